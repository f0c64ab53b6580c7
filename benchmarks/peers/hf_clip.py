"""A Hugging Face ``CLIPModel`` folder for infinity-emb: ViT-B/16 shapes, random weights, built offline.

    build/venvs/infinity/bin/python benchmarks/peers/hf_clip.py build/peers/hf-clip-vit-b-16

Run it with infinity's own virtualenv (benchmarks/peers/setup_infinity.sh), so the files are written by the
transformers version that reads them.
The configuration is OpenAI's CLIP ViT-B/16 (the shapes of open_clip's ``ViT-B-16``); the tokenizer files are
written from open_clip's bundled BPE merges, so nothing comes from a hub.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path


def build(folder: Path) -> Path:
    import torch
    from open_clip.tokenizer import SimpleTokenizer, default_bpe
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizerFast

    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    # open_clip names the special tokens <start_of_text> / <end_of_text>; Hugging Face's CLIP tokenizer <|...|>
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {renamed.get(token, token): index for token, index in SimpleTokenizer().encoder.items()}
    with gzip.open(default_bpe()) as f:
        merges = f.read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizerFast(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    config = CLIPConfig(
        text_config={"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8, "num_hidden_layers": 12,
                         "max_position_embeddings": 77, "vocab_size": 49408},
        vision_config={"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                       "num_hidden_layers": 12, "image_size": 224, "patch_size": 16},
        projection_dim=512,
    )
    torch.manual_seed(0)
    CLIPModel(config).eval().save_pretrained(folder)
    return folder


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
