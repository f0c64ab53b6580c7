"""The image tower on a GPU: images/s per runtime, precision and batch size, against the card's matmul peak.

For a GPU host (goal: ViT-B-16 >= 11,000 images/s on one H100). It exports the tower with `hqclip export` (the
exact ONNX file Triton serves: uint8 pixels in, normalisation in-graph), then times, side by side in one run:
  ort-cuda       ONNX Runtime, CUDA execution provider (fp16: the graph converted with onnxconverter-common)
  ort-trt        ONNX Runtime, TensorRT execution provider (what `hqclip export --tensorrt accelerator` uses)
  torch-eager    the open_clip model in PyTorch (fp16, bf16: autocast)
  torch-cudagraph  the eager model captured once into a CUDA graph and replayed (no Python, no launch gaps)
  torch-compile  the same model through torch.compile (default mode)
  torch-compile-cudagraph  torch.compile(mode="reduce-overhead"): compiled kernels replayed as CUDA graphs
and the retrieval indexes (FAISS flat and ivfpq, GPU vs CPU, via benchmarks/gpu_index_bench.py).
Inputs already sit on the device (a server copies 150 KB of uint8 per
image, about 1.6 GB/s at the goal); each row is the best of --repeats timed windows after warm-up.
The "% peak" column is achieved FLOP/s (the timed tower's FLOPs, counted by torch's FlopCounterMode with autograd
on, so that nn.MultiheadAttention's fused inference path cannot hide its projections) over the matmul FLOP/s
measured on this card at the same precision (fp32 rows: TF32 matmuls, as ONNX Runtime's CUDA provider and torch
with set_float32_matmul_precision("high") run them): the card's limit in images/s is that peak over those FLOPs.
The ONNX file is exported (`hqclip export`) only when an ort-* runtime is asked for.

    pip install -e '.[train,serve]' && pip uninstall -y onnxruntime faiss-cpu   # their GPU builds replace them
    pip install onnxruntime-gpu onnxconverter-common tensorrt-cu12 faiss-gpu-cu12
    python benchmarks/gpu_bench.py                        # everything, ViT-B-16, batch 1..256
    python benchmarks/gpu_bench.py --runtimes ort-trt --precisions fp16 --batch-sizes 64,128,256 --record
    python benchmarks/gpu_bench.py --device cpu --model <tiny checkpoint folder> --batch-sizes 1,4   # smoke test
    python benchmarks/gpu_bench.py --runtimes torch-eager,torch-cudagraph,torch-compile --precisions bf16 \
        --compiled-batch-sizes 256 --faiss-vectors 0        # torch only (what benchmarks/gpu_check.sh runs)

A runtime that cannot run here (no TensorRT libraries, no faiss GPU build) gets a row saying why and what to
install, instead of stopping the run. --record appends the table, with the card's name, to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import RESULTS, record  # noqa: E402
from hqclip.repo.layout import onnx_path  # noqa: E402
from hqclip.repo.manifest import load_manifest  # noqa: E402
from training.export import default_name, export_checkpoint  # noqa: E402
from training.models import load_model  # noqa: E402
from training.onnx_towers import IMAGE_INPUT, ImageTower  # noqa: E402

RUNTIMES = ("ort-cuda", "ort-trt", "torch-eager", "torch-cudagraph", "torch-compile", "torch-compile-cudagraph")
CPU_RUNTIMES = ("ort-cpu", "torch-eager")  # --device cpu: a smoke test of this script, not a benchmark
COMPILED = {"torch-compile": "default", "torch-compile-cudagraph": "reduce-overhead"}  # runtime: torch.compile mode
AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}  # precisions torch runs through autocast
GOAL = {"model": "ViT-B-16", "images_per_s": 11_000, "card": "H100"}


@dataclass
class Row:
    runtime: str
    precision: str
    batch: int
    images_per_s: float | None = None
    latency_ms: float | None = None
    peak_fraction: float | None = None
    note: str = ""


class Unavailable(RuntimeError):
    """This runtime cannot run on this host; the message says what to install."""


# --- timing ---
def throughput(step: Callable[[], object], sync: Callable[[], None], batch: int, seconds: float, repeats: int,
               warmup: int, min_calls: int = 3) -> tuple[float, float]:
    """(images/s, ms per batch) of the best of ``repeats`` windows of about ``seconds`` each."""
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    step()
    sync()
    per_call = max(time.perf_counter() - start, 1e-6)
    calls = max(min_calls, int(seconds / per_call))
    windows = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            step()
        sync()
        windows.append((time.perf_counter() - start) / calls)
    best = min(windows)
    return batch / best, best * 1000


def matmul_peak(device: str, precision: str, n: int = 8192, seconds: float = 2.0) -> float:
    """Measured dense matmul FLOP/s at ``precision`` (fp32: TF32 allowed on GPUs)."""
    if device == "cpu":
        n = 2048
    dtype = AUTOCAST.get(precision, torch.float32) if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    per_s, _ = throughput(lambda: a @ b, lambda: sync_torch(device), 1, seconds, 3, 3)
    return 2 * n**3 * per_s


def sync_torch(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def flops_per_image(tower: torch.nn.Module, size: tuple[int, int]) -> float:
    """FLOPs of one image through ``tower`` (on the CPU). Autograd stays on: under no_grad nn.MultiheadAttention
    takes a fused kernel that FlopCounterMode does not see (ViT-B-16 would count 22.5 GFLOP instead of 33.7)."""
    from torch.utils.flop_counter import FlopCounterMode

    pixels = torch.zeros(1, 3, *size, dtype=torch.uint8)
    counter = FlopCounterMode(display=False)
    with counter:
        tower(pixels)
    return float(counter.get_total_flops())


# --- runtimes: each returns a step function for one batch, inputs already on the device ---
def ort_session(onnx_path: Path, runtime: str, precision: str, device: str, workdir: Path, max_batch: int,
                size: tuple[int, int]):
    import onnxruntime as ort

    if precision not in ("fp32", "fp16"):
        raise Unavailable(f"the ONNX tower runs in fp32 or fp16 here; {precision} rows are torch's")
    if runtime == "ort-cpu":
        if precision != "fp32":
            raise Unavailable("ort-cpu runs fp32 only")
        return ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]), "cpu"
    if device == "cpu":
        raise Unavailable(f"{runtime} needs --device cuda")
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise Unavailable(f"onnxruntime has no CUDA provider ({available}): pip install onnxruntime-gpu")
    if runtime == "ort-cuda":
        path = onnx_path if precision == "fp32" else fp16_graph(onnx_path, workdir)
        providers = [("CUDAExecutionProvider", {"use_tf32": 1}), "CPUExecutionProvider"]
    else:
        if "TensorrtExecutionProvider" not in available:
            raise Unavailable("onnxruntime has no TensorRT provider: pip install onnxruntime-gpu tensorrt-cu12")
        shape = "x".join(str(d) for d in (3, *size))
        options = {
            "trt_fp16_enable": precision == "fp16",
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(workdir / "trt_cache"),
            "trt_builder_optimization_level": 5,
            "trt_profile_min_shapes": f"{IMAGE_INPUT}:1x{shape}",
            "trt_profile_opt_shapes": f"{IMAGE_INPUT}:{max_batch}x{shape}",
            "trt_profile_max_shapes": f"{IMAGE_INPUT}:{max_batch}x{shape}",
        }
        path, providers = onnx_path, [("TensorrtExecutionProvider", options), "CUDAExecutionProvider"]
    session = ort.InferenceSession(str(path), providers=providers)
    if session.get_providers()[0] != providers[0][0]:
        raise Unavailable(f"{providers[0][0]} did not load (see onnxruntime's log): check CUDA/cuDNN/TensorRT libs")
    return session, "cuda"


def fp16_graph(onnx_path: Path, workdir: Path) -> Path:
    """The graph with fp16 weights and compute; uint8 input and fp32 output kept (keep_io_types)."""
    target = workdir / "image_fp16.onnx"
    if not target.exists():
        try:
            import onnx
            from onnxconverter_common import float16
        except ImportError as exc:
            raise Unavailable("fp16 ONNX needs onnxconverter-common: pip install onnxconverter-common") from exc
        converted = float16.convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
        onnx.save(converted, str(target))
    return target


def ort_step(session, device: str, pixels: np.ndarray) -> tuple[Callable[[], object], Callable[[], None]]:
    import onnxruntime as ort

    binding = session.io_binding()
    value = ort.OrtValue.ortvalue_from_numpy(pixels, device, 0)
    binding.bind_ortvalue_input(IMAGE_INPUT, value)
    binding.bind_output(session.get_outputs()[0].name, device)
    return (lambda: session.run_with_iobinding(binding)), (lambda: None)  # run_with_iobinding waits for the GPU


def torch_step(tower: torch.nn.Module, runtime: str, precision: str, device: str, pixels: np.ndarray):
    if runtime in COMPILED:
        torch._dynamo.reset()  # a fresh compile per shape: dynamo's per-function cache holds only 8
        tower = torch.compile(tower, dynamic=False, mode=COMPILED[runtime])
    x = torch.from_numpy(pixels).to(device)
    # A graph replays the casts it captured: autocast must not hand it cached casts that are freed after capture.
    autocast = torch.autocast(device_type=device, dtype=AUTOCAST.get(precision, torch.float32),
                              enabled=precision in AUTOCAST, cache_enabled=runtime != "torch-cudagraph")

    def step():
        with torch.inference_mode(), autocast:
            return tower(x)

    if runtime == "torch-cudagraph":
        return cuda_graph(step, device), lambda: sync_torch(device)
    return step, lambda: sync_torch(device)


def cuda_graph(step: Callable[[], object], device: str) -> Callable[[], object]:
    """``step`` captured once into a CUDA graph (after warm-up on a side stream, as capture requires); each call
    replays it on the same input buffer."""
    if device != "cuda":
        raise Unavailable("torch-cudagraph needs --device cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


# --- FAISS, through the gateway's own index code (benchmarks/gpu_index_bench.py) ---
def faiss_rows(vectors: int, queries: int, rounds: int) -> list[dict]:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return [{"kind": "flat, ivfpq", "n": vectors, "where": "-",
                 "note": "faiss is not installed here: pip install faiss-gpu-cu12 (the gpu extra)"}]
    from benchmarks.gpu_index_bench import K
    from benchmarks.gpu_index_bench import run as index_run
    from benchmarks.index_bench import clustered
    from services.index.vectors import gpu_resources

    gpu = gpu_resources()
    base, query = clustered(vectors, seed=1), clustered(queries, seed=2)
    rows = []
    for kind in ("flat", "ivfpq"):
        cpu_row, cpu_found = index_run(kind, base, query, None, rounds)
        rows.append(cpu_row)
        if gpu is None:
            rows.append({"kind": kind, "n": vectors, "where": "gpu",
                         "note": "FAISS sees no GPU: pip install faiss-gpu-cu12 in place of faiss-cpu"})
            continue
        gpu_row, gpu_found = index_run(kind, base, query, gpu, rounds)
        gpu_row["agreement"] = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(cpu_found, gpu_found)]))
        rows.append(gpu_row)
    return rows


# --- the run ---
def export_tower(model: str, workdir: Path, max_batch: int) -> Path:
    """The image tower's ONNX file as `hqclip export` writes it (reused when already exported)."""
    repo = workdir / "model_repo"
    name = default_name(model)
    if not (repo / f"{name}.manifest.json").exists():
        print(f"exporting {model} to {repo} (once) ...", flush=True)
        export_checkpoint(model, out=repo, name=name, max_batch_size=max_batch)
    manifest = load_manifest(repo, name)
    return onnx_path(repo, manifest.image.model)


def card_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()})"


def run(args: argparse.Namespace) -> tuple[list[Row], list[dict], dict]:
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU visible to torch: run on a GPU host, or pass --device cpu for a smoke test")
    torch.set_float32_matmul_precision("high")  # fp32 rows: TF32 matmuls, like ONNX Runtime's CUDA provider
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    compiled_batches = [int(b) for b in (args.compiled_batch_sizes or args.batch_sizes).split(",")]
    onnx_path = None  # exported when the first ort-* runtime needs it

    loaded = load_model(args.model)
    size = tuple(loaded.preprocess_cfg["size"])
    tower = ImageTower(loaded.model, loaded.preprocess_cfg["mean"], loaded.preprocess_cfg["std"]).eval()
    flops = flops_per_image(tower, size)
    tower = tower.to(device)
    precisions = args.precisions.split(",")
    peaks = {p: matmul_peak(device, p) for p in precisions}
    facts = {"card": card_name(device), "model": args.model, "image_size": list(size), "gflops_per_image": flops / 1e9,
             "matmul_peak_tflops": {p: v / 1e12 for p, v in peaks.items()}, "torch": torch.__version__,
             "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    print(json.dumps(facts), flush=True)

    rng = np.random.default_rng(0)
    rows = []
    for runtime in args.runtimes.split(","):
        for precision in precisions:
            try:
                session = None
                if runtime.startswith("ort"):
                    onnx_path = onnx_path or export_tower(args.model, workdir, max(batches))
                    session, where = ort_session(onnx_path, runtime, precision, device, workdir, max(batches), size)
                for batch in compiled_batches if runtime in COMPILED else batches:
                    row = Row(runtime, precision, batch)
                    pixels = rng.integers(0, 256, (batch, 3, *size), dtype=np.uint8)
                    try:
                        if session is not None:
                            step, sync = ort_step(session, where, pixels)
                        else:
                            step, sync = torch_step(tower, runtime, precision, device, pixels)
                        row.images_per_s, row.latency_ms = throughput(step, sync, batch, args.seconds, args.repeats,
                                                                      args.warmup)
                        row.peak_fraction = row.images_per_s * flops / peaks[precision]
                    except Unavailable:
                        raise
                    except Exception as exc:  # out of memory at a large batch, say: a row, not the end of the run
                        row.note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    rows.append(row)
                    print(format_row(row), flush=True)
            except Unavailable as exc:  # the whole runtime cannot run here: one row says why
                rows.append(Row(runtime, precision, 0, note=str(exc)))
                print(format_row(rows[-1]), flush=True)
    faiss = faiss_rows(args.faiss_vectors, args.faiss_queries, args.faiss_rounds) if args.faiss_vectors else []
    facts["faiss"] = f"{args.faiss_vectors:,} vectors, {args.faiss_queries:,} queries, top 10"
    return rows, faiss, facts


def format_row(row: Row) -> str:
    if row.images_per_s is None:
        return f"| {row.runtime} | {row.precision} | {row.batch or 'all'} | - | - | - | {row.note} |"
    return (f"| {row.runtime} | {row.precision} | {row.batch} | {row.images_per_s:,.0f} | {row.latency_ms:.2f} "
            f"| {100 * row.peak_fraction:.1f}% | {row.note} |")


def table(rows: list[Row], faiss: list[dict], facts: dict) -> str:
    best = max((r for r in rows if r.images_per_s), key=lambda r: r.images_per_s, default=None)
    lines = [
        f"### GPU bench: {facts['model']} image tower on {facts['card']} ({facts['at']})",
        "",
        f"{facts['gflops_per_image']:.3g} GFLOP per image (the timed tower); measured matmul peak "
        + ", ".join(f"{p} {v:.3g} TFLOP/s (limit {limit(facts, p):,.0f} images/s)"
                    for p, v in facts["matmul_peak_tflops"].items())
        + f"; torch {facts['torch']}.",
        "",
        "| runtime | precision | batch | images/s | ms/batch | % peak | note |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *(format_row(r) for r in rows),
    ] + ([
        "",
        f"| FAISS index ({facts['faiss']}) | where | queries/s | single query p50 ms | top-10 agreement | note |",
        "| --- | --- | --- | --- | --- | --- |",
        *(f"| {f['kind']} | {f['where']} | {f['qps']:,.0f} | {f['p50']:.2f} "
          f"| {format(f['agreement'], '.3f') if 'agreement' in f else '-'} | |"
          if "qps" in f else f"| {f['kind']} | {f['where']} | - | - | - | {f['note']} |" for f in faiss),
    ] if faiss else [])
    if best:
        goal = f"goal {GOAL['images_per_s']:,} images/s for {GOAL['model']} on an {GOAL['card']}"
        lines += ["", f"Best: {best.runtime} {best.precision} batch {best.batch}: {best.images_per_s:,.0f} images/s, "
                      f"{best.images_per_s / limit(facts, best.precision):.2f}x the {best.precision} limit ({goal})."]
    return "\n".join(lines) + "\n"


def limit(facts: dict, precision: str) -> float:
    """Images/s if every FLOP ran at the measured matmul peak."""
    return facts["matmul_peak_tflops"][precision] * 1e12 / (facts["gflops_per_image"] * 1e9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16", help="open_clip name or checkpoint folder (random weights "
                        "for a name: throughput does not depend on them).")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES),
                        help=f"Comma-separated, of {', '.join(RUNTIMES + CPU_RUNTIMES[:1])}.")
    parser.add_argument("--precisions", default="fp16,fp32")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128,256")
    parser.add_argument("--compiled-batch-sizes", help="Batch sizes of the torch-compile* runtimes (each one "
                        "compiles anew, about a minute for ViT-B-16); default: --batch-sizes.")
    parser.add_argument("--seconds", type=float, default=2.0, help="Length of one timed window.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed windows per row; the best counts.")
    parser.add_argument("--warmup", type=int, default=10, help="Untimed calls first (torch.compile compiles here).")
    parser.add_argument("--faiss-vectors", type=int, default=1_000_000, help="0: no FAISS rows.")
    parser.add_argument("--faiss-queries", type=int, default=1000)
    parser.add_argument("--faiss-rounds", type=int, default=100, help="Single queries for the p50 latency.")
    parser.add_argument("--workdir", default=str(ROOT / "build" / "gpu_bench"), help="Export and engine caches.")
    parser.add_argument("--json", type=Path, help="Also write every number here.")
    parser.add_argument("--record", nargs="?", const=RESULTS, type=Path, metavar="FILE",
                        help="Append the table to benchmarks/RESULTS.md (or FILE).")
    args = parser.parse_args()
    if args.device == "cpu" and args.runtimes == ",".join(RUNTIMES):
        args.runtimes, args.precisions = ",".join(CPU_RUNTIMES), "fp32"

    rows, faiss, facts = run(args)
    text = table(rows, faiss, facts)
    print("\n" + text)
    if args.json:
        args.json.write_text(json.dumps({"facts": facts, "rows": [asdict(r) for r in rows], "faiss": faiss}, indent=2))
    if args.record:
        record(text, args.record)


if __name__ == "__main__":
    main()
