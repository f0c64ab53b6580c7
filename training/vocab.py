"""The short-tag vocabulary: normalised tags, the top K by how many samples carry them.

"Red Car.", "red car" and "“red car”" are one tag. The vocabulary is saved as JSON next to every
checkpoint (with the counts, which initialise the tag head's biases) and exported to the model repository.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201b": "'", "`": "'", "\u00b4": "'"})
_APOSTROPHE_IN_WORD = re.compile(r"(?<=\w)'(?=\w)")
_PUNCT = re.compile(r"[^\w\s'-]|_")
_HYPHENS = re.compile(r"(?<!\w)-+|-+(?!\w)")
_SPACES = re.compile(r"\s+")


def normalize_tag(tag: str) -> str:
    """Lower-case, unify quotes, drop punctuation and quotes (keeping in-word apostrophes and hyphens)."""
    text = unicodedata.normalize("NFKC", tag).translate(_QUOTES).lower()
    text = _APOSTROPHE_IN_WORD.sub("\0", text).replace("'", " ").replace("\0", "'")
    text = _HYPHENS.sub(" ", _PUNCT.sub(" ", text))
    return _SPACES.sub(" ", text).strip()


@dataclass
class Vocabulary:
    """Tags in index order, with how many samples carried each and how many samples were counted."""

    tags: list[str]
    counts: list[int] = field(default_factory=list)
    samples: int = 0

    def __post_init__(self) -> None:
        self.index = {tag: i for i, tag in enumerate(self.tags)}

    def __len__(self) -> int:
        return len(self.tags)

    def encode(self, tags: Iterable[str]) -> list[int]:
        """Indices of the (normalised) tags that are in the vocabulary, each once."""
        found = {self.index.get(normalize_tag(t)) for t in tags}
        return sorted(i for i in found if i is not None)

    def frequencies(self) -> list[float]:
        """The fraction of counted samples carrying each tag (for the head's bias initialisation)."""
        total = max(self.samples, 1)
        return [min(max(c / total, 1e-6), 1 - 1e-6) for c in self.counts]

    def save(self, path: Path) -> None:
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=0))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict:
        return {"tags": self.tags, "counts": self.counts, "samples": self.samples}

    @classmethod
    def from_dict(cls, data: dict) -> Vocabulary:
        return cls(tags=list(data["tags"]), counts=list(data.get("counts", [])), samples=int(data.get("samples", 0)))


def build_vocabulary(tag_lists: Iterable[Iterable[str]], size: int, min_count: int = 1) -> Vocabulary:
    """The ``size`` most frequent normalised tags (a tag counts once per sample); ties break alphabetically."""
    counter: Counter[str] = Counter()
    samples = 0
    for tags in tag_lists:
        samples += 1
        counter.update({t for t in (normalize_tag(x) for x in tags) if t})
    ranked = sorted((item for item in counter.items() if item[1] >= min_count), key=lambda kv: (-kv[1], kv[0]))
    ranked = ranked[:size]
    return Vocabulary(tags=[t for t, _ in ranked], counts=[c for _, c in ranked], samples=samples)
