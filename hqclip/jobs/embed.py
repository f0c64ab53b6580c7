"""`hqclip embed`: webdataset shards -> image embeddings with their keys, one embedding shard per input shard
(clip-retrieval calls this step inference). The index build and anything else join them by key.

- reader: the index build's shard reader (hqclip/jobs/index_build.py: ids ``<shard stem>/<key>``, captions, tags
  and attributes from the sample's JSON);
- mapper: its :func:`~hqclip.jobs.index_build.embed_batch` through the gateway's own engine (ONNX Runtime or
  OpenVINO in process, or a Triton client, as ``HQCLIP_BACKEND`` says), so CPU nodes, GPU nodes or a Triton fleet
  do the work; an image that does not decode is listed, not embedded;
- writer: ``<out>/<shard stem>.npz``, written whole (temporary file, fsync, rename): ``keys`` and ``ids``
  (strings), ``embeddings`` (float32, n x dim, L2-normalised), ``items`` (one JSON object per id: uri, caption,
  tags, attributes), ``failed`` (ids left out) and ``model``. ``np.load(path)`` reads it, no pickle;
- distributor: hqclip/jobs/distribute.py, one actor call per shard, each actor holding one engine; a shard whose
  output exists is skipped, so a rerun resumes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hqclip.jobs.distribute import Tally, distribute, tar_shards
from hqclip.jobs.index_build import Record, embed_batch, read_shards

SUFFIX = ".npz"


def input_shards(sources: list[Path]) -> list[Path]:
    """Tar shards named directly or found in folders (absolute: actors elsewhere open them)."""
    shards = tar_shards(sources)
    if not shards:
        raise ValueError(f"no .tar shards in {', '.join(map(str, sources))}")
    return [s.resolve() for s in shards]


def output_path(out_dir: Path, shard: str) -> Path:
    return out_dir / (Path(shard).stem + SUFFIX)


def write_embeddings(path: Path, records: list[Record], vectors: np.ndarray, failed: list[str], model: str) -> None:
    """One embedding shard, atomically: a reader (or a rerun) never sees half of one."""
    tmp = path.with_name(path.name + ".tmp")
    items = [json.dumps({k: v for k, v in dataclasses.asdict(r.item()).items() if k != "id"}, ensure_ascii=False)
             for r in records]
    with open(tmp, "wb") as f:
        np.savez(f, keys=np.array([r.id.rsplit("/", 1)[-1] for r in records], dtype=str),
                 ids=np.array([r.id for r in records], dtype=str), embeddings=vectors.astype(np.float32),
                 items=np.array(items, dtype=str), failed=np.array(failed, dtype=str), model=np.array(model))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_embeddings(path: Path) -> tuple[list[str], np.ndarray, list[dict], str]:
    """(ids, embeddings, items as dicts, model) of one embedding shard."""
    with np.load(path) as data:
        return (data["ids"].tolist(), data["embeddings"], [json.loads(i) for i in data["items"].tolist()],
                str(data["model"]))


def embedding_shards(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob(f"*{SUFFIX}"))


async def embed_shard(engine, shard: Path, out: Path, batch_size: int) -> dict:
    """Embed one input shard into ``out``; the counts the distributor sums."""
    kept: list[Record] = []
    vectors: list[np.ndarray] = []
    failed: list[str] = []
    batch: list[Record] = []

    async def flush() -> None:
        records, embedded = await embed_batch(engine, batch, failed)
        kept.extend(records)
        if embedded is not None:
            vectors.append(embedded)
        batch.clear()

    for record in read_shards([shard], lambda _: False):
        batch.append(record)
        if len(batch) >= batch_size:
            await flush()
    if batch:
        await flush()
    dim = engine.manifest.embed_dim
    matrix = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
    await asyncio.to_thread(write_embeddings, out, kept, matrix, failed, engine.manifest.name)
    return {"images": len(kept), "failed": len(failed)}


@dataclass
class EmbedWork:
    """The job as the distributor sees it (picklable): each actor starts its own engine on its own loop."""

    shards: list[Path]
    out_dir: Path
    settings: object  # services.settings.Settings: model repository, backend, batching, Triton
    batch_size: int = 64

    async def open(self) -> Callable[[str], Awaitable[dict]]:
        from services.engine import Engine
        from services.metrics import Metrics

        by_name = {shard.name: shard for shard in self.shards}
        self.engine = engine = Engine(self.settings, Metrics())  # lives as long as the actor (or this run)
        await engine.start()
        self.out_dir.mkdir(parents=True, exist_ok=True)

        def embed(name: str) -> Awaitable[dict]:
            return embed_shard(engine, by_name[name], output_path(self.out_dir, name), self.batch_size)

        return embed

    async def close(self) -> None:
        await self.engine.close()


def embed_dataset(sources: list[Path], out_dir: Path, settings, *, batch_size: int = 64, use_ray: bool = False,
                  ray_address: str | None = None, actors: int = 1, actor_cpus: float = 1.0, actor_gpus: float = 0.0,
                  retries: int = 1, progress: bool = True) -> Tally:
    """Every input shard whose embedding shard is not in ``out_dir`` yet, in this process or on Ray."""
    shards = input_shards(sources)
    out_dir = Path(out_dir).resolve()
    work = EmbedWork(shards, out_dir, settings, batch_size)
    return distribute([s.name for s in shards], lambda name: output_path(out_dir, name).exists(), work,
                      use_ray=use_ray, address=ray_address, actors=max(1, min(actors, len(shards))),
                      actor_cpus=actor_cpus, actor_gpus=actor_gpus, retries=retries, progress=progress,
                      label="embed shards")


def build_from_embeddings(folder: Path, name: str, settings, kind: str = "auto", snapshot_every: int = 20_000,
                          progress: bool = True):
    """The index build's writer on embedding shards: every id not in collection ``name`` yet is upserted with its
    vector and metadata (no model runs). Returns the index build's Summary."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from hqclip.jobs.index_build import Summary, auto_params, open_or_create
    from services.index.collection import Item
    from services.index.manager import open_catalog

    paths = embedding_shards(folder)
    if not paths:
        raise FileNotFoundError(f"{folder} holds no embedding shards (*{SUFFIX}): run `hqclip embed` first")
    total = 0
    for path in paths:
        with np.load(path) as data:
            total += len(data["ids"])
            dim, model = data["embeddings"].shape[1], str(data["model"])
    params = auto_params(settings.index, kind, total)
    catalog = open_catalog(settings.index)
    collection = open_or_create(catalog, name, params, dim, model)  # a collection made new adopts the first
    # fingerprint that queries it (the shards name their model, not its fingerprint)
    added = existing = since_snapshot = 0
    failed: list[str] = []
    try:
        with Progress(TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      disable=not progress) as bar:
            task = bar.add_task("index", total=total)
            for path in paths:
                ids, vectors, items, shard_model = read_embeddings(path)
                if shard_model != model or vectors.shape[1] != dim:
                    raise ValueError(f"{path} holds {vectors.shape[1]}-d vectors of model '{shard_model}', the "
                                     f"other shards {dim}-d of '{model}': embed them all with one model")
                with np.load(path) as data:
                    failed.extend(data["failed"].tolist())
                known = collection.get(ids)
                new = [i for i, item_id in enumerate(ids) if item_id not in known]
                existing += len(ids) - len(new)
                if new:
                    collection.upsert([Item(id=ids[i], **items[i]) for i in new], vectors[new])
                    added += len(new)
                    since_snapshot += len(new)
                if since_snapshot >= snapshot_every:
                    collection.snapshot()
                    since_snapshot = 0
                bar.advance(task, len(ids))
        count = collection.count  # before the close: a Milvus collection answers only while connected
    finally:
        collection.close(snapshot=True)
        catalog.close()
    return Summary(name, collection.spec.kind, count, added, existing, failed)
