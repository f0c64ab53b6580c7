"""A ViT image tower with the last block for every token vs for the class token only, side by side.

    .venv/bin/python benchmarks/vit_class_token.py [--model ViT-B-16] [--batch 8] [--record]

``hqclip export`` runs an open_clip ViT's last block for the class token only (training/onnx_towers.py
``class_token_features``). This exports the same random-weight model both ways into build/vit_class_token/ and
measures images/s in process with each runtime the gateway can use for it: ONNX Runtime fp32, OpenVINO fp32,
OpenVINO bf16. A and B alternate, four rounds, so the machine's drift cancels; the embeddings are compared too.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import publish  # noqa: E402
from benchmarks.text_length import rate  # noqa: E402
from hqclip.jobs.precision import tower_runner  # noqa: E402
from services.backends.openvino import compile_model  # noqa: E402
from training.export import export_onnx  # noqa: E402
from training.models import load_model  # noqa: E402
from training.onnx_towers import EMBEDDINGS_OUTPUT, IMAGE_INPUT, ImageTower  # noqa: E402

RUNTIMES = ["onnxruntime fp32", "openvino fp32", "openvino bf16"]


def runner(path: Path, runtime: str):
    if runtime == "onnxruntime fp32":
        return tower_runner(path, "fp32")
    import openvino as ov

    request = compile_model(ov.Core(), path, runtime.split()[1]).create_infer_request()
    return lambda pixels: request.infer({0: pixels})[0].copy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=16.0, help="per runtime and arm, split over four rounds")
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()

    torch.manual_seed(0)
    loaded = load_model(args.model)
    size = loaded.preprocess_cfg["size"]
    height, width = (size, size) if isinstance(size, int) else size
    folder = ROOT / "build" / "vit_class_token"
    paths = {}
    for arm, class_token_only in (("all tokens", False), ("class token", True)):
        tower = ImageTower(loaded.model, loaded.preprocess_cfg["mean"], loaded.preprocess_cfg["std"])
        if class_token_only and not tower.class_token_only:
            sys.exit(f"{args.model} is not a ViT pooled at its class token: nothing to compare")
        tower.class_token_only = class_token_only
        paths[arm] = folder / f"{args.model}-{arm.replace(' ', '-')}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_onnx(tower, torch.zeros(1, 3, height, width, dtype=torch.uint8), paths[arm], IMAGE_INPUT,
                         EMBEDDINGS_OUTPUT, 17)
    pixels = np.random.default_rng(0).integers(0, 256, (args.batch, 3, height, width), dtype=np.uint8)
    rows = []
    for runtime in RUNTIMES:
        runs = {arm: runner(path, runtime) for arm, path in paths.items()}
        a, b = (run(pixels) for run in runs.values())
        cosine = float(((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).min())
        rates = {arm: [] for arm in runs}
        for _ in range(4):
            for arm, run in runs.items():
                rates[arm].append(rate(lambda run=run: len(run(pixels)), args.seconds / 4))
        full, cls = float(np.mean(rates["all tokens"])), float(np.mean(rates["class token"]))
        rows.append((runtime, full, cls, cls / full, cosine))
        print(rows[-1], flush=True)

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    lines = [f"### ViT last block: all tokens vs the class token only — {args.model}, batch {args.batch}, {machine}",
             "", "| runtime | all tokens images/s | class token images/s | speed-up | min cosine |",
             "|---|---|---|---|---|"]
    lines += [f"| {r} | {a:.2f} | {b:.2f} | {s:.3f}x | {c:.6f} |" for r, a, b, s, c in rows]
    publish(lines, args.record)


if __name__ == "__main__":
    main()
