"""Tokenizers the services run without torch, giving exactly the ids open_clip's tokenizers give.

- ``clip_bpe``: open_clip's ``SimpleTokenizer`` (OpenAI CLIP's byte-level BPE) on the merges file the export copied
  into the repository. Over-long texts are cut as open_clip cuts them: the first ``context_length`` tokens, the
  last one replaced by end-of-text.
- ``hf``: a Hugging Face ``tokenizers`` ``tokenizer.json``, truncated and padded to the context length, after
  open_clip's text cleaning, as open_clip's ``HFTokenizer`` does.
Both return ids int64 [n, context_length] and, per text, whether it was truncated. ``trim_padding`` cuts a batch
of them after its longest text, for text towers exported to take any length (``TextSpec.any_length``).
"""

from __future__ import annotations

import functools
import gzip
import heapq
import html
import string
from pathlib import Path

import ftfy
import numpy as np
import regex

from hqclip.repo.manifest import TokenizerSpec

Tokenized = tuple[np.ndarray, list[bool]]
TRIM_MULTIPLE = 8  # trimmed lengths are rounded up to a multiple of this: few distinct shapes for the runtimes

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _basic_clean(text: str) -> str:
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def _whitespace(text: str) -> str:
    return " ".join(text.split())


def clean_text(text: str, clean: str) -> str:
    """open_clip's text cleaning: ftfy, HTML unescaping (twice), then whitespace / lower-case / canonical form."""
    text = _basic_clean(text)
    if clean == "lower":
        return _whitespace(text).lower()
    if clean == "whitespace":
        return _whitespace(text)
    if clean == "canonicalize":
        return _whitespace(text.replace("_", " ").translate(_PUNCTUATION).lower())
    raise ValueError(f"unknown text cleaning '{clean}'")


def _byte_alphabet() -> list[str]:
    """CLIP's reversible map of the 256 byte values to printable characters (printable bytes map to themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


class ClipBpeTokenizer:
    """open_clip's SimpleTokenizer in numpy."""

    SPECIAL = ("<start_of_text>", "<end_of_text>")
    N_MERGES = 49152 - 256 - 2

    def __init__(self, merges_file: Path, context_length: int, clean: str = "lower", cache_size: int = 65536) -> None:
        with gzip.open(merges_file) as f:
            lines = f.read().decode("utf-8").split("\n")[1 : self.N_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        self.byte_chars = _byte_alphabet()
        base = sorted(self.byte_chars)  # CLIP's order: printable bytes first, then the shifted ones
        vocab = base + [c + "</w>" for c in base] + ["".join(m) for m in merges]
        vocab += list(self.SPECIAL)
        self.ids = {token: i for i, token in enumerate(vocab)}
        self.ranks = {merge: i for i, merge in enumerate(merges)}
        self.sot_id, self.eot_id = self.ids[self.SPECIAL[0]], self.ids[self.SPECIAL[1]]
        self.pattern = regex.compile(
            "|".join(self.SPECIAL) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self.context_length = context_length
        self.clean = clean
        self._word_ids = functools.lru_cache(maxsize=cache_size)(self._word_ids_uncached)

    def _bpe(self, word: str) -> list[str]:
        """CLIP's BPE: merge the lowest-ranked adjacent pair everywhere (left to right, no overlaps), repeat until
        no known pair is left. Done on a linked list with a heap of pairs, so a long word costs n log n, not n^2."""
        symbols: list[str | None] = [*word[:-1], word[-1] + "</w>"]
        after = [*range(1, len(symbols)), -1]  # next live symbol; merges keep the left one, so order = index
        before = [*range(-1, len(symbols) - 1)]
        where: dict[tuple[str, str], set[int]] = {}  # pair -> indices of its left symbol
        heap: list[tuple[int, tuple[str, str]]] = []

        def pair_at(i: int) -> tuple[str, str] | None:
            return (symbols[i], symbols[after[i]]) if i >= 0 and after[i] >= 0 else None

        def add(i: int) -> None:
            pair = pair_at(i)
            if pair in self.ranks:
                if not where.get(pair):
                    heapq.heappush(heap, (self.ranks[pair], pair))
                where.setdefault(pair, set()).add(i)

        def discard(i: int) -> None:
            pair = pair_at(i)
            if pair in where:
                where[pair].discard(i)

        for i in range(len(symbols) - 1):
            add(i)
        while heap:
            _, best = heapq.heappop(heap)
            for i in sorted(where.pop(best, ())):
                if symbols[i] is None or pair_at(i) != best:
                    continue  # consumed by the merge just left of it (an overlapping occurrence)
                right = after[i]
                discard(before[i])
                discard(right)
                symbols[i], symbols[right] = best[0] + best[1], None
                after[i] = after[right]
                if after[i] >= 0:
                    before[after[i]] = i
                add(before[i])
                add(i)
        return [s for s in symbols if s is not None]

    def _word_ids_uncached(self, word: str) -> tuple[int, ...]:
        if word in self.SPECIAL:
            return (self.ids[word],)
        chars = "".join(self.byte_chars[b] for b in word.encode("utf-8"))
        return tuple(self.ids[part] for part in self._bpe(chars))

    def encode(self, text: str, limit: int | None = None) -> list[int]:
        """BPE ids of ``text`` without start/end tokens; stops once more than ``limit`` ids are known."""
        ids: list[int] = []
        for match in self.pattern.finditer(clean_text(text, self.clean)):
            ids.extend(self._word_ids(match.group()))
            if limit is not None and len(ids) > limit:
                break
        return ids

    def __call__(self, texts: list[str]) -> Tokenized:
        room = self.context_length - 2  # start and end of text
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        truncated = []
        for row, text in zip(out, texts):
            ids = self.encode(text, limit=room)
            truncated.append(len(ids) > room)
            ids = [self.sot_id, *ids[:room], self.eot_id]
            row[: len(ids)] = ids
        return out, truncated


class HFJsonTokenizer:
    """A ``tokenizers`` tokenizer.json, truncating and padding to the context length as open_clip's HFTokenizer."""

    def __init__(self, file: Path, context_length: int, clean: str, pad_id: int) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(file))
        truncation = self.tokenizer.truncation or {}
        padding = self.tokenizer.padding or {}
        self.tokenizer.enable_truncation(max_length=context_length,
                                         direction=truncation.get("direction", "right"))
        self.tokenizer.enable_padding(length=context_length, pad_id=pad_id,
                                      pad_token=self.tokenizer.id_to_token(pad_id) or padding.get("pad_token", "[PAD]"),
                                      direction=padding.get("direction", "right"))
        self.context_length = context_length
        self.clean = clean

    def __call__(self, texts: list[str]) -> Tokenized:
        encodings = self.tokenizer.encode_batch([clean_text(t, self.clean) for t in texts])
        ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(texts), self.context_length)
        return ids, [bool(e.overflowing) for e in encodings]


def load_tokenizer(spec: TokenizerSpec, repo: Path) -> ClipBpeTokenizer | HFJsonTokenizer:
    """The tokenizer a manifest's text tower names; its file is relative to the repository."""
    path = Path(repo) / spec.file
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} is missing: re-run `hqclip export`")
    if spec.kind == "clip_bpe":
        return ClipBpeTokenizer(path, spec.context_length, spec.clean)
    return HFJsonTokenizer(path, spec.context_length, spec.clean, spec.pad_id)


def trim_padding(ids: np.ndarray, pad_id: int) -> np.ndarray:
    """``ids`` [n, L] without the trailing columns that are padding in every row, kept to a multiple of
    ``TRIM_MULTIPLE`` (or L). A text of 10 tokens costs a text tower ~8x less than at the full 77."""
    used = np.flatnonzero((ids != pad_id).any(axis=0))
    length = int(used[-1]) + 1 if len(used) else 1
    return ids[:, : min(-(-length // TRIM_MULTIPLE) * TRIM_MULTIPLE, ids.shape[1])]
