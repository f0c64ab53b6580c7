"""Texts/s of a text tower at the full context length vs cut after each batch's longest text, side by side.

    .venv/bin/python benchmarks/text_length.py --repo build/textbench --model vitb16 [--batch 32] [--record]

The gateway cuts a text batch after its longest text when the manifest says the tower takes any length
(``TextSpec.any_length``; hqclip/repo/tokenizer.py ``trim_padding``). This measures what that buys, in process, on the
services' own tokenizer and one ONNX Runtime session with the gateway's session options, for three kinds of text:
zero-shot prompts (a template around a label), captions, and 60-word descriptions (what HQ-CLIP's LVLM writes).
Each kind: A (full length) and B (cut) alternate, A B A B, so the machine's drift cancels. The embeddings of A and B
are compared too (cosine).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import publish  # noqa: E402
from hqclip.repo.layout import onnx_path  # noqa: E402
from hqclip.repo.manifest import load_manifest  # noqa: E402
from hqclip.repo.prompts import DEFAULT_TEMPLATES  # noqa: E402
from hqclip.repo.tokenizer import load_tokenizer, trim_padding  # noqa: E402
from services.backends.onnxruntime import session_options  # noqa: E402
from services.settings import Settings  # noqa: E402

LABELS = ["tabby cat", "golden retriever", "espresso", "space shuttle", "red fox", "mountain bike", "lighthouse",
          "sushi", "violin", "snowy owl", "fire truck", "sunflower"]
CAPTIONS = ["a photo of a cat sitting on a sofa", "two astronauts on the moon", "a cup of coffee with latte art",
            "a red rocket on the launch pad", "galaxies in the deep sky", "stained cells under a microscope"]
DESCRIPTION = ("A wide photograph of a busy street market at dusk: wooden stalls under striped awnings sell "
               "oranges, leafy greens and spices in open sacks, strings of warm bulbs hang overhead, a woman in a "
               "blue coat weighs tomatoes on a brass scale while a child points at a basket of apples, and wet "
               "cobblestones reflect the lights.")


def kinds() -> dict[str, list[str]]:
    prompts = [template.format(label) for label in LABELS for template in DEFAULT_TEMPLATES]
    descriptions = [" ".join(DESCRIPTION.split()[i % 7:]) for i in range(7)]  # 50-60 words, all different
    return {"zero-shot prompts": prompts, "captions": CAPTIONS, "descriptions (~60 words)": descriptions}


def rate(run, seconds: float) -> float:
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        done += run()
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=ROOT / "model_repo")
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch", type=int, default=32, help="texts per tower call (the gateway's default cap)")
    parser.add_argument("--seconds", type=float, default=6.0, help="per kind and arm, split over two rounds")
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()

    manifest = load_manifest(args.repo, args.model)
    if not manifest.text.any_length:
        sys.exit(f"{manifest.name}'s text tower takes only the full context length: re-export it with `hqclip export`")
    session = ort.InferenceSession(str(onnx_path(args.repo, manifest.text.model)),
                                   session_options(Settings(), text_tower=True), providers=["CPUExecutionProvider"])
    tokenizer = load_tokenizer(manifest.text.tokenizer, args.repo)
    rows = []
    for kind, texts in kinds().items():
        batch = [texts[i % len(texts)] for i in range(args.batch)]
        full, _ = tokenizer(batch)
        cut = trim_padding(full, manifest.text.tokenizer.pad_id)
        embed = {name: (lambda ids=ids: session.run(None, {manifest.text.input: ids})[0])
                 for name, ids in (("full", full), ("cut", cut))}
        a, b = embed["full"](), embed["cut"]()
        cosine = float(((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).min())
        rates = {"full": [], "cut": []}
        for _ in range(2):  # A B A B
            for name in rates:
                rates[name].append(rate(lambda run=embed[name]: len(run()), args.seconds / 2))
        full_rate, cut_rate = float(np.mean(rates["full"])), float(np.mean(rates["cut"]))
        rows.append((kind, full.shape[1], cut.shape[1], full_rate, cut_rate, cut_rate / full_rate, cosine))
        print(rows[-1], flush=True)

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    lines = [f"### Text tower at full length vs cut after the longest text — `{manifest.name}` "
             f"({manifest.architecture}), batch {args.batch}, {machine}, ONNX Runtime {ort.__version__}",
             "", "| texts | tokens full | tokens cut | full /s | cut /s | speed-up | min cosine |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {k} | {f} | {c} | {a:.0f} | {b:.0f} | {r:.2f}x | {cos:.6f} |" for k, f, c, a, b, r, cos in rows]
    publish(lines, args.record)


if __name__ == "__main__":
    main()
