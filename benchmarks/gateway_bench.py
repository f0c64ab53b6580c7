"""Gateway vs in-process ONNX Runtime: images/s and texts/s, same model, same batch, side by side.

    .venv/bin/python benchmarks/gateway_bench.py --repo model_repo [--model demo] [--batch 8] [--seconds 10]
                                                 [--inputs images|texts|both]

For each modality and concurrency (1 and 8) it measures, alternating A then B so the machine's drift cancels:
  A. in-process: the same preprocessing / tokenizer (and cut of padding) and one ONNX Runtime session with the
     gateway's session options, `concurrency` threads each running a batch of `batch` inputs;
  B. HTTP: a real gateway process (uvicorn) and `concurrency` clients each posting `batch` inputs per request.
It prints a table with the ratio B/A (target: >= 0.9 at concurrency 8) and appends it to benchmarks/RESULTS.md
with --record.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import publish  # noqa: E402
from hqclip.repo.layout import onnx_path  # noqa: E402
from hqclip.repo.manifest import load_manifest  # noqa: E402
from hqclip.repo.preprocess import ImagePreprocessor  # noqa: E402
from hqclip.repo.tokenizer import load_tokenizer, trim_padding  # noqa: E402
from services.backends.onnxruntime import session_options  # noqa: E402
from services.settings import Settings  # noqa: E402
from testkit import gateway as gateways  # noqa: E402
from testkit.photos import PHOTO_NAMES, jpeg  # noqa: E402

TEXTS = ["a photo of a cat sitting on a sofa", "two astronauts on the moon", "a cup of coffee with latte art",
         "a red rocket on the launch pad", "galaxies in the deep sky", "stained cells under a microscope"]


def run_for(seconds: float, concurrency: int, work) -> float:
    """Items per second from `concurrency` threads each calling work() -> items, for `seconds`."""
    done = [0] * concurrency
    stop = time.perf_counter() + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < stop:
            done[i] += work()

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - started)


async def http_rate(url: str, seconds: float, concurrency: int, path: str, body: dict, items: int) -> float:
    done = 0
    payload = json.dumps(body).encode()  # encoded once: the client shares the cores and must cost little
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        stop = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                response = await client.post(path, content=payload, headers=headers)
                response.raise_for_status()
                done += items

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=ROOT / "model_repo")
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--inputs", choices=["images", "texts", "both"], default="both")
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()

    manifest = load_manifest(args.repo, args.model)
    settings = Settings()  # the gateway's own session options, so that A and B run the same sessions
    sessions = {m: ort.InferenceSession(str(onnx_path(args.repo, m)),
                                        session_options(settings, text_tower=m == manifest.text.model),
                                        providers=["CPUExecutionProvider"])
                for m in (manifest.image.model, manifest.text.model)}
    preprocess = ImagePreprocessor(manifest.image, 50_000_000, 100_000_000)
    tokenizer = load_tokenizer(manifest.text.tokenizer, args.repo)
    images = [jpeg(name) for name in PHOTO_NAMES]
    image_batch = [images[i % len(images)] for i in range(args.batch)]
    text_batch = [TEXTS[i % len(TEXTS)] for i in range(args.batch)]

    def in_process_images() -> int:
        pixels = np.stack([preprocess(data) for data in image_batch])
        sessions[manifest.image.model].run(None, {manifest.image.input: pixels})
        return len(pixels)

    def in_process_texts() -> int:
        ids, _ = tokenizer(text_batch)
        if manifest.text.any_length:  # the same work as the gateway's text batches
            ids = trim_padding(ids, manifest.text.tokenizer.pad_id)
        sessions[manifest.text.model].run(None, {manifest.text.input: ids})
        return len(ids)

    server = gateways.start(args.repo.resolve(), ROOT / "build" / "gateway_bench", "/ready",
                            **({"HQCLIP_MODEL": args.model} if args.model else {}))
    url = server.url
    try:
        image_body = {"model": manifest.name, "modality": "image",
                      "input": [base64.b64encode(d).decode() for d in image_batch]}
        text_body = {"model": manifest.name, "input": text_batch}
        rows = []
        arms = {"images": (in_process_images, image_body), "texts": (in_process_texts, text_body)}
        for modality, (local, body) in arms.items():
            if args.inputs not in (modality, "both"):
                continue
            for concurrency in (1, 8):
                local()  # warm-up
                asyncio.run(http_rate(url, 1.0, concurrency, "/v1/embeddings", body, args.batch))
                a, b = [], []
                for _ in range(2):  # A, B, A, B: drift cancels
                    a.append(run_for(args.seconds / 2, concurrency, local))
                    b.append(asyncio.run(http_rate(url, args.seconds / 2, concurrency, "/v1/embeddings", body,
                                                   args.batch)))
                rate_a, rate_b = float(np.mean(a)), float(np.mean(b))
                rows.append((modality, concurrency, rate_a, rate_b, rate_b / rate_a))
    finally:
        server.stop()

    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"Python {platform.python_version()}")
    lines = [f"### Gateway vs in-process ONNX Runtime — model `{manifest.name}` ({manifest.architecture}), "
             f"batch {args.batch} per request, {machine}, ONNX Runtime {ort.__version__}",
             "", "| inputs | concurrency | in-process /s | HTTP gateway /s | ratio |", "|---|---|---|---|---|"]
    lines += [f"| {m} | {c} | {a:.1f} | {b:.1f} | {r:.2f} |" for m, c, a, b, r in rows]
    publish(lines, args.record)


if __name__ == "__main__":
    main()
