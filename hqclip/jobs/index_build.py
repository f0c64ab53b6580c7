"""`hqclip index build`: a folder of images or webdataset shards -> a collection the gateway loads at start.

Shaped like clip-retrieval's inference job, one piece per step:

- reader: :class:`Record` s from a folder (recursive, in a fixed shuffled order so an IVF trained on the first
  items sees every sub-folder; ``photo.txt`` next to ``photo.jpg`` is its caption, ``photo.json`` its metadata) or
  from ``.tar`` shards (members grouped by key, read by the refine job's reader: ``jpg|png|webp`` + ``json``/``txt``).
- mapper: a batch of encoded images -> embeddings through the gateway's own :class:`~services.engine.Engine`
  (the same decoding, preprocessing, backend and micro-batcher as ``/v1/embed``; no torch).
- writer: :meth:`Collection.upsert`: each batch is durable (the WAL) once written.
- runner: :func:`build`: skips ids the collection already holds (a rerun resumes), shows a progress bar, logs
  images that do not decode, snapshots every ``snapshot_every`` items and at the end.

The kind ``auto`` picks ``ivfpq`` from ``IVF_MIN_ITEMS`` items up (with ``nlist`` ~ 4 sqrt(n)), else ``flat``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from hqclip.shards import IMAGE_EXTENSIONS, count_samples, image_files, read_tar
from services.errors import BadInput
from services.index.collection import Catalog, Collection, IndexSpec, Info, Item
from services.index.manager import open_catalog
from services.settings import IndexParams, Settings

log = logging.getLogger("hqclip.index.build")

IVF_MIN_ITEMS = 100_000


@dataclass
class Record:
    id: str
    image: bytes
    uri: str
    caption: str | None = None
    tags: list[str] = field(default_factory=list)
    attributes: dict[str, Any] = field(default_factory=dict)

    def item(self) -> Item:
        return Item(id=self.id, uri=self.uri, caption=self.caption, tags=self.tags, attributes=self.attributes)


@dataclass
class Summary:
    collection: str
    kind: str
    count: int
    added: int
    skipped_existing: int
    failed: list[str]


# --- reader ---
def _metadata(meta: dict) -> tuple[list[str], dict[str, Any]]:
    """VLM-150M-style JSON: ``tags`` become the item's tags, every other field an attribute."""
    tags = meta.get("tags") if isinstance(meta.get("tags"), list) else []
    return [str(t) for t in tags], {k: v for k, v in meta.items() if k not in ("tags", "caption")}


def folder_files(folder: Path) -> list[Path]:
    files = image_files(folder)
    random.Random(0).shuffle(files)
    return files


def read_folder(folder: Path, files: list[Path], known: Callable[[str], bool]) -> Iterator[Record | None]:
    for path in files:
        if known(str(path.relative_to(folder))):
            yield None  # already stored: not even read
            continue
        meta: dict = {}
        if path.with_suffix(".json").is_file():
            loaded = json.loads(path.with_suffix(".json").read_text())
            meta = loaded if isinstance(loaded, dict) else {}
        caption = meta.get("caption")
        if caption is None and path.with_suffix(".txt").is_file():
            caption = path.with_suffix(".txt").read_text(errors="replace").strip()
        tags, attributes = _metadata(meta)
        yield Record(str(path.relative_to(folder)), path.read_bytes(), path.resolve().as_uri(), caption, tags,
                     attributes)


def read_shards(shards: list[Path], known: Callable[[str], bool]) -> Iterator[Record | None]:
    for shard in shards:
        for sample in read_tar(shard):
            if known(f"{shard.stem}/{sample.key}"):
                yield None
                continue
            if sample.image is None:
                log.warning("%s: sample %s has no image; skipped", shard.name, sample.key)
                continue
            tags, attributes = _metadata(sample.meta)
            yield Record(f"{shard.stem}/{sample.key}", sample.image, f"{shard.resolve().as_uri()}#{sample.key}",
                         sample.caption, tags, attributes)


def open_source(source: Path) -> tuple[int, Callable[[Callable[[str], bool]], Iterator[Record | None]]]:
    """How many records a folder of images, a .tar shard or a folder of .tar shards holds, and a reader of them
    that yields None in place of each record whose id ``known`` says is stored already."""
    source = Path(source)
    if source.is_file() and source.suffix == ".tar":
        return count_samples(source), lambda known: read_shards([source], known)
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is neither a folder of images nor a .tar shard")
    shards = sorted(source.glob("*.tar"))
    if shards:
        return sum(count_samples(s) for s in shards), lambda known: read_shards(shards, known)
    files = folder_files(source)
    if not files:
        raise FileNotFoundError(f"{source} holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no .tar shards")
    return len(files), lambda known: read_folder(source, files, known)


# --- the parts that depend on size ---
def auto_params(defaults: IndexParams, kind: str, count: int) -> IndexParams:
    if kind == "auto":
        kind = "ivfpq" if count >= IVF_MIN_ITEMS else "flat"
    params = defaults.model_copy(update={"kind": kind})
    if kind == "ivfpq" and count >= IVF_MIN_ITEMS:
        params.nlist = 2 ** round(math.log2(4 * math.sqrt(count)))
    return params


def open_or_create(catalog: Catalog, name: str, params: IndexParams, dim: int, model: str,
                   fingerprint: str | None = None) -> Collection:
    """Collection ``name`` of ``catalog`` (HQCLIP_INDEX__BACKEND's), made if new; refused when another model (its
    fingerprint) or dimension embedded it. One made before fingerprints were recorded adopts ``fingerprint``."""
    if catalog.exists(name):
        collection = catalog.open(name)
        other = collection.fingerprint not in (None, fingerprint) or collection.model not in (None, model)
        if other or collection.spec.dim != dim:
            collection.close(snapshot=False)
            raise ValueError(f"collection '{name}' holds {collection.spec.dim}-d vectors of model "
                             f"'{collection.model}', not model '{model}' ({dim}-d): build into another name and point "
                             "an alias at it (POST /v1/collections/{alias}/alias), or delete it")
        if collection.fingerprint is None and fingerprint is not None:
            collection.adopt(fingerprint)
        return collection
    spec = IndexSpec(**params.model_dump(), dim=dim)
    return catalog.create(name, Info(spec, model, fingerprint, time.time()))


# --- mapper ---
async def embed_batch(engine, batch: list[Record], failed: list[str]) -> tuple[list[Record], np.ndarray | None]:
    """Embeddings of a batch; an image that does not decode is logged and left out, not the whole batch."""
    try:
        return batch, await engine.embed_images([r.image for r in batch])
    except BadInput:
        if len(batch) == 1:
            failed.append(batch[0].id)
            return [], None
    kept, vectors = [], []
    for record in batch:
        one, vector = await embed_batch(engine, [record], failed)
        if one:
            kept.append(record)
            vectors.append(vector[0])
    return kept, (np.stack(vectors) if vectors else None)


# --- runner ---
def build(source: Path, name: str, settings: Settings, kind: str = "auto", batch_size: int = 64,
          snapshot_every: int = 20_000, progress: bool = True) -> Summary:
    """Embed every image of ``source`` into collection ``name`` of ``settings.index`` (its backend: a folder under
    ``dir`` for FAISS, Milvus at ``milvus_uri``); resumable."""
    from services.engine import Engine
    from services.metrics import Metrics

    total, reader = open_source(source)

    async def run() -> Summary:
        engine = Engine(settings, Metrics())
        await engine.start()
        manifest = engine.manifest
        params = auto_params(settings.index, kind, total)
        catalog = open_catalog(settings.index)
        collection = open_or_create(catalog, name, params, manifest.embed_dim, manifest.name, manifest.fingerprint)
        added = existing = since_snapshot = 0
        failed: list[str] = []
        columns = (TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.speed} img/s"),
                   TimeElapsedColumn(), TimeRemainingColumn())
        try:
            with Progress(*columns, disable=not progress) as bar:
                task = bar.add_task("embed", total=total)

                async def flush(batch: list[Record]) -> None:
                    nonlocal added, since_snapshot
                    kept, vectors = await embed_batch(engine, batch, failed)
                    if kept:
                        await asyncio.to_thread(collection.upsert, [r.item() for r in kept], vectors)
                        added += len(kept)
                        since_snapshot += len(kept)
                    if since_snapshot >= snapshot_every:
                        await asyncio.to_thread(collection.snapshot)
                        since_snapshot = 0
                    bar.advance(task, len(batch))

                batch: list[Record] = []
                for record in reader(lambda record_id: bool(collection.get([record_id]))):
                    if record is None:
                        existing += 1
                        bar.advance(task)
                        continue
                    batch.append(record)
                    if len(batch) >= batch_size:
                        await flush(batch)
                        batch = []
                if batch:
                    await flush(batch)
            count = collection.count  # before the close: a Milvus collection answers only while connected
        finally:
            collection.close(snapshot=True)
            catalog.close()
            await engine.close()
        for record_id in failed:
            log.warning("%s: not a decodable image; skipped", record_id)
        return Summary(name, collection.spec.kind, count, added, existing, failed)

    return asyncio.run(run())
