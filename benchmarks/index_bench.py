"""Retrieval benchmark: each index kind on clustered 512-d vectors, and HTTP search vs FAISS called directly.

    nice -n 10 .venv/bin/python benchmarks/index_bench.py                 # 100k and 1M, all kinds, HTTP at 100k
    nice -n 10 .venv/bin/python benchmarks/index_bench.py --sizes 100000 --out -   # quick, print only

Part 1, per size and kind, a collection built through the store (services/index/, the HQCLIP_INDEX__* defaults):
build time (durable upserts in batches of 10k: SQLite metadata + WAL, FAISS adds, and for ivfpq the training they
trigger), the snapshot's size (what the index takes in memory), recall@10 against exact search (flat's answers) and
queries/s for a batch of queries through ``Collection.search`` (FAISS + the hits' metadata); the search-time knob
(hnsw ef_search, ivfpq rerank) is swept. hnsw is built up to ``--hnsw-max`` vectors only: on 2 shared cores its
build at 1M takes minutes on a quiet box but grew past an hour under load; past it the report gives an estimate.

Part 2, at ``--http-size``: those collections, loaded by a real gateway (uvicorn subprocess), queried one at a time
over HTTP with a vector, against the same index searched directly in this process with the same queries: p50/p99
latency side by side, in alternating blocks so drift cancels.

Part 3, with ``--backends faiss milvus`` at ``--backend-size``: the backend as a column. The same vectors go into a
collection of each kind on each backend (FAISS + SQLite in the gateway; a Milvus standalone server started here from
the ``milvus`` package, its index built before timing), then recall@10 against exact search and the p50 of single
HTTP searches through a gateway serving that backend, in one run.

Targets: HTTP p50 within 2 ms of FAISS direct; some kind with recall@10 >= 0.95 at 1M. Results go to
benchmarks/RESULTS.md (``--out``).
"""

from __future__ import annotations

import argparse
import gc
import http.client
import json
import math
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep instead of spinning on shared cores
import shutil
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import faiss
import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import record  # noqa: E402
from services.index.collection import Collection, IndexSpec, Info, Item  # noqa: E402
from services.index.faiss_sqlite import FaissCollection  # noqa: E402
from services.index.manager import open_catalog  # noqa: E402
from services.settings import IndexParams, IndexSettings  # noqa: E402
from testkit import gateway as gateways  # noqa: E402
from testkit.milvus import MilvusServer  # noqa: E402
from testkit.tiny import export_tiny_repo, write_tiny_checkpoint  # noqa: E402

DIM = 512
K = 10
SWEEPS = {"flat": ("-", [None]), "hnsw": ("ef_search", [64, 128, 256]), "ivfpq": ("rerank", [10, 50, 100])}


def clustered_chunks(n: int, seed: int, clusters: int = 1000, spread: float = 0.6, chunk: int = 10_000):
    """Unit vectors around ``clusters`` random centres (like CLIP embeddings of many topics), ``chunk`` at a time,
    so a million of them never sit in memory beside the index built from them."""
    centres = np.random.default_rng(12345).normal(size=(clusters, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = centres[rng.integers(0, clusters, m)] + rng.normal(scale=spread / math.sqrt(DIM), size=(m, DIM))
        yield start, (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def ingested(n: int, label: str):
    """The ``n`` indexed vectors (seed 1) chunk by chunk, with a progress bar: a 1M build takes many minutes."""
    from tqdm import tqdm

    with tqdm(total=n, desc=label, unit="vec", unit_scale=True, mininterval=5) as bar:
        for start, x in clustered_chunks(n, seed=1):
            yield start, x
            bar.update(len(x))


def clustered(n: int, seed: int) -> np.ndarray:
    return np.concatenate([x for _, x in clustered_chunks(n, seed)])


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q))


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / len(t) for f, t in zip(found, truth)]))


def bench_kind(kind: str, n: int, queries: np.ndarray, truth: np.ndarray | None, params: IndexParams,
               path: Path) -> tuple[list[dict], Collection, np.ndarray]:
    """Build collection ``kind`` at ``path`` from ``n`` clustered vectors (item i: id "v<i>"), snapshot, search.
    Without ``truth`` (flat: exact) its own answers are the truth for the other kinds."""
    spec = IndexSpec(**params.model_dump(exclude={"kind"}), kind=kind, dim=DIM)
    gc.collect()
    started = time.perf_counter()
    collection = FaissCollection.create(path, spec)
    for start, x in ingested(n, f"faiss {kind}"):
        collection.upsert([Item(id=f"v{start + i}", tags=[f"t{(start + i) % 10}"]) for i in range(len(x))], x)
    build_s = time.perf_counter() - started
    collection.snapshot()
    size = sum(f.stat().st_size for f in path.glob("snapshot-*.faiss"))
    knob, values = SWEEPS[kind]
    rows = []
    for value in values:
        if knob != "-":
            setattr(collection.spec, knob, value)
        collection.search(queries[:10], K)  # warm
        started = time.perf_counter()
        hits = collection.search(queries, K)
        elapsed = time.perf_counter() - started
        found = np.array([[int(h.id[1:]) for h in row] + [-1] * (K - len(row)) for row in hits])
        truth = found if truth is None else truth
        rows.append({"kind": kind, "n": n, "knob": f"{knob}={value}" if knob != "-" else "exact",
                     "build_s": build_s, "memory_mb": size / 2**20, "recall": recall(found, truth),
                     "qps": len(queries) / elapsed})
        print(rows[-1], flush=True)
    if knob != "-":
        setattr(collection.spec, knob, getattr(params, knob))
    return rows, collection, found


def model_repo(given: Path | None, work: Path) -> Path:
    """The given model repository, or the tiny test model exported into ``work`` (needs the train extra)."""
    if given is not None:
        return given
    return export_tiny_repo(write_tiny_checkpoint(work / "tiny"), work / "repo")


def http_vs_direct(folder: Path, direct: dict[str, Collection], repo: Path | None, rounds: int) -> list[dict]:
    """The collections in ``folder`` through a gateway, against the same indexes (``direct``) searched here.

    Three ways, in blocks of queries taken in turn (A B C A B C: drift hits all three alike): FAISS here; HTTP from
    the standard library's keep-alive client (the gateway's cost: what the target is about); HTTP from httpx, the
    SDK's client, whose own CPU per request shows in the last column. Blocks, not one query each way in turn: a
    flat search streams the whole index through the caches, so a FAISS search here right before each HTTP request
    would hand the gateway caches this process had just flushed, which no real caller does."""
    queries = clustered(rounds, seed=3)
    gateway = gateways.start(model_repo(repo, folder.parent), folder.parent / "gateway", HQCLIP_INDEX__DIR=str(folder))
    url = gateway.url
    headers = {"content-type": "application/json"}
    plain = http.client.HTTPConnection(urlsplit(url).hostname, urlsplit(url).port, timeout=60)

    def over_http(path: str, body: str) -> None:
        plain.request("POST", path, body, headers)
        response = plain.getresponse()
        answer = response.read()
        assert response.status == 200, answer

    rows = []
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            for kind, collection in direct.items():
                path = f"/v1/collections/{kind}/search"
                bodies = [json.dumps({"vector": q.tolist(), "top_k": K}) for q in queries]
                ways = {"direct": lambda i, c=collection: c.vectors.search(queries[i][None, :], K),
                        "http": lambda i, p=path, b=bodies: over_http(p, b[i]),
                        "httpx": lambda i, p=path, b=bodies: client.post(p, content=b[i],
                                                                         headers=headers).raise_for_status()}
                for i in range(len(queries)):  # warm every query's path once
                    over_http(path, bodies[i])
                times: dict[str, list[float]] = {name: [] for name in ways}
                for block in np.array_split(np.arange(len(queries)), 4):
                    for name, way in ways.items():
                        for i in block:
                            started = time.perf_counter()
                            way(i)
                            times[name].append(time.perf_counter() - started)
                rows.append({"kind": kind, "n": collection.count,
                             **{f"{name}_p{q}": percentile(values, q) for name, values in times.items()
                                for q in (50, 99)}})
                print(rows[-1], flush=True)
    finally:
        plain.close()
        gateway.stop()
    return rows


def _milvus_indexed(collection, n: int) -> float:
    """Seal the Milvus collection's segments and wait (polling) until its index covers all ``n`` rows: searches
    of growing segments are brute force, so timing before that would measure flat. Seconds it took."""
    started = time.perf_counter()
    client = collection.client
    client.flush(collection.milvus_name)
    while True:
        done = client.describe_index(collection.milvus_name, "vector")
        if done.get("indexed_rows", 0) >= n and done.get("pending_index_rows", 0) == 0:
            return time.perf_counter() - started
        time.sleep(0.5)


def backend_rows(args, repo: Path | None, work: Path) -> list[dict]:
    """Part 3: each kind on each backend, the same vectors and queries: build, recall@10, HTTP p50."""
    n, params = args.backend_size, IndexParams()
    queries = clustered(args.queries, seed=2)
    _, truth = faiss.knn(queries, clustered(n, seed=1), K, metric=faiss.METRIC_INNER_PRODUCT)
    repo = model_repo(repo, work)
    server = MilvusServer(work / "milvus", work / "milvus.log").start() if "milvus" in args.backends else None
    rows = []
    try:
        for backend in args.backends:
            folder = work / f"backend-{backend}"
            index = {"HQCLIP_INDEX__BACKEND": backend}
            if backend == "milvus":
                index["HQCLIP_INDEX__MILVUS_URI"] = server.uri
            settings = IndexSettings(backend=backend, dir=folder, milvus_uri=server.uri if server else "unused.db",
                                     gpu=False)
            catalog = open_catalog(settings)
            for kind in args.kinds:
                spec = IndexSpec(**params.model_dump(exclude={"kind"}), kind=kind, dim=DIM)
                started = time.perf_counter()
                collection = catalog.create(kind, Info(spec, None, None, time.time()))
                for start, x in ingested(n, f"{backend} {kind}"):
                    for at in range(0, len(x), 2000):  # 2k per request: a 10k-item gRPC message is ~25 MB
                        part = x[at : at + 2000]
                        collection.upsert([Item(id=f"v{start + at + i}", tags=[f"t{(start + at + i) % 10}"])
                                           for i in range(len(part))], part)
                indexed_s = _milvus_indexed(collection, n) if backend == "milvus" else 0.0
                build_s = time.perf_counter() - started
                collection.search(queries[:10], K)  # warm (Milvus: loads the index)
                found = np.array([[int(h.id[1:]) for h in row] + [-1] * (K - len(row))
                                  for row in collection.search(queries, K)])
                rows.append({"backend": backend, "kind": kind, "n": n, "build_s": build_s, "indexed_s": indexed_s,
                             "recall": recall(found, truth)})
                print(rows[-1], flush=True)
                collection.close(snapshot=True)
            catalog.close()
            gateway = gateways.start(repo, work / f"gateway-{backend}", HQCLIP_INDEX__DIR=str(folder), **index)
            url = gateway.url
            try:
                connection = http.client.HTTPConnection(urlsplit(url).hostname, urlsplit(url).port, timeout=60)
                for row in rows:
                    if row["backend"] != backend:
                        continue
                    path = f"/v1/collections/{row['kind']}/search"
                    bodies = [json.dumps({"vector": q.tolist(), "top_k": K}) for q in clustered(args.rounds, seed=3)]
                    times = []
                    for i, body in enumerate(bodies * 2):  # the first pass warms
                        started = time.perf_counter()
                        connection.request("POST", path, body, {"content-type": "application/json"})
                        response = connection.getresponse()
                        assert response.status == 200, response.read()
                        response.read()
                        if i >= len(bodies):
                            times.append(time.perf_counter() - started)
                    row["http_p50"], row["http_p99"] = percentile(times, 50), percentile(times, 99)
                    print(row, flush=True)
                connection.close()
            finally:
                gateway.stop()
    finally:
        if server is not None:
            server.kill()
    return rows


def backend_report(rows: list[dict], args) -> list[str]:
    from importlib.metadata import version

    lines = ["", f"### Backends: FAISS vs Milvus standalone ({args.backend_size:,} vectors, the same vectors and "
             f"queries, default index parameters; Milvus {version('milvus')} server from the `milvus` package, "
             f"pymilvus {version('pymilvus')})", "",
             "| backend | kind | vectors | build s | of which index wait s | recall@10 | HTTP p50 ms | HTTP p99 ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['kind']} | {r['n']:,} | {r['build_s']:.1f} | {r['indexed_s']:.1f} | "
                     f"{r['recall']:.3f} | {r['http_p50']:.2f} | {r['http_p99']:.2f} |")
    lines += ["", "build s: durable upserts of 2k items at a time through the collection interface (Milvus: then "
              "flush and wait until its index covers every row); HTTP: single vector searches (top_k 10) over "
              "keep-alive on localhost, after one warm-up pass. Milvus runs in its own processes (proxy, "
              "coordinators, query and index nodes, etcd) on the same cores as the gateway.", ""]
    return lines


def report(index_rows: list[dict], http_rows: list[dict], skipped: list[str], args,
           backends: list[dict] | None = None) -> str:
    lines = [
        "## Retrieval benchmark (benchmarks/index_bench.py)", "",
        f"Clustered unit vectors, {DIM}-d (1000 centres), {args.queries} queries not in the set, k={K}; "
        f"FAISS {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {os.getloadavg()[0]:.1f} at the end "
        "(on a shared machine absolute times are pessimistic; the side-by-side ratios are the point).",
    ]
    if index_rows:
        lines += ["", "### Index kinds", "",
                  "| kind | vectors | search knob | build s | index MiB | recall@10 | queries/s |",
                  "|---|---:|---|---:|---:|---:|---:|"]
        lines += [f"| {r['kind']} | {r['n']:,} | {r['knob']} | {r['build_s']:.1f} | {r['memory_mb']:.0f} | "
                  f"{r['recall']:.3f} | {r['qps']:.0f} |" for r in index_rows]
        lines += ["", "- build s: durable upserts of 10k items at a time (SQLite metadata + WAL with the vectors, "
                  "FAISS adds; ivfpq: the training they trigger); index MiB: the snapshot file (flat/hnsw: the "
                  "vectors, + graph; ivfpq: PQ codes + the full vectors kept for exact re-ranking); queries/s: one "
                  "batch of queries through Collection.search (FAISS + the hits' metadata from SQLite)."]
    lines += [f"- {line}" for line in skipped]
    best = [r for r in index_rows if r["n"] >= 1_000_000 and r["kind"] != "flat"]
    if best:
        top = max(best, key=lambda r: r["recall"])
        verdict = "met" if top["recall"] >= 0.95 else "NOT met"
        lines.append(f"- Target recall@10 >= 0.95 at 1M (approximate kinds): {verdict} — best "
                     f"{top['kind']} {top['knob']}: {top['recall']:.3f} at {top['qps']:.0f} queries/s.")
    if backends:
        lines += backend_report(backends, args)
    if not http_rows:
        return "\n".join([*lines, ""])
    lines += ["", f"### Search latency: HTTP vs FAISS direct ({args.http_size:,} vectors, {args.rounds} single "
              "queries each way, in alternating blocks; default index parameters)", "",
              "| kind | FAISS p50 ms | HTTP p50 ms | FAISS p99 ms | HTTP p99 ms | p50 gap ms | target gap <= 2 ms "
              "| HTTP p50 ms, httpx client |",
              "|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in http_rows:
        gap = r["http_p50"] - r["direct_p50"]
        lines.append(f"| {r['kind']} | {r['direct_p50']:.2f} | {r['http_p50']:.2f} | {r['direct_p99']:.2f} | "
                     f"{r['http_p99']:.2f} | {gap:.2f} | {'met' if gap <= 2 else 'NOT met'} | "
                     f"{r['httpx_p50']:.2f} |")
    lines += ["", "HTTP = JSON body with a 512-float vector, validation, a worker-thread hop, the FAISS search, the "
              "SQLite metadata lookup of the hits and the JSON answer, over keep-alive on localhost, from the "
              "standard library's client; the last column is the same request from httpx (the SDK's client), "
              "whose own CPU per request is part of what a Python caller waits.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000], help="Part 1; none: skip it.")
    parser.add_argument("--kinds", nargs="+", default=["flat", "hnsw", "ivfpq"], choices=["flat", "hnsw", "ivfpq"])
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--hnsw-max", type=int, default=100_000, help="Largest set hnsw is built for.")
    parser.add_argument("--http-size", type=int, default=100_000, help="A size of --sizes; 0 skips part 2.")
    parser.add_argument("--rounds", type=int, default=300, help="Single queries per kind in part 2.")
    parser.add_argument("--backends", nargs="*", default=[], choices=["faiss", "milvus"],
                        help="Part 3: these backends side by side at --backend-size (e.g. faiss milvus).")
    parser.add_argument("--backend-size", type=int, default=100_000)
    parser.add_argument("--repo", type=Path, default=None, help="Model repository (default: export a tiny one).")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"),
                        help="Markdown file the report is appended to, as a section; '-' prints only.")
    args = parser.parse_args()
    params = IndexParams()  # the gateway's defaults (HQCLIP_INDEX__* apply)
    queries = clustered(args.queries, seed=2)
    work = Path(tempfile.mkdtemp(prefix="index-bench-"))
    index_rows, skipped, hnsw_build, direct = [], [], {}, {}
    backends = backend_rows(args, args.repo, work / "backends") if args.backends else []
    for n in args.sizes:
        truth = None  # flat (exact) runs first and gives it; without flat, faiss.knn does
        if "flat" not in args.kinds:
            _, truth = faiss.knn(queries, clustered(n, seed=1), K, metric=faiss.METRIC_INNER_PRODUCT)
        for kind in sorted(args.kinds, key=lambda k: k != "flat"):
            if kind == "hnsw" and n > args.hnsw_max:
                if hnsw_build:
                    small, seconds = max(hnsw_build.items())
                    estimate = seconds * n / small * math.log(n) / math.log(small)
                    skipped.append(f"hnsw at {n:,} not built (over --hnsw-max): from {small:,} its build would take "
                                   f"about {estimate / 60:.0f} min here (n log n); use ivfpq at this size.")
                continue
            path = work / str(n) / kind
            rows, collection, found = bench_kind(kind, n, queries, truth, params, path)
            truth = found if kind == "flat" else truth
            index_rows += rows
            if kind == "hnsw":
                hnsw_build[n] = rows[0]["build_s"]
            collection.close(snapshot=False)  # snapshotted already; keep the index in memory at the HTTP size
            if n == args.http_size:
                direct[kind] = collection
            else:
                shutil.rmtree(path)
            del collection
            gc.collect()
    http_rows = http_vs_direct(work / str(args.http_size), direct, args.repo, args.rounds) if direct else []
    shutil.rmtree(work)
    text = report(index_rows, http_rows, skipped, args, backends)
    print(text)
    if args.out != "-":
        record(text, args.out)


if __name__ == "__main__":
    main()
