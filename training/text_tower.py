"""Text embeddings without the padding: a batch's token ids cut after its longest text.

open_clip pads every text to the context length (77) and runs the text tower over all of it. Where padding cannot
change a text's embedding, the columns after the batch's longest text are dropped first: the same embeddings for a
fraction of the text tower's FLOPs (captions of 10-20 tokens: 4-7x fewer). That holds for
- open_clip's own CLIP text tower: causal attention, pooled at the end-of-text token (``argmax`` / ``eos``);
- Hugging Face towers (``HFTextEncoder``) that mask padding and pool by mean or first token.
Any other tower runs as open_clip runs it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import text_global_pool
from torch import nn

_MASKED_POOLERS = {"MeanPooler", "ClsPooler", "ClsLastHiddenStatePooler"}


def trim(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """``tokens`` [B, L] without the trailing columns that are padding in every row (at least one column)."""
    used = (tokens != pad_id).any(dim=0).nonzero()
    return tokens[:, : int(used.max()) + 1 if len(used) else 1]


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


def encode_text(model: nn.Module, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """``model.encode_text(tokens, normalize)``, on the trimmed tokens where that gives the same embeddings."""
    if isinstance(model, CLIP) and model.attn_mask is not None and model.text_pool_type in ("argmax", "eos"):
        features = _causal_clip_text(model, trim(tokens, 0))  # open_clip's tokenizers pad with 0
        return F.normalize(features, dim=-1) if normalize else features
    text = getattr(model, "text", None)
    if type(getattr(text, "pooler", None)).__name__ in _MASKED_POOLERS:
        return model.encode_text(trim(tokens, text.config.pad_token_id), normalize=normalize)
    return model.encode_text(tokens, normalize=normalize)
