"""Hot swap: a new export replaces the served model without a restart, under load, and a broken one never does.

The served model is the tiny checkpoint (seed 0); the replacement is the same architecture with other weights
(seed 1), exported by `hqclip export` into a copy of the repository while the gateway serves from it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from hqclip.repo.layout import versions
from hqclip.repo.manifest import load_manifest, sha256_file
from tests.swap import MIXED, Load, pair, references, repo, retrained_checkpoint  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ADMIN = {"Authorization": "Bearer admin-key"}
WATCH_TIMEOUT_S = 60
TOWERS = ("tiny_image", "tiny_text")




def _export(checkpoint: Path, repo: Path, *options: str) -> str:
    """`hqclip export` of ``checkpoint`` into ``repo`` as model 'tiny'; the new fingerprint."""
    subprocess.run([sys.executable, "-m", "hqclip.cli", "export", str(checkpoint), "--out", str(repo), "--name",
                    "tiny", *options], cwd=ROOT, check=True, capture_output=True)
    return load_manifest(repo).fingerprint


def _fingerprints(gateway) -> tuple[str, str]:
    """(/v1/models, /ready) fingerprints."""
    card = httpx.get(f"{gateway.url}/v1/models", headers=ADMIN).json()["data"][0]
    return card["fingerprint"], httpx.get(f"{gateway.url}/ready").json()["fingerprint"]


async def test_swap_under_load_fails_no_request_and_never_mixes_models(gateway_factory, repo, retrained_checkpoint,
                                                                       references):
    gateway = gateway_factory(HQCLIP_MODEL_REPO=str(repo), HQCLIP_ADMIN_KEYS="admin-key")
    old = load_manifest(repo).fingerprint
    assert _fingerprints(gateway) == (old, old)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=120) as client:
        load = Load(client, references)
        clients = load.start()
        new = await asyncio.to_thread(_export, retrained_checkpoint, repo)  # the gateway serves on meanwhile
        export_done = time.monotonic()
        reload = await client.post("/v1/admin/reload", headers=ADMIN)
        load.swapped()
        await asyncio.gather(*clients)

    load.check()
    assert reload.status_code == 200, reload.text
    assert reload.json()["reloaded"] and (reload.json()["previous"], reload.json()["fingerprint"]) == (old, new)
    assert new != old and _fingerprints(gateway) == (new, new)
    assert all(model == "old" for _, _, ended, model in load.answers if ended < export_done)
    assert any(model == "new" for *_, model in load.answers)


def test_a_broken_export_keeps_the_old_model_and_the_answer_says_why(gateway_factory, repo, retrained_checkpoint,
                                                                     references):
    from training.export import export_checkpoint

    gateway = gateway_factory(HQCLIP_MODEL_REPO=str(repo), HQCLIP_ADMIN_KEYS="admin-key",
                              HQCLIP_API_KEYS="user-key")
    old = load_manifest(repo).fingerprint

    def reload(headers=ADMIN) -> httpx.Response:
        return httpx.post(f"{gateway.url}/v1/admin/reload", headers=headers, timeout=120)

    def still_old() -> None:
        body = httpx.post(f"{gateway.url}/v1/embed", json=MIXED, headers=ADMIN, timeout=60).json()
        assert pair(body, references) == "old" and _fingerprints(gateway) == (old, old)

    assert reload({}).status_code == 401
    refused = reload({"Authorization": "Bearer user-key"})
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
    unchanged = reload()
    assert unchanged.status_code == 200 and not unchanged.json()["reloaded"], unchanged.text

    export_checkpoint(str(retrained_checkpoint), out=repo, name="tiny")
    image_onnx, text_onnx = repo / "tiny_image" / "1" / "model.onnx", repo / "tiny_text" / "1" / "model.onnx"
    good_image, manifest_file = image_onnx.read_bytes(), repo / "tiny.manifest.json"
    good_manifest = manifest_file.read_text()

    text_onnx.rename(text_onnx.with_suffix(".moved"))  # the manifest names a file that is not there
    answer = reload()
    assert answer.status_code == 422 and "tiny_text/1/model.onnx" in answer.json()["error"]["message"], answer.text
    assert "missing" in answer.json()["error"]["message"]
    still_old()
    text_onnx.with_suffix(".moved").rename(text_onnx)

    image_onnx.write_bytes(good_image[: len(good_image) // 2])  # truncated: its checksum no longer matches
    answer = reload()
    assert answer.status_code == 422 and "tiny_image/1/model.onnx" in answer.json()["error"]["message"], answer.text
    assert "checksum" in answer.json()["error"]["message"]
    still_old()

    manifest = json.loads(good_manifest)  # an export that wrote a broken graph and its checksum
    manifest["files"]["tiny_image/1/model.onnx"] = sha256_file(image_onnx)
    manifest_file.write_text(json.dumps(manifest))
    answer = reload()
    assert answer.status_code == 422 and "cannot load" in answer.json()["error"]["message"], answer.text
    still_old()

    image_onnx.write_bytes(good_image)
    manifest_file.write_text(good_manifest)
    answer = reload()
    assert answer.status_code == 200 and answer.json()["reloaded"], answer.text
    body = httpx.post(f"{gateway.url}/v1/embed", json=MIXED, headers=ADMIN, timeout=60).json()
    assert pair(body, references) == "new"


def test_the_watcher_swaps_in_a_new_export(gateway_factory, repo, retrained_checkpoint, references):
    from training.export import export_checkpoint

    gateway = gateway_factory(HQCLIP_MODEL_REPO=str(repo), HQCLIP_RELOAD_S="0.2")
    export_checkpoint(str(retrained_checkpoint), out=repo, name="tiny")
    new = load_manifest(repo).fingerprint
    deadline = time.monotonic() + WATCH_TIMEOUT_S
    while _fingerprints(gateway)[0] != new:  # polls the gateway's own report, not a sleep of a guessed length
        assert time.monotonic() < deadline, gateway.log.read_text()[-2000:]
        time.sleep(0.1)
    body = httpx.post(f"{gateway.url}/v1/embed", json=MIXED, timeout=60).json()
    assert pair(body, references) == "new"


def test_exports_as_new_versions_are_reloaded_and_the_oldest_pruned(gateway_factory, repo, tiny_checkpoint,
                                                                    retrained_checkpoint, references):
    """`hqclip export --version next`: the towers go into version 2 beside version 1, the manifest names them,
    the gateway reloads them; a third export keeps versions 3 and 2 (--keep-versions 2) and deletes version 1."""
    gateway = gateway_factory(HQCLIP_MODEL_REPO=str(repo), HQCLIP_ADMIN_KEYS="admin-key")
    old = load_manifest(repo).fingerprint

    def reload_to(fingerprint: str, model: str) -> None:
        answer = httpx.post(f"{gateway.url}/v1/admin/reload", headers=ADMIN, timeout=120)
        assert answer.status_code == 200 and answer.json()["fingerprint"] == fingerprint, answer.text
        body = httpx.post(f"{gateway.url}/v1/embed", json=MIXED, headers=ADMIN, timeout=60).json()
        assert pair(body, references) == model and _fingerprints(gateway) == (fingerprint, fingerprint)

    new = _export(retrained_checkpoint, repo, "--version", "next")
    manifest = load_manifest(repo, verify=True)
    assert {tower: versions(repo, tower) for tower in TOWERS} == {tower: [2, 1] for tower in TOWERS}
    assert [manifest.version(tower) for tower in TOWERS] == [2, 2] and new != old
    assert "tiny_image/2/model.onnx" in manifest.files and "tiny_image/1/model.onnx" not in manifest.files
    reload_to(new, "new")

    again = _export(tiny_checkpoint, repo, "--version", "next", "--keep-versions", "2")
    assert {tower: versions(repo, tower) for tower in TOWERS} == {tower: [3, 2] for tower in TOWERS}
    assert again == old  # the same weights in another version folder: the same embedding space
    reload_to(old, "old")
    bad = subprocess.run([sys.executable, "-m", "hqclip.cli", "export", str(tiny_checkpoint), "--out", str(repo),
                          "--version", "latest"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--version" in bad.stderr and "'next'" in bad.stderr
