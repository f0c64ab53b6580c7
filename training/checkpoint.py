"""`hqclip train` checkpoints: written atomically, the last few kept, loaded back for evaluation and export."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from training.hqclip_model import ModelBundle, load_bundle
from training.tag_head import TagHead
from training.vocab import Vocabulary

CHECKPOINT_FORMAT = "hqclip-train-checkpoint"
CHECKPOINT_GLOB = "checkpoint-*.pt"


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = sorted(Path(output_dir).glob(CHECKPOINT_GLOB))
    return found[-1] if found else None


def save_checkpoint(output_dir: Path, step: int, payload: dict, keep: int) -> Path:
    """Write ``checkpoint-<step>.pt`` atomically (temp file + rename) and delete all but the last ``keep``."""
    path = Path(output_dir) / f"checkpoint-{step:09d}.pt"
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    for old in sorted(Path(output_dir).glob(CHECKPOINT_GLOB))[:-keep]:
        old.unlink()
    return path


def load_trained(path: Path, bundle: ModelBundle | None = None
                 ) -> tuple[ModelBundle, TagHead | None, Vocabulary | None]:
    """A training checkpoint's model, tag head and vocabulary (for evaluation and export).

    ``bundle``: the model to load the weights into (e.g. the demo model built in code); by default the
    one named in the checkpoint's config.
    """
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an `hqclip train` checkpoint")
    if bundle is None:  # the architecture; the weights come from the checkpoint (a pretrained tag is not fetched)
        cfg = payload["config"]["model"]
        local = cfg["pretrained"] if cfg["pretrained"] and Path(cfg["pretrained"]).is_file() else None
        bundle = load_bundle(cfg["name"], local)
    bundle.model.load_state_dict(payload["model"])
    head = vocab = None
    if payload.get("tag_head") is not None:
        vocab = Vocabulary.from_dict(payload["vocab"])
        head = TagHead(payload["tag_head"]["linear.weight"].shape[1], len(vocab))
        head.load_state_dict(payload["tag_head"])
    return bundle, head, vocab
