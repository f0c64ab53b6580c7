"""GPU vs CPU for the collection indexes (flat, ivfpq) on clustered 512-d vectors, side by side in one run.

    pip install faiss-gpu-cu12     # in place of faiss-cpu, on a host with an NVIDIA GPU
    python benchmarks/gpu_index_bench.py [--sizes 100000 1000000] [--queries 1000] [--out benchmarks/RESULTS.md]

For each size and kind it builds the same index twice through services/index/vectors.py — once CPU-only, once with
FAISS GPU resources (the GPU copy the gateway searches when ``faiss.get_num_gpus() > 0``) — and measures: build time
(for the GPU, the add plus the copy to the device made by the first search), queries/s for a batch, single-query
p50/p99, and how many of the CPU's top 10 the GPU also returns (agreement; 1.0 for flat up to ties, close to 1 for
ivfpq, whose GPU scan uses float16 lookup tables). hnsw is not here: FAISS has no GPU HNSW, it stays on the CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.index_bench import DIM, clustered, percentile  # noqa: E402
from benchmarks.results import record  # noqa: E402
from services.index.vectors import IndexSpec, gpu_resources, new_vectors  # noqa: E402
from services.settings import IndexParams  # noqa: E402

K = 10


def run(kind: str, base: np.ndarray, queries: np.ndarray, gpu, rounds: int) -> tuple[dict, np.ndarray]:
    spec = IndexSpec(**IndexParams().model_dump(exclude={"kind"}), kind=kind, dim=DIM)
    started = time.perf_counter()
    vectors = new_vectors(spec, gpu)
    ids = np.arange(len(base), dtype=np.int64)
    for start in range(0, len(base), 100_000):
        vectors.add(ids[start : start + 100_000], base[start : start + 100_000])
    vectors.search(queries[:1], K)  # the GPU copy is made here
    build_s = time.perf_counter() - started
    started = time.perf_counter()
    _, found = vectors.search(queries, K)
    qps = len(queries) / (time.perf_counter() - started)
    single = []
    for q in queries[:rounds]:
        started = time.perf_counter()
        vectors.search(q[None, :], K)
        single.append(time.perf_counter() - started)
    row = {"kind": kind, "n": len(base), "where": "gpu" if gpu is not None else "cpu", "build_s": build_s,
           "qps": qps, "p50": percentile(single, 50), "p99": percentile(single, 99)}
    return row, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=200, help="Single queries for the latency percentiles.")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"),
                        help="Markdown file the table is appended to; '-' prints only.")
    args = parser.parse_args()
    gpu = gpu_resources()
    if gpu is None:
        raise SystemExit("FAISS sees no GPU: install faiss-gpu-cu12 (in place of faiss-cpu) on a GPU host")
    queries = clustered(args.queries, seed=2)
    lines = ["## Collection indexes: GPU vs CPU (benchmarks/gpu_index_bench.py)", "",
             f"FAISS {faiss.__version__}, {faiss.get_num_gpus()} GPU(s), {faiss.omp_get_max_threads()} CPU threads; "
             f"{DIM}-d clustered vectors, {args.queries} queries, k={K}.", "",
             "| kind | vectors | where | build s | queries/s | single p50 ms | single p99 ms | top-10 agreement |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for n in args.sizes:
        base = clustered(n, seed=1)
        for kind in ("flat", "ivfpq"):
            cpu_row, cpu_found = run(kind, base, queries, None, args.rounds)
            gpu_row, gpu_found = run(kind, base, queries, gpu, args.rounds)
            agreement = np.mean([len(set(a) & set(b)) / K for a, b in zip(cpu_found, gpu_found)])
            for row, agree in ((cpu_row, "-"), (gpu_row, f"{agreement:.3f}")):
                lines.append(f"| {row['kind']} | {row['n']:,} | {row['where']} | {row['build_s']:.1f} | "
                             f"{row['qps']:.0f} | {row['p50']:.2f} | {row['p99']:.2f} | {agree} |")
                print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out != "-":
        record(text, args.out)


if __name__ == "__main__":
    main()
