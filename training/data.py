"""Webdataset shards in, training batches out (the shard format: hqclip/shards.py; the join: hqclip/jobs/join.py).

A sample is what img2dataset writes, ``{key}.jpg|png|webp`` + ``{key}.json`` (+ ``{key}.txt``), with the
VLM-150M annotation fields in the JSON: ``desc`` and ``neg_desc`` (lists of clauses, joined with ", "),
``tags`` and ``neg_tags`` (lists of short strings). The alt text is the JSON's ``caption`` (or ``txt``) or
the ``.txt`` file. A sample with a missing or malformed field, or an image that does not decode, raises
:class:`SampleError`; the pipelines hand it to a :class:`SkipCounter`, which counts it by reason and moves on.

Training reads an endless, deterministic stream: shards are shuffled per epoch from the seed, split over
ranks and workers, shuffled again in a buffer, decoded, and batched inside each worker. Every batch says
which worker made it and how many raw samples that worker has consumed, which is all an exact resume needs
(:class:`StreamState`): workers fast-forward without decoding, and the worker order is rotated so the
DataLoader's round-robin continues where it stopped. Per-sample randomness (which texts, the crop) comes
from a seed derived from the sample's position, never from shared RNG state.
"""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hqclip.shards import ANNOTATION_FIELDS, IMAGE_EXTENSIONS
from training.vocab import Vocabulary


class SampleError(ValueError):
    """A sample that cannot be used; ``reason`` is the counter key (e.g. ``missing:desc``, ``bad_image``)."""

    def __init__(self, reason: str, key: str = "?") -> None:
        super().__init__(f"sample {key}: {reason}")
        self.reason = reason


class SkipCounter:
    """A webdataset-style handler: counts the exception by reason and tells the pipeline to continue."""

    def __init__(self, counts: dict[str, int] | None = None) -> None:
        self.counts: Counter[str] = Counter(counts or {})
        self.paused = False  # while fast-forwarding on resume: those samples were counted before

    def __call__(self, exn: Exception) -> bool:
        if not self.paused:
            self.counts[exn.reason if isinstance(exn, SampleError) else f"unreadable:{type(exn).__name__}"] += 1
        return True


def expand_urls(patterns: Iterable[str] | str) -> list[str]:
    """Shard paths/URLs with brace patterns (``shards/{00000..00099}.tar``) expanded."""
    from braceexpand import braceexpand

    if isinstance(patterns, str):
        patterns = [patterns]
    urls = [url for pattern in patterns for url in braceexpand(str(pattern))]
    if not urls:
        raise ValueError("no shards given: set data.train_shards (paths or brace patterns of .tar files)")
    return urls


def read_raw(urls: Iterable[str], handler: Callable[[Exception], bool],
             select: Callable[[str], bool] | None = None) -> Iterator[dict]:
    """Raw samples (``__key__`` + bytes per extension) from tar shards, in order; ``select`` filters file names."""
    from webdataset.tariterators import tarfile_samples

    return tarfile_samples(({"url": url} for url in urls), handler=handler, select_files=select)


# --- one sample -------------------------------------------------------------------------------------------


@dataclass
class Sample:
    key: str
    image: Image.Image
    alt: str
    desc: str | None = None
    neg_desc: str | None = None
    tags: list[str] | None = None
    neg_tags: list[str] | None = None
    label: str | None = None  # a class name, for zero-shot evaluation on shards


def _text(value: object, name: str, key: str) -> str:
    """A non-empty string from a string or a list of clauses (joined with ", ")."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = ", ".join(v.strip() for v in value if v.strip())
    if not isinstance(value, str):
        raise SampleError(f"malformed:{name}", key)
    if not value.strip():
        raise SampleError(f"missing:{name}", key)
    return value.strip()


def _tags(value: object, name: str, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SampleError(f"malformed:{name}", key)
    tags = [v.strip() for v in value if v.strip()]
    if not tags:
        raise SampleError(f"missing:{name}", key)
    return tags


def decode_sample(raw: dict, require: Iterable[str] = ANNOTATION_FIELDS) -> Sample:
    """A :class:`Sample` from raw bytes; :class:`SampleError` names what is missing or broken.

    Annotation fields not in ``require`` are read when present and well-formed, else left None.
    """
    key = raw.get("__key__", "?")
    try:
        meta = json.loads(raw["json"]) if "json" in raw else {}
    except (ValueError, UnicodeDecodeError) as exn:
        raise SampleError("malformed:json", key) from exn
    if not isinstance(meta, dict):
        raise SampleError("malformed:json", key)
    alt = meta.get("caption", meta.get("txt"))
    if alt is None and "txt" in raw:
        alt = raw["txt"].decode("utf-8", errors="replace")
    if alt is None:
        raise SampleError("missing:caption", key)
    sample = Sample(key=key, image=_image(raw, key), alt=_text(alt, "caption", key))
    required = set(require)
    for name in ANNOTATION_FIELDS:
        parse = _tags if name.endswith("tags") else _text
        if name in required:
            if name not in meta:
                raise SampleError(f"missing:{name}", key)
            setattr(sample, name, parse(meta[name], name, key))
        elif name in meta:
            try:
                setattr(sample, name, parse(meta[name], name, key))
            except SampleError:
                pass
    label = meta.get("label")
    sample.label = label if isinstance(label, str) and label else None
    return sample


def _image(raw: dict, key: str) -> Image.Image:
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if ext is None:
        raise SampleError("missing:image", key)
    try:
        with Image.open(io.BytesIO(raw[ext])) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exn:
        raise SampleError("bad_image", key) from exn


def iterate_samples(
    urls: Iterable[str], counter: SkipCounter, require: Iterable[str] = ANNOTATION_FIELDS
) -> Iterator[Sample]:
    """Every usable sample of the shards, in order (evaluation, vocabulary); the rest go to ``counter``."""
    for raw in read_raw(urls, counter):
        try:
            yield decode_sample(raw, require)
        except SampleError as exn:
            counter(exn)


def iterate_tags(urls: Iterable[str], counter: SkipCounter, limit: int | None = None) -> Iterator[list[str]]:
    """The ``tags`` of each annotated sample, reading only the JSON files (to build the vocabulary)."""
    seen = 0
    for raw in read_raw(urls, counter, select=lambda name: name.endswith(".json")):
        if limit is not None and seen >= limit:
            return
        key = raw.get("__key__", "?")
        try:
            meta = json.loads(raw["json"])
            yield _tags(meta.get("tags") if isinstance(meta, dict) else None, "tags", key)
            seen += 1
        except (KeyError, ValueError, UnicodeDecodeError) as exn:
            counter(exn if isinstance(exn, SampleError) else SampleError("malformed:json", key))


# --- the training stream ----------------------------------------------------------------------------------


@dataclass
class TextChoice:
    """How a sample's positive and negative texts are drawn."""

    p_desc: float = 0.5  # positive: the long description with this probability, else the alt text
    p_neg_desc: float = 0.5  # negative: the long negative description with this probability, else neg tags

    def draw(self, sample: Sample, rng: random.Random) -> tuple[str, str]:
        positive = sample.desc if rng.random() < self.p_desc else sample.alt
        negative = sample.neg_desc if rng.random() < self.p_neg_desc else ", ".join(sample.neg_tags or ())
        return positive, negative


@dataclass
class StreamState:
    """Where each of one process's data workers is: raw samples consumed, skip counts, and whose turn it is."""

    workers: int
    consumed: list[int] = field(default_factory=list)
    skipped: list[dict[str, int]] = field(default_factory=list)
    next_worker: int = 0

    def __post_init__(self) -> None:
        slots = max(self.workers, 1)
        self.consumed = self.consumed or [0] * slots
        self.skipped = self.skipped or [{} for _ in range(slots)]

    def update(self, batch: dict) -> None:
        worker = int(batch["worker"])
        self.consumed[worker] = int(batch["consumed"])
        self.skipped[worker] = dict(batch["skipped"])
        self.next_worker = (worker + 1) % len(self.consumed)

    def skip_counts(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for counts in self.skipped:
            total.update(counts)
        return dict(total)

    def to_dict(self) -> dict:
        return {"workers": self.workers, "consumed": self.consumed, "skipped": self.skipped,
                "next_worker": self.next_worker}


class TrainStream(IterableDataset):
    """Endless batches for one training process: ``images``, ``positive``/``negative`` token ids, ``tags``."""

    def __init__(
        self,
        urls: list[str],
        transform: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        vocab: Vocabulary,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle_buffer: int = 2000,
        choice: TextChoice | None = None,
        rank: int = 0,
        world_size: int = 1,
        state: StreamState,
    ) -> None:
        self.urls, self.transform, self.tokenizer, self.vocab = urls, transform, tokenizer, vocab
        self.batch_size, self.seed, self.shuffle_buffer = batch_size, seed, shuffle_buffer
        self.choice = choice or TextChoice()
        self.rank, self.world_size = rank, world_size
        self.state = state

    def _worker_stream(self, worker: int, workers: int) -> Iterator[dict]:
        """This worker's raw samples, epoch after epoch, shuffled; deterministic given the seed."""
        slot, slots = self.rank * workers + worker, self.world_size * workers
        buffer_rng = random.Random(f"{self.seed}/buffer/{slot}")
        buffer: list[dict] = []
        epoch = 0
        while True:
            urls = list(self.urls)
            random.Random(f"{self.seed}/shards/{epoch}").shuffle(urls)
            if len(urls) >= slots:
                raws: Iterable[dict] = read_raw(urls[slot::slots], self.counter)
            else:  # fewer shards than readers: every reader reads all, keeps every slots-th sample
                raws = (r for i, r in enumerate(read_raw(urls, self.counter)) if i % slots == slot)
            produced = False
            for raw in raws:
                produced = True
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(raw)
                    continue
                index = buffer_rng.randrange(len(buffer))
                buffer[index], raw = raw, buffer[index]
                yield raw
            if not produced and not buffer:
                raise RuntimeError(f"data worker {slot} read no samples from {len(urls)} shard(s): check the paths")
            epoch += 1

    def _item(self, raw: dict, position: str) -> tuple[torch.Tensor, str, str, list[int]]:
        sample = decode_sample(raw)
        rng = random.Random(position)
        positive, negative = self.choice.draw(sample, rng)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.getrandbits(63))
            image = self.transform(sample.image)
        return image, positive, negative, self.vocab.encode(sample.tags or ())

    def _collate(self, items: list, worker: int, consumed: int) -> dict:
        images, positives, negatives, tag_ids = zip(*items)
        tags = torch.zeros(len(items), len(self.vocab), dtype=torch.uint8)
        for row, ids in enumerate(tag_ids):
            tags[row, list(ids)] = 1
        return {
            "images": torch.stack(images),
            "positive": self.tokenizer(list(positives)),
            "negative": self.tokenizer(list(negatives)),
            "tags": tags,
            "worker": worker,
            "consumed": consumed,
            "skipped": dict(self.counter.counts),
        }

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers = info.num_workers if info else 1
        worker = ((info.id if info else 0) + self.state.next_worker) % workers  # resume the round-robin
        self.counter = SkipCounter(self.state.skipped[worker])
        skip = self.state.consumed[worker]
        consumed, items = 0, []
        self.counter.paused = skip > 0
        for raw in self._worker_stream(worker, workers):
            consumed += 1
            if consumed <= skip:
                continue
            self.counter.paused = False
            try:
                items.append(self._item(raw, f"{self.seed}/{self.rank}/{worker}/{consumed}"))
            except SampleError as exn:
                self.counter(exn)
                continue
            if len(items) == self.batch_size:
                yield self._collate(items, worker, consumed)
                items = []


def train_loader(stream: TrainStream, workers: int) -> DataLoader:
    """Batches are made inside the workers; the loader only moves them (round-robin over workers).

    The loader gets its own generator: by default it would draw its workers' base seed from the global torch
    RNG, and a resumed run (which restores that RNG first) would then see a different dropout stream.
    """
    return DataLoader(
        stream, batch_size=None, num_workers=workers, persistent_workers=False, pin_memory=torch.cuda.is_available(),
        prefetch_factor=2 if workers else None, generator=torch.Generator().manual_seed(stream.seed),
    )
