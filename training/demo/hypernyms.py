"""The everyday names ImageNet lacks, from WordNet: "cat" for its cat breeds, "person" for its groom and diver.

The 1000 ImageNet classes are WordNet 3.0 noun synsets (their ids, ``n02123045``, are the synsets' offsets in
WordNet's ``data.noun``), nearly all of them leaves: "tabby", "Egyptian Mau", "palace", but no "cat" or
"building". People name photos at the level above. So the distillation (training/demo/distill.py) gives each
ImageNet class, beside its own name, the names of its WordNet ancestors that cover at least ``min_leaves`` and
at most ``max_leaves`` of the 1000 classes: specific enough to be a name ("domestic cat", "cat", "feline",
"building", "person", "flower"), not "entity" or "artifact" (hundreds of classes).

WordNet comes from the Debian package ``wordnet-base`` (``/usr/share/wordnet/data.noun``); the ImageNet class
ids from timm's ``imagenet_synsets.txt`` (the standard class order, that of open_clip's class names).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

WORDNET_NOUNS = Path("/usr/share/wordnet/data.noun")
APT_PACKAGE = "wordnet-base"
MIN_LEAVES, MAX_LEAVES = 2, 100


@dataclass(frozen=True)
class Hypernym:
    name: str  # the synset's first lemma, "domestic cat"
    classes: tuple[int, ...]  # the ImageNet classes below it


@cache
def _wordnet_nouns(path: Path = WORDNET_NOUNS) -> tuple[dict[int, str], dict[int, tuple[int, ...]]]:
    """(offset -> first lemma, offset -> hypernym offsets) of WordNet's noun synsets (``wndb(5)`` format)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: apt-get install {APT_PACKAGE}")
    names, parents = {}, {}
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith("  "):  # the licence header
            continue
        fields = line.split(" | ")[0].split()
        offset, words = int(fields[0]), int(fields[3], 16)
        at = 4 + 2 * words
        pointers = [fields[at + 1 + 4 * i: at + 5 + 4 * i] for i in range(int(fields[at]))]
        names[offset] = fields[4].replace("_", " ")
        parents[offset] = tuple(int(p[1]) for p in pointers if p[0] in ("@", "@i") and p[2] == "n")
    return names, parents


def imagenet_offsets() -> list[int]:
    """The WordNet offsets of the 1000 ImageNet classes, in class order."""
    from importlib.resources import files

    lines = files("timm.data").joinpath("_info/imagenet_synsets.txt").read_text().split()
    return [int(wnid[1:]) for wnid in lines]


def imagenet_hypernyms(min_leaves: int = MIN_LEAVES, max_leaves: int = MAX_LEAVES) -> list[Hypernym]:
    """The WordNet ancestors of the ImageNet classes with ``min_leaves``-``max_leaves`` classes below them, by
    name."""
    names, parents = _wordnet_nouns()
    below: dict[int, list[int]] = {}
    for index, offset in enumerate(imagenet_offsets()):
        seen, stack = set(), [offset]
        while stack:
            for parent in parents[stack.pop()]:
                if parent not in seen:
                    seen.add(parent)
                    stack.append(parent)
        for ancestor in seen:
            below.setdefault(ancestor, []).append(index)
    return sorted((Hypernym(names[o], tuple(c)) for o, c in below.items() if min_leaves <= len(c) <= max_leaves),
                  key=lambda h: (h.name, h.classes))
