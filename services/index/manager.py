"""The collections a gateway serves: every collection of the configured backend (``HQCLIP_INDEX__BACKEND``), opened at
start; with FAISS, snapshotted in the background every ``snapshot_interval_s`` and a last time on a clean stop.

A name is a collection or an alias of one. Aliases resolve on every lookup, so flipping one (:meth:`alias`) moves
every later request to the new collection at once: the hot swap of a re-embedded collection. A request holds the
collection it resolved (:meth:`using`) until it ends: a collection deleted meanwhile (the old one, right after a
flip) is gone for every later lookup at once, and dropped from storage when its last request ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

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
        self._users: Counter[str] = Counter()  # requests holding each collection (by name)
        self._doomed: dict[str, Collection] = {}  # deleted while in use: dropped by their last user
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

    @contextmanager
    def using(self, name: str) -> Iterator[Collection]:
        """The collection ``name`` names, held for the caller: deleting it meanwhile drops it only when released."""
        with self._lock:
            try:
                collection = self._collections[self._aliases.get(name, name)]
            except KeyError:
                raise CollectionNotFound(name) from None
            self._users[collection.name] += 1
        try:
            yield collection
        finally:
            with self._lock:
                self._users[collection.name] -= 1
                last = not self._users[collection.name]
                if last:
                    del self._users[collection.name]
                doomed = self._doomed.pop(collection.name, None) if last else None
            if doomed is not None:  # off the event loop: a Milvus drop is a round trip
                threading.Thread(target=self.catalog.drop, args=(doomed,), name="collection-drop").start()

    def fingerprints(self) -> set[str]:
        """The fingerprints of the models that embedded the collections served (services/reload.py keeps their
        engines loaded)."""
        with self._lock:
            return {c.fingerprint for c in self._collections.values() if c.fingerprint}

    def create(self, name: str, params: IndexParams, dim: int | None, served: Manifest,
               keep_images: bool = False) -> Collection:
        """A new empty collection; ``dim`` defaults to the served model's, which it records as its embedder (the
        model served now: after a hot swap, the new one). ``keep_images``: image items keep their bytes."""
        check_name(name)
        dim = dim or served.embed_dim
        own_model = dim == served.embed_dim
        info = Info(IndexSpec(**params.model_dump(), dim=dim), served.name if own_model else None,
                    served.fingerprint if own_model else None, time.time(), keep_images)
        with self._lock:
            if name in self._collections or name in self._aliases or name in self._doomed or \
                    self.catalog.exists(name):
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
            if self._users[name]:
                self._doomed[name] = collection
                return
        self.catalog.drop(collection)

    def alias(self, alias: str, target: str, replace: bool = False) -> None:
        """Point ``alias`` at collection ``target`` in one atomic step (made if new, flipped if not). ``replace``:
        when ``alias`` is a collection, it is deleted and the alias takes its name in the same step (a collection
        turned into an alias of its re-embedded copy; a request holding it at that moment may fail)."""
        check_name(alias, "alias")
        replaced = None
        with self._lock:
            if target not in self._collections:
                if target in self._aliases:
                    raise AliasConflict(f"'{target}' is an alias; point '{alias}' at a collection "
                                        f"('{self._aliases[target]}')")
                raise CollectionNotFound(target)
            if alias in self._collections:
                if not replace or alias == target:
                    raise AliasConflict(f"'{alias}' is a collection; an alias cannot take its name (send "
                                        "replace=true to delete the collection and alias its name)")
                pointing = sorted(a for a, t in self._aliases.items() if t == alias)
                if pointing:
                    raise AliasConflict(f"alias '{pointing[0]}' points at collection '{alias}'; flip it first")
                replaced = self._collections.pop(alias)
                self.catalog.drop(replaced)  # now, not when idle: Milvus refuses an alias named like a collection
            self.catalog.set_alias(alias, target)
            self._aliases[alias] = target
        log.info("alias %s -> collection %s%s", alias, target, " (the collection it named deleted)" if replaced else "")
