"""The collection interface (services/index/collection.py) behaves the same on FAISS + SQLite and on Milvus (here
milvus-lite, in process; the slow lane runs the HTTP suite on a Milvus server too): upsert and replace, delete,
filters, paging, exclusion, bad input, reopening, the fingerprint and aliases. Expected rankings come from numpy."""

from __future__ import annotations

import time

import numpy as np
import pytest

from services.index.collection import Filters, IndexSpec, Info, InvalidInput, Item
from services.index.manager import open_catalog
from services.settings import IndexSettings

DIM = 16
N = 120


@pytest.fixture(params=["faiss", "milvus", "milvus-session"])
def settings(request, tmp_path) -> IndexSettings:
    """Milvus twice: at the default consistency (Strong) and at Session, which a gateway alone on its database
    may choose (HQCLIP_INDEX__MILVUS_CONSISTENCY): it must still read its own writes at once."""
    backend, _, level = request.param.partition("-")
    return IndexSettings(backend=backend, dir=tmp_path / "collections", milvus_uri=str(tmp_path / "m.db"),
                         gpu=False, milvus_consistency=(level or "strong").capitalize())


def unit(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def items(n: int) -> list[Item]:
    return [Item(f"i{i}", f"file:///{i}.jpg", f"caption {i}", ["even" if i % 2 == 0 else "odd", f"m{i % 5}"],
                 {"group": i % 3, "name": f"n{i % 4}", "flag": i % 7 == 0, **({"opt": 1} if i % 2 else {})})
            for i in range(n)]


def ranking(x: np.ndarray, q: np.ndarray, keep=lambda i: True) -> list[str]:
    return [f"i{i}" for i in np.argsort(-(x @ q), kind="stable") if keep(i)]


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_the_same_semantics_on_every_backend(settings, kind):
    catalog = open_catalog(settings)
    spec = IndexSpec(kind=kind, dim=DIM, nlist=4, pq_m=4, ef_search=256)
    collection = catalog.create("photos.v1", Info(spec, "tiny", "abc", time.time()))
    x = unit(N)
    collection.upsert(items(N), x)
    assert collection.count == N
    q = unit(1, seed=1)[0]

    pages = [h.id for o in (0, 10, 20) for h in collection.search(q[None], top_k=10, offset=o)[0]]
    assert pages == ranking(x, q)[:30]
    top = collection.search(q[None], top_k=1)[0][0]
    assert (top.uri, top.caption, top.score) == (f"file:///{top.id[1:]}.jpg", f"caption {top.id[1:]}",
                                                 pytest.approx(float(x[int(top.id[1:])] @ q), abs=1e-5))
    cases = [
        (Filters(["odd", "m3"]), lambda i: i % 2 == 1 and i % 5 == 3),
        (Filters([], {"group": 2, "name": "n1"}), lambda i: i % 3 == 2 and i % 4 == 1),
        (Filters(["even"], {"flag": True}), lambda i: i % 2 == 0 and i % 7 == 0),
        (Filters([], {"group": "2"}), lambda i: False),  # typed: "2" is not 2
        (Filters([], {"opt": None}), lambda i: i % 2 == 0),  # null matches a missing key
    ]
    for filters, keep in cases:
        assert [h.id for h in collection.search(q[None], top_k=50, filters=filters)[0]] == ranking(x, q, keep)[:50]
    like = collection.search(x[5:6], top_k=3, exclude="i5")[0]
    assert [h.id for h in like] == [i for i in ranking(x, x[5]) if i != "i5"][:3]

    created = collection.get(["i1"])["i1"]
    first = collection.search(x[1:2], top_k=1)[0][0].created
    collection.upsert([Item("i1", caption="moved", tags=["moved"])], -x[1:2])
    moved = collection.search(-x[1:2], top_k=1)[0][0]
    assert (moved.id, moved.caption, moved.tags, moved.attributes, moved.created) == ("i1", "moved", ["moved"], {},
                                                                                       first)
    assert created.caption == "caption 1" and collection.get(["i1", "nope"])["i1"].caption == "moved"
    assert collection.vector("i1") == pytest.approx(-x[1], abs=1e-6)
    assert collection.delete(["i3", "nope", "i2", "i3"]) == ["i3", "i2"] and collection.count == N - 2
    with pytest.raises(KeyError):
        collection.vector("i2")
    for bad, vectors in (([Item("a"), Item("a")], unit(2)), ([Item("a")], np.ones((1, 8))),
                         ([Item("a")], np.zeros((1, DIM)))):
        with pytest.raises(InvalidInput) as caught:
            collection.upsert(bad, vectors)
        assert caught.value.field == "items"
    assert collection.count == N - 2

    catalog.set_alias("live", "photos.v1")
    legacy = catalog.create("legacy", Info(IndexSpec(dim=DIM), "tiny", None, time.time()))
    legacy.adopt("def")
    for c in (collection, legacy):
        c.close()
    catalog.close()

    reopened = open_catalog(settings)
    by_name = {c.name: c for c in reopened.open_all()}
    again = by_name["photos.v1"]
    assert (again.count, again.spec, again.model, again.fingerprint) == (N - 2, spec, "tiny", "abc")
    assert by_name["legacy"].fingerprint == "def"
    assert [h.id for h in again.search(-x[1:2], top_k=1)[0]] == ["i1"]
    assert reopened.aliases() == {"live": "photos.v1"}
    reopened.set_alias("live", "legacy")  # flipped
    assert reopened.aliases() == {"live": "legacy"}
    reopened.drop_alias("live")
    reopened.drop(by_name["legacy"])
    assert reopened.aliases() == {} and not reopened.exists("legacy") and reopened.exists("photos.v1")
    again.close()
    reopened.close()


def test_items_page_in_id_order_with_what_they_were_embedded_from(settings):
    """What `hqclip reindex` reads: every item once, in id order, with its source; ``since`` keeps the later writes;
    image bytes only where the collection keeps them (FAISS), refused on Milvus."""
    catalog = open_catalog(settings)
    keep = settings.backend == "faiss"
    collection = catalog.create("sources", Info(IndexSpec(dim=DIM), "tiny", "abc", time.time(), keep))
    stored = [Item(f"t{i:02d}", source="text", text=f"text {i}") for i in range(25)]
    stored += [Item("img", uri="file:///img.jpg", source="image", image=b"\xff\xd8jpeg"), Item("vec", source="vector")]
    collection.upsert(stored, unit(len(stored)))
    pages, after = [], None
    while True:
        page = collection.items(after, limit=10, images=True)
        pages.append([i.id for i in page])
        if len(page) < 10:
            break
        after = page[-1].id
    assert [i for page in pages for i in page] == sorted(i.id for i in stored) and len(pages) == 3
    listed = {i.id: i for i in collection.items(limit=100, images=True)}
    assert (listed["t03"].source, listed["t03"].text, listed["vec"].source) == ("text", "text 3", "vector")
    assert (listed["img"].source, listed["img"].uri) == ("image", "file:///img.jpg")
    assert listed["img"].image == (b"\xff\xd8jpeg" if keep else None)
    assert collection.items(limit=100)[0].image is None  # bytes only when asked for
    later = max(i.updated for i in listed.values())
    collection.upsert([Item("t05", source="text", text="changed")], unit(1, seed=3))
    assert [(i.id, i.text) for i in collection.items(since=later)] == [("t05", "changed")]
    if not keep:
        with pytest.raises(InvalidInput) as caught:
            catalog.create("kept", Info(IndexSpec(dim=DIM), "tiny", "abc", time.time(), True))
        assert caught.value.field == "keep_images"
    collection.close()
    catalog.close()
