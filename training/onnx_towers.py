"""The torch modules that become the ONNX towers: pre- and post-processing inside the graph.

- ``ImageTower``: uint8 pixels [B,3,H,W] (resized and cropped by the services) -> /255, (x - mean) / std ->
  ``encode_image`` -> L2 normalise. uint8 on the wire is 4x fewer bytes than float32. For open_clip's ViT pooled
  at the class token, the last block runs for that token only (``class_token_features``): the other tokens' outputs
  of the last block are never read, and skipping them is ~6% of a ViT-B/16's FLOPs, with the same embeddings.
- ``TextTower``: int64 ids [B,L] -> ``encode_text`` -> L2 normalise. The attention mask comes from the model's
  own forward (open_clip's HF tower derives it from ``pad_token_id``; its CLIP tower is causal and pools at EOT).
  Where padding cannot change an embedding (``any_length``), L may be anything up to the context length: the
  services cut each batch after its longest text.
- ``TagTower``: image embeddings [B,D] -> the short-tag head's logits -> sigmoid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from training.text_tower import any_length, encode_unpadded

IMAGE_INPUT = "pixel_values"
TEXT_INPUT = "input_ids"
TAGS_INPUT = "embeddings"
EMBEDDINGS_OUTPUT = "embeddings"
TAGS_OUTPUT = "probabilities"


def pools_class_token(visual: nn.Module) -> bool:
    """An open_clip ViT whose embedding is its class token's, after plain pre-norm blocks."""
    return (isinstance(visual, VisionTransformer) and visual.attn_pool is None and visual.pool_type == "tok"
            and visual.transformer.batch_first and type(visual.transformer.resblocks[-1]) is ResidualAttentionBlock
            and not hasattr(visual.transformer.resblocks[-1], "ln_1_kv"))


def class_token_features(visual: VisionTransformer, pixels: torch.Tensor) -> torch.Tensor:
    """``visual(pixels)`` with the last block computed for the class token only: it attends to every token (their
    keys and values), but its attention output, MLP and residuals run for one token instead of all."""
    x = visual._embeds(pixels)
    *blocks, last = visual.transformer.resblocks
    for block in blocks:
        x = block(x)
    keys = last.ln_1(x)
    token = x[:, :1] + last.ls_1(last.attn(keys[:, :1], keys, keys, need_weights=False)[0])
    token = token + last.ls_2(last.mlp(last.ln_2(token)))
    pooled, _ = visual._pool(token)
    return pooled if visual.proj is None else pooled @ visual.proj


class ImageTower(nn.Module):
    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.class_token_only = pools_class_token(model.visual)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixels = (pixel_values.float() / 255.0 - self.mean) / self.std
        if self.class_token_only:
            return F.normalize(class_token_features(self.model.visual, pixels), dim=-1)
        return F.normalize(self.model.encode_image(pixels), dim=-1)


class TextTower(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.any_length = any_length(model)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.any_length:
            return F.normalize(encode_unpadded(self.model, input_ids), dim=-1)
        return F.normalize(self.model.encode_text(input_ids), dim=-1)


class TagTower(nn.Module):
    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(embeddings))
