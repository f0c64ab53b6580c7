"""Collections follow the model: after a reload, `hqclip reindex` re-embeds a collection with the new model into a new
physical collection and flips the alias, while clients keep searching it (through the previous model, kept loaded
for it, until the flip); a killed run resumes; items with nothing to embed again stop the flip unless dropped.

Real gateways on the tiny model (seed 0), reloaded to a retrained one (seed 1) exported into a copy of the
repository; expected answers are ranked here from embeddings each model gives through /v1/embed.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest

from hqclip.jobs.reindex import ReindexError, reindex
from testkit.gateway import error, ok
from testkit.photos import b64, jpeg
from testkit.processes import ROOT
from testkit.tiny import export_tiny_repo
from tests.servers.milvus import BACKENDS, index_env
from tests.swap import repo, retrained_checkpoint  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": "Bearer admin-key"}
USER = {"Authorization": "Bearer user-key"}
QUERY = "a photo of a cat"
TOP_K = 5
TEXTS = ["a cat on a sofa", "a rocket launch", "a cup of coffee", "an astronaut in space", "a red car",
         "green grass", "a metal robot", "the night sky", "a dog in the snow", "a bowl of soup"]
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def call(gw, method: str, path: str, body=None, headers=ADMIN, **kwargs) -> httpx.Response:
    return httpx.request(method, f"{gw.url}{path}", json=body, headers=headers, timeout=120, **kwargs)


def swap_model(gw, repo, checkpoint) -> str:
    """Export ``checkpoint`` into the served repository and reload the gateway; the new fingerprint."""
    export_tiny_repo(checkpoint, repo)
    answer = ok(call(gw, "POST", "/v1/admin/reload"))
    assert answer["reloaded"], answer
    return answer["fingerprint"]


def embed(gw, inputs: list[dict]) -> np.ndarray:
    data = ok(call(gw, "POST", "/v1/embed", {"inputs": inputs}))["data"]
    return np.array([row["embedding"] for row in data], dtype=np.float32)


def retained(gw) -> list[str]:
    return httpx.get(f"{gw.url}/ready").json()["retained"]


@dataclass
class Searchers:
    """Client threads searching ``name`` by text until stopped, each answer recorded with its times."""

    gw: object
    name: str
    threads: int = 3
    answers: list[tuple[int, float, float, list[dict]]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def _run(self, n: int) -> None:
        with httpx.Client(base_url=self.gw.url, headers=ADMIN, timeout=120) as client:
            while not self.stop.is_set():
                started = time.monotonic()
                response = client.post(f"/v1/collections/{self.name}/search", json={"text": QUERY, "top_k": TOP_K})
                if response.status_code != 200:
                    self.failures.append(f"{response.status_code} {response.text}")
                    return
                self.answers.append((n, started, time.monotonic(), response.json()["results"]))

    def __enter__(self) -> Searchers:
        self._threads = [threading.Thread(target=self._run, args=(n,)) for n in range(self.threads)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join()

    def wait_for(self, count: int, after: float) -> None:
        """Until every thread has had ``count`` answers to requests started after ``after`` (or one failed)."""
        while not self.failures and min(sum(1 for n, s, _, _ in self.answers if n == t and s > after)
                                        for t in range(self.threads)) < count:
            self.stop.wait(0.01)


def expected(vectors: np.ndarray, query: np.ndarray, ids: list[str]) -> dict[str, float]:
    """Every item's score for the query under one model."""
    return {i: float(s) for i, s in zip(ids, vectors @ query)}


def model_of(hits: list[dict], scores: dict[str, dict[str, float]]) -> str:
    """The model whose ranking the answer is: its hits score as under that model, and they are its top scores."""
    for model, by_id in scores.items():
        top = sorted(by_id.values(), reverse=True)[:TOP_K]
        if all(abs(h["score"] - by_id[h["id"]]) < 1e-4 for h in hits) and \
                [h["score"] for h in hits] == pytest.approx(top, abs=1e-4):
            return model
    raise AssertionError(f"an answer matching neither model: {hits}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_reindex_and_alias_flip_with_searches_running(gateway_factory, repo, retrained_checkpoint, tmp_path,
                                                      backend, request):
    server = request.getfixturevalue("milvus_server") if backend == "milvus-server" else None
    gw = gateway_factory(HQCLIP_MODEL_REPO=str(repo), HQCLIP_ADMIN_KEYS="admin-key",
                         **index_env(backend, tmp_path / "collections", server))
    ok(call(gw, "POST", "/v1/collections", {"name": "photos.v0"}))
    ok(call(gw, "POST", "/v1/collections/photos/alias", {"target": "photos.v0"}))
    files = {}
    for name in PHOTOS:  # image items re-embedded from the files their uris name
        files[name] = tmp_path / f"{name}.jpg"
        files[name].write_bytes(jpeg(name))
    items = [{"id": f"text-{i}", "text": t} for i, t in enumerate(TEXTS)]
    items += [{"id": n, "image": b64(path.read_bytes()), "uri": path.as_uri() if i % 2 else str(path),
               "tags": ["photo"]} for i, (n, path) in enumerate(files.items())]
    ok(call(gw, "POST", "/v1/collections/photos/items", {"items": items}))
    inputs = [{"text": t} for t in TEXTS] + [{"image": b64(p.read_bytes())} for p in files.values()] + [{"text": QUERY}]
    ids = [item["id"] for item in items]
    before = embed(gw, inputs)
    old_fingerprint = httpx.get(f"{gw.url}/ready").json()["fingerprint"]

    with Searchers(gw, "photos") as searchers:
        searchers.wait_for(2, after=0)
        new_fingerprint = swap_model(gw, repo, retrained_checkpoint)
        assert retained(gw) == [old_fingerprint]  # the old model stays loaded for photos.v0
        reloaded = time.monotonic()
        searchers.wait_for(2, after=reloaded)
        summary = reindex(gw.url, "photos", api_key="admin-key", progress=False)
        done = time.monotonic()
        searchers.wait_for(3, after=done)

    assert not searchers.failures, searchers.failures[:3]
    new = f"photos.{new_fingerprint[:12]}"
    assert (summary.complete, summary.flipped, summary.deleted_old, summary.old, summary.new) == \
        (True, True, True, "photos.v0", new), str(summary)
    assert summary.copied == len(items) and not summary.not_reembeddable
    after = embed(gw, inputs)
    assert not np.allclose(before, after, atol=1e-3)  # two models indeed
    scores = {"old": expected(before[:-1], before[-1], ids), "new": expected(after[:-1], after[-1], ids)}
    for thread in range(searchers.threads):
        models = [model_of(hits, scores) for n, _, _, hits in searchers.answers if n == thread]
        assert models == sorted(models, key=["old", "new"].index), models  # old until the flip, then new
    assert all(model_of(hits, scores) == "old" for _, _, ended, hits in searchers.answers if ended < reloaded)
    assert any(model_of(hits, scores) == "old" for _, started, _, hits in searchers.answers if started > reloaded)
    assert all(model_of(hits, scores) == "new" for _, started, _, hits in searchers.answers if started > done)
    listing = ok(call(gw, "GET", "/v1/collections"))
    assert listing["aliases"] == {"photos": new} and [c["name"] for c in listing["data"]] == [new]
    assert listing["data"][0]["fingerprint"] == new_fingerprint and listing["data"][0]["count"] == len(items)
    assert retained(gw) == []  # the old collection deleted: the old model unloaded
    hit = ok(call(gw, "POST", "/v1/collections/photos/search", {"image": b64(jpeg("rocket")), "top_k": 1}))
    assert (hit["results"][0]["id"], hit["results"][0]["tags"][0]) == ("rocket", "photo")


def test_a_killed_reindex_resumes_without_duplicates(gateway_factory, repo, retrained_checkpoint):
    gw = gateway_factory(HQCLIP_MODEL_REPO=str(repo), HQCLIP_ADMIN_KEYS="admin-key")
    ok(call(gw, "POST", "/v1/collections", {"name": "notes"}))  # a collection: the flip makes 'notes' an alias
    texts = [f"note number {i}: {TEXTS[i % len(TEXTS)]}" for i in range(300)]
    for start in range(0, len(texts), 100):
        ok(call(gw, "POST", "/v1/collections/notes/items",
                {"items": [{"id": f"n{i:03d}", "text": t} for i, t in enumerate(texts) if start <= i < start + 100]}))
    fingerprint = swap_model(gw, repo, retrained_checkpoint)
    new = f"notes.{fingerprint[:12]}"
    command = [sys.executable, "-m", "hqclip.cli", "reindex", "notes", "--gateway", gw.url, "--api-key", "admin-key",
               "--batch-size", "4", "--no-progress"]

    job = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    copied = 0
    while copied < 20 and job.poll() is None:  # killed once it has copied a few batches
        response = call(gw, "GET", f"/v1/collections/{new}")
        copied = response.json()["count"] if response.status_code == 200 else 0
    job.kill()
    output = job.communicate()[0].decode()
    assert job.returncode == -9, f"the job ended before it was killed: {output}"
    partial = ok(call(gw, "GET", f"/v1/collections/{new}"))["count"]
    assert 20 <= partial < len(texts)
    assert ok(call(gw, "GET", "/v1/collections"))["aliases"] == {}  # not flipped: 'notes' is still the old one

    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    skipped = int(re.search(r"skipped (\d+) already there", rerun.stdout).group(1))
    assert skipped >= partial and "  complete" in rerun.stdout, rerun.stdout  # (>=: a post in flight at the kill)
    listing = ok(call(gw, "GET", "/v1/collections"))
    assert listing["aliases"] == {"notes": new} and [c["name"] for c in listing["data"]] == [new]
    stored, after = [], None
    while True:
        page = ok(call(gw, "GET", "/v1/collections/notes/items", params={"limit": 1000, **({"after": after} if after
                                                                                          else {})}))
        stored += [(item["id"], item["text"], item["source"]) for item in page["items"]]
        if page["next"] is None:
            break
        after = page["next"]
    assert stored == [(f"n{i:03d}", t, "text") for i, t in enumerate(texts)]
    hit = ok(call(gw, "POST", "/v1/collections/notes/search", {"text": texts[7], "top_k": 1}))["results"][0]
    assert hit["id"] == "n007" and hit["score"] == pytest.approx(1.0, abs=1e-4)


def test_vector_items_stop_the_flip_unless_dropped_and_bad_input_is_named(gateway_factory, repo,
                                                                          retrained_checkpoint):
    gw = gateway_factory(HQCLIP_MODEL_REPO=str(repo), HQCLIP_ADMIN_KEYS="admin-key", HQCLIP_API_KEYS="user-key")
    ok(call(gw, "POST", "/v1/collections", {"name": "mixed.v0", "keep_images": True}))
    refused = error(call(gw, "POST", "/v1/collections/mixed/alias", {"target": "mixed.v0"}, headers=USER), 403,
                    "authorization")
    assert "admin key" in refused["message"]
    ok(call(gw, "POST", "/v1/collections/mixed/alias", {"target": "mixed.v0"}))
    vector = embed(gw, [{"text": "a vector"}])[0].tolist()
    ok(call(gw, "POST", "/v1/collections/mixed/items", {"items": [
        {"id": "a", "text": "a cat"}, {"id": "b", "image": b64(jpeg("chelsea"))}, {"id": "v", "vector": vector}]}))
    old_fingerprint = httpx.get(f"{gw.url}/ready").json()["fingerprint"]
    fingerprint = swap_model(gw, repo, retrained_checkpoint)
    new = f"mixed.{fingerprint[:12]}"

    error(call(gw, "GET", "/v1/collections/nope/items"), 404, "collection")
    error(call(gw, "GET", "/v1/collections/mixed/items", params={"limit": 0}), 422, "limit")
    error(call(gw, "GET", "/v1/collections/mixed/items", params={"images": True}, headers=USER), 403,
          "authorization")
    error(call(gw, "POST", "/v1/collections/mixed.v0/alias", {"target": "mixed"}), 409, "target")
    error(call(gw, "DELETE", "/v1/collections/mixed", headers=USER), 403, "authorization")
    with pytest.raises(ReindexError, match="NAME: no collection or alias 'nope'"):
        reindex(gw.url, "nope", api_key="admin-key", progress=False)
    with pytest.raises(ReindexError, match="listing image bytes needs an admin key"):
        reindex(gw.url, "mixed", api_key="user-key", progress=False)
    with pytest.raises(ReindexError, match=r"'mixed\.v0' is a collection, not an alias"):
        reindex(gw.url, "mixed.v0", api_key="admin-key", keep_old=True, progress=False)

    stopped = reindex(gw.url, "mixed", api_key="admin-key", progress=False)
    assert (stopped.complete, stopped.flipped, stopped.not_reembeddable, stopped.copied) == (False, False, ["v"], 2)
    assert "1 items not copied" in str(stopped) and "--drop-vectors" in str(stopped)
    assert ok(call(gw, "GET", "/v1/collections"))["aliases"] == {"mixed": "mixed.v0"}
    assert ok(call(gw, "POST", "/v1/collections/mixed/search", {"text": "a cat", "top_k": 1}))["results"][0]["id"] \
        == "a"  # still the old collection, through the old model
    assert retained(gw) == [old_fingerprint]

    dropped = reindex(gw.url, "mixed", api_key="admin-key", progress=False, keep_old=True, drop_vectors=True)
    assert (dropped.complete, dropped.flipped, dropped.dropped, dropped.deleted_old) == (True, True, True, False)
    assert dropped.skipped == 2 and dropped.copied == 0  # the stopped run's copies are reused
    assert ok(call(gw, "GET", f"/v1/collections/{new}"))["count"] == 2
    assert ok(call(gw, "POST", "/v1/collections/mixed/search", {"image": b64(jpeg("chelsea")), "top_k": 1}
                   ))["results"][0]["id"] == "b"  # re-embedded from its kept bytes
    assert retained(gw) == [old_fingerprint]  # mixed.v0 kept: so is its model
    ok(call(gw, "DELETE", "/v1/collections/mixed.v0"))
    assert retained(gw) == []
