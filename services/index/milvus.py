"""The scale backend: collections in Milvus through pymilvus's ``MilvusClient``, which talks to a Milvus server or
cluster (``http://host:19530``) and to milvus-lite (a local ``.db`` file) alike.

One Milvus collection per collection, named ``c_<name>`` (Milvus names allow only letters, digits and ``_``: others
are escaped as ``_<hex>``), with the fields

    id (VARCHAR, primary key)   vector (FLOAT_VECTOR, unit length: inner product = cosine)
    item (JSON: uri, caption, source, text, updated)   tags (ARRAY of VARCHAR)   attributes (JSON)   created (DOUBLE)

Image bytes are not kept (``keep_images`` is refused): a JSON field holds at most 64 KB, and object storage is
where a cluster keeps images; an image item is re-embedded from its ``uri`` (docs/reindex.md).

and one catalog collection, ``hqclip_catalog``, holding what each collection records about itself (index spec,
model, fingerprint); Milvus requires a vector field, so its rows carry a 2-d placeholder. Aliases are Milvus
aliases, flipped server-side in one step.

milvus-lite (2.5) tears its write-ahead log when two threads write at once and a kill -9 follows: recovery stops at
the torn batch and drops every write after it (tests/test_durability.py found it: half the acknowledged items gone).
Writes through one milvus-lite catalog therefore go one at a time (``write_lock``); a Milvus server takes them
concurrently.

Consistency is ``Strong`` by default (``HQCLIP_INDEX__MILVUS_CONSISTENCY``): a search waits until it sees every write
acknowledged before it, so an acknowledged upsert or delete is searchable at once (docs/retrieval.md, Durability).

Index kinds: flat -> FLAT, hnsw -> HNSW (M, efConstruction; ef at search), ivfpq -> IVF_PQ (nlist, m, 8 bits;
nprobe at search) whose ``rerank`` x k candidates are re-ranked exactly against the stored full vectors here, as
the FAISS backend does (Milvus 2.3 has no refine step for IVF_PQ); milvus-lite has no IVF_PQ and gets IVF_SQ8.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from pymilvus import DataType, MilvusClient, MilvusException

from services.index.collection import (
    Catalog,
    Collection,
    CollectionNotFound,
    Filters,
    Hit,
    IndexSpec,
    Info,
    InvalidInput,
    Item,
    check_upsert,
    normalise,
)

log = logging.getLogger("hqclip.index")

CATALOG = "hqclip_catalog"
MAX_LIMIT = 16_384  # Milvus's most results of one search (offset + limit)
MAX_IDS = 1000  # ids per "id in [...]" expression
ID_BYTES = 2048  # a 512-character id in UTF-8
TAG_BYTES = 1024
MAX_TAGS = 4096
PQ_BITS = 8
_METRIC = "IP"
_FIELDS = ["item", "tags", "attributes", "created"]


def physical(name: str, prefix: str = "c_") -> str:
    """The Milvus name of a collection or alias: letters and digits kept, every other character ``_<hex>``."""
    return prefix + "".join(ch if ch.isascii() and ch.isalnum() else f"_{ord(ch):02x}" for ch in name)


def logical(milvus_name: str, prefix: str = "c_") -> str:
    return re.sub(r"_([0-9a-f]{2})", lambda m: chr(int(m.group(1), 16)), milvus_name.removeprefix(prefix))


def quote(value: str) -> str:
    """A string literal of Milvus's expression language."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return quote(str(value))


def expression(filters: Filters | None, exclude: str | None = None) -> str:
    """A Milvus boolean expression keeping the items that pass ``filters``, leaving out the item ``exclude``."""
    parts = []
    if filters:
        parts += [f"array_contains(tags, {quote(tag)})" for tag in dict.fromkeys(filters.tags)]
        for key, value in filters.attributes.items():
            field = f"attributes[{quote(key)}]"
            parts.append(f"not exists {field}" if value is None else f"{field} == {_literal(value)}")
    if exclude is not None:
        parts.append(f"id != {quote(exclude)}")
    return " and ".join(parts)


def _id_list(ids: list[str]) -> str:
    return f"id in [{', '.join(quote(i) for i in ids)}]"


def _index_params(spec: IndexSpec, lite: bool) -> tuple[str, dict[str, Any]]:
    if spec.kind == "hnsw":
        return "HNSW", {"M": spec.hnsw_m, "efConstruction": spec.ef_construction}
    if spec.kind == "ivfpq" and lite:  # milvus-lite has no IVF_PQ: its nearest, 8-bit scalar codes in IVF lists
        return "IVF_SQ8", {"nlist": spec.nlist}
    if spec.kind == "ivfpq":
        return "IVF_PQ", {"nlist": spec.nlist, "m": spec.subquantizers(), "nbits": PQ_BITS}
    return "FLAT", {}


def _search_params(spec: IndexSpec, limit: int) -> dict[str, Any]:
    if spec.kind == "hnsw":
        return {"metric_type": _METRIC, "params": {"ef": max(spec.ef_search, limit)}}
    if spec.kind == "ivfpq":
        return {"metric_type": _METRIC, "params": {"nprobe": spec.nprobe}}
    return {"metric_type": _METRIC, "params": {}}


def _invalid(exc: MilvusException) -> InvalidInput:
    return InvalidInput(f"Milvus refused the items: {exc.message}", "items")


class MilvusCollection(Collection):
    backend = "milvus"

    def __init__(self, catalog: MilvusCatalog, name: str, info: Info) -> None:
        self.catalog, self.client = catalog, catalog.client
        self.name, self.milvus_name, self.info = name, physical(name), info
        self.level = catalog.consistency  # of every read and search

    # -- reads and writes --------------------------------------------------------------------------------------
    @property
    def count(self) -> int:
        rows = self.client.query(self.milvus_name, filter="", output_fields=["count(*)"], consistency_level=self.level)
        return int(rows[0]["count(*)"])

    def _rows(self, ids: list[str], fields: list[str]) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for start in range(0, len(ids), MAX_IDS):
            chunk = ids[start : start + MAX_IDS]
            for row in self.client.query(self.milvus_name, filter=_id_list(chunk), output_fields=fields,
                                         consistency_level=self.level):
                out[row["id"]] = row
        return out

    def upsert(self, items: list[Item], vectors: np.ndarray) -> None:
        x = check_upsert(items, vectors, self.spec.dim)
        for item in items:
            if len(item.tags) > MAX_TAGS or any(len(t.encode()) > TAG_BYTES for t in item.tags):
                raise InvalidInput(f"item '{item.id}': at most {MAX_TAGS} tags of at most {TAG_BYTES} bytes each "
                                   "(the Milvus backend's limits)", "items")
        known = self._rows([item.id for item in items], ["created"])
        now = time.time()
        rows = [{"id": item.id, "vector": vector.tolist(),
                 "item": {"uri": item.uri, "caption": item.caption, "source": item.source, "text": item.text,
                          "updated": now},
                 "tags": item.tags, "attributes": item.attributes,
                 "created": float(known[item.id]["created"]) if item.id in known else now}
                for item, vector in zip(items, x)]
        try:
            with self.catalog.write_lock:
                self.client.upsert(self.milvus_name, rows)
        except MilvusException as exc:
            if exc.code == 1100:  # invalid parameter: the data, not the server
                raise _invalid(exc) from None
            raise

    def delete(self, ids: list[str]) -> list[str]:
        wanted = list(dict.fromkeys(ids))
        found = self._rows(wanted, ["id"])
        if found:
            with self.catalog.write_lock:
                self.client.delete(self.milvus_name, ids=list(found))
        return [i for i in wanted if i in found]

    def get(self, ids: list[str]) -> dict[str, Item]:
        rows = self._rows(list(dict.fromkeys(ids)), _FIELDS)
        return {i: Item(i, r["item"].get("uri"), r["item"].get("caption"), list(r["tags"]), r["attributes"])
                for i, r in rows.items()}

    def items(self, after: str | None = None, limit: int = 100, since: float | None = None,
              images: bool = False) -> list[Item]:
        """Milvus queries have no order: the ids above ``after`` are read in windows of ``MAX_LIMIT``, narrowed
        (``id <= bound``) until one window holds every id in its range, whose smallest ``limit`` are the page."""
        base = f"id > {quote(after or '')}" + (f' and item["updated"] > {since!r}' if since is not None else "")
        bound = None
        while True:
            expr = base + (f" and id <= {quote(bound)}" if bound is not None else "")
            ids = sorted(r["id"] for r in self.client.query(self.milvus_name, filter=expr, output_fields=["id"],
                                                             limit=MAX_LIMIT, consistency_level="Strong"))
            if len(ids) < MAX_LIMIT:
                break
            bound = ids[limit - 1]
        rows = self._rows(ids[:limit], _FIELDS)
        out = []
        for i in ids[:limit]:
            if i in rows:  # deleted between the two reads: left out
                item = rows[i]["item"] or {}
                out.append(Item(i, item.get("uri"), item.get("caption"), list(rows[i]["tags"]),
                                rows[i]["attributes"], item.get("source"), item.get("text"), None, item.get("updated")))
        return out

    def vector(self, item_id: str) -> np.ndarray:
        rows = self._rows([item_id], ["vector"])
        if item_id not in rows:
            raise KeyError(item_id)
        return np.asarray(rows[item_id]["vector"], dtype=np.float32)

    def search(self, queries: np.ndarray, top_k: int = 10, offset: int = 0, filters: Filters | None = None,
               exclude: str | None = None) -> list[list[Hit]]:
        q = normalise(queries, self.spec.dim)
        k = offset + top_k
        if k > MAX_LIMIT:
            raise InvalidInput(f"offset + top_k must be at most {MAX_LIMIT} on the Milvus backend", "offset")
        expr = expression(filters, exclude)
        if self.spec.kind == "ivfpq":
            return [hits[offset:] for hits in self._reranked(q, k, expr)]
        found = self.client.search(self.milvus_name, data=q.tolist(), limit=k, filter=expr, output_fields=_FIELDS,
                                   search_params=_search_params(self.spec, k), consistency_level=self.level)
        return [[self._hit(h["id"], h["distance"], h["entity"]) for h in row][offset:] for row in found]

    def _reranked(self, q: np.ndarray, k: int, expr: str) -> list[list[Hit]]:
        """IVF_PQ's ``rerank`` x k candidates per query, re-ranked by exact inner product with the stored vectors."""
        wanted = min(max(k, k * self.spec.rerank), MAX_LIMIT)
        found = self.client.search(self.milvus_name, data=q.tolist(), limit=wanted, filter=expr, output_fields=[],
                                   search_params=_search_params(self.spec, wanted), consistency_level=self.level)
        ids = list(dict.fromkeys(h["id"] for row in found for h in row))
        rows = self._rows(ids, ["vector", *_FIELDS])
        results = []
        for query, row in zip(q, found):
            candidates = [h["id"] for h in row if h["id"] in rows]
            if not candidates:
                results.append([])
                continue
            scores = np.asarray([rows[i]["vector"] for i in candidates], dtype=np.float32) @ query
            order = np.argsort(-scores, kind="stable")[:k]
            results.append([self._hit(candidates[j], float(scores[j]), rows[candidates[j]]) for j in order])
        return results

    @staticmethod
    def _hit(item_id: str, score: float, entity: dict) -> Hit:
        item = entity["item"] or {}
        return Hit(item_id, float(score), item.get("uri"), item.get("caption"), list(entity["tags"]),
                   entity["attributes"], float(entity["created"]))

    def adopt(self, fingerprint: str) -> None:
        self.info.fingerprint = fingerprint
        self.catalog.save_info(self.name, self.info)

    def close(self, snapshot: bool = True) -> None:
        """Nothing to release per collection: the server keeps it loaded for every gateway that shares it."""


class MilvusCatalog(Catalog):
    backend = "milvus"

    def __init__(self, uri: str, consistency: str = "Strong") -> None:
        if "://" not in uri:  # milvus-lite: a local file
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
        self.uri, self.consistency = uri, consistency  # of item reads and searches; the catalog's are Strong
        self.client = MilvusClient(uri)
        self.write_lock = threading.Lock() if "://" not in uri else contextlib.nullcontext()  # see the top
        if not self.client.has_collection(CATALOG):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("name", DataType.VARCHAR, is_primary=True, max_length=256)
            schema.add_field("info", DataType.JSON)
            schema.add_field("placeholder", DataType.FLOAT_VECTOR, dim=2)
            index = self.client.prepare_index_params()
            index.add_index("placeholder", index_type="FLAT", metric_type="L2")
            self.client.create_collection(CATALOG, schema=schema, index_params=index, consistency_level="Strong")
        self.client.load_collection(CATALOG)

    # -- what each collection records -------------------------------------------------------------------------
    def save_info(self, name: str, info: Info) -> None:
        record = {"spec": info.spec.model_dump(), "model": info.model, "fingerprint": info.fingerprint,
                  "created": info.created}
        with self.write_lock:
            self.client.upsert(CATALOG, [{"name": name, "info": record, "placeholder": [0.0, 0.0]}])

    def _infos(self) -> dict[str, Info]:
        rows = self.client.query(CATALOG, filter='name != ""', output_fields=["name", "info"],
                                 consistency_level="Strong")
        return {r["name"]: Info(IndexSpec(**r["info"]["spec"]), r["info"]["model"], r["info"]["fingerprint"],
                                float(r["info"]["created"])) for r in rows}

    # -- the catalog -------------------------------------------------------------------------------------------
    def open_all(self) -> list[Collection]:
        opened = []
        for name, info in sorted(self._infos().items()):
            if not self.client.has_collection(physical(name)):  # a create interrupted before its collection
                self.client.delete(CATALOG, ids=[name])
                continue
            self.client.load_collection(physical(name))
            collection = MilvusCollection(self, name, info)
            log.info("collection %s: %d items (%s, Milvus at %s)", name, collection.count, info.spec.kind, self.uri)
            opened.append(collection)
        return opened

    def open(self, name: str) -> Collection:
        infos = self._infos()
        if name not in infos or not self.client.has_collection(physical(name)):
            raise CollectionNotFound(name)
        self.client.load_collection(physical(name))
        return MilvusCollection(self, name, infos[name])

    def exists(self, name: str) -> bool:
        return self.client.has_collection(physical(name)) or name in self.aliases()

    def create(self, name: str, info: Info) -> Collection:
        if info.keep_images:
            raise InvalidInput("keep_images: the Milvus backend keeps no image bytes (a JSON field holds at most "
                               "64 KB); image items are re-embedded from their uri (docs/reindex.md)", "keep_images")
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=ID_BYTES)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=info.spec.dim)
        schema.add_field("item", DataType.JSON)
        schema.add_field("tags", DataType.ARRAY, element_type=DataType.VARCHAR, max_capacity=MAX_TAGS,
                         max_length=TAG_BYTES)
        schema.add_field("attributes", DataType.JSON)
        schema.add_field("created", DataType.DOUBLE)
        index_type, params = _index_params(info.spec, lite="://" not in self.uri)
        index = self.client.prepare_index_params()
        index.add_index("vector", index_type=index_type, metric_type=_METRIC, params=params)
        self.client.create_collection(physical(name), schema=schema, index_params=index, consistency_level="Strong")
        self.save_info(name, info)  # last: a collection without its catalog row is dropped at the next start
        return MilvusCollection(self, name, info)

    def drop(self, collection: Collection) -> None:
        self.client.delete(CATALOG, ids=[collection.name])
        self.client.drop_collection(physical(collection.name))

    def aliases(self) -> dict[str, str]:
        out = {}
        for name in self._infos():
            if self.client.has_collection(physical(name)):
                for alias in self._aliases_of(physical(name)):
                    out[logical(alias)] = name
        return out

    def _aliases_of(self, milvus_name: str) -> list[str]:
        """A Milvus server lists a collection's aliases in its description (``list_aliases`` fails there outside
        the default database); milvus-lite only through ``list_aliases``."""
        described = self.client.describe_collection(milvus_name).get("aliases") or []
        if described:
            return list(described)
        try:
            return list(self.client.list_aliases(milvus_name)["aliases"])
        except MilvusException:
            return []

    def set_alias(self, alias: str, target: str) -> None:
        if not self.client.has_collection(physical(target)):
            raise CollectionNotFound(target)
        if alias in self.aliases():
            self.client.alter_alias(physical(target), physical(alias))
        else:
            self.client.create_alias(physical(target), physical(alias))

    def drop_alias(self, alias: str) -> None:
        if alias not in self.aliases():
            raise CollectionNotFound(alias)
        self.client.drop_alias(physical(alias))

    def close(self) -> None:
        self.client.close()
        if "://" not in self.uri:  # milvus-lite runs inside this process: stop it, releasing the file's lock
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(self.uri)

