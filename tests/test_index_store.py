"""The collection store on its own, with real FAISS and SQLite: every index kind, upsert, delete, filters, paging,
snapshot + WAL replay. Expected neighbours come from numpy brute force over the same vectors."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from services.index import faiss_sqlite as store_module
from services.index.collection import CollectionBusy, Filters, Item
from services.index.faiss_sqlite import FaissCollection as Collection
from services.index.vectors import IndexSpec, gpu_resources

DIM = 32
KINDS = ["flat", "hnsw", "ivfpq"]
# small ivfpq lists so that 40 x 256 = 10,240 items train it; the fixtures below hold more than that
SPEC = {"dim": DIM, "nlist": 16, "pq_m": 16, "nprobe": 16, "rerank": 10, "hnsw_m": 16, "ef_construction": 64,
        "ef_search": 256}
N = 10_500


def clustered(n: int, dim: int = DIM, clusters: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def items_for(n: int) -> list[Item]:
    return [Item(id=f"item-{i}", uri=f"file:///{i}.jpg", caption=f"caption {i}",
                 tags=["even" if i % 2 == 0 else "odd", f"mod5-{i % 5}"],
                 attributes={"group": i % 3, "name": f"n{i % 4}", "flag": i % 7 == 0}) for i in range(n)]


def brute_force(x: np.ndarray, q: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[list[int]]:
    scores = q @ x.T
    if allowed is not None:
        scores[:, ~allowed] = -np.inf
    return [list(row[: min(k, int(np.isfinite(s).sum()))]) for row, s in
            zip(np.argsort(-scores, axis=1, kind="stable"), scores)]


def ids(hits) -> list[str]:
    return [h.id for h in hits]


def recall(found: list[str], expected: list[int]) -> float:
    return len(set(found) & {f"item-{i}" for i in expected}) / max(len(expected), 1)


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """FAISS's OpenMP threads spin while they wait: on 2 shared cores one thread is several times faster."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return clustered(N)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return clustered(20, seed=1)


@pytest.fixture(scope="module", params=KINDS)
def filled(request, tmp_path_factory, data):
    """One collection per kind holding N items, shared by the read-only tests."""
    collection = Collection.create(tmp_path_factory.mktemp("c") / request.param, IndexSpec(kind=request.param, **SPEC))
    everything = items_for(N)
    for start in range(0, N, 2500):
        collection.upsert(everything[start : start + 2500], data[start : start + 2500])
    yield collection
    collection.close(snapshot=False)


def test_ivfpq_trains_once_it_holds_enough(filled):
    if filled.spec.kind == "ivfpq":
        assert filled.vectors.ivf is not None and filled.vectors.ivf.ntotal == N


def test_search_matches_brute_force(filled, data, queries):
    expected = brute_force(data, queries, 10)
    results = filled.search(queries, top_k=10)
    if filled.spec.kind == "flat":
        assert [ids(hits) for hits in results] == [[f"item-{i}" for i in row] for row in expected]
    else:
        mean = np.mean([recall(ids(hits), row) for hits, row in zip(results, expected)])
        assert mean >= 0.9, f"{filled.spec.kind} recall@10 {mean:.2f}"
    top = results[0][0]
    assert top.uri.startswith("file:///") and top.caption.startswith("caption") and top.created > 0
    assert top.score == pytest.approx(float(queries[0] @ data[int(top.id.split("-")[1])]), abs=1e-4)


@pytest.mark.parametrize("exact_filter_max", [store_module.EXACT_FILTER_MAX, 0], ids=["subset", "selector"])
def test_filters_on_tags_and_attributes(filled, data, queries, monkeypatch, exact_filter_max):
    """Both ways a filter runs: exactly over the matching ids, or the index with an IDSelector."""
    monkeypatch.setattr(store_module, "EXACT_FILTER_MAX", exact_filter_max)
    idx = np.arange(N)
    cases = [
        (Filters(tags=["odd"]), idx % 2 == 1),
        (Filters(tags=["odd", "mod5-3"]), (idx % 2 == 1) & (idx % 5 == 3)),
        (Filters(attributes={"group": 2, "name": "n1"}), (idx % 3 == 2) & (idx % 4 == 1)),
        (Filters(tags=["even"], attributes={"flag": True}), (idx % 2 == 0) & (idx % 7 == 0)),
    ]
    for filters, allowed in cases:
        results = filled.search(queries[:5], top_k=10, filters=filters)
        expected = brute_force(data, queries[:5], 10, allowed)
        for hits, row in zip(results, expected):
            assert all(allowed[int(h.id.split("-")[1])] for h in hits), filters
            if exact_filter_max or filled.spec.kind == "flat":
                assert ids(hits) == [f"item-{i}" for i in row], filters
            else:
                assert recall(ids(hits), row) >= 0.5, filters


def test_attribute_equality_is_typed(filled, queries):
    assert filled.search(queries[:1], top_k=5, filters=Filters(attributes={"group": "1"}))[0] == []
    assert filled.search(queries[:1], top_k=5, filters=Filters(attributes={"missing": 1}))[0] == []
    assert len(filled.search(queries[:1], top_k=5, filters=Filters(attributes={"group": 1}))[0]) == 5


def test_offset_pages_through_the_ranking(filled, queries):
    whole = ids(filled.search(queries[:1], top_k=30)[0])
    pages = [ids(filled.search(queries[:1], top_k=10, offset=o)[0]) for o in (0, 10, 20)]
    assert [i for page in pages for i in page] == whole and len(set(whole)) == 30


def test_exclude_leaves_out_the_query_item(filled, data):
    hits = filled.search(data[7:8], top_k=5, exclude="item-7")[0]
    assert "item-7" not in ids(hits) and len(hits) == 5
    assert filled.vector("item-7") == pytest.approx(data[7], abs=1e-6)
    with pytest.raises(KeyError):
        filled.vector("no-such-item")


@pytest.mark.parametrize("kind", KINDS)
def test_upsert_delete_snapshot_replay(kind, tmp_path, data):
    path = tmp_path / kind
    collection = Collection.create(path, IndexSpec(kind=kind, **SPEC), model="tiny")
    everything = items_for(N)
    collection.upsert(everything[:6000], data[:6000])
    assert collection.snapshot() and not collection.snapshot()  # nothing new the second time
    # after the snapshot: crosses the ivfpq training size, replaces, deletes
    collection.upsert(everything[6000:], data[6000:])
    moved = Item(id="item-1", caption="moved", tags=["moved"], attributes={"v": 2})
    created_before = collection.search(data[1:2], top_k=1)[0][0].created
    collection.upsert([moved], data[2:3])
    assert collection.delete(["item-3", "item-4", "never-stored"]) == ["item-3", "item-4"]
    expected_count = N - 2
    assert collection.count == expected_count

    def check(c: Collection) -> None:
        assert c.count == expected_count
        near_2 = c.search(data[2:3], top_k=2)[0]
        assert {h.id for h in near_2} == {"item-1", "item-2"}
        one = next(h for h in near_2 if h.id == "item-1")
        assert (one.caption, one.tags, one.attributes) == ("moved", ["moved"], {"v": 2})
        assert one.created == created_before  # an upsert keeps the first creation time
        for q in (1, 3, 4):  # the old version of item-1 and the deleted items are gone, from every path
            found = ids(c.search(data[q : q + 1], top_k=20)[0])
            assert found.count("item-1") <= 1 and "item-3" not in found and "item-4" not in found
            assert "item-3" not in ids(c.search(data[q : q + 1], top_k=20, filters=Filters(tags=["odd"]))[0])
        assert c.search(data[:1], top_k=50, filters=Filters(tags=["moved"]))[0][0].id == "item-1"

    check(collection)
    pending = collection.pending
    collection.close(snapshot=False)  # as after kill -9: the WAL holds everything after the snapshot

    reopened = Collection.open(path)
    assert reopened.state.replayed == pending
    assert reopened.model == "tiny" and reopened.spec == IndexSpec(kind=kind, **SPEC)
    if kind == "ivfpq":
        assert reopened.vectors.ivf is not None
    check(reopened)
    assert reopened.snapshot()
    assert [p.name for p in path.glob("snapshot-*.faiss")] == [f"snapshot-{reopened.state.seq:016d}.faiss"]
    assert reopened._conn.execute("SELECT count(*) FROM wal").fetchone()[0] == 0
    reopened.close()

    again = Collection.open(path)  # from the snapshot alone
    assert again.state.replayed == 0
    check(again)
    again.close()


def test_interrupted_snapshot_is_discarded(tmp_path, data):
    path = tmp_path / "c"
    collection = Collection.create(path, IndexSpec(kind="flat", dim=DIM))
    collection.upsert(items_for(10), data[:10])
    collection.close(snapshot=False)
    (path / ".snapshot-99.tmp").write_bytes(b"half a snapshot")
    reopened = Collection.open(path)
    assert reopened.count == 10 and not list(path.glob(".snapshot-*"))
    reopened.close()


def test_bad_writes_change_nothing(tmp_path, data):
    collection = Collection.create(tmp_path / "c", IndexSpec(kind="flat", dim=DIM))
    collection.upsert(items_for(3), data[:3])
    with pytest.raises(ValueError, match="32 dimensions"):
        collection.upsert([Item(id="x")], np.ones((1, 8)))
    with pytest.raises(ValueError, match="twice"):
        collection.upsert([Item(id="x"), Item(id="x")], data[:2])
    with pytest.raises(ValueError, match="zeros"):
        collection.upsert([Item(id="x")], np.zeros((1, DIM)))
    with pytest.raises(ValueError, match="NaN"):
        collection.upsert([Item(id="x")], np.full((1, DIM), np.nan))
    assert collection.count == 3 and collection.get(["x"]) == {}
    with pytest.raises(CollectionBusy):
        Collection.open(tmp_path / "c")
    collection.close()


@pytest.mark.gpu
@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="needs a GPU that FAISS sees (a faiss-gpu build)")
@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_gpu_search_matches_cpu(kind, tmp_path, data, queries):
    collections = {}
    for where, gpu in (("cpu", None), ("gpu", gpu_resources())):
        collection = Collection.create(tmp_path / where, IndexSpec(kind=kind, **SPEC), gpu=gpu)
        collection.upsert(items_for(N), data)
        collection.delete(["item-0"])  # drops the GPU copy; the next search copies it again
        collection.upsert(items_for(N)[1:2], data[1:2])
        collections[where] = collection
    assert collections["gpu"].vectors.gpu is not None
    cpu, gpu = (collections[w].search(queries, top_k=10) for w in ("cpu", "gpu"))
    for cpu_hits, gpu_hits in zip(cpu, gpu):
        if kind == "flat":
            assert ids(gpu_hits) == ids(cpu_hits)
        else:  # the GPU scans the same lists with float16 lookup tables: near-identical candidates
            assert len(set(ids(gpu_hits)) & set(ids(cpu_hits))) >= 9
        common = {h.id: h.score for h in cpu_hits}
        for hit in gpu_hits:
            if hit.id in common:
                assert hit.score == pytest.approx(common[hit.id], abs=1e-4)
    for collection in collections.values():
        collection.close(snapshot=False)


def test_a_collection_stored_before_sources_were_kept_opens_with_them_empty(tmp_path):
    """The items table of an older collection lacks source, text, image and updated: opening it adds them, its items
    list with no source (`hqclip reindex` then uses their uri), and new writes keep theirs."""
    import sqlite3

    x = clustered(3)
    collection = Collection.create(tmp_path / "old", IndexSpec(dim=DIM))
    collection.upsert(items_for(2), x[:2])
    collection.close()
    with sqlite3.connect(tmp_path / "old" / "meta.sqlite") as conn:
        for column in ("source", "text", "image", "updated"):
            conn.execute(f"ALTER TABLE items DROP COLUMN {column}")
    reopened = Collection.open(tmp_path / "old")
    assert [(i.id, i.uri, i.source, i.updated) for i in reopened.items()] == \
        [("item-0", "file:///0.jpg", None, None), ("item-1", "file:///1.jpg", None, None)]
    reopened.upsert([Item("item-2", source="text", text="new")], x[2:])
    assert [(i.source, i.text) for i in reopened.items(after="item-1")] == [("text", "new")]
    assert reopened.count == 3
    reopened.close()
