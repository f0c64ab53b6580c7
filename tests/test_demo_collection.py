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
from services.settings import Settings
from testkit.shards import write_shards

pytestmark = pytest.mark.slow


@pytest.fixture
def shards(tmp_path):
    return write_shards(tmp_path / "heldout", shards=2, per_shard=5)


def settings(repo, model: str, index_dir) -> Settings:
    return Settings(model_repo=repo, model=model, index={"dir": index_dir})




def test_built_once_kept_resumed_and_rebuilt_for_another_model(shards, tiny_repo, tagged_repo, tmp_path):
    index_dir, work = tmp_path / "collections", tmp_path / "work"
    first = seed(shards, settings(tiny_repo, "tiny", index_dir), work, progress=False)
    assert (first.action, first.count) == ("built", 10)
    collection = Collection.open(index_dir / "demo")
    stored = collection.get([f"shard-00000/{i:09d}" for i in range(5)])
    assert collection.model == "tiny"
    collection.close(snapshot=False)
    one = stored["shard-00000/000000000"]
    assert one.caption == "NASA portrait" and one.tags == ["astronaut", "white suit", "flag"]
    assert one.attributes["thumbnail"].startswith("data:image/jpeg;base64,")

    assert seed(shards, settings(tiny_repo, "tiny", index_dir), work, progress=False).action == "kept"
    marker = index_dir / MARKER
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "complete": False}))  # as if interrupted
    resumed = seed(shards, settings(tiny_repo, "tiny", index_dir), work, progress=False)
    assert (resumed.action, resumed.count, json.loads(marker.read_text())["complete"]) == ("resumed", 10, True)

    rebuilt = seed(shards, settings(tagged_repo, "tagged", index_dir), work, progress=False)
    assert (rebuilt.action, rebuilt.count) == ("rebuilt", 10)
    collection = Collection.open(index_dir / "demo")
    assert collection.model == "tagged"
    collection.close(snapshot=False)


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
