"""Cached tower outputs as one file: the demo's training features and its photo features share how they are saved,
loaded and looked up by text."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import torch


class CachedTensors:
    """Base of a dataclass of cached tower outputs with its distinct ``texts`` and their features in ``text``."""

    texts: list[str]
    text: torch.Tensor

    def save(self, path: Path) -> None:
        """Atomically: a temporary file, then a rename."""
        tmp = Path(path).with_suffix(".tmp")
        torch.save(asdict(self), tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path):
        return cls(**torch.load(path, map_location="cpu", weights_only=False))

    def text_rows(self, texts: Iterable[str]) -> torch.Tensor:
        where = {t: i for i, t in enumerate(self.texts)}
        return self.text[[where[t] for t in texts]]


def pooled_texts(model, tokenizer, texts: list[str], batch_size: int, bar) -> list[torch.Tensor]:
    """The text tower's pooled features (before the projection) of ``texts``, a batch at a time, in order."""
    from training.text_tower import encode_pooled

    rows = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        rows.append(encode_pooled(model, tokenizer(chunk)).float())
        bar.update(len(chunk))
    return rows
