"""open_clip models: load one (by name, from a checkpoint file or folder, or the hub) and describe its tokenizer.

Sources ``load_model`` accepts:
- an open_clip name (``ViT-B-16``): random weights, or ``pretrained=`` a checkpoint file or an open_clip tag;
- a local folder with ``open_clip_config.json`` and optionally ``open_clip_model.safetensors`` /
  ``open_clip_pytorch_model.bin`` (the layout of the released HQ-CLIP weights, e.g.
  ``zhixiangwei/vlm150m-hqclip-large-vitb16``); without a weights file the model is randomly initialised;
- ``hf-hub:org/repo`` when a network is there.
Weights come only from that checkpoint: a model without one is random everywhere (no tower is silently filled
with ImageNet or Hugging Face base weights).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


@dataclass
class TokenizerInfo:
    """What the services need to tokenize exactly like the model's open_clip tokenizer, without torch.

    ``source`` is the BPE merges file (``kind="clip_bpe"``) or a ``tokenizers.Tokenizer`` (``kind="hf"``).
    """

    kind: Literal["clip_bpe", "hf"]
    context_length: int
    clean: Literal["lower", "whitespace", "canonicalize"]
    pad_id: int
    source: Path | tokenizers.Tokenizer  # noqa: F821 (tokenizers is imported lazily)

    def save(self, folder: Path) -> str:
        """Write the tokenizer file into ``folder``; return its file name."""
        if self.kind == "clip_bpe":
            name = Path(self.source).name
            (folder / name).write_bytes(Path(self.source).read_bytes())
            return name
        self.source.save(str(folder / "tokenizer.json"))
        return "tokenizer.json"


@dataclass
class LoadedModel:
    model: nn.Module
    architecture: str
    weights: str  # where the weights came from; "random" when there were none
    preprocess_cfg: dict
    tokenizer: TokenizerInfo


def _clean_name(clean_fn) -> str:
    from open_clip.tokenizer import get_clean_fn

    for name in ("lower", "whitespace", "canonicalize"):
        if clean_fn is get_clean_fn(name):
            return name
    raise ValueError(f"unknown open_clip text cleaning function {clean_fn!r}")


def _hf_backend(hf_tokenizer, context_length: int):
    """A copy of a transformers fast tokenizer's backend, truncating and padding as open_clip calls it."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    backend.enable_truncation(max_length=context_length, direction=hf_tokenizer.truncation_side)
    backend.enable_padding(length=context_length, pad_id=hf_tokenizer.pad_token_id, pad_token=hf_tokenizer.pad_token,
                           direction=hf_tokenizer.padding_side)
    return backend


def tokenizer_info(tokenizer) -> TokenizerInfo:
    """Describe an open_clip tokenizer (SimpleTokenizer, HFTokenizer, SigLipTokenizer) for export."""
    from open_clip.tokenizer import HFTokenizer, SigLipTokenizer, SimpleTokenizer, default_bpe

    if isinstance(tokenizer, SimpleTokenizer):
        if tokenizer.reduction_fn is not None or len(tokenizer.all_special_ids) != 2:
            raise ValueError("only open_clip's plain SimpleTokenizer exports (no reduction_mask, no extra special "
                             "tokens): those are training-time options")
        return TokenizerInfo("clip_bpe", tokenizer.context_length, _clean_name(tokenizer.clean_fn), 0,
                             Path(default_bpe()))
    if isinstance(tokenizer, HFTokenizer):
        if tokenizer.tokenizer_mode or tokenizer.strip_sep_token:
            raise ValueError("HFTokenizer with tokenizer_mode or strip_sep_token does not export yet")
        hf = tokenizer.tokenizer
        return TokenizerInfo("hf", tokenizer.context_length, _clean_name(tokenizer.clean_fn), hf.pad_token_id,
                             _hf_backend(hf, tokenizer.context_length))
    if isinstance(tokenizer, SigLipTokenizer):
        hf = tokenizer.tokenizer
        return TokenizerInfo("hf", tokenizer.context_length, "canonicalize", hf.pad_token_id,
                             _hf_backend(hf, tokenizer.context_length))
    raise TypeError(f"cannot export tokenizer {type(tokenizer).__name__}")


def _architecture(model_cfg: dict, fallback: str) -> str:
    """The open_clip name whose config equals ``model_cfg``, else ``fallback``."""
    import open_clip

    for name in open_clip.list_models():
        if open_clip.get_model_config(name) == model_cfg:
            return name
    return fallback


def _weights_in(folder: Path) -> str:
    found = sorted(p.name for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    return str(folder / found[0]) if found else "random"


def load_model(model: str, pretrained: str | None = None) -> LoadedModel:
    """Build an open_clip model in eval mode with its preprocessing config and tokenizer description."""
    import open_clip

    folder = Path(model)
    if folder.is_dir():
        config_path = folder / "open_clip_config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{folder} has no open_clip_config.json: a checkpoint folder needs one "
                                    "(the layout `open_clip.push_to_hf_hub` writes)")
        if pretrained:
            raise ValueError("--pretrained goes with a model name, not a checkpoint folder (its weights are inside)")
        source = f"local-dir:{folder}"
        architecture = _architecture(json.loads(config_path.read_text())["model_cfg"], folder.name)
        weights = _weights_in(folder)
    elif model.startswith("hf-hub:"):
        source, architecture, weights = model, model.removeprefix("hf-hub:"), model
    else:
        if model not in open_clip.list_models():
            raise ValueError(f"'{model}' is neither a folder nor an open_clip model name "
                             f"(`python -c 'import open_clip; print(open_clip.list_models())'`)")
        source, architecture, weights = model, model, pretrained or "random"

    net = open_clip.create_model(source, pretrained=pretrained, pretrained_image=False, pretrained_text=False)
    net.eval()
    tokenizer = open_clip.get_tokenizer(source)
    return LoadedModel(net, architecture, weights, open_clip.get_model_preprocess_cfg(net), tokenizer_info(tokenizer))


def logit_scale_and_bias(model: nn.Module) -> tuple[float, float | None]:
    """exp(learned logit scale) and the learned bias (SigLIP-style models), as plain floats."""
    with torch.no_grad():
        scale = float(model.logit_scale.exp().reshape(()))
        bias = getattr(model, "logit_bias", None)
        return scale, None if bias is None else float(bias.reshape(()))
