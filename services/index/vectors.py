"""The FAISS side of a collection: int64 ids -> L2-normalised vectors, searched by inner product.

Three kinds, chosen when a collection is created (docs/retrieval.md says when to pick which):

- ``flat``: exact search, ``IndexIDMap2(IndexFlatIP)``; deletes free memory at once.
- ``hnsw``: graph search, ``IndexIDMap2(IndexHNSWFlat)``; HNSW cannot remove vectors, so deletes are tombstones
  that searches skip (an ``IDSelector``) and that stay in memory until the collection is rebuilt.
- ``ivfpq``: ``IndexIVFPQ`` for candidates, then exact re-ranking of ``rerank`` x k of them against the full vectors
  kept in an ``IndexIDMap2(IndexFlatIP)``. Until the collection holds ``40 x max(nlist, 256)`` vectors (FAISS's
  guideline of ~39 training points per centroid, for the nlist lists and for each sub-quantizer's 256 codes) there
  is too little to train on and it searches the full vectors exactly; the add that reaches that size trains it.

With a GPU (``faiss.get_num_gpus() > 0``) flat and ivfpq keep a GPU copy of what they search: adds go to both,
a delete drops the copy and the next search copies it again; searches with a filter (an ``IDSelector``) and all
of hnsw run on the CPU index, which stays the one that is snapshotted.
"""

from __future__ import annotations

from typing import BinaryIO

import faiss
import numpy as np

from services.index.collection import IndexSpec

TRAIN_POINTS_PER_CENTROID = 40
PQ_BITS = 8
PQ_CODES = 1 << PQ_BITS
MAX_CANDIDATES = 10_000  # ivfpq re-ranks at most this many per query (deep pages would otherwise copy gigabytes)
GPU_MAX_K = 2048  # FAISS GPU indexes return at most this many neighbours per query


def _selector(allowed: np.ndarray | None, dead: np.ndarray | None = None) -> faiss.IDSelector | None:
    if allowed is not None:
        return faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
    if dead is not None and len(dead):
        return faiss.IDSelectorNot(faiss.IDSelectorBatch(dead))
    return None


def _write(index: faiss.Index, out: BinaryIO) -> None:
    writer = faiss.PyCallbackIOWriter(out.write)
    faiss.write_index(index, writer)
    del writer  # flushes


def _read(src: BinaryIO) -> faiss.Index:
    reader = faiss.PyCallbackIOReader(src.read)
    index = faiss.read_index(reader)
    del reader
    return index


def _id_map(index: faiss.IndexIDMap2) -> np.ndarray:
    return faiss.vector_to_array(index.id_map).astype(np.int64, copy=False)


def _flat_idmap(dim: int) -> faiss.IndexIDMap2:
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


class Vectors:
    """One collection's vectors. Not thread-safe: the collection serialises calls."""

    def __init__(self, spec: IndexSpec, gpu: faiss.StandardGpuResources | None = None) -> None:
        self.spec = spec
        self.gpu = gpu
        self._replica: faiss.Index | None = None

    # -- what every kind implements -------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        """Live vectors."""
        raise NotImplementedError

    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        raise NotImplementedError

    def remove(self, ids: np.ndarray) -> None:
        raise NotImplementedError

    def search(self, x: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` (scores, ids) per query row, ids -1 past the end; ``allowed``: only these ids."""
        raise NotImplementedError

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """The stored (exact) vectors of live ``ids``."""
        raise NotImplementedError

    def ids(self) -> np.ndarray:
        """Every live id."""
        raise NotImplementedError

    def write(self, out: BinaryIO) -> None:
        raise NotImplementedError

    @classmethod
    def read(cls, spec: IndexSpec, src: BinaryIO, gpu: faiss.StandardGpuResources | None = None) -> Vectors:
        raise NotImplementedError

    def memory_bytes(self) -> int:
        """Bytes the CPU index takes, measured by serialising it."""
        return int(sum(faiss.serialize_index(index).nbytes for index in self._parts()))

    def _parts(self) -> list[faiss.Index]:
        raise NotImplementedError

    # -- GPU copy ----------------------------------------------------------------------------------------------
    def _on_gpu(self, index: faiss.Index) -> faiss.Index | None:
        """The GPU copy of ``index`` (made on first use), or None without a GPU."""
        if self.gpu is None:
            return None
        if self._replica is None:
            options = faiss.GpuClonerOptions()
            options.useFloat16LookupTables = True  # IVFPQ with many sub-quantizers needs it to fit shared memory
            self._replica = faiss.index_cpu_to_gpu(self.gpu, 0, index, options)
        return self._replica


class FlatVectors(Vectors):
    def __init__(self, spec: IndexSpec, gpu=None, index: faiss.IndexIDMap2 | None = None) -> None:
        super().__init__(spec, gpu)
        self.index = index if index is not None else _flat_idmap(spec.dim)
        self._replica_ids = np.zeros(0, dtype=np.int64)  # GPU copy's row -> id

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        self.index.add_with_ids(x, ids)
        if self._replica is not None:
            self._replica.add(x)  # the inner flat index: its positions line up with the id map
            self._replica_ids = np.concatenate([self._replica_ids, ids])

    def remove(self, ids: np.ndarray) -> None:
        self.index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))
        self._replica = None

    def search(self, x, k, allowed=None):
        if allowed is None and self.gpu is not None and self.index.ntotal:
            if self._replica is None:
                self._replica_ids = _id_map(self.index)
            scores, rows = self._on_gpu(faiss.downcast_index(self.index.index)).search(x, k)
            return scores, np.where(rows >= 0, self._replica_ids[np.maximum(rows, 0)], -1)
        params = faiss.SearchParameters(sel=_selector(allowed)) if allowed is not None else None
        return self.index.search(x, k, params=params)

    def reconstruct(self, ids):
        return self.index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))

    def ids(self):
        return _id_map(self.index)

    def write(self, out):
        _write(self.index, out)

    @classmethod
    def read(cls, spec, src, gpu=None):
        return cls(spec, gpu, _read(src))

    def _parts(self):
        return [self.index]


class HnswVectors(Vectors):
    def __init__(self, spec: IndexSpec, gpu=None, index=None, dead: np.ndarray | None = None) -> None:
        super().__init__(spec, None)  # FAISS has no GPU HNSW: it stays on the CPU
        if index is None:
            graph = faiss.IndexHNSWFlat(spec.dim, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            graph.hnsw.efConstruction = spec.ef_construction
            index = faiss.IndexIDMap2(graph)
        self.index = index
        self.dead = np.zeros(0, dtype=np.int64) if dead is None else dead

    @property
    def ntotal(self) -> int:
        return self.index.ntotal - len(self.dead)

    def add(self, ids, x):
        self.index.add_with_ids(x, ids)

    def remove(self, ids):
        self.dead = np.union1d(self.dead, np.asarray(ids, dtype=np.int64))

    def search(self, x, k, allowed=None):
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(self.spec.ef_search, k)
        selector = _selector(allowed, self.dead)
        if selector is not None:
            params.sel = selector
        return self.index.search(x, k, params=params)

    def reconstruct(self, ids):
        return self.index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))

    def ids(self):
        return np.setdiff1d(_id_map(self.index), self.dead)

    def write(self, out):
        _write(self.index, out)
        np.save(out, self.dead)

    @classmethod
    def read(cls, spec, src, gpu=None):
        index = _read(src)
        return cls(spec, gpu, index, np.load(src))

    def _parts(self):
        return [self.index]


class IvfPqVectors(Vectors):
    def __init__(self, spec: IndexSpec, gpu=None, exact=None, ivf=None) -> None:
        super().__init__(spec, gpu)
        self.exact = exact if exact is not None else _flat_idmap(spec.dim)
        self.ivf: faiss.IndexIVFPQ | None = ivf
        if self.ivf is None and self.exact.ntotal >= self.train_size:
            self.train()

    @property
    def train_size(self) -> int:
        return TRAIN_POINTS_PER_CENTROID * max(self.spec.nlist, PQ_CODES)

    @property
    def ntotal(self) -> int:
        return self.exact.ntotal

    def train(self) -> None:
        """Train the coarse quantizer and PQ on up to train_size stored vectors, then index all of them."""
        flat = faiss.downcast_index(self.exact.index)
        stored = faiss.rev_swig_ptr(flat.get_xb(), self.exact.ntotal * self.spec.dim).reshape(-1, self.spec.dim)
        pick = np.random.default_rng(0).choice(len(stored), size=min(len(stored), self.train_size), replace=False)
        quantizer = faiss.IndexFlatIP(self.spec.dim)
        ivf = faiss.IndexIVFPQ(
            quantizer, self.spec.dim, self.spec.nlist, self.spec.subquantizers(), PQ_BITS,
            faiss.METRIC_INNER_PRODUCT,
        )
        ivf.own_fields = True
        quantizer.this.disown()
        ivf.train(np.ascontiguousarray(stored[np.sort(pick)]))
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # remove_ids without scanning every list
        ivf.add_with_ids(stored, _id_map(self.exact))
        self.ivf = ivf
        self._replica = None

    def add(self, ids, x):
        self.exact.add_with_ids(x, ids)
        if self.ivf is not None:
            self.ivf.add_with_ids(x, ids)
            if self._replica is not None:
                self._replica.add_with_ids(x, ids)
        elif self.exact.ntotal >= self.train_size:
            self.train()

    def remove(self, ids):
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        self.exact.remove_ids(ids)
        if self.ivf is not None:
            self.ivf.remove_ids(ids)
        self._replica = None

    def search(self, x, k, allowed=None):
        if self.ivf is None:
            params = faiss.SearchParameters(sel=_selector(allowed)) if allowed is not None else None
            return self.exact.search(x, k, params=params)
        wanted = max(k, min(k * self.spec.rerank, MAX_CANDIDATES))
        if allowed is None and self.gpu is not None and wanted <= GPU_MAX_K:
            gpu_index = self._on_gpu(self.ivf)
            gpu_index.nprobe = self.spec.nprobe
            _, candidates = gpu_index.search(x, wanted)
        else:
            params = faiss.SearchParametersIVF()
            params.nprobe = self.spec.nprobe
            if allowed is not None:
                params.sel = _selector(allowed)
            _, candidates = self.ivf.search(x, wanted, params=params)
        return self._rerank(x, candidates, k)

    def _rerank(self, x: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner products of each query with its candidates; the best ``k``."""
        found = candidates >= 0
        vectors = np.zeros((*candidates.shape, self.spec.dim), dtype=np.float32)
        if found.any():
            vectors[found] = self.exact.reconstruct_batch(np.ascontiguousarray(candidates[found]))
        scores = np.einsum("qcd,qd->qc", vectors, x)
        scores[~found] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top_scores = np.take_along_axis(scores, order, axis=1)
        top_ids = np.where(np.isfinite(top_scores), np.take_along_axis(candidates, order, axis=1), -1)
        if top_ids.shape[1] < k:  # fewer candidates than k: pad like FAISS does
            pad = k - top_ids.shape[1]
            top_scores = np.pad(top_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            top_ids = np.pad(top_ids, ((0, 0), (0, pad)), constant_values=-1)
        return top_scores.astype(np.float32), top_ids

    def reconstruct(self, ids):
        return self.exact.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))

    def ids(self):
        return _id_map(self.exact)

    def write(self, out):
        _write(self.exact, out)
        out.write(b"\x01" if self.ivf is not None else b"\x00")
        if self.ivf is not None:
            _write(self.ivf, out)

    @classmethod
    def read(cls, spec, src, gpu=None):
        exact = _read(src)
        ivf = _read(src) if src.read(1) == b"\x01" else None
        return cls(spec, gpu, exact, ivf)

    def _parts(self):
        return [self.exact] + ([self.ivf] if self.ivf is not None else [])


_KINDS: dict[str, type[Vectors]] = {"flat": FlatVectors, "hnsw": HnswVectors, "ivfpq": IvfPqVectors}


def new_vectors(spec: IndexSpec, gpu: faiss.StandardGpuResources | None = None) -> Vectors:
    return _KINDS[spec.kind](spec, gpu)


def read_vectors(spec: IndexSpec, src: BinaryIO, gpu: faiss.StandardGpuResources | None = None) -> Vectors:
    return _KINDS[spec.kind].read(spec, src, gpu)


def gpu_resources() -> faiss.StandardGpuResources | None:
    """FAISS GPU resources for device 0 when FAISS sees a GPU (a faiss-gpu build on a GPU host), else None."""
    if faiss.get_num_gpus() > 0:
        return faiss.StandardGpuResources()
    return None
