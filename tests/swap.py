"""Support for the hot-swap tests: a retrained model (the tiny one with other weights) and telling which of the two
answered a request."""

from __future__ import annotations

import asyncio
import io
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from testkit.photos import b64, jpeg

TEXT, IMAGE = "a photo of a cat", "astronaut"


@pytest.fixture(scope="module")
def retrained_checkpoint(tmp_path_factory) -> Path:
    from testkit.tiny import write_seeded_checkpoint

    return write_seeded_checkpoint(tmp_path_factory.mktemp("retrained"), seed=1)


@pytest.fixture
def repo(tiny_repo, tmp_path) -> Path:
    """A copy of the tiny repository the test may export into."""
    return Path(shutil.copytree(tiny_repo, tmp_path / "repo"))


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


@dataclass
class Load:
    """``clients`` concurrent clients sending MIXED in a loop, each until it has had ``after`` answers to requests
    started after ``swapped()``; what each answer came from is recorded, a failure stops them all."""

    client: httpx.AsyncClient
    references: dict
    clients: int = 4
    after: int = 3
    answers: list[tuple[int, float, float, str]] = field(default_factory=list)  # (client, started, ended, model)
    failures: list[str] = field(default_factory=list)
    swapped_at: float | None = None
    answered: asyncio.Event = field(default_factory=asyncio.Event)  # every client has had an answer

    async def _run(self, client: int) -> None:
        seen_after = 0
        while seen_after < self.after and not self.failures:
            started = time.monotonic()
            response = await self.client.post("/v1/embed", json=MIXED)
            if response.status_code != 200:
                self.failures.append(response.text)
                self.answered.set()
                return
            self.answers.append((client, started, time.monotonic(), pair(response.json(), self.references)))
            if len({c for c, *_ in self.answers}) == self.clients:
                self.answered.set()
            seen_after += self.swapped_at is not None and started > self.swapped_at

    def start(self) -> list[asyncio.Task]:
        return [asyncio.create_task(self._run(i)) for i in range(self.clients)]

    def swapped(self) -> None:
        self.swapped_at = time.monotonic()

    def check(self) -> None:
        """No failure; only new answers to requests started after the swap; old ones before it; each client's
        answers old, then new, never back."""
        assert not self.failures, self.failures[:3]
        assert all(model == "new" for _, started, _, model in self.answers if started > self.swapped_at)
        assert any(model == "old" for *_, model in self.answers)
        for client in range(self.clients):
            models = [model for c, *_, model in self.answers if c == client]
            assert models == sorted(models, key=["old", "new"].index), models
