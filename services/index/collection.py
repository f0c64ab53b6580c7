"""What a retrieval collection is, whichever engine stores it: the interface, its plain records and its errors.

Two implementations, one file each: :mod:`services.index.faiss_sqlite` (FAISS + SQLite in the gateway, the
default) and :mod:`services.index.milvus` (a Milvus server, or milvus-lite with a local file). Each also has a
catalog: the set of collections and aliases one backend holds. The HTTP layer (services/routes/collections.py)
sees only this module; pydantic models live there, not here.

Semantics every implementation keeps:

- items are keyed by the user's string id; an upsert of a known id replaces it (keeping ``created``);
- vectors are stored unit length, so the inner-product score is the cosine;
- filters: every tag in ``tags`` present, every ``attributes[key] == value`` (JSON types compared);
- a write is durable and searchable when the call returns; search pages with ``offset``.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import Field

from services.settings import IndexParams

Scalar = str | int | float | bool | None

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


# --- errors (the HTTP edge maps each to a status and the field it names) ---
class InvalidInput(ValueError):
    """The request's data cannot be stored or searched; ``field`` names what is wrong ("items", "name")."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


class CollectionExists(ValueError):
    pass


class CollectionNotFound(KeyError):
    pass


class CollectionBusy(RuntimeError):
    """Another process has this collection open."""


class AliasConflict(ValueError):
    """An alias would shadow a collection, point at an alias, or a collection to drop is still aliased."""


# --- records ---
class IndexSpec(IndexParams):
    """How a collection's index is built: the parameters (services/settings.py) plus the dimension; fixed at
    creation and stored with the collection."""

    dim: int = Field(gt=0)

    def subquantizers(self) -> int:
        """The largest divisor of ``dim`` that is at most ``pq_m``: PQ splits a vector into equal parts."""
        return max(m for m in range(1, min(self.pq_m, self.dim) + 1) if self.dim % m == 0)


SOURCES = ("text", "image", "vector")


@dataclass
class Item:
    """An item's metadata, and what it was embedded from, kept so a new model can embed it again (docs/reindex.md):
    ``source`` is "text", "image" or "vector" (None: stored before sources were kept); ``text`` the text of a text
    item; ``image`` an image item's bytes, only in a collection made with ``keep_images``. ``updated`` (unix time of
    the last write) is set by the store when items are listed."""

    id: str
    uri: str | None = None
    caption: str | None = None
    tags: list[str] = field(default_factory=list)
    attributes: dict[str, Any] = field(default_factory=dict)
    source: str | None = None
    text: str | None = None
    image: bytes | None = None
    updated: float | None = None


@dataclass
class Filters:
    """Which items a search may return: all of ``tags`` present, every attribute equal (JSON types compared)."""

    tags: list[str] = field(default_factory=list)
    attributes: dict[str, Scalar] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.tags or self.attributes)


@dataclass
class Hit:
    id: str
    score: float
    uri: str | None
    caption: str | None
    tags: list[str]
    attributes: dict[str, Any]
    created: float


@dataclass
class Info:
    """What a collection records about itself besides its items."""

    spec: IndexSpec
    model: str | None
    fingerprint: str | None  # the embedding model's (hqclip.repo.manifest.Manifest.fingerprint); None: not yet known
    created: float
    keep_images: bool = False  # image items keep their bytes (for re-embedding); FAISS + SQLite only


def check_name(name: str, what: str = "collection") -> str:
    if not NAME.match(name):
        raise InvalidInput(f"{what} name {name!r} must be 1-64 letters, digits, '_', '.' or '-', starting with a "
                           "letter or digit", "name")
    return name


def normalise(vectors: np.ndarray, dim: int) -> np.ndarray:
    """float32 C-contiguous [n, dim], each row scaled to unit length; InvalidInput on a wrong shape, NaN or zero."""
    x = np.array(vectors, dtype=np.float32, ndmin=2, copy=True, order="C")
    if x.ndim != 2 or x.shape[1] != dim:
        raise InvalidInput(f"vectors must have {dim} dimensions, got shape {tuple(np.shape(vectors))}", "items")
    if not np.isfinite(x).all():
        raise InvalidInput("vectors contain NaN or infinity", "items")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise InvalidInput("a vector is all zeros and has no direction", "items")
    return x / norms


def check_upsert(items: list[Item], vectors: np.ndarray, dim: int) -> np.ndarray:
    """The checks every backend makes before a write: one vector per item, ids unique; the normalised vectors."""
    if len(items) != len(vectors):
        raise InvalidInput(f"{len(items)} items but {len(vectors)} vectors", "items")
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise InvalidInput(f"id '{item.id}' appears twice in one request", "items")
        seen.add(item.id)
    return normalise(vectors, dim)


class Collection(abc.ABC):
    """One collection: vectors and their items' metadata. Methods block: call them from worker threads."""

    backend: str  # "faiss" or "milvus"
    name: str
    info: Info

    @property
    def spec(self) -> IndexSpec:
        return self.info.spec

    @property
    def model(self) -> str | None:
        return self.info.model

    @property
    def fingerprint(self) -> str | None:
        return self.info.fingerprint

    @property
    @abc.abstractmethod
    def count(self) -> int:
        """Live items."""

    @abc.abstractmethod
    def upsert(self, items: list[Item], vectors: np.ndarray) -> None:
        """Store ``items`` with their vectors, replacing stored items with the same ids; durable on return."""

    @abc.abstractmethod
    def delete(self, ids: list[str]) -> list[str]:
        """Delete these ids; durable on return. The ids that were stored, in the order given (others ignored)."""

    @abc.abstractmethod
    def get(self, ids: list[str]) -> dict[str, Item]:
        """The stored items among ``ids``."""

    @abc.abstractmethod
    def items(self, after: str | None = None, limit: int = 100, since: float | None = None,
              images: bool = False) -> list[Item]:
        """Up to ``limit`` stored items with ids after ``after``, in id order (UTF-8 byte order), each with its
        source and ``updated``; only those written after ``since`` when given; image bytes only when ``images``."""

    @abc.abstractmethod
    def vector(self, item_id: str) -> np.ndarray:
        """The stored vector of an item; KeyError when there is none."""

    @abc.abstractmethod
    def search(self, queries: np.ndarray, top_k: int = 10, offset: int = 0, filters: Filters | None = None,
               exclude: str | None = None) -> list[list[Hit]]:
        """Per query row, the hits ranked ``offset`` to ``offset + top_k`` by cosine, among items that pass
        ``filters``, leaving out the item ``exclude``."""

    @abc.abstractmethod
    def adopt(self, fingerprint: str) -> None:
        """Record the embedding model's fingerprint (a collection made before fingerprints were recorded)."""

    def snapshot(self) -> bool:
        """Persist in-memory state; False when there was nothing to do (the default: the engine persists)."""
        return False

    @abc.abstractmethod
    def close(self, snapshot: bool = True) -> None:
        """Release the collection (after a last snapshot, unless told not to)."""

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "backend": self.backend,
            "kind": self.spec.kind,
            "dim": self.spec.dim,
            "count": self.count,
            "model": self.model,
            "fingerprint": self.fingerprint,
            "created": self.info.created,
            "keep_images": self.info.keep_images,
            "spec": self.spec.model_dump(exclude={"kind", "dim"}),
        }


class Catalog(abc.ABC):
    """The collections and aliases one backend holds. Aliases are names that point at a collection; flipping one
    is atomic, so a re-embedded collection can replace the one an alias serves in one step."""

    backend: str

    @abc.abstractmethod
    def open_all(self) -> list[Collection]:
        """Every collection the backend holds, opened."""

    @abc.abstractmethod
    def open(self, name: str) -> Collection:
        """One stored collection, opened (CollectionNotFound when there is none)."""

    @abc.abstractmethod
    def exists(self, name: str) -> bool:
        """Whether a collection of this name is stored (opened or not)."""

    @abc.abstractmethod
    def create(self, name: str, info: Info) -> Collection:
        """A new empty collection."""

    @abc.abstractmethod
    def drop(self, collection: Collection) -> None:
        """Close and delete a collection and everything it stores."""

    @abc.abstractmethod
    def aliases(self) -> dict[str, str]:
        """alias -> collection."""

    @abc.abstractmethod
    def set_alias(self, alias: str, target: str) -> None:
        """Point ``alias`` at collection ``target`` (creating or flipping it) in one atomic step."""

    @abc.abstractmethod
    def drop_alias(self, alias: str) -> None:
        """Remove an alias (its collection stays)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the backend's connection, if it has one."""
