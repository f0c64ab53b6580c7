"""LiT-style HQ-CLIP training on cached tower outputs, for models whose towers are both frozen (the demo model).

A frozen tower in eval mode, fed without augmentation, gives the same output for an image or a text at every
step. So the towers run once over the data (:func:`encode_features`: the image trunk's pooled features and the
text tower's pooled features, i.e. the inputs of the two projections), and training runs only what changes:
the projections, the logit scale and the tag head (:class:`Heads`). Each step is the training loop's step
(training/train.py) on those inputs: the same texts drawn per sample (alt text or long description; negative
description or joined negative tags), the same loss (training/losses.py), optimizer groups, warmup + cosine
schedule, clipping and logit-scale clamp. On two shared CPU cores this is the difference between a
few minutes and hours (the EfficientNet forward is ~0.1-0.3 s per image there), and it makes a multi-seed
ablation affordable. tests/test_demo_model.py checks that a step here equals the loop's step on the full model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from training.config import TrainConfig
from training.data import SkipCounter, iterate_samples
from training.demo.distill import Distillation
from training.demo.feature_file import CachedTensors, pooled_texts
from training.losses import HQCLIPLoss
from training.tag_head import TagHead
from training.train import param_groups, seed_everything, warmup_cosine
from training.vocab import Vocabulary, build_vocabulary

TEXT_FIELDS = ("alt", "desc", "neg_desc", "tags", "neg_tags")


@dataclass
class Features(CachedTensors):
    """One split's tower outputs: per image the projection inputs, per distinct text the same."""

    keys: list[str]
    captions: list[str]
    labels: list[str | None]
    tags: list[list[str]]
    image: torch.Tensor  # [N, image_dim] input of the image projection
    texts: list[str]  # distinct texts (samples' four texts + any extra, e.g. zero-shot prompts)
    text: torch.Tensor  # [T, text_dim] input of the text projection
    index: dict[str, torch.Tensor] = field(default_factory=dict)  # field -> [N] row in `text`
    skipped: dict[str, int] = field(default_factory=dict)


@torch.no_grad()
def encode_features(model: nn.Module, transform, tokenizer, urls: list[str], extra_texts: Iterable[str] = (),
                    batch_size: int = 32, progress: bool = True) -> Features:
    """Run the frozen towers of an open_clip timm + Hugging Face model over shards; keep the projections' inputs.

    Images: the timm trunk's pooled output. Texts: the HF tower's pooled output through ``encode_text``'s path
    (:func:`training.text_tower.encode_pooled`: batches cut after their longest text and split by length, rows
    back in input order), so every row is the text's own features whatever the batch around it.
    """
    from tqdm import tqdm

    counter = SkipCounter()
    samples = list(iterate_samples(urls, counter))
    if not samples:
        raise ValueError(f"no usable samples in {urls} (skipped: {dict(counter.counts)})")
    model.eval()
    texts = list(dict.fromkeys([t for s in samples for t in _texts(s)] + list(extra_texts)))
    image_rows, text_rows = [], []
    bar = tqdm(total=len(samples) + len(texts), desc="tower features", unit="item", disable=not progress)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        image_rows.append(model.visual.trunk(torch.stack([transform(s.image) for s in chunk])).float())
        bar.update(len(chunk))
    text_rows += pooled_texts(model, tokenizer, texts, batch_size * 4, bar)
    bar.close()
    where = {t: i for i, t in enumerate(texts)}
    index = {name: torch.tensor([where[_texts(s)[k]] for s in samples]) for k, name in enumerate(TEXT_FIELDS)}
    return Features(
        keys=[s.key for s in samples], captions=[s.alt for s in samples], labels=[s.label for s in samples],
        tags=[list(s.tags or ()) for s in samples], image=torch.cat(image_rows), texts=texts,
        text=torch.cat(text_rows), index=index, skipped=dict(counter.counts),
    )


def _texts(sample) -> tuple[str, str, str, str, str]:
    """A sample's texts (TEXT_FIELDS), tags joined as training/data.py's TextChoice joins negative tags."""
    return sample.alt, sample.desc, sample.neg_desc, ", ".join(sample.tags or ()), ", ".join(sample.neg_tags or ())


class HeadsConfig(BaseModel):
    """``heads.*`` overrides of ``hqclip demo build --retrain``."""

    model_config = ConfigDict(extra="forbid")
    text_projection: Literal["random", "identity", "frozen_identity"] = Field("frozen_identity", description=(
        "How the text projection starts: open_clip's random init, or the identity (the text tower's own space, "
        "when its width is the embedding's), trained or kept (docs/demo-model.md)."))


class Heads(nn.Module):
    """What training changes in a model with two frozen towers: projections, logit scale, tag head.

    Built like open_clip builds them (bias-free linear projections, logit scale log(1/0.07)); the tag
    head is created last, so with or without it the projections start from the same seed-given weights.
    ``text_projection`` (:class:`HeadsConfig`) may then set the text projection to the identity.
    """

    def __init__(self, image_dim: int, text_dim: int, embed_dim: int, vocab: Vocabulary | None = None,
                 text_projection: str = "random") -> None:
        super().__init__()
        self.image_proj = nn.Linear(image_dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_dim, embed_dim, bias=False)
        if text_projection != "random":
            with torch.no_grad():
                self.text_proj.weight.copy_(torch.eye(embed_dim, text_dim))
            self.text_proj.weight.requires_grad_(text_projection == "identity")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.tag_head = TagHead(embed_dim, len(vocab), vocab.frequencies()) if vocab is not None else None

    def embed_images(self, image: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(image), dim=-1)

    def embed_texts(self, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(text), dim=-1)

    def clip_state_dict(self) -> dict[str, torch.Tensor]:
        """The projections and scale under the open_clip CustomTextCLIP (timm + HF towers) names."""
        return {"visual.head.proj.weight": self.image_proj.weight.detach().clone(),
                "text.proj.weight": self.text_proj.weight.detach().clone(),
                "logit_scale": self.logit_scale.detach().clone()}


def multi_hot(tags: list[list[str]], vocab: Vocabulary) -> torch.Tensor:
    targets = torch.zeros(len(tags), len(vocab), dtype=torch.uint8)
    for row, sample_tags in enumerate(tags):
        targets[row, vocab.encode(sample_tags)] = 1
    return targets


def train_heads(features: Features, cfg: TrainConfig, embed_dim: int, progress: bool = True,
                vocab: Vocabulary | None = None, distill: Distillation | None = None,
                heads_cfg: HeadsConfig | None = None) -> tuple[Heads, Vocabulary | None, list[dict]]:
    """Train :class:`Heads` on one split's features with the HQ-CLIP objective of ``cfg``; (heads, vocab, log).

    Uses ``cfg.loss``, ``cfg.optim``, ``cfg.data.batch_size/p_desc/p_neg_desc/vocab_*`` and ``cfg.run.seed``;
    batches are drawn without replacement, epoch after epoch, from a generator seeded by ``cfg.run.seed``.
    With ``distill`` (training/demo/distill.py), its weighted terms are added at every step (log keys
    ``distill``, ``captions``); it draws its images from its own generator, so the HQ-CLIP batches are the same
    with or without it.
    """
    from tqdm import tqdm

    seed_everything(cfg.run.seed)
    use_hni, use_stc = cfg.loss.lambda_hni > 0, cfg.loss.lambda_stc > 0
    if use_stc and vocab is None:
        vocab = build_vocabulary(features.tags, cfg.data.vocab_size, cfg.data.vocab_min_count)
    heads = Heads(features.image.shape[1], features.text.shape[1], embed_dim, vocab if use_stc else None,
                  (heads_cfg or HeadsConfig()).text_projection)
    targets = multi_hot(features.tags, vocab) if use_stc else None
    loss_fn = HQCLIPLoss(cfg.loss.lambda_hni, cfg.loss.lambda_stc, cfg.loss.hni_mode, cfg.loss.stc_reduction)
    optimizer = torch.optim.AdamW(param_groups(heads, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=cfg.optim.betas, eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.optim.warmup_steps, cfg.optim.steps, cfg.optim.min_lr_ratio))
    generator = torch.Generator().manual_seed(cfg.run.seed)
    n, batch = len(features.keys), min(cfg.data.batch_size, len(features.keys))
    order, cursor, log = torch.randperm(n, generator=generator), 0, []
    for step in tqdm(range(1, cfg.optim.steps + 1), desc="train heads", unit="step", disable=not progress):
        if cursor + batch > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        rows = order[cursor:cursor + batch]
        cursor += batch
        draws = torch.rand(2, batch, generator=generator)
        positive = torch.where(draws[0] < cfg.data.p_desc, features.index["desc"][rows], features.index["alt"][rows])
        negative = torch.where(draws[1] < cfg.data.p_neg_desc, features.index["neg_desc"][rows],
                               features.index["neg_tags"][rows])
        heads.train()
        image = heads.embed_images(features.image[rows])
        terms = loss_fn(image, heads.embed_texts(features.text[positive]), heads.logit_scale.exp(),
                        heads.embed_texts(features.text[negative]) if use_hni else None,
                        heads.tag_head(image) if use_stc else None, targets[rows] if use_stc else None)
        for name, (weight, value) in (distill.terms(heads) if distill is not None else {}).items():
            terms[name] = value
            terms["loss"] = terms["loss"] + weight * value
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if cfg.optim.grad_clip:
            nn.utils.clip_grad_norm_([p for p in heads.parameters() if p.requires_grad], cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            heads.logit_scale.clamp_(0, math.log(100))
        if step % cfg.run.log_every == 0 or step == cfg.optim.steps:
            log.append({"step": step, **{k: float(v.detach()) for k, v in terms.items()}})
    return heads.eval(), vocab if use_stc else None, log


class _CachedEncoder:
    """training/evaluate.py's ``Encoder.texts`` on cached text features, through the trained projection."""

    def __init__(self, heads: Heads, features: Features) -> None:
        self.heads, self.features = heads, features

    def texts(self, texts: list[str]) -> torch.Tensor:
        return self.heads.embed_texts(self.features.text_rows(texts))


@torch.no_grad()
def evaluate_heads(heads: Heads, features: Features, templates: list[str], vocab: Vocabulary | None = None
                   ) -> dict[str, float]:
    """``hqclip eval``'s shard metrics (training/evaluate.py's functions and keys) from cached features.

    Retrieval R@k both ways with the alt text and with the long description, hard-negative accuracy with the
    descriptions and with the joined tags, tag mAP (with a tag head), zero-shot accuracy on the labelled
    samples (their prompts must be among the cached texts).
    """
    from training.evaluate import hard_negative_accuracy, mean_average_precision, retrieval, zero_shot

    image = heads.embed_images(features.image)

    def texts(name: str) -> torch.Tensor:
        return heads.embed_texts(features.text[features.index[name]])

    results: dict = {"samples": len(features.keys)}
    results |= retrieval(image, texts("alt"), "alt")
    results |= retrieval(image, texts("desc"), "desc")
    results["hardneg_acc_desc"] = hard_negative_accuracy(image, texts("desc"), texts("neg_desc"))
    results["hardneg_acc_tags"] = hard_negative_accuracy(image, texts("tags"), texts("neg_tags"))
    if heads.tag_head is not None and vocab is not None:
        results["tag_mAP"] = mean_average_precision(heads.tag_head(image).numpy(),
                                                    multi_hot(features.tags, vocab).numpy())
    labelled = [i for i, label in enumerate(features.labels) if label]
    if labelled:
        results |= zero_shot(_CachedEncoder(heads, features), image[labelled],
                             [features.labels[i] for i in labelled], templates)
    return results
