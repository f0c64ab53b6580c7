"""`hqclip index build` from a folder of photos and from webdataset shards, run as the real command; the gateway
then loads the collections at start and finds each image by itself (offline and online embeddings agree)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from testkit.photos import b64, encode, jpeg, photo
from testkit.processes import ROOT
from testkit.shards import write_shards

pytestmark = pytest.mark.slow

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")


def run_build(source, name, env) -> dict:
    done = subprocess.run([sys.executable, "-m", "hqclip.cli", "index", "build", str(source), name],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_repo):
    work = tmp_path_factory.mktemp("build")
    folder = work / "photos"
    (folder / "nested").mkdir(parents=True)
    for i, name in enumerate(PHOTOS):
        (folder / ("nested" if i % 2 else "") / f"{name}.jpg").write_bytes(jpeg(name))
    (folder / "nested" / "coffee.txt").write_text("a cup of coffee\n")  # sidecars beside nested/coffee.jpg
    (folder / "nested" / "coffee.json").write_text(json.dumps({"tags": ["drink", "cup"], "source": "skimage"}))
    (folder / "broken.jpg").write_bytes(jpeg("rocket")[:2000])
    shards = write_shards(work / "shards", shards=2, per_shard=6)
    env = {**os.environ, "HQCLIP_MODEL_REPO": str(tiny_repo), "HQCLIP_INDEX__DIR": str(work / "collections")}
    first = run_build(folder, "photos", env)
    again = run_build(folder, "photos", env)
    from_shards = run_build(work / "shards", "shards", env)
    return work, first, again, from_shards, shards


def test_build_skips_broken_images_and_resumes(built):
    _, first, again, from_shards, _ = built
    assert (first["kind"], first["count"], first["added"], first["failed"]) == ("flat", 5, 5, ["broken.jpg"])
    assert (again["added"], again["skipped_existing"], again["count"]) == (0, 5, 5)
    assert (from_shards["count"], from_shards["added"]) == (12, 12)


def test_gateway_loads_built_collections(built, gateway_factory):
    work, *_ , shards = built
    gateway = gateway_factory(HQCLIP_INDEX__DIR=str(work / "collections"))
    listed = {c["name"]: c for c in httpx.get(f"{gateway.url}/v1/collections").json()["data"]}
    assert (listed["photos"]["count"], listed["shards"]["count"], listed["photos"]["wal_pending"]) == (5, 12, 0)
    for name in PHOTOS:
        hits = httpx.post(f"{gateway.url}/v1/collections/photos/search", json={"image": b64(jpeg(name)), "top_k": 1},
                          timeout=60).json()["results"]
        assert hits[0]["id"].endswith(f"{name}.jpg") and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    coffee = httpx.post(f"{gateway.url}/v1/collections/photos/search",
                        json={"image": b64(jpeg("coffee")), "top_k": 1}, timeout=60).json()["results"][0]
    assert (coffee["caption"], coffee["tags"], coffee["attributes"]) == ("a cup of coffee", ["drink", "cup"],
                                                                        {"source": "skimage"})
    assert coffee["id"] == "nested/coffee.jpg" and coffee["uri"].startswith("file://")
    cats = httpx.post(f"{gateway.url}/v1/collections/shards/search",
                      json={"image": b64(encode(photo("chelsea"))), "top_k": 12, "filters": {"tags": ["cat"]}},
                      timeout=60).json()["results"]
    assert cats and all("cat" in hit["tags"] and hit["attributes"]["label"] == "chelsea" for hit in cats)
    assert {hit["id"].split("/")[0] for hit in cats} <= {"shard-00000", "shard-00001"}
    assert len(shards) == 2


def test_build_into_milvus_and_serve_it(built, tiny_repo, gateway_factory):
    """The same build through HQCLIP_INDEX__BACKEND=milvus (milvus-lite here): the gateway on that database finds
    each image by itself, and the collection records the model's fingerprint."""
    work, *_ = built
    index = {"HQCLIP_INDEX__BACKEND": "milvus", "HQCLIP_INDEX__MILVUS_URI": str(work / "milvus" / "collections.db")}
    env = {**os.environ, "HQCLIP_MODEL_REPO": str(tiny_repo), **index}
    summary = run_build(work / "photos", "photos", env)
    assert (summary["count"], summary["added"], summary["failed"]) == (5, 5, ["broken.jpg"])
    gateway = gateway_factory(**index)
    described = httpx.get(f"{gateway.url}/v1/collections/photos").json()
    assert (described["backend"], described["count"], described["model"]) == ("milvus", 5, "tiny")
    assert described["fingerprint"]
    for name in PHOTOS:
        hits = httpx.post(f"{gateway.url}/v1/collections/photos/search", json={"image": b64(jpeg(name)), "top_k": 1},
                          timeout=60).json()["results"]
        assert hits[0]["id"].endswith(f"{name}.jpg") and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
