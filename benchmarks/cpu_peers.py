"""CPU serving against its peers, one run: the physical limit, the gateway (fp32 on ONNX Runtime and on OpenVINO,
and with its default settings: HQCLIP_PRECISION=auto and HQCLIP_BACKEND=auto), a plain FastAPI + open_clip server
and infinity-emb (where installed), all on ViT-B-16 shapes and 224 px JPEGs.

    bash benchmarks/peers/setup_infinity.sh                      # infinity-emb in build/venvs/infinity (once)
    nice -n 10 .venv/bin/python benchmarks/cpu_peers.py          # appends to benchmarks/RESULTS.md

The gateway serves random weights by default. ``--model`` serves a trained ViT-B-16 instead, so that its int8
variant is gated on a model whose zero-shot accuracy means something (benchmarks/vitb16_digits.py trains one on
MNIST digits; its variants are gated on the offline digit set, ``--eval-data none``):

    nice -n 10 .venv/bin/python benchmarks/cpu_peers.py --model build/vitb16-digits/model --eval-data none \
        --variants int8

The peers run random weights of the same architecture either way: their speed does not depend on the values.

What it measures, in this order:
1. the machine (services/backends/cpu.py: AVX512-BF16, AMX, VNNI) and its matrix-multiply GFLOP/s in fp32 and,
   where the CPU has bf16 units, bf16 (torch, oneDNN; numpy for fp32), alternating rounds; the model's GFLOP per
   image (torch's flop counter on open_clip's ViT-B-16 image tower); limit = GFLOP/s / GFLOP per image;
2. the model repository (``vitb16``: ``hqclip export ViT-B-16``, or ``--model``, plus the ``--variants`` this CPU
   computes natively, each through its parity gates), built once per model (``model_repo(model)``); the Hugging
   Face CLIP folder for infinity;
3. the variants' in-process speed (batch 8), to pick the fastest one that passed its gates;
4. the servers at once, each measured for ``--seconds`` per cell and round, servers in rotating order within each
   cell so drift cancels: concurrency 1 and 8, 1 and 8 images per request; images/s, p50/p99 latency, RSS.
Targets (issue 15): the default gateway >= 1.2x the best fp32 peer and >= 0.85x the fp32 limit; where a variant
passed, the fastest one >= 2x the best peer.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import machine_line, record  # noqa: E402
from hqclip.jobs.precision import EmulatedPrecision, GateFailed, check_native, export_precision, tower_runner  # noqa: E402
from hqclip.repo.layout import onnx_path  # noqa: E402
from hqclip.repo.manifest import load_manifest  # noqa: E402
from hqclip.repo.preprocess import ImagePreprocessor  # noqa: E402
from services.backends.cpu import this_cpu  # noqa: E402
from testkit.processes import free_port  # noqa: E402

BUILD = ROOT / "build" / "peers"
RANDOM_WEIGHTS = "ViT-B-16"
HF_CLIP = BUILD / "hf-clip-vit-b-16"
INFINITY = ROOT / "build" / "venvs" / "infinity"
MODEL = "vitb16"
PICTURES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina", "cat", "hubble_deep_field")
CELLS = ((1, 1), (1, 8), (8, 1), (8, 8))  # (concurrency, images per request)
STARTUP_TIMEOUT_S = 900  # four ViT-B-16 servers loading on two shared cores


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- 1. the machine and its limit ---

def machine() -> dict[str, str]:
    return {"cpu": machine_line(), "memory_gib": f"{psutil.virtual_memory().total / 2**30:.0f}",
            "load": ", ".join(f"{x:.1f}" for x in os.getloadavg())}


def matmul_gflops(kind: str, n: int = 2048, seconds: float = 1.5) -> float:
    """Best GFLOP/s of an n x n matrix multiply in ``kind`` (torch-fp32, torch-bf16, numpy-fp32) over ``seconds``."""
    import torch

    if kind == "numpy-fp32":
        a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        run = lambda: a @ a
    else:
        a = torch.randn(n, n, dtype=torch.bfloat16 if kind == "torch-bf16" else torch.float32)
        run = lambda: torch.mm(a, a)
    run()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        run()
        best = max(best, 2 * n**3 / (time.perf_counter() - started) / 1e9)
    return best


def model_gflop() -> float:
    """GFLOP of one 224 px image through open_clip's ViT-B-16 image tower (multiply-add = 2 FLOP)."""
    import open_clip
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused fast path hides attention from the counter
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encode_image(torch.zeros(1, 3, 224, 224))
    return counter.get_total_flops() / 1e9


# --- 2. the models ---

def model_repo(model: str) -> Path:
    """Where ``model`` is exported: ``build/peers/model_repo`` for the random-weight ViT-B-16, else a repository
    named after the trained model's path (so a trained model never mixes with the random one's variants)."""
    if model == RANDOM_WEIGHTS:
        return BUILD / "model_repo"
    return BUILD / ("model_repo-" + "-".join(Path(model).resolve().parts[-2:]))


def prepare(repo: Path, model: str, eval_data: Path | None, eval_images: int, variants: list[str]
            ) -> dict[str, str]:
    """The exported repository with its variants (gates decide which exist) and the Hugging Face folder."""
    if not (repo / f"{MODEL}.manifest.json").is_file():
        log(f"exporting {model} to {repo}")
        subprocess.run([sys.executable, "-m", "hqclip.cli", "export", model, "--out", str(repo), "--name",
                        MODEL], cwd=ROOT, check=True)
    outcome = {}
    for precision in variants:
        try:
            check_native(precision, force=False)
        except EmulatedPrecision as exc:  # the gateway would refuse to serve it here
            outcome[precision] = f"not built: {exc}"
            continue
        if precision in load_manifest(repo, MODEL).variants:
            outcome[precision] = "passed"
            continue
        log(f"building the {precision} variant through its gates ({eval_images} evaluation images)")
        try:
            export_precision(repo, precision, name=MODEL, data=eval_data, max_images=eval_images,
                             max_calibration=32)
            outcome[precision] = "passed"
        except GateFailed as exc:
            outcome[precision] = f"failed: {exc}"
    if INFINITY.is_dir() and not (HF_CLIP / "model.safetensors").is_file():
        subprocess.run([str(INFINITY / "bin" / "python"), str(ROOT / "benchmarks" / "peers" / "hf_clip.py"),
                        str(HF_CLIP)], check=True)
    return outcome


def photos() -> list[bytes]:
    """224 x 224 JPEG photos (scikit-image's bundled pictures, centre square)."""
    from skimage import data as skdata

    encoded = []
    for name in PICTURES:
        array = getattr(skdata, name)()
        image = Image.fromarray(array[..., :3] if array.ndim == 3 else array).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        buffer = io.BytesIO()
        image.crop((left, top, left + side, top + side)).resize((224, 224), Image.Resampling.BICUBIC).save(
            buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded


def in_process_speed(repo: Path, precision: str, pixels: np.ndarray, reps: int = 3) -> float:
    """Images/s of the variant's image tower at batch 8 in this process (the runtime the gateway uses)."""
    manifest = load_manifest(repo, MODEL)
    model = manifest.towers(precision)[0]
    run = tower_runner(onnx_path(repo, model), precision)
    run(pixels)
    best = 0.0
    for _ in range(reps):
        started = time.perf_counter()
        run(pixels)
        best = max(best, len(pixels) / (time.perf_counter() - started))
    return best


# --- 4. servers and load ---

@dataclass
class Server:
    name: str
    url: str
    payload: dict
    process: subprocess.Popen
    rss: list[float] = field(default_factory=list)

    def sample_rss(self) -> None:
        process = psutil.Process(self.process.pid)
        self.rss.append(sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start(name: str, command: list[str], env: dict[str, str], port: int, path: str, payload: dict,
          health: str = "/health") -> Server:
    logfile = BUILD / f"{name}.log"
    with open(logfile, "wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:  # poll until ready: a slow start is not a failure, an exit is
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}: see {logfile}")
        try:
            if httpx.get(url + health, timeout=60).status_code == 200:
                return Server(name, url + path, payload, process)
        except httpx.TransportError:
            pass
        time.sleep(1)
    process.kill()
    raise RuntimeError(f"{name} not ready after {STARTUP_TIMEOUT_S}s: see {logfile}")


def start_servers(repo: Path, started: list[Server]) -> None:
    """Start the servers into ``started`` (so the caller stops those that did start if one fails)."""
    python = sys.executable
    gateway_env = {"HQCLIP_MODEL_REPO": str(repo), "HQCLIP_MODEL": MODEL, "HQCLIP_LOG_LEVEL": "info"}
    image_request = {"model": MODEL, "modality": "image", "encoding_format": "float"}
    for name, settings in (("gateway fp32, ONNX Runtime", {"HQCLIP_PRECISION": "fp32",
                                                           "HQCLIP_BACKEND": "onnxruntime"}),
                           ("gateway fp32, OpenVINO", {"HQCLIP_PRECISION": "fp32", "HQCLIP_BACKEND": "openvino"}),
                           ("gateway defaults (auto)", {})):
        port = free_port()
        index = BUILD / "collections" / name  # its own empty index folder: never the user's data/collections
        shutil.rmtree(index, ignore_errors=True)
        started.append(start(name, [python, "-m", "hqclip.cli", "serve"],
                             {**gateway_env, **settings, "HQCLIP_PORT": str(port), "HQCLIP_INDEX__DIR": str(index)},
                             port, "/v1/embeddings", image_request, "/ready"))
    port = free_port()
    started.append(start("FastAPI + open_clip", [python, "benchmarks/peers/openclip_server.py", "--model", "ViT-B-16",
                                                 "--port", str(port)], {}, port, "/embeddings", {}))
    if not INFINITY.is_dir():
        log(f"infinity-emb is not installed in {INFINITY} (bash benchmarks/peers/setup_infinity.sh): left out")
        return
    port = free_port()
    started.append(start("infinity-emb", [str(INFINITY / "bin" / "infinity_emb"), "v2", "--model-id", str(HF_CLIP),
                                          "--served-model-name", "clip", "--port", str(port), "--device", "cpu",
                                          "--engine", "torch", "--log-level", "warning"],
                         {"HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"}, port,
                         "/embeddings", {"model": "clip", "modality": "image"}))


async def load(server: Server, images: list[str], concurrency: int, per_request: int, seconds: float
               ) -> tuple[int, float, list[float]]:
    """(images embedded, elapsed s, request latencies s) of ``concurrency`` clients posting for ``seconds``."""
    latencies: list[float] = []
    done = 0
    deadline = time.perf_counter() + seconds

    async def client(worker: int, http: httpx.AsyncClient) -> None:
        nonlocal done
        i = worker
        while time.perf_counter() < deadline:
            batch = [images[(i + k) % len(images)] for k in range(per_request)]
            i += per_request
            started = time.perf_counter()
            response = await http.post(server.url, json={**server.payload, "input": batch})
            if response.status_code != 200:
                raise RuntimeError(f"{server.name}: {response.status_code} {response.text[:300]}")
            latencies.append(time.perf_counter() - started)
            done += len(response.json()["data"])

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(w, http) for w in range(concurrency)))
        return done, time.perf_counter() - started, latencies


# --- the run ---

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="Per server, cell and round.")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--eval-images", type=int, default=64, help="Parity images when building a variant.")
    parser.add_argument("--variants", default="bf16,int8", help="Variants to build (each through its gates).")
    parser.add_argument("--model", default=RANDOM_WEIGHTS,
                        help="What the gateway serves: a ViT-B-16 `hqclip export` loads (a trained checkpoint file "
                        "or folder, e.g. build/vitb16-digits/model); default: random weights.")
    parser.add_argument("--eval-data", default=str(ROOT / "build" / "demo" / "data"),
                        help="Parity data for the variants' gates: the demo's held-out set, or 'none' for the "
                        "offline set (scikit-image pictures + MNIST digits; docs/precision.md).")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS.md",
                        help="Markdown file the report is appended to, as a section.")
    args = parser.parse_args()
    BUILD.mkdir(parents=True, exist_ok=True)

    host = machine()
    log(f"machine: {host}")
    gflop = model_gflop()
    kinds = ["torch-fp32", "numpy-fp32"] + (["torch-bf16"] if this_cpu().bf16_native else [])  # emulated: minutes
    gflops: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(3):
        for kind in gflops:
            gflops[kind].append(matmul_gflops(kind))
    peak = {kind: statistics.median(values) for kind, values in gflops.items()}
    log(f"model {gflop:.1f} GFLOP/image; matmul GFLOP/s {peak}")

    repo = model_repo(args.model)
    eval_data = None if args.eval_data.lower() == "none" else Path(args.eval_data)
    gates = prepare(repo, args.model, eval_data, args.eval_images, [v for v in args.variants.split(",") if v])
    log(f"variants: {gates}")
    manifest = load_manifest(repo, MODEL)
    host["model"] = f"{manifest.architecture}, weights: {manifest.weights}"
    preprocess = ImagePreprocessor(manifest.image, 1 << 30, 1 << 30)
    jpegs = photos()
    pixels = np.stack([preprocess(jpegs[i % len(jpegs)]) for i in range(8)])
    speeds = {p: [] for p in ("fp32", *manifest.variants)}
    for _ in range(2):
        for precision in speeds:
            speeds[precision].append(in_process_speed(repo, precision, pixels))
    speed = {p: statistics.median(v) for p, v in speeds.items()}
    variant = max(manifest.variants, key=speed.get, default=None)
    log(f"in-process images/s at batch 8: {speed}; fastest variant: {variant}")

    data_uris = [f"data:image/jpeg;base64,{base64.b64encode(j).decode()}" for j in jpegs]
    running: list[Server] = []
    results: dict[tuple[str, int, int], dict] = {}
    try:
        start_servers(repo, running)
        chosen = (BUILD / "gateway defaults (auto).log").read_text().splitlines()
        host["auto"] = "; ".join(line.removeprefix("INFO:").strip() for line in chosen
                                 if line.startswith("INFO:     serving") or " tower " in line)
        for server in running:  # warm-up: first requests pay for allocations and lazy initialisation
            asyncio.run(load(server, data_uris, 2, 8, 3.0))
        for concurrency, per_request in CELLS:
            totals = {s.name: [0, 0.0, []] for s in running}
            for round_ in range(args.rounds):
                order = running[round_ % len(running):] + running[:round_ % len(running)]
                for server in order:
                    done, elapsed, latencies = asyncio.run(load(server, data_uris, concurrency, per_request,
                                                                args.seconds))
                    server.sample_rss()
                    totals[server.name][0] += done
                    totals[server.name][1] += elapsed
                    totals[server.name][2] += latencies
            for server in running:
                done, elapsed, latencies = totals[server.name]
                cell = results[(server.name, concurrency, per_request)] = {
                    "images_per_s": done / elapsed, "p50_ms": 1000 * float(np.percentile(latencies, 50)),
                    "p99_ms": 1000 * float(np.percentile(latencies, 99)), "requests": len(latencies)}
                log(f"c={concurrency} n={per_request} {server.name}: {cell}")
        rss = {s.name: max(s.rss) for s in running}
    finally:
        for server in running:
            server.stop()

    report = render(host, gflop, peak, gates, speed, variant, running, results, rss, args)
    record("\n".join("#" + line if line.startswith("#") else line for line in report.splitlines()), args.out)
    (BUILD / "results-cpu.json").write_text(json.dumps(
        {"machine": host, "gflop": gflop, "matmul": peak, "gates": gates, "in_process": speed,
         "results": {f"{k[0]} c={k[1]} n={k[2]}": v for k, v in results.items()}, "rss_mib": rss}, indent=1))
    print(report)


def render(host, gflop, peak, gates, speed, variant, running, results, rss, args) -> str:
    fp32_limit = peak["torch-fp32"] / gflop
    bf16_limit = peak["torch-bf16"] / gflop if "torch-bf16" in peak else None
    names = [s.name for s in running]
    gateways, peers = names[:3], names[3:]  # the order start_servers starts them
    auto = gateways[2]
    lines = [
        "# CPU serving vs peers (benchmarks/cpu_peers.py)", "",
        f"{machine_line()} At the start, when the matmul limit was measured: {host['load']}. Memory "
        f"{host['memory_gib']} GiB.",
        f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {args.rounds} rounds x {args.seconds:.0f} s per "
        "server and cell, servers in rotating order; 224 px JPEG photos. The gateway serves "
        f"{host['model']}; the peers serve random weights of the same architecture.", "",
        "## The physical limit", "",
        "| | value |", "|---|---|",
        f"| ViT-B-16 image tower, GFLOP per image (torch flop counter) | {gflop:.1f} |",
        f"| matmul GFLOP/s fp32 (torch / numpy) | {peak['torch-fp32']:.0f} / {peak['numpy-fp32']:.0f} |",
        f"| matmul GFLOP/s bf16 (torch, oneDNN) | {peak['torch-bf16']:.0f} |" if bf16_limit else
        "| matmul GFLOP/s bf16 | not measured: no bf16 units (emulated) |",
        f"| limit fp32, images/s | {fp32_limit:.2f} |",
        f"| limit bf16, images/s | {bf16_limit:.2f} |" if bf16_limit else "| limit bf16, images/s | - |", "",
        "## Variants (gates at export, then in-process speed at batch 8)", "",
        "| precision | gates | in-process images/s |", "|---|---|---|",
        f"| fp32 | reference | {speed['fp32']:.2f} |",
        *[f"| {p} | {gates.get(p, '')[:160]} | {speed[p]:.2f} |" if p in speed else
          f"| {p} | {gates.get(p, 'not built in this run')[:200]} | - |" for p in ("bf16", "int8")],
        f"\nFastest variant at parity: **{variant or 'none'}**. What the defaults chose (start-up log): "
        f"{host.get('auto', '?')}", "",
        "## Through HTTP", "",
        "| server | concurrency | images/request | images/s | p50 ms | p99 ms | requests |",
        "|---|---|---|---|---|---|---|",
    ]
    for concurrency, per_request in CELLS:
        for name in names:
            r = results[(name, concurrency, per_request)]
            lines.append(f"| {name} | {concurrency} | {per_request} | {r['images_per_s']:.2f} | {r['p50_ms']:.0f} | "
                         f"{r['p99_ms']:.0f} | {r['requests']} |")
    best = {name: max(results[(name, c, n)]["images_per_s"] for c, n in CELLS) for name in names}
    c8 = {name: results[(name, 8, 8)]["images_per_s"] for name in names}
    best_peer = max(peers, key=c8.get)
    lines += ["", "| server | best images/s | peak RSS MiB |", "|---|---|---|",
              *[f"| {name} | {best[name]:.2f} | {rss[name]:.0f} |" for name in names], "",
              "## Targets (concurrency 8 x 8 images)", "",
              f"- defaults vs the best fp32 peer ({best_peer}): {c8[auto]:.2f} / {c8[best_peer]:.2f} = "
              f"**{c8[auto] / c8[best_peer]:.2f}x** (target >= 1.2x)",
              f"- defaults vs the fp32 limit: {c8[auto]:.2f} / {fp32_limit:.2f} = **{c8[auto] / fp32_limit:.2f}x** "
              "(target >= 0.85x)",
              *[f"- fp32 {g.split(', ')[1]} vs the best peer: {c8[g] / c8[best_peer]:.2f}x" for g in gateways[:2]], ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
