"""The embedded backend: a collection is a FAISS index of vectors, the items' metadata in SQLite, and a write-ahead
log for durability, all in one folder under ``HQCLIP_INDEX__DIR``::

    meta.sqlite              info (index spec, model, fingerprint), items, item_tags, wal
    snapshot-<seq>.faiss     the index as of WAL position <seq>; written to a temp file, fsynced, renamed

and an alias is a pointer file ``.aliases/<alias>`` holding its collection's name, replaced atomically (rename).

Each stored version of an item gets a fresh int64 id, the WAL sequence number of its ``add``; ``items`` maps the
user's string id to it. An upsert of a known id logs a ``delete`` of the old version and an ``add`` of the new.
A write commits the WAL rows and the metadata in one SQLite transaction (``synchronous=FULL``) before it touches
the index, and the caller hears back only after that. At open: load the newest snapshot, replay the WAL after it.
A snapshot writes the index under the lock, then fsyncs and renames outside it, then drops the WAL it covers.

One lock per collection serialises writes, searches and snapshots: FAISS indexes are not safe to search while
another thread adds to them. Call these methods from a worker thread, never on the event loop.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.index.collection import (
    Catalog,
    Collection,
    CollectionBusy,
    CollectionNotFound,
    Filters,
    Hit,
    IndexSpec,
    Info,
    Item,
    check_upsert,
    normalise,
)
from services.index.vectors import Vectors, gpu_resources, new_vectors, read_vectors

log = logging.getLogger("hqclip.index")

EXACT_FILTER_MAX = 20_000  # a filter keeping at most this many items is answered exactly over just those
_SQL_CHUNK = 900  # ids per "IN (...)" (SQLite's variable limit is 32766 on new builds, 999 on old ones)

SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    fid INTEGER PRIMARY KEY,              -- the FAISS id of the current version
    id TEXT NOT NULL UNIQUE,              -- the user's id
    uri TEXT,
    caption TEXT,
    tags TEXT NOT NULL DEFAULT '[]',      -- JSON list of strings
    attributes TEXT NOT NULL DEFAULT '{}',-- JSON object
    created REAL NOT NULL,                -- unix time the id was first stored
    source TEXT,                          -- text, image or vector: what it was embedded from (NULL: not kept)
    text TEXT,                            -- a text item's text
    image BLOB,                           -- an image item's bytes (collections made with keep_images)
    updated REAL                          -- unix time of the last write
);
CREATE TABLE IF NOT EXISTS item_tags (tag TEXT NOT NULL, fid INTEGER NOT NULL, PRIMARY KEY (tag, fid)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS item_tags_fid ON item_tags (fid);
CREATE TABLE IF NOT EXISTS wal (
    seq INTEGER PRIMARY KEY,              -- for an add, also the FAISS id it creates
    op TEXT NOT NULL CHECK (op IN ('add', 'delete')),
    fid INTEGER NOT NULL,
    vector BLOB                           -- float32 little-endian, for adds
);
"""


@dataclass
class _Counters:
    seq: int = 0  # last WAL position assigned
    snapshot_seq: int = 0  # WAL position the newest snapshot on disk covers
    replayed: int = 0  # WAL rows replayed at open
    loaded_s: float = 0.0


def _chunks(values: list, size: int = _SQL_CHUNK):
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _snapshot_seq(path: Path) -> int:
    return int(path.stem.removeprefix("snapshot-"))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# columns added after the first release: a collection stored before them gets them at open, empty
_ADDED_COLUMNS = {"source": "TEXT", "text": "TEXT", "image": "BLOB", "updated": "REAL"}
_ITEM_COLUMNS = "fid, id, uri, caption, tags, attributes, created, source, text, image, updated"


def _info(rows: dict[str, str]) -> Info:
    return Info(IndexSpec.model_validate_json(rows["spec"]), rows.get("model"), rows.get("fingerprint"),
                float(rows["created"]), rows.get("keep_images") == "1")


class FaissCollection(Collection):
    """Open with :meth:`create` or :meth:`open`; :meth:`close` when done."""

    backend = "faiss"

    def __init__(self, path: Path, conn: sqlite3.Connection, lock_file, vectors: Vectors, info: Info) -> None:
        self.path, self.name = path, path.name
        self.info = info
        self.vectors = vectors
        self._conn = conn
        self._lock_file = lock_file
        self._lock = threading.RLock()
        self._snapshot_lock = threading.Lock()
        self._closed = False
        self.state = _Counters()

    # -- opening and closing -----------------------------------------------------------------------------------
    @staticmethod
    def _connect(path: Path) -> tuple[sqlite3.Connection, Any]:
        lock_file = open(path / ".lock", "a+")  # noqa: SIM115 (held open for the collection's life: the lock)
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise CollectionBusy(f"collection {path} is open in another process; stop it first") from None
        conn = sqlite3.connect(path / "meta.sqlite", check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the caller is answered
        conn.executescript(SCHEMA)
        have = {row[1] for row in conn.execute("PRAGMA table_info(items)")}
        for column, kind in _ADDED_COLUMNS.items():
            if column not in have:
                conn.execute(f"ALTER TABLE items ADD COLUMN {column} {kind}")
        return conn, lock_file

    @classmethod
    def create(cls, path: Path, spec: IndexSpec, model: str | None = None, gpu=None,
               fingerprint: str | None = None, keep_images: bool = False) -> FaissCollection:
        path = Path(path)
        path.mkdir(parents=True)
        conn, lock_file = cls._connect(path)
        info = Info(spec, model, fingerprint, time.time(), keep_images)
        rows = {"spec": spec.model_dump_json(), "model": model, "fingerprint": fingerprint,
                "created": repr(info.created), "keep_images": "1" if keep_images else None}
        with conn:
            conn.execute("BEGIN")
            conn.executemany("INSERT INTO info VALUES (?, ?)", [(k, v) for k, v in rows.items() if v is not None])
        return cls(path, conn, lock_file, new_vectors(spec, gpu), info)

    @classmethod
    def open(cls, path: Path, gpu=None) -> FaissCollection:
        """Load the newest snapshot and replay the WAL after it."""
        started = time.perf_counter()
        path = Path(path)
        if not (path / "meta.sqlite").is_file():
            raise FileNotFoundError(f"{path} is not a collection (no meta.sqlite)")
        conn, lock_file = cls._connect(path)
        info = _info(dict(conn.execute("SELECT key, value FROM info")))
        spec = info.spec
        for stale in path.glob(".snapshot-*.tmp"):  # a snapshot interrupted before its rename
            stale.unlink()
        snapshots = sorted(path.glob("snapshot-*.faiss"), key=_snapshot_seq)
        if snapshots:
            with open(snapshots[-1], "rb") as src:
                vectors = read_vectors(spec, src, gpu)
            snapshot_seq = _snapshot_seq(snapshots[-1])
        else:
            vectors, snapshot_seq = new_vectors(spec, gpu), 0
        collection = cls(path, conn, lock_file, vectors, info)
        collection.state.snapshot_seq = snapshot_seq
        collection._replay(snapshot_seq)
        collection.state.loaded_s = time.perf_counter() - started
        live = conn.execute("SELECT count(*) FROM items").fetchone()[0]
        if live != vectors.ntotal:
            log.error("collection %s: the index holds %d vectors but the metadata %d items; rebuild it with "
                      "`hqclip index build`", path.name, vectors.ntotal, live)
        return collection

    def _replay(self, after: int) -> None:
        """Apply the WAL rows after ``after`` in order, consecutive adds (or deletes) as one batch."""
        batch_op, fids, blobs = None, [], []

        def flush() -> None:
            if batch_op == "add":
                x = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), self.spec.dim)
                self.vectors.add(np.array(fids, dtype=np.int64), np.ascontiguousarray(x, dtype=np.float32))
            elif batch_op == "delete":
                self.vectors.remove(np.array(fids, dtype=np.int64))
            fids.clear()
            blobs.clear()

        last = after
        rows = self._conn.execute("SELECT seq, op, fid, vector FROM wal WHERE seq > ? ORDER BY seq", (after,))
        for seq, op, fid, blob in rows:
            if op != batch_op or len(fids) >= 65536:
                flush()
                batch_op = op
            fids.append(fid)
            if op == "add":
                blobs.append(blob)
            last = seq
            self.state.replayed += 1
        flush()
        self.state.seq = last

    def close(self, snapshot: bool = True) -> None:
        """Write a final snapshot (unless told not to), then release the folder."""
        if snapshot:
            self.snapshot()
        with self._snapshot_lock, self._lock:
            if self._closed:
                return
            self._closed = True
            self._conn.close()
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()

    # -- writes ------------------------------------------------------------------------------------------------
    def upsert(self, items: list[Item], vectors: np.ndarray) -> None:
        """Store ``items`` with their vectors, replacing any stored item with the same id; durable on return."""
        x = check_upsert(items, vectors, self.spec.dim)
        ids = [item.id for item in items]
        now = time.time()
        with self._lock:
            old = self._lookup(ids, "id, fid, created")
            wal, rows, tags, replaced = [], [], [], []
            seq = self.state.seq
            for item, vector in zip(items, x):
                created = now
                if item.id in old:
                    _, old_fid, created = old[item.id]
                    seq += 1
                    wal.append((seq, "delete", old_fid, None))
                    replaced.append(old_fid)
                seq += 1
                wal.append((seq, "add", seq, vector.astype("<f4").tobytes()))
                image = item.image if self.info.keep_images and item.source == "image" else None
                rows.append((seq, item.id, item.uri, item.caption, json.dumps(item.tags),
                             json.dumps(item.attributes), created, item.source, item.text, image, now))
                tags.extend((tag, seq) for tag in dict.fromkeys(item.tags))
            with self._conn:
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.executemany("INSERT INTO wal VALUES (?, ?, ?, ?)", wal)
                self._forget(replaced)
                self._conn.executemany(f"INSERT INTO items ({_ITEM_COLUMNS}) VALUES ({', '.join('?' * 11)})",
                                       rows)
                self._conn.executemany("INSERT INTO item_tags VALUES (?, ?)", tags)
            self.state.seq = seq
            if replaced:
                self.vectors.remove(np.array(replaced, dtype=np.int64))
            self.vectors.add(np.array([row[0] for row in rows], dtype=np.int64), x)

    def delete(self, ids: list[str]) -> list[str]:
        with self._lock:
            wanted = list(dict.fromkeys(ids))
            found = self._lookup(wanted, "id, fid")
            if not found:
                return []
            fids = [fid for _, fid in found.values()]
            wal = [(self.state.seq + 1 + i, "delete", fid, None) for i, fid in enumerate(fids)]
            with self._conn:
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.executemany("INSERT INTO wal VALUES (?, ?, ?, ?)", wal)
                self._forget(fids)
            self.state.seq += len(wal)
            self.vectors.remove(np.array(fids, dtype=np.int64))
            return [i for i in wanted if i in found]

    def _forget(self, fids: list[int]) -> None:
        for chunk in _chunks(fids):
            marks = ",".join("?" * len(chunk))
            self._conn.execute(f"DELETE FROM items WHERE fid IN ({marks})", chunk)
            self._conn.execute(f"DELETE FROM item_tags WHERE fid IN ({marks})", chunk)

    def _lookup(self, ids: list[str], columns: str) -> dict[str, tuple]:
        out = {}
        for chunk in _chunks(ids):
            marks = ",".join("?" * len(chunk))
            for row in self._conn.execute(f"SELECT {columns} FROM items WHERE id IN ({marks})", chunk):
                out[row[0]] = row
        return out

    # -- reads -------------------------------------------------------------------------------------------------
    @property
    def count(self) -> int:
        return self.vectors.ntotal

    def get(self, ids: list[str]) -> dict[str, Item]:
        with self._lock:
            rows = self._lookup(ids, "id, uri, caption, tags, attributes")
        return {
            i: Item(id=i, uri=uri, caption=caption, tags=json.loads(tags), attributes=json.loads(attrs))
            for i, (_, uri, caption, tags, attrs) in rows.items()
        }

    def items(self, after: str | None = None, limit: int = 100, since: float | None = None,
              images: bool = False) -> list[Item]:
        image = "image" if images else "NULL"
        sql = (f"SELECT id, uri, caption, tags, attributes, source, text, {image}, updated FROM items "
               "WHERE id > ? AND coalesce(updated, 0) > ? ORDER BY id LIMIT ?")
        with self._lock:
            rows = self._conn.execute(sql, (after or "", since if since is not None else -1.0, limit)).fetchall()
        return [Item(i, uri, caption, json.loads(tags), json.loads(attrs), source, text, data, updated)
                for i, uri, caption, tags, attrs, source, text, data, updated in rows]

    def vector(self, item_id: str) -> np.ndarray:
        with self._lock:
            found = self._lookup([item_id], "id, fid")
            if not found:
                raise KeyError(item_id)
            return self.vectors.reconstruct(np.array([found[item_id][1]], dtype=np.int64))[0]

    def search(
        self,
        queries: np.ndarray,
        top_k: int = 10,
        offset: int = 0,
        filters: Filters | None = None,
        exclude: str | None = None,
    ) -> list[list[Hit]]:
        q = normalise(queries, self.spec.dim)
        k = offset + top_k + (1 if exclude is not None else 0)
        with self._lock:
            allowed = self._matching(filters) if filters else None
            if allowed is not None and len(allowed) <= EXACT_FILTER_MAX:
                scores, fids = self._exact(q, allowed, k)
            else:
                scores, fids = self.vectors.search(q, k, allowed)
            wanted = [int(f) for f in np.unique(fids) if f >= 0]
            meta = {}
            for chunk in _chunks(wanted):
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT fid, id, uri, caption, tags, attributes, created FROM items WHERE fid IN ({marks})"
                for row in self._conn.execute(sql, chunk):
                    meta[row[0]] = row[1:]
        results = []
        for row_scores, row_fids in zip(scores, fids):
            hits = []
            for score, fid in zip(row_scores, row_fids):
                if fid < 0 or int(fid) not in meta or meta[int(fid)][0] == exclude:
                    continue
                item_id, uri, caption, tags, attrs, created = meta[int(fid)]
                hits.append(Hit(item_id, float(score), uri, caption, json.loads(tags), json.loads(attrs), created))
            results.append(hits[offset : offset + top_k])
        return results

    def _matching(self, filters: Filters) -> np.ndarray:
        """FAISS ids of the items that pass ``filters`` (an SQLite query: the pre-filter)."""
        clauses, params = [], []
        for tag in dict.fromkeys(filters.tags):
            clauses.append("fid IN (SELECT fid FROM item_tags WHERE tag = ?)")
            params.append(tag)
        for key, value in filters.attributes.items():
            clauses.append("json_extract(attributes, ?) IS ?")
            params.extend([f'$."{key}"', int(value) if isinstance(value, bool) else value])
        sql = "SELECT fid FROM items WHERE " + " AND ".join(clauses)
        return np.fromiter((row[0] for row in self._conn.execute(sql, params)), dtype=np.int64)

    def _exact(self, q: np.ndarray, allowed: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` by exact inner product over just the ``allowed`` ids."""
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        fids = np.full((len(q), k), -1, dtype=np.int64)
        if len(allowed):
            all_scores = q @ self.vectors.reconstruct(allowed).T
            n = min(k, len(allowed))
            order = np.argsort(-all_scores, axis=1, kind="stable")[:, :n]
            scores[:, :n] = np.take_along_axis(all_scores, order, axis=1)
            fids[:, :n] = allowed[order]
        return scores, fids

    # -- durability --------------------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """WAL rows not yet covered by a snapshot on disk."""
        return self.state.seq - self.state.snapshot_seq

    def snapshot(self) -> bool:
        """Write the index atomically with the WAL position it covers, then drop that WAL. False: nothing new."""
        with self._snapshot_lock:
            with self._lock:
                seq = self.state.seq
                if self._closed or seq == self.state.snapshot_seq:
                    return False
                tmp = self.path / f".snapshot-{seq}.tmp"
                out = open(tmp, "wb")  # noqa: SIM115 (written under the lock, synced after it)
                try:
                    self.vectors.write(out)  # under the lock: the index must not change while it is written
                    out.flush()
                except BaseException:
                    out.close()
                    tmp.unlink(missing_ok=True)
                    raise
            with out:
                os.fsync(out.fileno())
            final = self.path / f"snapshot-{seq:016d}.faiss"
            os.replace(tmp, final)
            _fsync_dir(self.path)
            with self._lock:
                self.state.snapshot_seq = seq
                with self._conn:
                    self._conn.execute("BEGIN IMMEDIATE")
                    self._conn.execute("DELETE FROM wal WHERE seq <= ?", (seq,))
            for older in self.path.glob("snapshot-*.faiss"):
                if older != final and _snapshot_seq(older) < seq:
                    older.unlink()
            return True

    def adopt(self, fingerprint: str) -> None:
        with self._lock:
            with self._conn:
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.execute("INSERT OR REPLACE INTO info VALUES ('fingerprint', ?)", (fingerprint,))
            self.info.fingerprint = fingerprint

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "wal_pending": self.pending, "gpu": self.vectors.gpu is not None}


class FaissCatalog(Catalog):
    """The collections in folders under ``root`` (``HQCLIP_INDEX__DIR``); aliases as pointer files."""

    backend = "faiss"

    def __init__(self, root: Path, gpu: bool = True) -> None:
        self.root = Path(root)
        self.gpu = gpu_resources() if gpu else None

    def open_all(self) -> list[Collection]:
        found = sorted(p for p in self.root.iterdir() if (p / "meta.sqlite").is_file()) if self.root.is_dir() else []
        opened = []
        for path in found:
            collection = FaissCollection.open(path, self.gpu)
            log.info("collection %s: %d items (%s), replayed %d WAL rows in %.2fs", collection.name,
                     collection.count, collection.spec.kind, collection.state.replayed, collection.state.loaded_s)
            opened.append(collection)
        return opened

    def open(self, name: str) -> Collection:
        if not (self.root / name / "meta.sqlite").is_file():
            raise CollectionNotFound(name)
        return FaissCollection.open(self.root / name, self.gpu)

    def exists(self, name: str) -> bool:
        return (self.root / name).exists()

    def create(self, name: str, info: Info) -> Collection:
        return FaissCollection.create(self.root / name, info.spec, info.model, self.gpu, info.fingerprint,
                                      info.keep_images)

    def drop(self, collection: Collection) -> None:
        assert isinstance(collection, FaissCollection)
        collection.close(snapshot=False)
        shutil.rmtree(collection.path)

    @property
    def _alias_dir(self) -> Path:
        return self.root / ".aliases"  # collection names never start with '.'

    def aliases(self) -> dict[str, str]:
        folder = self._alias_dir
        return {p.name: p.read_text().strip() for p in sorted(folder.iterdir()) if not p.name.startswith(".")} \
            if folder.is_dir() else {}

    def set_alias(self, alias: str, target: str) -> None:
        if not (self.root / target / "meta.sqlite").is_file():
            raise CollectionNotFound(target)
        self._alias_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._alias_dir / f".{alias}.tmp"
        with open(tmp, "w") as out:
            out.write(target + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self._alias_dir / alias)  # atomic: readers see the old target or the new one
        _fsync_dir(self._alias_dir)

    def drop_alias(self, alias: str) -> None:
        try:
            (self._alias_dir / alias).unlink()
        except FileNotFoundError:
            raise CollectionNotFound(alias) from None
        _fsync_dir(self._alias_dir)

    def close(self) -> None:
        """Nothing shared to release: each collection holds its own files."""
