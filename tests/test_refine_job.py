"""`hqclip refine` in one process against a real vLLM server: killed mid-way and rerun, every sample is refined
exactly once and written once, in shards the training job reads; a folder of images with a CSV works the same;
SLURM array tasks split the shards. The same job on Ray: tests/test_ray_refine.py."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from hqclip.jobs.refine import Shard, my_shards
from services.refine.schema import JSON_SCHEMA
from testkit.photos import encode
from testkit.processes import ROOT
from testkit.shards import SUBJECTS, crop, jpeg, photo

SHARDS, PER_SHARD = 3, 6
BROKEN = "000000008"  # its "jpg" is text: rejected for good, logged, left out, never retried


def write_input(folder: Path) -> dict[str, dict]:
    """img2dataset-like shards of distinct real photo crops: {key}.jpg + .txt + .json (no annotations)."""
    folder.mkdir(parents=True)
    rng, names = np.random.default_rng(0), list(SUBJECTS)
    photos = {name: photo(name) for name in names}
    samples = {}
    for s in range(SHARDS):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(PER_SHARD):
                key = f"{s * PER_SHARD + i:09d}"
                name = names[int(key) % len(names)]
                caption = SUBJECTS[name][0]
                image = b"this is no image" if key == BROKEN else jpeg(crop(photos[name], rng, 64))
                meta = {"key": key, "caption": caption, "url": f"https://example.com/{key}.jpg", "status": "success"}
                members = {"jpg": image, "txt": caption.encode(), "json": json.dumps(meta).encode()}
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                samples[key] = {"caption": caption, "jpg": image, "shard": f"{s:05d}.tar"}
    return samples


def read_output(folder: Path) -> list[tuple[str, str, dict[str, bytes]]]:
    """(shard, key, members) of every sample in the output shards, in order."""
    out = []
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            grouped: dict[str, dict[str, bytes]] = {}
            for info in tar:
                key, _, ext = info.name.partition(".")
                grouped.setdefault(key, {})[ext] = tar.extractfile(info).read()
        out.extend((path.name, key, members) for key, members in grouped.items())
    return out


def refine_command(source: Path, out: Path, url: str, *extra: str, ray: bool = False) -> list[str]:
    """The single-process job by default; with ``ray``, on a local Ray (tests/test_ray_refine.py)."""
    return [sys.executable, "-m", "hqclip.cli", "refine", str(source), "--out", str(out), "--url", url,
            "--no-progress", "--ray" if ray else "--no-ray", *extra]


ENV = {**os.environ, "HQCLIP_REFINE__TEMPERATURE": "1.0"}  # the tiny model ends its answers when sampled


def summary_numbers(stdout: str) -> tuple[int, int, int]:
    """(refined now, refined before, left out now) from the job's summary."""
    match = re.search(r"samples: (\d+) refined now .*, (\d+) refined before, (\d+) left out", stdout)
    assert match, stdout
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def assert_refined(members: dict[str, bytes], expected: dict) -> None:
    meta = json.loads(members["json"])
    assert meta["caption"] == expected["caption"] and meta["status"] == "success"
    assert members["jpg"] == expected["jpg"] and members["txt"] == expected["caption"].encode()
    jsonschema.validate({k: meta[k] for k in ("desc", "neg_desc", "tags", "neg_tags")}, JSON_SCHEMA)
    assert len(meta["tags"]) == len(meta["neg_tags"])


@pytest.mark.slow
def test_killed_mid_way_and_rerun_every_sample_is_refined_and_written_once(tmp_path, vllm_server):
    samples = write_input(tmp_path / "in")
    out = tmp_path / "out"
    state = out / ".refine-state" / "worker-0-of-1.sqlite"
    job = subprocess.Popen(refine_command(tmp_path / "in", out, vllm_server.url, "--concurrency", "2"), cwd=ROOT,
                           env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def progress() -> tuple[int, list[str]]:
        """(samples of unwritten shards with an answer in the state, shards written)."""
        written = sorted(p.name for p in out.glob("*.tar"))
        if not state.exists():
            return 0, written
        try:
            with sqlite3.connect(state) as db:
                rows = db.execute("SELECT shard FROM refined UNION ALL SELECT shard FROM rejected").fetchall()
        except sqlite3.OperationalError:  # the job is creating its tables
            return 0, written
        return sum(1 for (shard,) in rows if shard not in written), written

    deadline = time.monotonic() + 300
    while True:  # kill once a shard is written and the next one is part done
        assert job.poll() is None, "the job ended before it could be killed:\n" + job.stdout.read().decode()
        assert time.monotonic() < deadline, "the job made no progress in 300 s"
        answered, written = progress()
        if written and answered >= 3:
            break
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=30)
    answered_at_kill, written_at_kill = progress()
    assert len(written_at_kill) < SHARDS

    requests_before = vllm_server.requests_done()
    rerun = subprocess.run(refine_command(tmp_path / "in", out, vllm_server.url, "--concurrency", "2"), cwd=ROOT,
                           env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    refined_now, refined_before, left_out_now = summary_numbers(rerun.stdout)
    requests = vllm_server.requests_done() - requests_before

    # the rerun skipped the shards written and the samples the state held, and asked the LVLM only for the rest
    in_written_shards = sum(1 for s in samples.values() if s["shard"] in written_at_kill)
    assert refined_before == answered_at_kill
    assert refined_now + left_out_now == len(samples) - in_written_shards - answered_at_kill
    assert refined_now <= requests < refined_now + answered_at_kill + in_written_shards

    # every good sample exactly once, in the shard it came from, refined; the broken one left out and logged
    output = read_output(out)
    keys = [key for _, key, _ in output]
    assert sorted(keys) == sorted(set(samples) - {BROKEN})
    for shard, key, members in output:
        assert shard == samples[key]["shard"]
        assert_refined(members, samples[key])
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [(f["key"], f["retried_by_rerun"]) for f in failures] == [(BROKEN, False)]
    assert not list(out.glob("*.tmp"))

    # a third run finds nothing to do
    again = subprocess.run(refine_command(tmp_path / "in", out, vllm_server.url), cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 written now, 3 already written" in again.stdout, again.stdout


@pytest.mark.slow
def test_a_folder_of_images_with_a_csv_of_alt_texts(tmp_path, vllm_server):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    rows = []
    for i, name in enumerate(["astronaut", "coffee", "chelsea", "rocket", "retina"]):
        file = f"sub/{name}.png" if i % 2 else f"{name}.jpg"
        (images / file).write_bytes(jpeg(photo(name).resize((64, 64))) if file.endswith(".jpg")
                                    else _png(photo(name).resize((64, 64))))
        rows.append({"path": file, "alt": SUBJECTS[name][0]})
    with open(tmp_path / "alt.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "alt"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "out"
    result = subprocess.run(refine_command(images, out, vllm_server.url, "--captions", str(tmp_path / "alt.csv"),
                                           "--image-column", "path", "--caption-column", "alt", "--shard-size", "2"),
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    output = read_output(out)
    assert [shard for shard, _, _ in output] == ["00000.tar", "00000.tar", "00001.tar", "00001.tar", "00002.tar"]
    for (_, key, members), row in zip(output, rows):
        meta = json.loads(members["json"])
        assert meta["file"] == row["path"] and meta["caption"] == row["alt"] and meta["key"] == key
        assert members[row["path"].rsplit(".", 1)[1]] == (images / row["path"]).read_bytes()
        jsonschema.validate({k: meta[k] for k in ("desc", "neg_desc", "tags", "neg_tags")}, JSON_SCHEMA)


def _png(image) -> bytes:
    return encode(image, "PNG")


def test_workers_split_the_shards_without_overlap():
    shards = [Shard(f"{i:05d}.tar", lambda: iter(())) for i in range(10)]
    parts = [[s.name for s in my_shards(shards, i, 3)] for i in range(3)]
    assert sorted(name for part in parts for name in part) == [s.name for s in shards]
    assert all(len(part) in (3, 4) for part in parts)
    with pytest.raises(ValueError, match="--worker-index"):
        my_shards(shards, 3, 3)


def test_a_missing_csv_column_is_named(tmp_path):
    (tmp_path / "alt.csv").write_text("file,text\na.jpg,a cat\n")
    result = subprocess.run(refine_command(tmp_path, tmp_path / "out", "http://127.0.0.1:9", "--captions",
                                           str(tmp_path / "alt.csv")), cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "has no column caption, image" in result.stderr
