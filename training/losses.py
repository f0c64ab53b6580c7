"""The HQ-CLIP objective (paper Fig. 2b): contrastive + lambda_hni * HNI + lambda_stc * STC.

Each term is a small module returning a named scalar, so the loop logs every term. Features are gathered
across ranks once (:func:`gather_features`) and every rank computes the same global contrastive and HNI
terms; STC is per sample and stays local. With ``gather_with_grad`` (the default) gradients flow back
through the gather, which makes a DDP step's gradients equal to a single process's on the same global batch.
All embeddings are L2-normalised; ``logit_scale`` is the multiplier (already exponentiated).
Formulas and the reasons for them: docs/training.md.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class _AllGather(torch.autograd.Function):
    """All-gather (equal sizes) whose backward sums every rank's gradient and returns this rank's slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rows, ctx.rank = len(tensor), dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # works on gloo and nccl alike (gloo has no reduce-scatter)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_features(*features: torch.Tensor, with_grad: bool = True) -> tuple[torch.Tensor, ...]:
    """Each tensor concatenated over all ranks in rank order (unchanged when not distributed).

    ``with_grad``: autograd flows through the gather to every rank's features. Without it, only this
    rank's own slice keeps its gradient (open_clip's default), which scales these terms' gradients by
    1/world_size relative to per-sample terms.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    gathered = []
    for tensor in features:
        if with_grad:
            gathered.append(_AllGather.apply(tensor))
        else:
            parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, tensor.detach().contiguous())
            parts[dist.get_rank()] = tensor
            gathered.append(torch.cat(parts, dim=0))
    return tuple(gathered)


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE: mean of image->text and text->image cross-entropy over the batch's pairs."""

    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = logit_scale * image @ text.T
        labels = torch.arange(len(image), device=image.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        return {"contrastive": loss}


class HardNegativeLoss(nn.Module):
    """Hard-negative identification: the image must score its positive text above its negative text.

    ``columns`` (default, NegCLIP): the batch's negative texts join the image->text softmax as extra
    columns; the term is what they add to the image->text cross-entropy, halved like the symmetric loss:
    ``0.5 * mean_i [logsumexp_j s(i, [T; N]_j) - logsumexp_j s(i, T_j)]``, so contrastive + 1.0 * HNI is
    exactly NegCLIP's loss. ``pairwise``: a two-way softmax of each image over its own positive and
    negative, ``mean_i softplus(s(i, n_i) - s(i, t_i))``.
    """

    def __init__(self, mode: str = "columns") -> None:
        super().__init__()
        if mode not in ("columns", "pairwise"):
            raise ValueError(f"hni_mode must be 'columns' or 'pairwise', not {mode!r}")
        self.mode = mode

    def forward(
        self, image: torch.Tensor, text: torch.Tensor, negative: torch.Tensor, logit_scale: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        if self.mode == "pairwise":
            margin = logit_scale * ((image * negative).sum(-1) - (image * text).sum(-1))
            return {"hni": F.softplus(margin).mean()}
        positives = logit_scale * image @ text.T
        negatives = logit_scale * image @ negative.T
        with_negatives = torch.logsumexp(torch.cat([positives, negatives], dim=1), dim=1)
        return {"hni": (with_negatives - torch.logsumexp(positives, dim=1)).mean() / 2}


class TagLoss(nn.Module):
    """Short-tag classification: multi-label BCE of the tag head's logits against the multi-hot tags.

    ``sum``: summed over the vocabulary, averaged over samples; ``mean``: averaged over both.
    """

    def __init__(self, reduction: str = "sum") -> None:
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise ValueError(f"stc_reduction must be 'sum' or 'mean', not {reduction!r}")
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
        return {"stc": loss.sum(1).mean() if self.reduction == "sum" else loss.mean()}


class HQCLIPLoss(nn.Module):
    """``loss = contrastive + lambda_hni * hni + lambda_stc * stc``; a term with weight 0 is not computed."""

    def __init__(
        self,
        lambda_hni: float = 1.0,
        lambda_stc: float = 0.1,
        hni_mode: str = "columns",
        stc_reduction: str = "sum",
        gather_with_grad: bool = True,
    ) -> None:
        super().__init__()
        self.lambda_hni, self.lambda_stc, self.gather_with_grad = lambda_hni, lambda_stc, gather_with_grad
        self.contrastive = ContrastiveLoss()
        self.hni = HardNegativeLoss(hni_mode)
        self.stc = TagLoss(stc_reduction)

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        logit_scale: torch.Tensor,
        negative: torch.Tensor | None = None,
        tag_logits: torch.Tensor | None = None,
        tag_targets: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        use_hni, use_stc = self.lambda_hni > 0, self.lambda_stc > 0
        if use_hni and negative is None:
            raise ValueError("lambda_hni > 0 needs negative text features")
        if use_stc and (tag_logits is None or tag_targets is None):
            raise ValueError("lambda_stc > 0 needs tag logits and targets")
        features = (image, text, negative) if use_hni else (image, text)
        gathered = gather_features(*(f.float() for f in features), with_grad=self.gather_with_grad)
        terms = self.contrastive(gathered[0], gathered[1], logit_scale)
        total = terms["contrastive"]
        if use_hni:
            terms |= self.hni(*gathered, logit_scale)
            total = total + self.lambda_hni * terms["hni"]
        if use_stc:
            terms |= self.stc(tag_logits, tag_targets)
            total = total + self.lambda_stc * terms["stc"]
        terms["loss"] = total
        return terms
