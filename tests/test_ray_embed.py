"""`hqclip embed` on a real two-node Ray cluster on loopback, one of its actors' workers killed with SIGKILL mid-run:
the job still finishes, every shard written once and equal to the single-process run's; `hqclip index build`
loads the embedding shards into a collection; without Ray the job runs in one process and says how to scale."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from hqclip.jobs.embed import read_embeddings
from testkit.processes import ROOT
from testkit.shards import write_shards

pytestmark = pytest.mark.slow

SHARDS, PER_SHARD = 10, 8
ACTOR_TITLE = "MapBatches(_ShardActor)"  # in the process title Ray gives an actor's worker


def embed_command(source: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hqclip.cli", "embed", str(source), "--out", str(out), "--no-progress",
            "--batch-size", "4", *extra]


@pytest.fixture(scope="module")
def env(tiny_repo) -> dict[str, str]:
    return {**os.environ, "HQCLIP_MODEL_REPO": str(tiny_repo), "RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("embed") / "shards"
    write_shards(folder, shards=SHARDS, per_shard=PER_SHARD)
    return folder


@pytest.fixture(scope="module")
def reference(shards, env, tmp_path_factory) -> Path:
    """The single-process run's embedding shards."""
    out = tmp_path_factory.mktemp("reference")
    done = subprocess.run(embed_command(shards, out, "--no-ray"), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"shards: {SHARDS} done now, 0 already done, 0 failed" in done.stdout
    return out


@pytest.fixture(scope="module")
def cluster(env):
    """A head and a second node, 1 logical CPU and a 100 MB object store each, on 127.0.0.1."""
    from ray.cluster_utils import Cluster

    before = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 100 * 1024**2,
                                                          "include_dashboard": False})
    try:
        nodes.add_node(num_cpus=1, object_store_memory=100 * 1024**2)
        nodes.wait_for_nodes()
        yield nodes
    finally:
        nodes.shutdown()
        if before is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = before


def actor_workers() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if ACTOR_TITLE in " ".join(process.info["cmdline"] or []):
                found.append(process)
        except psutil.Error:
            continue
    return found


def assert_same(out: Path, reference: Path) -> None:
    names = sorted(p.name for p in reference.glob("*.npz"))
    assert sorted(p.name for p in out.glob("*.npz")) == names and len(names) == SHARDS
    assert not list(out.glob("*.tmp"))
    for name in names:
        ids, vectors, items, model = read_embeddings(out / name)
        ref_ids, ref_vectors, ref_items, ref_model = read_embeddings(reference / name)
        assert (ids, items, model) == (ref_ids, ref_items, ref_model)
        np.testing.assert_allclose(vectors, ref_vectors, atol=1e-5)


def test_a_killed_actor_on_a_two_node_cluster_loses_no_shard(cluster, shards, reference, env, tmp_path):
    out = tmp_path / "embeddings"
    job = subprocess.Popen(embed_command(shards, out, "--ray-address", cluster.address, "--actors", "2",
                                         "--actor-cpus", "0.5"),
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while True:  # kill an actor's worker once the first shard is written and before the last
        assert job.poll() is None, "the job ended before a worker could be killed:\n" + job.stdout.read()
        assert time.monotonic() < deadline, "no shard written in 300 s"
        workers = actor_workers()
        if list(out.glob("*.npz")) and workers:
            break
        time.sleep(0.05)
    workers[0].send_signal(signal.SIGKILL)
    written_at_kill = len(list(out.glob("*.npz")))
    stdout, _ = job.communicate(timeout=600)
    assert written_at_kill < SHARDS, "every shard was written before the kill: make the shards bigger"
    assert job.returncode == 0, stdout
    assert f"shards: {SHARDS} done now, 0 already done, 0 failed, of {SHARDS}" in stdout, stdout
    assert f"images: {SHARDS * PER_SHARD} in" in stdout
    assert_same(out, reference)

    again = subprocess.run(embed_command(shards, out, "--ray-address", cluster.address), cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"0 done now, {SHARDS} already done" in again.stdout, again.stdout


@pytest.mark.parametrize("backend", ["faiss", "milvus"])
def test_index_build_loads_embedding_shards(reference, env, tmp_path, backend):
    """Into FAISS and into Milvus (milvus-lite here), the configured backend's catalog."""
    from services.index.manager import open_catalog
    from services.settings import IndexSettings

    index = IndexSettings(backend=backend, dir=tmp_path / "collections", milvus_uri=str(tmp_path / "m.db"), gpu=False)
    env = {**env, "HQCLIP_INDEX__BACKEND": backend, "HQCLIP_INDEX__DIR": str(index.dir),
           "HQCLIP_INDEX__MILVUS_URI": index.milvus_uri}
    command = [sys.executable, "-m", "hqclip.cli", "index", "build", str(reference), "photos"]
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert '"added": 80' in first.stdout and '"skipped_existing": 80' in again.stdout, first.stdout + again.stdout

    ids, vectors, items, _ = read_embeddings(reference / "shard-00003.npz")
    catalog = open_catalog(index)
    collection = catalog.open("photos")
    try:
        assert collection.count == SHARDS * PER_SHARD
        hit = collection.search(vectors[2:3], top_k=1)[0][0]
        stored = collection.get([ids[2]])[ids[2]]
    finally:
        collection.close(snapshot=False)
        catalog.close()
    assert hit.id == ids[2] and hit.score == pytest.approx(1.0, abs=1e-4)
    assert (stored.uri, stored.caption, stored.tags) == (items[2]["uri"], items[2]["caption"], items[2]["tags"])


def test_without_ray_the_job_runs_here_and_says_how_to_scale(shards, reference, env, tmp_path):
    """Ray hidden from the interpreter, as in an install without the 'ray' extra."""
    hide_ray = ("import sys; sys.modules['ray'] = None; sys.modules['pyarrow'] = None; "
                "from hqclip.cli import app; app()")
    one = sorted(shards.glob("*.tar"))[0]
    done = subprocess.run([sys.executable, "-c", hide_ray, "embed", str(one), "--out", str(tmp_path), "--no-progress"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "pip install 'hqclip[ray]'" in done.stderr
    ids, vectors, _, _ = read_embeddings(tmp_path / f"{one.stem}.npz")
    ref_ids, ref_vectors, _, _ = read_embeddings(reference / f"{one.stem}.npz")
    assert ids == ref_ids
    np.testing.assert_allclose(vectors, ref_vectors, atol=1e-5)
    asked = subprocess.run([sys.executable, "-c", hide_ray, "embed", str(one), "--out", str(tmp_path), "--ray"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert asked.returncode == 2 and "pip install 'hqclip[ray]'" in asked.stderr
