"""The HQ-CLIP model: an open_clip model with its transforms and tokenizer, LiT-style tower freezing, and the
one-forward module that DDP wraps (both towers and the short-tag head)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from training.tag_head import TagHead
from training.text_tower import encode_text


@dataclass
class ModelBundle:
    """An open_clip model with its transforms and tokenizer (what training and evaluation need)."""

    model: nn.Module
    train_transform: Callable
    val_transform: Callable
    tokenizer: Callable


def load_bundle(name: str, pretrained: str | None = None) -> ModelBundle:
    """Any model ``training.models.load_model`` loads (an open_clip name + weights, a checkpoint folder)."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from training.models import load_model

    loaded = load_model(name, pretrained)
    preprocess = PreprocessCfg(**loaded.preprocess_cfg)
    source = f"local-dir:{name}" if Path(name).is_dir() else name
    return ModelBundle(loaded.model, image_transform_v2(preprocess, is_train=True),
                       image_transform_v2(preprocess, is_train=False), open_clip.get_tokenizer(source))


# Output projections stay trainable in a frozen tower (LiT): ViT `proj`, timm `head`, text projections.
_PROJECTIONS = ("visual.proj", "visual.head.", "text_projection", "text.proj")


def _is_projection(name: str) -> bool:
    return any(name == p or name.startswith(p if p.endswith(".") else p + ".") for p in _PROJECTIONS)


def freeze_towers(model: nn.Module, image: bool, text: bool, keep_projections: bool = True) -> list[nn.Module]:
    """Stop gradients into the frozen towers; return the modules to keep in eval mode.

    Eval mode (set again after every ``train()``) is how batch-norm statistics and dropout stay frozen; open_clip's
    ``lock_image_tower(freeze_bn_stats=True)`` is not used because it replaces timm's fused BN+activation layers
    and loses their activations.
    """
    frozen: list[nn.Module] = []
    for name, param in model.named_parameters():
        if name.startswith(("logit_scale", "logit_bias")):
            param.requires_grad_(name == "logit_scale")  # the loss is a softmax: a SigLIP bias is unused
            continue
        is_image = name.startswith("visual.")
        if (image if is_image else text) and not (keep_projections and _is_projection(name)):
            param.requires_grad_(False)
    if image:
        frozen.append(model.visual)
    if text:
        text_modules = ("text",) if hasattr(model, "text") else ("transformer", "token_embedding", "ln_final")
        frozen.extend(getattr(model, n) for n in text_modules if isinstance(getattr(model, n, None), nn.Module))
    return frozen


class HQCLIPModel(nn.Module):
    """What DDP wraps: both towers and the tag head in one forward."""

    def __init__(self, clip: nn.Module, tag_head: TagHead | None, negative_text_grad: bool = True) -> None:
        super().__init__()
        self.clip, self.tag_head, self.negative_text_grad = clip, tag_head, negative_text_grad

    def forward(
        self, images: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor | None]:
        image = self.clip.encode_image(images, normalize=True)
        neg = None
        if negative is not None and self.negative_text_grad:
            text, neg = encode_text(self.clip, torch.cat([positive, negative])).chunk(2)
        else:
            text = encode_text(self.clip, positive)
            if negative is not None:
                with torch.no_grad():
                    neg = encode_text(self.clip, negative)
        return {
            "image": image,
            "text": text,
            "negative": neg,
            "tag_logits": self.tag_head(image.float()) if self.tag_head is not None else None,
            "logit_scale": self.clip.logit_scale.exp(),
        }
