"""`hqclip refine` on a real local Ray against a real vLLM server: the driver killed (with the Ray it started) and
rerun resumes, and the output equals an uninterrupted run's (seeded sampling: the same image gets the same answer);
an unreachable LVLM fails each shard after its retry, reported by name, nothing written."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from testkit.processes import ROOT
from tests.test_refine_job import BROKEN, SHARDS, read_output, refine_command, write_input

pytestmark = pytest.mark.slow

ENV = {**os.environ, "HQCLIP_REFINE__TEMPERATURE": "1.0", "HQCLIP_REFINE__SEED": "0", "RAY_AUTH_MODE": "disabled"}


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the driver and every process it started (its local Ray: GCS, raylet, workers): a lost machine."""
    tree = [process, *psutil.Process(process.pid).children(recursive=True)]
    for each in tree:
        try:
            each.send_signal(signal.SIGKILL)
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    process.wait(timeout=30)
    psutil.wait_procs([p for p in tree[1:] if isinstance(p, psutil.Process)], timeout=30)


def test_driver_killed_and_rerun_equals_an_uninterrupted_run(tmp_path, vllm_server):
    samples = write_input(tmp_path / "in")
    whole = subprocess.run(refine_command(tmp_path / "in", tmp_path / "whole", vllm_server.url, "--concurrency", "2",
                                          ray=True), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    assert f"shards: {SHARDS} written now, 0 already written" in whole.stdout, whole.stdout

    out = tmp_path / "out"
    job = subprocess.Popen(refine_command(tmp_path / "in", out, vllm_server.url, "--concurrency", "2", ray=True),
                           cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not list(out.glob("*.tar")):  # kill once the first shard is written
        assert job.poll() is None, "the job ended before it could be killed:\n" + job.stdout.read().decode()
        assert time.monotonic() < deadline, "no shard written in 300 s"
        time.sleep(0.02)
    kill_tree(job)
    written_at_kill = sorted(p.name for p in out.glob("*.tar"))
    assert len(written_at_kill) < SHARDS

    rerun = subprocess.run(refine_command(tmp_path / "in", out, vllm_server.url, "--concurrency", "2", ray=True),
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert (f"shards: {SHARDS - len(written_at_kill)} written now, {len(written_at_kill)} already written"
            in rerun.stdout), rerun.stdout
    assert read_output(out) == read_output(tmp_path / "whole")
    assert sorted(key for _, key, _ in read_output(out)) == sorted(set(samples) - {BROKEN})
    assert not list(out.glob("*.tmp"))


def test_an_unreachable_lvlm_fails_every_shard_by_name(tmp_path):
    write_input(tmp_path / "in")
    done = subprocess.run(refine_command(tmp_path / "in", tmp_path / "out", "http://127.0.0.1:9/v1", "--retries", "1",
                                         ray=True), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stdout + done.stderr
    for shard in range(SHARDS):
        assert f"failed shard: {shard:05d}.tar: ShardIncomplete: no LVLM server reachable" in done.stdout, done.stdout
    assert f"{SHARDS} shards failed after their retries: rerun the same command" in done.stdout
    assert not list(Path(tmp_path / "out").glob("*.tar"))
