"""`hqclip loop` end to end: raw photo shards refined by the tiny vLLM, the tiny model trained from the served
model's checkpoint, gated on held-out shards, exported as the next version, swapped into a real gateway, and the
gateway's collection re-embedded by it behind its name (hqclip/jobs/reindex.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from hqclip.repo.layout import versions
from hqclip.repo.manifest import load_manifest
from testkit.processes import checkout_env
from testkit.shards import write_shards

ADMIN_KEY = "admin-key"
RAW_SHARDS, PER_SHARD = 4, 40  # 160 photo crops to refine
COLLECTION, CAPTIONS = "captions", [f"a photo of {thing}" for thing in ("a dog", "a red car", "two birds", "snow",
                                                                         "a bowl of soup", "an old bridge")]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_checkpoint) -> tuple[Path, Path]:
    """(the served model's `hqclip train` checkpoint, the repository it was exported into as 'tiny' version 1)."""
    from training.config import load_config
    from training.export import export_checkpoint
    from training.train import train

    folder = tmp_path_factory.mktemp("served")
    shards = write_shards(folder / "shards", shards=1, per_shard=16, seed=2)
    train(load_config(None, [f"model.name={tiny_checkpoint}", f"data.train_shards={json.dumps(shards)}",
                             "data.batch_size=8", "data.workers=0", "data.shuffle_buffer=8", "optim.steps=2",
                             "optim.warmup_steps=1", f"run.output_dir={folder / 'run'}", "run.progress=false"]))
    checkpoint = sorted((folder / "run").glob("checkpoint-*.pt"))[-1]
    export_checkpoint(str(checkpoint), out=folder / "repo", name="tiny")
    return checkpoint, folder / "repo"


def _config(tmp_path: Path, served: tuple[Path, Path], gateway: str, vllm_url: str, tolerance: float) -> Path:
    checkpoint, repo = served
    raw, heldout = tmp_path / "raw", tmp_path / "heldout"
    if not raw.exists():
        write_shards(raw, shards=RAW_SHARDS, per_shard=PER_SHARD, seed=0)
        write_shards(heldout, shards=1, per_shard=32, seed=1)
    config = {
        "work": str(tmp_path / "work"),
        "data": {"raw": [str(raw)], "lvlm": [vllm_url], "concurrency": 8, "ray": False},
        "train": {"base_checkpoint": str(checkpoint),
                  "overrides": ["data.batch_size=16", "data.workers=0", "data.shuffle_buffer=32", "optim.steps=4",
                                "optim.warmup_steps=1", "optim.lr=1e-4", "run.checkpoint_every=2"]},
        "gate": {"shards": [str(heldout / "shard-00000.tar")], "metric": "desc_t2i_R@5", "tolerance": tolerance},
        "serve": {"model_repo": str(repo), "model": "tiny", "gateway": gateway, "admin_key_env": "LOOP_ADMIN_KEY",
                  "collections": [COLLECTION]},
    }
    path = tmp_path / "loop.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _loop(config: Path, *options: str) -> subprocess.CompletedProcess:
    env = checkout_env(HQCLIP_REFINE__TEMPERATURE="1.0",  # the tiny VLM ends its answers when sampled
                       LOOP_ADMIN_KEY=ADMIN_KEY, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "hqclip.cli", "loop", "--config", str(config), "--no-progress",
                           *options], cwd=config.parent, env=env, capture_output=True, text=True, timeout=900)


def _fingerprint(gateway) -> str:
    return httpx.get(f"{gateway.url}/v1/models", timeout=30).json()["data"][0]["fingerprint"]


def _collection(gateway) -> dict:
    answer = httpx.get(f"{gateway.url}/v1/collections/{COLLECTION}", timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _statuses(result: subprocess.CompletedProcess) -> dict[str, str]:
    """step -> ran / skipped / stopped, from the summary the loop prints."""
    return dict(re.findall(r"^(\S+)\s+(ran|skipped|stopped)\s", result.stdout, re.M))


@pytest.mark.slow
def test_the_loop_refines_trains_gates_exports_reloads_and_resumes(tmp_path, served, gateway_factory,
                                                                   vllm_server):
    repo = served[1]
    gateway = gateway_factory(HQCLIP_MODEL_REPO=str(repo), HQCLIP_ADMIN_KEYS=ADMIN_KEY)
    old = _fingerprint(gateway)
    admin = httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    assert admin.post("/v1/collections", json={"name": COLLECTION}).status_code == 201
    items = [{"id": f"c{i}", "text": text} for i, text in enumerate(CAPTIONS)]
    assert admin.post(f"/v1/collections/{COLLECTION}/items", json={"items": items}).status_code == 200
    assert _collection(gateway)["fingerprint"] == old

    # a run stopped after the train step (as a job killed there would be, with both steps recorded)
    first = _loop(_config(tmp_path, served, gateway.url, vllm_server.url, tolerance=-1.0), "--stop-after", "train")
    assert first.returncode == 0, first.stderr[-4000:]
    assert _statuses(first) == {"refine": "ran", "train": "ran", "gate": "stopped", "export": "stopped",
                                "reload": "stopped", f"reindex/{COLLECTION}": "stopped"}
    refined = json.loads((tmp_path / "work" / "loop-state.json").read_text())["refine"]["outputs"]["shards"]
    assert len(refined) == RAW_SHARDS

    # resumed with a gate the new model cannot pass (it must be better by 1.0): refused, both numbers printed
    refused = _loop(_config(tmp_path, served, gateway.url, vllm_server.url, tolerance=-1.0))
    assert refused.returncode == 3, refused.stderr[-4000:]
    assert "refine: done before, skipped" in refused.stderr and "train: done before, skipped" in refused.stderr
    numbers = re.search(r"desc_t2i_R@5: new ([\d.]+), served ([\d.]+) \(tolerance -1", refused.stderr)
    assert numbers and "the new model is refused" in refused.stderr and "nothing was exported" in refused.stderr
    assert _fingerprint(gateway) == old and versions(repo, "tiny_image") == [1]

    # with a tolerance it passes: resumed at the gate, exported as version 2, the gateway swapped to it
    passed = _loop(_config(tmp_path, served, gateway.url, vllm_server.url, tolerance=1.0))
    assert passed.returncode == 0, passed.stderr[-4000:]
    assert _statuses(passed) == {"refine": "skipped", "train": "skipped", "gate": "ran", "export": "ran",
                                 "reload": "ran", f"reindex/{COLLECTION}": "ran"}
    new = load_manifest(repo, "tiny", verify=True).fingerprint
    assert versions(repo, "tiny_image") == [2, 1] and new != old and _fingerprint(gateway) == new
    # the collection's name now leads to its copy embedded by the new model: a text query finds its own caption
    reindexed = _collection(gateway)
    assert (reindexed["fingerprint"], reindexed["count"]) == (new, len(CAPTIONS)) and reindexed["name"] != COLLECTION
    assert httpx.get(f"{gateway.url}/v1/collections", timeout=30).json()["aliases"] == {COLLECTION: reindexed["name"]}
    for i, text in enumerate(CAPTIONS):
        hits = admin.post(f"/v1/collections/{COLLECTION}/search", json={"text": text, "top_k": 1}).json()["results"]
        assert hits[0]["id"] == f"c{i}", (text, hits)
    assert f"served {numbers.group(2)}" in passed.stderr  # the served model measured the same both times

    # a rerun after completion does nothing
    again = _loop(_config(tmp_path, served, gateway.url, vllm_server.url, tolerance=1.0))
    assert again.returncode == 0, again.stderr[-4000:]
    assert set(_statuses(again).values()) == {"skipped"}
    assert versions(repo, "tiny_image") == [2, 1] and _fingerprint(gateway) == new

    # a changed input reruns its step and those after it, nothing before: the same model as version 3
    changed = _loop(_config(tmp_path, served, gateway.url, vllm_server.url, tolerance=0.9))
    assert changed.returncode == 0, changed.stderr[-4000:]
    assert _statuses(changed) == {"refine": "skipped", "train": "skipped", "gate": "ran", "export": "ran",
                                  "reload": "ran", f"reindex/{COLLECTION}": "ran"}
    assert "gate: its inputs changed since it ran" in changed.stderr
    assert versions(repo, "tiny_image") == [3, 2] and _fingerprint(gateway) == new  # the same weights
    same = ("name", "fingerprint", "count", "created")  # already embedded by them: the reindex had nothing to do
    assert {k: _collection(gateway)[k] for k in same} == {k: reindexed[k] for k in same}


def test_a_bad_config_and_a_base_checkpoint_that_is_not_the_served_models_are_refused(tmp_path, tiny_repo):
    config = tmp_path / "loop.yaml"
    base = tmp_path / "checkpoint-000000001.pt"
    base.write_bytes(b"another model's checkpoint")
    good = {"work": "work", "data": {"raw": ["raw"], "lvlm": ["http://127.0.0.1:9/v1"]},
            "train": {"base_checkpoint": str(base)}, "gate": {"shards": ["heldout.tar"]},
            "serve": {"model_repo": str(tiny_repo), "model": "tiny", "gateway": "http://127.0.0.1:9"}}
    config.write_text(yaml.safe_dump({**good, "gate": {"shards": ["heldout.tar"], "metrc": "tag_mAP"}}))
    typo = _loop(config)
    assert typo.returncode == 2 and "gate.metrc" in typo.stderr, typo.stderr
    config.write_text(yaml.safe_dump(good))
    bad_step = _loop(config, "--stop-after", "training")
    assert bad_step.returncode == 2 and "--stop-after" in bad_step.stderr, bad_step.stderr
    mismatch = _loop(config)
    assert mismatch.returncode == 1, mismatch.stderr
    assert "set train.base_checkpoint to the checkpoint it came from" in mismatch.stderr
    assert not (tmp_path / "work").exists()  # refused before any step ran
