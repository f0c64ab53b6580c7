"""The `hqclip-client` command against a real gateway: embed/classify/tags/search give what the SDK gives, as JSON or
a table; ingest adds a folder with a summary (added, skipped, failed with reasons) and resumes after a crash."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hqclip_client import Client, NotFoundError
from testkit.photos import encode, jpeg, photo, write_jpegs

pytestmark = pytest.mark.slow

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
SCRIPT = Path(sys.executable).parent / "hqclip-client"


@pytest.fixture(scope="module")
def env(client_gateway, tmp_path_factory) -> dict[str, str]:
    return {**os.environ, "HQCLIP_URL": client_gateway.url,
            "HQCLIP_API_KEY": client_gateway.env["HQCLIP_API_KEYS"].split(",")[0],
            "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache")), "COLUMNS": "200"}


@pytest.fixture(scope="module")
def sdk(env):
    with Client(env["HQCLIP_URL"], api_key=env["HQCLIP_API_KEY"]) as client:
        yield client


def cli(env, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


def cli_json(env, *args: str):
    return json.loads(cli(env, *args, "--format", "json").stdout)


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory) -> dict[str, Path]:
    return write_jpegs(tmp_path_factory.mktemp("photos"), PHOTOS)


def test_embed_as_json_equals_the_sdk(env, sdk, photo_files):
    out = cli_json(env, "embed", "-t", "a cat", "-t", "a rocket", "-i", str(photo_files["coffee"]))
    assert [(row["input"], row["modality"]) for row in out["data"]] == [
        ("a cat", "text"), ("a rocket", "text"), (str(photo_files["coffee"]), "image")]
    vectors = np.array([row["embedding"] for row in out["data"]], dtype=np.float32)
    np.testing.assert_allclose(vectors[:2], sdk.embed_texts(["a cat", "a rocket"]).vectors, atol=1e-5)
    np.testing.assert_allclose(vectors[2:], sdk.embed_images([photo_files["coffee"]]).vectors, atol=1e-5)
    table = cli(env, "embed", "-t", "a cat").stdout
    assert "a cat" in table and "tagged" in table


def test_classify_and_tags_as_json_and_as_a_table(env, sdk, photo_files):
    images = [str(photo_files["chelsea"]), str(photo_files["rocket"])]
    out = cli_json(env, "classify", *images, "-l", "cat,astronaut", "-l", "coffee cup", "--top-k", "3")
    expected = sdk.classify([photo_files["chelsea"], photo_files["rocket"]], ["cat", "astronaut", "coffee cup"],
                            top_k=3)
    assert [row["image"] for row in out] == images
    assert [row["labels"] for row in out] == [[s.model_dump() for s in c.labels] for c in expected]
    table = cli(env, "classify", images[0], "-l", "cat,astronaut").stdout
    assert "cat" in table and "astronaut" in table and "chelsea.jpg" in table
    tags = cli_json(env, "tags", images[0], "--top-k", "3")
    assert tags[0]["tags"] == [t.model_dump() for t in sdk.tags([photo_files["chelsea"]], top_k=3)[0].tags]
    assert expected[0].labels[0].label in cli(env, "classify", images[0], "-l", "cat,astronaut,coffee cup").stdout


def _folder(root: Path) -> Path:
    """Four photos (one in a subfolder, one with a caption sidecar), a broken file, and files to leave alone."""
    (root / "sub").mkdir(parents=True)
    (root / "astronaut.jpg").write_bytes(jpeg("astronaut"))
    (root / "astronaut.txt").write_text("An astronaut in a white suit\nsecond line is ignored\n")
    (root / "coffee.png").write_bytes(encode(photo("coffee"), "PNG"))
    (root / "sub" / "chelsea.jpg").write_bytes(jpeg("chelsea"))
    (root / "rocket.webp").write_bytes(encode(photo("rocket"), "WEBP"))
    (root / "broken.jpg").write_bytes(b"this is not a picture at all")
    (root / "notes.txt").write_text("not an image")
    (root / ".cache").mkdir()
    (root / ".cache" / "hidden.jpg").write_bytes(jpeg("rocket"))
    return root


def test_ingest_reports_added_skipped_failed_and_resumes(env, sdk, tmp_path):
    folder = _folder(tmp_path / "images")
    first = cli(env, "ingest", str(folder), "cli-ingest", "--create", "--batch-size", "2", "--format", "json",
                check=False)
    assert first.returncode == 1, "failures make the exit status non-zero"
    summary = json.loads(first.stdout)
    assert (summary["added"], summary["skipped"], summary["total"], summary["count"]) == (4, 0, 5, 4)
    assert list(summary["failed"]) == ["broken.jpg"] and "broken.jpg" not in summary["state"]
    assert "not an image" in summary["failed"]["broken.jpg"] and not summary["failed"]["broken.jpg"].startswith("items")
    assert Path(summary["state"]).is_relative_to(env["XDG_CACHE_HOME"])

    hit = sdk.search("cli-ingest", image=jpeg("astronaut"), top_k=1).results[0]
    assert (hit.id, hit.caption, hit.uri) == ("astronaut.jpg", "An astronaut in a white suit",
                                             str((folder / "astronaut.jpg").resolve()))
    thumbnail = Image.open(io.BytesIO(base64.b64decode(hit.attributes["thumbnail"].split(",", 1)[1])))
    assert thumbnail.format == "JPEG" and max(thumbnail.size) <= 160
    assert sdk.search("cli-ingest", image=jpeg("chelsea"), top_k=1).results[0].id == "sub/chelsea.jpg"

    (folder / "broken.jpg").unlink()
    (folder / "sub" / "astronaut-again.jpg").write_bytes(jpeg("astronaut"))
    second = json.loads(cli(env, "ingest", str(folder), "cli-ingest", "--format", "json").stdout)
    assert (second["added"], second["skipped"], second["failed"], second["count"]) == (1, 4, {}, 5)

    table = cli(env, "ingest", str(folder), "cli-ingest")
    assert "skipped" in table.stdout and "state:" in table.stderr


def test_ingest_resumes_after_a_crash_without_losing_or_doubling(env, sdk, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    data = jpeg("coffee")
    for i in range(40):
        (folder / f"img{i:03d}.jpg").write_bytes(data)
    state = tmp_path / "state.jsonl"
    args = [str(SCRIPT), "ingest", str(folder), "crash-test", "--create", "--batch-size", "1", "--state", str(state),
            "--format", "json"]
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (state.exists() and state.read_text().count("\n") >= 3) and time.monotonic() < deadline:
        assert process.poll() is None, "ingest ended before it could be interrupted"
        time.sleep(0.01)  # polling the state file, not waiting for an outcome
    process.kill()
    process.wait()
    acknowledged = {json.loads(line) for line in state.read_text().splitlines() if line.endswith('"')}
    assert 3 <= len(acknowledged) < 40
    assert sdk.get_collection("crash-test").count >= len(acknowledged)

    summary = json.loads(cli(env, *args[1:]).stdout)
    assert summary["skipped"] >= len(acknowledged) and summary["added"] + summary["skipped"] == 40
    assert summary["failed"] == {} and summary["count"] == 40  # upserts by path: nothing twice


def test_ingest_starts_over_when_the_collection_was_recreated(env, sdk, tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("coffee", "rocket"):
        (folder / f"{name}.jpg").write_bytes(jpeg(name))
    assert cli_json(env, "ingest", str(folder), "recreated", "--create")["added"] == 2
    sdk.delete_collection("recreated")
    again = cli_json(env, "ingest", str(folder), "recreated", "--create")
    assert (again["added"], again["skipped"], again["count"]) == (2, 0, 2)


def test_search_by_text_image_and_id_with_filters(env, sdk):
    sdk.create_collection("cli-search")
    sdk.add("cli-search", [{"id": n, "image": jpeg(n), "caption": f"[{n}]", "tags": ["photo", n],
                            "attributes": {"i": i}} for i, n in enumerate(PHOTOS)])
    by_text = cli_json(env, "search", "cli-search", "a cat on a sofa", "--top-k", "3")
    assert [h["id"] for h in by_text["results"]] == [h.id for h in sdk.search("cli-search", "a cat on a sofa",
                                                                             top_k=3).results]
    assert cli_json(env, "search", "cli-search", "--id", "coffee", "--top-k", "10")["results"][0]["id"] != "coffee"
    filtered = cli_json(env, "search", "cli-search", "anything", "--tag", "photo", "--attr", "i=2")
    assert [h["id"] for h in filtered["results"]] == ["chelsea"]
    table = cli(env, "search", "cli-search", "a rocket", "--top-k", "4").stdout
    assert all(f"[{n}]" in table for n in PHOTOS), "captions are shown as text, not read as markup"


def test_collections_command(env, sdk):
    created = cli_json(env, "collections", "create", "cli-made", "--kind", "hnsw")
    assert (created["name"], created["kind"]) == ("cli-made", "hnsw")
    assert "cli-made" in [c["name"] for c in cli_json(env, "collections")]
    assert cli_json(env, "collections", "show", "cli-made")["count"] == 0
    cli(env, "collections", "delete", "cli-made")
    with pytest.raises(NotFoundError):
        sdk.get_collection("cli-made")


def test_errors_say_what_the_gateway_said(env, photo_files):
    wrong_key = cli({**env, "HQCLIP_API_KEY": "wrong"}, "embed", "-t", "hi", check=False)
    assert wrong_key.returncode == 1 and "401" in wrong_key.stderr and "API key" in wrong_key.stderr
    missing = cli(env, "search", "no-such-collection", "a cat", check=False)
    assert missing.returncode == 1 and "no collection 'no-such-collection'" in missing.stderr
    bad = cli(env, "classify", str(photo_files["chelsea"]), "-l", " , ", check=False)
    assert bad.returncode == 1 and "labels" in bad.stderr
    absent = cli(env, "tags", "/nonexistent/photo.jpg", check=False)
    assert absent.returncode == 1 and "No such file" in absent.stderr


def test_refine_command(lvlm_gateway, photo_files):
    env = {**os.environ, "HQCLIP_URL": lvlm_gateway.url, "COLUMNS": "200"}
    out = cli_json(env, "refine", str(photo_files["chelsea"]), str(photo_files["rocket"]),
                   "--alt-text", "Chelsea the cat", "--alt-text", "launch day")
    assert [row["image"] for row in out] == [str(photo_files["chelsea"]), str(photo_files["rocket"])]
    for row in out:
        assert row["desc"] and row["neg_desc"] and len(row["tags"]) == len(row["neg_tags"]) > 0
    table = cli(env, "refine", str(photo_files["coffee"])).stdout
    assert all(field in table for field in ("desc", "neg_desc", "neg_tags", "coffee.jpg"))
