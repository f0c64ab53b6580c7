"""Text embeddings without the padding: a batch's token ids cut after its longest text, short and long texts apart.

open_clip pads every text to the context length (77) and runs the text tower over all of it. Where padding cannot
change a text's embedding, the columns after the batch's longest text are dropped first: the same embeddings for a
fraction of the text tower's FLOPs (captions of 10-20 tokens: 4-7x fewer). HQ-CLIP's batches mix lengths (an alt
text or a long description, negative tags or a long negative description, drawn per sample), so one long text
would pad every short one back up: the batch is split in two by length when that saves at least ``SPLIT_SAVING``
of the padded tokens, each part cut to its own longest text, and the rows put back in order. That holds for
- open_clip's own CLIP text tower: causal attention, pooled at the end-of-text token (``argmax`` / ``eos``);
- Hugging Face towers (``HFTextEncoder``) that mask padding and pool by mean or first token.
Any other tower runs as open_clip runs it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import text_global_pool
from torch import nn

_MASKED_POOLERS = {"MeanPooler", "ClsPooler", "ClsLastHiddenStatePooler"}
SPLIT_SAVING = 0.25  # a second, smaller text-tower call pays for itself only when it drops this much padding


def trim(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """``tokens`` [B, L] without the trailing columns that are padding in every row (at least one column)."""
    used = (tokens != pad_id).any(dim=0).nonzero()
    return tokens[:, : int(used.max()) + 1 if len(used) else 1]


def split(lengths: list[int]) -> int | None:
    """For texts of ``lengths`` tokens sorted ascending: how many of the shortest go in a batch of their own, so that
    padding each part to its longest text computes the fewest tokens; None when that saves under SPLIT_SAVING."""
    n, longest = len(lengths), lengths[-1]
    if n < 2 or longest == 0:
        return None
    cost, k = min((k * lengths[k - 1] + (n - k) * longest, k) for k in range(1, n))
    return k if cost <= (1 - SPLIT_SAVING) * n * longest else None


def _in_parts(run: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """``run`` on trimmed tokens; on the short and the long texts apart when ``split`` says it pays."""
    lengths = torch.where(tokens != pad_id, torch.arange(1, tokens.shape[1] + 1, device=tokens.device), 0).amax(1)
    order = torch.argsort(lengths)
    k = split(lengths[order].tolist())
    if k is None:
        return run(trim(tokens, pad_id))
    short, long = order[:k], order[k:]
    features = torch.cat([run(trim(tokens[short], pad_id)), run(trim(tokens[long], pad_id))])
    return features[torch.argsort(order)]  # back to the input's row order (autograd follows the indexing)


def _causal_clip_text(clip: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP.encode_text (open_clip 3.x) on ``tokens`` of any length up to the context: positions and the causal
    mask sliced to it. tests/test_train.py holds it equal to open_clip's own on full-length tokens."""
    n = tokens.shape[1]
    cast = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast) + clip.positional_embedding[:n].to(cast)
    x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask[:n, :n]))
    x = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
    if isinstance(clip.text_projection, nn.Linear):
        return clip.text_projection(x)
    return x if clip.text_projection is None else x @ clip.text_projection


def _causal(model: nn.Module) -> bool:
    return isinstance(model, CLIP) and model.attn_mask is not None and model.text_pool_type in ("argmax", "eos")


def _masked(model: nn.Module) -> bool:
    return type(getattr(getattr(model, "text", None), "pooler", None)).__name__ in _MASKED_POOLERS


def any_length(model: nn.Module) -> bool:
    """Whether ``model``'s text tower gives the same embeddings on tokens cut after the batch's longest text."""
    return _causal(model) or _masked(model)


def encode_unpadded(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Unnormalised text features of ``tokens`` [B, L], any L up to the context, for an ``any_length`` model (what
    ``hqclip export`` traces with a dynamic sequence axis)."""
    return _causal_clip_text(model, tokens) if _causal(model) else model.encode_text(tokens)


def encode_text(model: nn.Module, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """``model.encode_text(tokens, normalize)``, on the trimmed tokens where that gives the same embeddings."""
    if _causal(model):
        features = _in_parts(lambda part: _causal_clip_text(model, part), tokens, 0)  # open_clip pads with 0
        return F.normalize(features, dim=-1) if normalize else features
    if _masked(model):
        pad_id = model.text.config.pad_token_id
        return _in_parts(lambda part: model.encode_text(part, normalize=normalize), tokens, pad_id)
    return model.encode_text(tokens, normalize=normalize)


def encode_pooled(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The Hugging Face text tower's pooled features of ``tokens`` [B, L]: the input of its projection, row for row,
    through ``encode_text``'s trimmed and split path (what a cache of a frozen tower keeps)."""
    if not _masked(model):
        raise ValueError(f"encode_pooled needs a Hugging Face text tower with a masked pooler, not {type(model)}")
    text = model.text
    pad_id = text.config.pad_token_id

    def pooled(part: torch.Tensor) -> torch.Tensor:
        mask = (part != pad_id).long()
        return text.pooler(text.transformer(input_ids=part, attention_mask=mask), mask)

    return _in_parts(pooled, tokens, pad_id)
