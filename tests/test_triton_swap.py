"""Hot swap on Triton with explicit versions: both towers' new versions load beside the old, requests pin their
version, the flip is one step, the old versions are unloaded after; a version that fails to load changes nothing.

Triton is pytriton's tritonserver in ``--model-control-mode=explicit`` serving the repository's version folders as
its own (Python-backend) models (tests/servers/triton_serve.py --triton-repo).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import httpx
import pytest

from hqclip.repo.manifest import load_manifest, sha256_file
from tests.servers.triton import TritonServer, triton_factory  # noqa: F401 (a fixture)
from tests.swap import MIXED, Load, pair, references, retrained_checkpoint  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": "Bearer admin-key"}
TOWERS = ("tiny_image", "tiny_text")
UNLOAD_TIMEOUT_S = 60


def publish_version(checkpoint: Path, repo: Path, version: int) -> str:
    """`hqclip export --version`: ``checkpoint``'s towers into ``repo`` as ``version`` beside the versions there, the
    manifest naming them last; the new fingerprint."""
    from training.export import export_checkpoint

    export_checkpoint(str(checkpoint), out=repo, name="tiny", version=version)
    return load_manifest(repo).fingerprint


@pytest.fixture
def repo(tiny_repo, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_repo, tmp_path / "repo"))


@pytest.fixture
def retrained_export(retrained_checkpoint, tmp_path) -> Path:
    from training.export import export_checkpoint

    export_checkpoint(str(retrained_checkpoint), out=tmp_path / "export", name="tiny")
    return tmp_path / "export"


def wait_for_versions(triton: TritonServer, want: dict[str, set[str]]) -> None:
    """Poll Triton's repository index until it serves exactly ``want`` (unloading finishes after the call)."""
    deadline = time.monotonic() + UNLOAD_TIMEOUT_S
    while (got := {model: triton.versions().get(model, set()) for model in want}) != want:
        assert time.monotonic() < deadline, got
        time.sleep(0.1)


async def test_swap_both_towers_with_requests_running(triton_factory, gateway_factory, repo, retrained_checkpoint,
                                                      references):
    triton = triton_factory(repo, explicit_versions=True)
    gateway = gateway_factory(HQCLIP_MODEL_REPO=str(repo), HQCLIP_BACKEND="triton", HQCLIP_TRITON__URL=triton.grpc_url,
                              HQCLIP_ADMIN_KEYS="admin-key")
    old = load_manifest(repo).fingerprint
    new = publish_version(retrained_checkpoint, repo, 2)
    assert sorted(triton.mirror()) == ["tiny_image/2", "tiny_text/2"]
    async with httpx.AsyncClient(base_url=gateway.url, timeout=120) as client:
        load = Load(client, references)
        clients = load.start()
        await load.answered.wait()  # every client has an answer from version 1
        reload = await client.post("/v1/admin/reload", headers=ADMIN)
        load.swapped()
        await asyncio.gather(*clients)

    load.check()
    assert reload.status_code == 200 and reload.json()["fingerprint"] == new != old, reload.text
    wait_for_versions(triton, {tower: {"2"} for tower in TOWERS})  # the old versions unloaded once unused


def test_a_version_triton_cannot_load_keeps_the_old_one_serving(triton_factory, gateway_factory, repo,
                                                                 retrained_checkpoint, retrained_export,
                                                                 references):
    triton = triton_factory(repo, explicit_versions=True)
    gateway = gateway_factory(HQCLIP_MODEL_REPO=str(repo), HQCLIP_BACKEND="triton", HQCLIP_TRITON__URL=triton.grpc_url,
                              HQCLIP_ADMIN_KEYS="admin-key")
    old = load_manifest(repo).fingerprint

    def refused(*words: str) -> None:
        """The reload answers 422 with ``words`` in its message; the old model serves on, Triton keeps version 1."""
        answer = httpx.post(f"{gateway.url}/v1/admin/reload", headers=ADMIN, timeout=120)
        assert answer.status_code == 422, answer.text
        message = answer.json()["error"]["message"]
        assert all(word in message for word in (*words, old)), message
        body = httpx.post(f"{gateway.url}/v1/embed", json=MIXED, timeout=60)
        assert body.status_code == 200 and pair(body.json(), references) == "old"
        assert httpx.get(f"{gateway.url}/ready", timeout=30).json()["fingerprint"] == old
        wait_for_versions(triton, {tower: {"1"} for tower in TOWERS})

    for tower in TOWERS:  # an export over version 1: Triton would answer from the old weights it holds
        shutil.copyfile(retrained_export / tower / "1" / "model.onnx", repo / tower / "1" / "model.onnx")
    shutil.copyfile(retrained_export / "tiny.manifest.json", repo / "tiny.manifest.json")
    refused("tiny_image is version 1", "tiny_image/2/")

    publish_version(retrained_checkpoint, repo, 2)
    broken = repo / "tiny_image" / "2" / "model.onnx"  # a graph the runtime refuses, with a checksum to match it
    broken.write_bytes(broken.read_bytes()[:1000])
    manifest = json.loads((repo / "tiny.manifest.json").read_text())
    manifest["files"]["tiny_image/2/model.onnx"] = sha256_file(broken)
    (repo / "tiny.manifest.json").write_text(json.dumps(manifest))
    triton.mirror()

    refused("version 2 of tiny_image")
