"""Support for the hot-swap tests: a retrained model (the tiny one with other weights) and telling which of the two
answered a request."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.photos import b64, jpeg

TEXT, IMAGE = "a photo of a cat", "astronaut"


@pytest.fixture(scope="module")
def retrained_checkpoint(tmp_path_factory) -> Path:
    from tests.tiny import save_seeded_weights, write_tiny_checkpoint

    return save_seeded_weights(write_tiny_checkpoint(tmp_path_factory.mktemp("retrained")), seed=1)


def reference(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """open_clip's own (text, image) embeddings of TEXT and IMAGE for the checkpoint in ``folder``."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    with torch.no_grad():
        text = model.eval().encode_text(tokenizer([TEXT]))
        image = model.encode_image(preprocess(Image.open(io.BytesIO(jpeg(IMAGE))).convert("RGB"))[None])
    return tuple(torch.nn.functional.normalize(x, dim=-1)[0].numpy() for x in (text, image))


@pytest.fixture(scope="module")
def references(tiny_checkpoint, retrained_checkpoint) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {"old": reference(tiny_checkpoint), "new": reference(retrained_checkpoint)}


def which(vector, references: dict, tower: int) -> str:
    """Which model embedded ``vector``: the one whose reference it matches (the two are far apart)."""
    matches = [name for name, pair in references.items() if float(np.dot(vector, pair[tower])) >= 0.9999]
    assert len(matches) == 1, {name: float(np.dot(vector, pair[tower])) for name, pair in references.items()}
    return matches[0]


def pair(body: dict, references: dict) -> str:
    """The model of a mixed answer, checking its text and its image came from the same one."""
    text, image = (np.array(item["embedding"]) for item in body["data"])
    text_model, image_model = which(text, references, 0), which(image, references, 1)
    assert text_model == image_model, f"text from the {text_model} model, image from the {image_model} one"
    return text_model


MIXED = {"model": "tiny", "inputs": [{"text": TEXT}, {"image": b64(jpeg(IMAGE))}]}
