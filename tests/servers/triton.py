"""Fixtures: a real Triton server (pytriton's bundled tritonserver) serving a model repository's ONNX models.

The server runs tests/servers/triton_serve.py inside the virtualenv of tests/servers/triton_env.sh, in its own
process group, so stopping it can never leave tritonserver or a Python-backend stub behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from hqclip.repo.manifest import load_manifest
from testkit.processes import STARTUP_TIMEOUT_S, die_with_parent, free_port
from tests.servers.triton_mirror import mirror

ROOT = Path(__file__).resolve().parents[2]
TRITON_PYTHON = ROOT / "build" / "venvs" / "triton" / "bin" / "python"
SERVE = ROOT / "tests" / "servers" / "triton_serve.py"
STOP_TIMEOUT_S = 60


def process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class TritonServer:
    """One tritonserver serving ``repo``; ``stop()`` then ``start()`` again reuse the same ports."""

    repo: Path
    log: Path
    grpc_port: int
    http_port: int
    metrics_port: int
    triton_repo: Path | None = None  # explicit versions: Triton's own Python-backend models, mirrored here
    process: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def models(self) -> list[str]:
        manifest = load_manifest(self.repo)
        return [manifest.image.model, manifest.text.model] + ([manifest.tags.model] if manifest.tags else [])

    def ready(self) -> bool:
        try:
            paths = ["/v2/health/ready"] + [f"/v2/models/{model}/ready" for model in self.models()]
            return all(httpx.get(self.http_url + path, timeout=2).status_code == 200 for path in paths)
        except httpx.TransportError:
            return False

    def start(self) -> None:
        if not TRITON_PYTHON.exists():
            raise RuntimeError(f"{TRITON_PYTHON} is missing: run `bash tests/servers/triton_env.sh` "
                               "(or `make test-servers`)")
        command = [str(TRITON_PYTHON), str(SERVE), "--model-repo", str(self.repo), "--grpc-port", str(self.grpc_port),
                   "--http-port", str(self.http_port), "--metrics-port", str(self.metrics_port)]
        if self.triton_repo is not None:
            command += ["--triton-repo", str(self.triton_repo)]
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True, preexec_fn=die_with_parent)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.ready():  # polls Triton's own readiness endpoints
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Triton did not become ready:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.2)

    def mirror(self) -> list[str]:
        """Give Triton the versions exported since it started (explicit versions only); the ones added."""
        return mirror(self.repo, self.triton_repo)

    def versions(self) -> dict[str, set[str]]:
        """model -> the versions Triton serves now (READY), from its repository index."""
        index = httpx.post(f"{self.http_url}/v2/repository/index", json={}, timeout=10).json()
        ready: dict[str, set[str]] = {}
        for entry in index:
            if entry.get("state") == "READY":
                ready.setdefault(entry["name"], set()).add(entry["version"])
        return ready

    def stop(self) -> bool:
        """SIGTERM, as an operator would; True when everything exited by itself (nothing needed SIGKILL)."""
        if self.process is None:
            return True
        pgid = self.process.pid  # start_new_session: the group id is the leader's pid
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while self.process.poll() is not None and process_group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)  # the leader is gone; its children may still be exiting
        clean = not process_group_alive(pgid)
        if not clean:  # something outlived the shutdown: never leave it behind
            os.killpg(pgid, signal.SIGKILL)
        self.process.wait()
        self.process = None
        return clean


@pytest.fixture(scope="session")
def triton_factory(tmp_path_factory):
    """``start(repo, explicit_versions=False)`` -> a ready TritonServer on free ports; all are stopped at the end of
    the session. With ``explicit_versions`` Triton serves the repository's version folders as its own models."""
    started: list[TritonServer] = []

    def start(repo: Path, explicit_versions: bool = False) -> TritonServer:
        folder = tmp_path_factory.mktemp("triton")
        server = TritonServer(Path(repo), folder / "triton.log", free_port(), free_port(), free_port(),
                              folder / "models" if explicit_versions else None)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()

