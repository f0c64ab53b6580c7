"""The training job's configuration: one YAML file, overridden by ``section.field=value`` arguments.

``hqclip train --config run.yaml optim.lr=1e-4 data.batch_size=64`` loads ``run.yaml`` (every field is
optional), applies the overrides in order (values parsed as YAML, so ``true``, ``1e-4`` and ``[a, b]`` work)
and validates the result. Unknown fields are errors, so a typo never silently trains with a default.
Every default and the reason for it is in docs/training.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelConfig(_Section):
    """Which open_clip model training starts from, and what it may change."""

    name: str = Field("ViT-B-32", description="open_clip model name or checkpoint folder (training/models.py).")
    pretrained: str | None = Field(None, description="open_clip pretrained tag or checkpoint path; None = random init.")
    init_from: Path | None = Field(
        None, description="An `hqclip train` checkpoint to start from (the served model's, in `hqclip loop`): its "
        "architecture, weights, tag head and tag vocabulary; a fresh optimizer and schedule. Replaces name/pretrained.")
    freeze_image: bool = Field(False, description="Freeze the image tower (LiT): no gradients, kept in eval mode.")
    freeze_text: bool = Field(False, description="Freeze the text tower: no gradients, kept in eval mode.")
    train_projections: bool = Field(True, description="Keep a frozen tower's output projection trainable.")


class DataConfig(_Section):
    """Webdataset shards and how a sample becomes (image, positive text, negative text, tags)."""

    train_shards: list[str] = Field(default_factory=list, description="Shard paths/URLs; brace patterns expand.")
    batch_size: int = Field(256, ge=1, description="Samples per step on each process.")
    workers: int = Field(4, ge=0, description="DataLoader worker processes per training process.")
    shuffle_buffer: int = Field(2000, ge=1, description="Samples held for shuffling (per worker).")
    p_desc: float = Field(0.5, ge=0, le=1, description="Probability the positive text is the long description.")
    p_neg_desc: float = Field(0.5, ge=0, le=1, description="Probability the negative is the long negative description.")
    augment: bool = Field(True, description="Use the model's training transform (random resized crop).")
    vocab_size: int = Field(10_000, ge=1, description="Tags kept for short-tag classification (top-K).")
    vocab_min_count: int = Field(1, ge=1, description="A tag needs at least this many samples to be kept.")
    vocab_path: Path | None = Field(None, description="A saved vocabulary; None = build one from train_shards.")
    vocab_max_samples: int | None = Field(
        100_000, description="Samples scanned (JSON only, rank 0) to build the vocabulary; None = all."
    )


class LossConfig(_Section):
    """The HQ-CLIP objective: contrastive + lambda_hni * HNI + lambda_stc * STC."""

    lambda_hni: float = Field(1.0, ge=0, description="Weight of hard-negative identification; 0 = off.")
    lambda_stc: float = Field(0.1, ge=0, description="Weight of short-tag classification; 0 = off.")
    hni_mode: Literal["columns", "pairwise"] = Field(
        "columns", description="columns: negatives as extra image->text logits (NegCLIP); pairwise: own pos vs neg."
    )
    stc_reduction: Literal["mean", "sum"] = Field(
        "sum", description="BCE over tags: mean over the vocabulary, or sum over it (then mean over samples)."
    )
    gather_with_grad: bool = Field(True, description="Gradients flow through the cross-rank feature gather.")
    negative_text_grad: bool = Field(True, description="Back-propagate into the text tower through negatives.")


class OptimConfig(_Section):
    lr: float = Field(5e-4, gt=0, description="Peak learning rate (after warmup).")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine floor as a fraction of lr.")
    weight_decay: float = Field(0.2, ge=0, description="AdamW decay on weights (not on gains, biases, scale).")
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = Field(500, ge=0)
    steps: int = Field(10_000, ge=1, description="Total optimizer steps.")
    grad_clip: float | None = Field(1.0, description="Max global gradient norm; None = no clipping.")


class RunConfig(_Section):
    output_dir: Path = Field(Path("runs/hqclip"), description="Checkpoints, metrics.jsonl, vocab.json, config.yaml.")
    seed: int = 0
    device: str = Field("auto", description="auto (cuda if present), cpu or cuda.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU.")
    log_every: int = Field(10, ge=1, description="Steps between metrics lines.")
    checkpoint_every: int = Field(1000, ge=1, description="Steps between checkpoints (and one at the end).")
    keep_checkpoints: int = Field(3, ge=1, description="Checkpoints kept; older ones are deleted.")
    resume: str | None = Field("auto", description="auto: latest checkpoint in output_dir if any; a path; or None.")
    stop_at_step: int | None = Field(None, description="Leave after this step (checkpointed), e.g. a time-boxed job.")
    progress: bool = Field(True, description="Show a progress bar (rank 0).")


class TrainConfig(_Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as YAML."""
    if "=" not in override:
        raise ValueError(f"override {override!r} is not of the form section.field=value (e.g. optim.lr=1e-4)")
    dotted, raw = override.split("=", 1)
    *parents, leaf = dotted.strip().split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {override!r}: {part} is not a section")
    node[leaf] = yaml.safe_load(raw) if raw.strip() else None


def load_config(path: Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """The YAML file (if any) with the overrides applied, validated."""
    tree: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of sections (model, data, loss, optim, run)")
        tree = loaded or {}
    for override in overrides:
        apply_override(tree, override)
    return TrainConfig.model_validate(tree)


def dump_config(config: TrainConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
