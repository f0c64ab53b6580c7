"""The `demo` collection `hqclip demo build` seeds (hqclip/jobs/demo_collection.py): built once with captions, tags
and thumbnails, kept on a rerun, resumed after an interruption, rebuilt for another model, never touching a
collection of the same name that it did not make nor one a running process holds. Real shards, the tiny models,
the gateway's own engine and store, a temporary index folder."""

from __future__ import annotations

import json

import pytest

from hqclip.jobs.demo_collection import MARKER, seed
from services.index.collection import CollectionBusy
from services.index.faiss_sqlite import FaissCollection as Collection
from services.index.manager import open_catalog
from services.settings import Settings
from testkit.shards import write_shards

pytestmark = pytest.mark.slow


@pytest.fixture
def shards(tmp_path):
    return write_shards(tmp_path / "heldout", shards=2, per_shard=5)


def settings(repo, model: str, index_dir, backend: str = "faiss") -> Settings:
    return Settings(model_repo=repo, model=model,
                    index={"dir": index_dir, "backend": backend, "milvus_uri": str(index_dir / "milvus.db")})


def opened(s: Settings):
    """The demo collection, through the backend's catalog (closed with the catalog after the block)."""
    catalog = open_catalog(s.index)
    collection = catalog.open("demo")
    return catalog, collection


@pytest.mark.parametrize("backend", ["faiss", "milvus"])
def test_built_once_kept_resumed_and_rebuilt_for_another_model(shards, tiny_repo, tagged_repo, tmp_path, backend):
    index_dir, work = tmp_path / "collections", tmp_path / "work"
    first = seed(shards, settings(tiny_repo, "tiny", index_dir, backend), work, progress=False)
    assert (first.action, first.count) == ("built", 10)
    catalog, collection = opened(settings(tiny_repo, "tiny", index_dir, backend))
    stored = collection.get([f"shard-00000/{i:09d}" for i in range(5)])
    assert collection.model == "tiny"
    collection.close(snapshot=False)
    catalog.close()
    one = stored["shard-00000/000000000"]
    assert one.caption == "NASA portrait" and one.tags == ["astronaut", "white suit", "flag"]
    assert one.attributes["thumbnail"].startswith("data:image/jpeg;base64,")

    kept = seed(shards, settings(tiny_repo, "tiny", index_dir, backend), work, progress=False)
    assert (kept.action, kept.count) == ("kept", 10)
    marker = index_dir / MARKER
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "complete": False}))  # as if interrupted
    resumed = seed(shards, settings(tiny_repo, "tiny", index_dir, backend), work, progress=False)
    assert (resumed.action, resumed.count, json.loads(marker.read_text())["complete"]) == ("resumed", 10, True)

    rebuilt = seed(shards, settings(tagged_repo, "tagged", index_dir, backend), work, progress=False)
    assert (rebuilt.action, rebuilt.count) == ("rebuilt", 10)
    catalog, collection = opened(settings(tagged_repo, "tagged", index_dir, backend))
    assert (collection.model, collection.count) == ("tagged", 10)
    collection.close(snapshot=False)
    catalog.close()


def test_a_users_own_demo_collection_and_a_held_one_are_left_alone(shards, tiny_repo, tagged_repo, tmp_path):
    index_dir, work = tmp_path / "collections", tmp_path / "work"
    seed(shards, settings(tiny_repo, "tiny", index_dir), work, progress=False)
    held = Collection.open(index_dir / "demo")  # as a running gateway holds it
    try:
        with pytest.raises(CollectionBusy):
            seed(shards, settings(tagged_repo, "tagged", index_dir), work, progress=False)
    finally:
        held.close(snapshot=False)
    (index_dir / MARKER).unlink()  # a `demo` no demo build made: the user's
    foreign = seed(shards, settings(tagged_repo, "tagged", index_dir), work, progress=False)
    assert foreign.action == "foreign" and "kept as it is" in str(foreign)
    collection = Collection.open(index_dir / "demo")
    assert (collection.model, collection.count) == ("tiny", 10)
    collection.close(snapshot=False)
