"""Inference backends: one small interface (base.py), one file per runtime, and the one place that chooses which
precision and which runtime serve each tower (``HQCLIP_PRECISION``, ``HQCLIP_BACKEND``; docs/precision.md).

Precision ``auto``: the first of ``PREFERENCE`` the repository has (every variant in it passed its parity gates at
export) and this CPU computes natively (services/backends/cpu.py). An explicit precision the CPU only emulates is
refused at start, unless ``HQCLIP_ALLOW_EMULATED`` asks to serve it anyway, with a warning.

Backend ``auto``: a variant runs on the runtime its parity was measured on (the manifest's ``runtime``); fp32 can
run on ONNX Runtime and, where OpenVINO is installed and its CPU plugin reports FP32, on OpenVINO. Their ranking
changes from one processor to the next (OpenVINO 1.2-1.5x faster on one AVX-512 Xeon, slower on the same machine
under load: docs/precision.md), which nothing the runtimes report predicts; so each tower runs a few batches on
both, alternating, and keeps the faster. The choice and its reasons go to the start-up log and ``/v1/models``.
"""

from __future__ import annotations

import logging
import sys
import time

import numpy as np

from hqclip.repo.manifest import Manifest
from hqclip.repo.tokenizer import load_tokenizer, trim_padding
from services.backends.base import Backend, BackendUnavailable, Load, Routed
from services.backends.cpu import Cpu, this_cpu
from services.settings import Settings

PREFERENCE = ("bf16", "int8", "fp32")  # fastest first where computed natively (docs/precision.md, "Measured")
UNITS = {"bf16": "AVX512-BF16 or AMX-BF16", "int8": "VNNI or AMX-INT8"}
EMULATION_COST = {"bf16": "a ViT-B-16 ran 40x slower in emulated bf16 than in fp32",
                  "int8": "int8 runs without dot-product units, on slower integer paths"}
MEASURE_ROUNDS = 3  # per runtime and tower, after one warm-up batch
MEASURE_TEXT = "a photo of a dog playing in the snow"  # a typical query's length
MEASURE_TEXTS = 8

log = logging.getLogger("hqclip.backends")


class EmulatedPrecision(ValueError):
    """HQCLIP_PRECISION names a precision this CPU has no units for; the message says what to do."""


def choose_precision(requested: str, manifest: Manifest, cpu: Cpu, allow_emulated: bool) -> tuple[str, str]:
    """(precision to serve, why)."""
    available = [manifest.precision, *manifest.variants]
    if requested == "auto":
        passed_over = []
        for precision in PREFERENCE:
            if precision not in available:
                continue
            if cpu.native(precision):
                skipped = f"; passed over: {', '.join(passed_over)}" if passed_over else ""
                return precision, (f"auto: the fastest precision in the repository ({', '.join(available)}) that "
                                   f"this CPU computes natively{skipped}")
            passed_over.append(f"{precision} (emulated here: no {UNITS[precision]})")
        raise ValueError(f"model '{manifest.name}' has no precision this CPU computes natively")
    manifest.towers(requested)  # a precision that was not exported: the error names the command that adds it
    if cpu.native(requested):
        return requested, f"HQCLIP_PRECISION={requested}"
    problem = (f"HQCLIP_PRECISION={requested}: this CPU ({cpu.model}) has no {UNITS[requested]}, so {requested} "
               f"would be emulated ({EMULATION_COST[requested]}, docs/precision.md)")
    if not allow_emulated:
        raise EmulatedPrecision(f"{problem}. Set HQCLIP_PRECISION=auto (or fp32) to serve what this CPU runs "
                                "natively, or HQCLIP_ALLOW_EMULATED=true to serve it anyway.")
    log.warning("%s; serving it anyway (HQCLIP_ALLOW_EMULATED=true)", problem)
    return requested, f"HQCLIP_PRECISION={requested}, EMULATED on this CPU (HQCLIP_ALLOW_EMULATED=true)"


def _runtime(name: str) -> type:
    if name == "openvino":
        from services.backends.openvino import OpenVinoBackend

        return OpenVinoBackend
    from services.backends.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend


def _candidates(settings: Settings, manifest: Manifest, precision: str, cpu: Cpu) -> tuple[list[str], str]:
    """The runtimes that may serve ``precision``'s towers, and why those."""
    variant = manifest.variants.get(precision)
    if variant is not None and variant.runtime == "openvino":
        return ["openvino"], f"the {precision} variant runs on OpenVINO (its parity was measured there)"
    if settings.backend != "auto":
        return [settings.backend], f"HQCLIP_BACKEND={settings.backend}"
    if variant is not None:
        return [variant.runtime], f"the {precision} variant runs on {variant.runtime} (its parity was measured there)"
    if "FP32" not in cpu.openvino:
        return ["onnxruntime"], "OpenVINO is not installed or reports no FP32 on this CPU"
    return ["onnxruntime", "openvino"], ""


def _sample(settings: Settings, manifest: Manifest, load: Load) -> np.ndarray:
    """A batch of the size the batcher sends: typical queries for a text tower, noise pixels for an image tower."""
    if load.text:
        ids = load_tokenizer(manifest.text.tokenizer, settings.model_repo)(
            [MEASURE_TEXT] * min(MEASURE_TEXTS, settings.batch.text_max_size, manifest.max_batch_size))[0]
        return trim_padding(ids, manifest.text.tokenizer.pad_id) if manifest.text.any_length else ids
    count = min(settings.batch.image_max_size, manifest.max_batch_size)
    return np.random.default_rng(0).integers(0, 256, (count, 3, *manifest.image.size), dtype=np.uint8)


def _fastest(candidates: dict[str, Backend], load: Load, inputs: np.ndarray) -> tuple[str, str]:
    """The runtime whose best batch time is lowest (the best of a few resists other load), alternating them."""
    best = {}
    for backend in candidates.values():  # warm-up: first calls allocate and tune
        backend.run(load.model, inputs)
    for _ in range(MEASURE_ROUNDS):
        for name, backend in candidates.items():
            start = time.perf_counter()
            backend.run(load.model, inputs)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    winner = min(best, key=best.get)
    speeds = ", ".join(f"{name} {len(inputs) / seconds:.1f}/s" for name, seconds in best.items())
    return winner, f"auto: measured at start, batches of {len(inputs)}, best of {MEASURE_ROUNDS}: {speeds}"


def _local(settings: Settings, manifest: Manifest, precision: str, cpu: Cpu) -> tuple[Backend, dict]:
    """The in-process backend serving each tower (and the tag head beside the image tower), and what was chosen."""
    image, text = manifest.towers(precision)
    fp32_towers = (manifest.image.model, manifest.text.model)  # a per-tower variant keeps one of them
    routes: dict[str, Backend] = {}
    towers = {}
    for tower, model in (("image", image), ("text", text)):
        computes = manifest.precision if model in fp32_towers else precision
        load = Load(model, manifest.version(model), computes, text=tower == "text")
        names, why = _candidates(settings, manifest, computes, cpu)
        built = {name: _runtime(name)(settings, [load]) for name in names}
        if len(built) == 1:
            chosen, reason = names[0], why
        else:
            chosen, reason = _fastest(built, load, _sample(settings, manifest, load))  # the other is dropped
        routes[load.model] = built[chosen]
        towers[tower] = {"model": load.model, "runtime": chosen, "why": reason}
    if manifest.tags:
        head = Load(manifest.tags.model, manifest.version(manifest.tags.model))
        routes[head.model] = _runtime(towers["image"]["runtime"])(settings, [head])
    return Routed(routes), towers


def _show_info(level: str) -> None:
    """The choice is logged before uvicorn configures logging: give this logger uvicorn's look and level."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level.upper())


def create_backend(settings: Settings, manifest: Manifest, cpu: Cpu | None = None) -> Backend:
    """The backend serving the manifest's model at the precision and on the runtimes chosen for this CPU."""
    _show_info(settings.log_level)
    cpu = cpu or this_cpu()
    if settings.backend == "triton":
        from services.backends.triton import TritonBackend

        # Triton runs on its own machine's devices: auto serves the exported fp32 towers there.
        precision = manifest.precision if settings.precision == "auto" else settings.precision
        why = "HQCLIP_BACKEND=triton serves the exported towers" if settings.precision == "auto" else \
            f"HQCLIP_PRECISION={precision}"
        manifest.towers(precision)
        backend: Backend = TritonBackend(settings.model_copy(update={"precision": precision}), manifest)
        towers = {tower: {"model": model, "runtime": "triton", "why": "HQCLIP_BACKEND=triton"}
                  for tower, model in zip(("image", "text"), manifest.towers(precision))}
    else:
        precision, why = choose_precision(settings.precision, manifest, cpu, settings.allow_emulated)
        backend, towers = _local(settings, manifest, precision, cpu)
    backend.precision = precision
    backend.choice = {"precision": precision, "precision_why": why, "towers": towers, "cpu": cpu.summary()}
    log.info("serving %s in %s (%s) on %s", manifest.name, precision, why, cpu.summary())
    for tower, chosen in towers.items():
        log.info("%s tower %s on %s (%s)", tower, chosen["model"], chosen["runtime"], chosen["why"])
    return backend


__all__ = ["Backend", "BackendUnavailable", "EmulatedPrecision", "create_backend"]
