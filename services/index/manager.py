"""The collections a gateway serves: every collection of the configured backend (``HQCLIP_INDEX__BACKEND``), opened at
start; with FAISS, snapshotted in the background every ``snapshot_interval_s`` and a last time on a clean stop.

A name is a collection or an alias of one. Aliases resolve on every lookup, so flipping one (:meth:`alias`) moves
every later request to the new collection at once: the hot swap of a re-embedded collection.
"""

from __future__ import annotations

import logging
import threading
import time

from hqclip.repo.manifest import Manifest
from services.index.collection import (
    AliasConflict,
    Catalog,
    Collection,
    CollectionExists,
    CollectionNotFound,
    IndexSpec,
    Info,
    check_name,
)
from services.settings import IndexParams, IndexSettings

log = logging.getLogger("hqclip.index")


def open_catalog(settings: IndexSettings) -> Catalog:
    """The backend ``settings.backend`` names (Milvus is imported only when chosen)."""
    if settings.backend == "milvus":
        from services.index.milvus import MilvusCatalog

        return MilvusCatalog(settings.milvus_uri, settings.milvus_consistency)
    from services.index.faiss_sqlite import FaissCatalog

    return FaissCatalog(settings.dir, settings.gpu)


class CollectionManager:
    def __init__(self, settings: IndexSettings) -> None:
        self.settings = settings
        self.catalog: Catalog | None = None
        self._collections: dict[str, Collection] = {}
        self._aliases: dict[str, str] = {}
        self._lock = threading.Lock()  # guards the dicts, not the collections (each has its own lock)
        self._stop = threading.Event()
        self._snapshotter: threading.Thread | None = None

    @property
    def backend(self) -> str:
        return self.settings.backend

    def start(self) -> None:
        """Open every collection, then start the background snapshotter."""
        self.catalog = open_catalog(self.settings)
        for collection in self.catalog.open_all():
            self._collections[collection.name] = collection
        self._aliases = self.catalog.aliases()
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
        if self.catalog is not None:
            self.catalog.close()

    def list(self) -> list[Collection]:
        with self._lock:
            return sorted(self._collections.values(), key=lambda c: c.name)

    def aliases(self) -> dict[str, str]:
        with self._lock:
            return dict(sorted(self._aliases.items()))

    def get(self, name: str) -> Collection:
        """The collection ``name`` names, directly or through an alias."""
        with self._lock:
            try:
                return self._collections[self._aliases.get(name, name)]
            except KeyError:
                raise CollectionNotFound(name) from None

    def create(self, name: str, params: IndexParams, dim: int | None, served: Manifest) -> Collection:
        """A new empty collection; ``dim`` defaults to the served model's, which it records as its embedder (the
        model served now: after a hot swap, the new one)."""
        check_name(name)
        dim = dim or served.embed_dim
        own_model = dim == served.embed_dim
        info = Info(IndexSpec(**params.model_dump(), dim=dim), served.name if own_model else None,
                    served.fingerprint if own_model else None, time.time())
        with self._lock:
            if name in self._collections or name in self._aliases or self.catalog.exists(name):
                raise CollectionExists(name)
            collection = self.catalog.create(name, info)
            self._collections[name] = collection
        return collection

    def delete(self, name: str) -> None:
        """Delete a collection, or just the alias when ``name`` is one."""
        with self._lock:
            if name in self._aliases:
                self.catalog.drop_alias(name)
                del self._aliases[name]
                return
            if name not in self._collections:
                raise CollectionNotFound(name)
            pointing = sorted(a for a, target in self._aliases.items() if target == name)
            if pointing:
                raise AliasConflict(f"alias '{pointing[0]}' points at collection '{name}'; flip or delete the alias "
                                    "first")
            collection = self._collections.pop(name)
        self.catalog.drop(collection)

    def alias(self, alias: str, target: str) -> None:
        """Point ``alias`` at collection ``target`` in one atomic step (made if new, flipped if not)."""
        check_name(alias, "alias")
        with self._lock:
            if target not in self._collections:
                if target in self._aliases:
                    raise AliasConflict(f"'{target}' is an alias; point '{alias}' at a collection "
                                        f"('{self._aliases[target]}')")
                raise CollectionNotFound(target)
            if alias in self._collections:
                raise AliasConflict(f"'{alias}' is a collection; an alias cannot take its name")
            self.catalog.set_alias(alias, target)
            self._aliases[alias] = target
        log.info("alias %s -> collection %s", alias, target)
