"""The gateway launcher: a real ``hqclip serve`` process on a free port, with its own working and index folders; and
the checks of its answers that test suites share."""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from testkit.processes import checkout_env, die_with_parent, free_port, wait_until_healthy


@dataclass
class Gateway:
    """A real `hqclip serve` process."""

    url: str
    process: subprocess.Popen
    env: dict[str, str]
    log: Path
    stopped: bool = field(default=False)

    def __str__(self) -> str:
        return self.url

    def stop(self) -> None:
        """Graceful shutdown (SIGTERM), as an operator would."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)
        self.stopped = True

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks run."""
        self.process.kill()
        self.process.wait(timeout=30)
        self.stopped = True


def launch(repo: Path, folder: Path, **env: str) -> Gateway:
    """Start ``hqclip serve`` on the model repository ``repo``; return at once (see :func:`start`).

    It runs in ``folder`` (its log is ``folder/gateway.log``), keeps its collections in ``folder/collections``
    unless ``HQCLIP_INDEX__DIR`` is given, and sees no ``HQCLIP_*`` setting of the caller's environment: nothing
    it does touches the checkout's data/ or a gateway the user runs from it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    defaults = {"HQCLIP_HOST": "127.0.0.1", "HQCLIP_LOG_LEVEL": "warning",
                "HQCLIP_INDEX__DIR": str(folder / "collections")}
    full_env = checkout_env(**{**defaults, **env, "HQCLIP_MODEL_REPO": str(repo), "HQCLIP_PORT": str(port)})
    log = folder / "gateway.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "hqclip.cli", "serve"], cwd=folder, env=full_env,
                                   stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    return Gateway(f"http://127.0.0.1:{port}", process, full_env, log)


def start(repo: Path, folder: Path, ready_path: str = "/health", **env: str) -> Gateway:
    """:func:`launch`, then poll ``ready_path`` until it answers; a gateway that does not come up is killed."""
    gateway = launch(repo, folder, **env)
    try:
        wait_until_healthy(gateway.url, gateway.process, gateway.log, ready_path)
    except BaseException:
        gateway.kill()
        raise
    return gateway


def ok(response: httpx.Response) -> dict:
    """The JSON of a 2xx answer (anything else fails, with the answer)."""
    assert response.status_code < 300, response.text
    return response.json()


def error(response: httpx.Response, status: int, param: str) -> dict:
    """The error body of an answer that must be ``status`` naming the field ``param``, with a message."""
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["param"] == param and body["message"], body
    return body
