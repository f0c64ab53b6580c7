"""The collections a gateway serves: one folder each under ``HQCLIP_INDEX__DIR``, all opened at start, snapshotted
in the background every ``snapshot_interval_s``, and snapshotted a last time on a clean stop."""

from __future__ import annotations

import logging
import re
import shutil
import threading
from pathlib import Path

from services.index.store import Collection
from services.index.vectors import IndexSpec, gpu_resources
from services.settings import IndexParams, IndexSettings

log = logging.getLogger("hqclip.index")

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class CollectionExists(ValueError):
    pass


class CollectionNotFound(KeyError):
    pass


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise ValueError(f"collection name {name!r} must be 1-64 letters, digits, '_', '.' or '-', "
                         "starting with a letter or digit")
    return name


class CollectionManager:
    def __init__(self, settings: IndexSettings, model: str | None = None, dim: int | None = None) -> None:
        self.settings = settings
        self.root = Path(settings.dir)
        self.model, self.dim = model, dim
        self.gpu = gpu_resources() if settings.gpu else None
        self._collections: dict[str, Collection] = {}
        self._lock = threading.Lock()  # guards the dict, not the collections (each has its own lock)
        self._stop = threading.Event()
        self._snapshotter: threading.Thread | None = None

    def start(self) -> None:
        """Open every collection under the root (made on the first create), then start the background snapshotter."""
        found = sorted(p for p in self.root.iterdir() if (p / "meta.sqlite").is_file()) if self.root.is_dir() else []
        for path in found:
            collection = Collection.open(path, self.gpu)
            log.info("collection %s: %d items (%s), replayed %d WAL rows in %.2fs", collection.name,
                     collection.count, collection.spec.kind, collection.state.replayed, collection.state.loaded_s)
            self._collections[collection.name] = collection
        self._snapshotter = threading.Thread(target=self._snapshot_loop, name="index-snapshots", daemon=True)
        self._snapshotter.start()

    def _snapshot_loop(self) -> None:
        while not self._stop.wait(self.settings.snapshot_interval_s):
            self.snapshot_all()

    def snapshot_all(self) -> None:
        for collection in self.list():
            try:
                collection.snapshot()
            except Exception:  # the WAL still holds every write: log it and retry at the next tick
                log.exception("snapshot of collection %s failed; its WAL keeps the writes", collection.name)

    def close(self) -> None:
        """Stop the snapshotter, write a final snapshot of each collection and release them."""
        self._stop.set()
        if self._snapshotter is not None:
            self._snapshotter.join()
        with self._lock:
            collections, self._collections = list(self._collections.values()), {}
        for collection in collections:
            collection.close(snapshot=True)

    def list(self) -> list[Collection]:
        with self._lock:
            return sorted(self._collections.values(), key=lambda c: c.name)

    def get(self, name: str) -> Collection:
        with self._lock:
            try:
                return self._collections[name]
            except KeyError:
                raise CollectionNotFound(name) from None

    def create(self, name: str, params: IndexParams, dim: int | None = None) -> Collection:
        """A new empty collection; ``dim`` defaults to the served model's."""
        check_name(name)
        dim = dim or self.dim
        if dim is None:
            raise ValueError("dim is required: this gateway serves no model to take it from")
        spec = IndexSpec(**params.model_dump(), dim=dim)
        with self._lock:
            if name in self._collections or (self.root / name).exists():
                raise CollectionExists(name)
            collection = Collection.create(self.root / name, spec, self.model, self.gpu)
            self._collections[name] = collection
        return collection

    def delete(self, name: str) -> None:
        with self._lock:
            collection = self._collections.pop(name, None)
        if collection is None:
            raise CollectionNotFound(name)
        collection.close(snapshot=False)
        shutil.rmtree(collection.path)
