"""Server processes for tests and benchmarks: free ports, a readiness poll, an environment isolated from the user's.

A process started with :func:`checkout_env` and :func:`die_with_parent` runs this checkout's code from any working
directory, sees none of the user's ``HQCLIP_*`` settings (their gateway's index folder, keys or URL), and is killed
with the test run that started it, even when that run is killed itself (no server left holding a port or a folder).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 120
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def isolated_env(**env: str) -> dict[str, str]:
    """This process's environment without any ``HQCLIP_*`` variable (the user's settings), plus ``env``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("HQCLIP_")}, **env}


def checkout_env(**env: str) -> dict[str, str]:
    """:func:`isolated_env` with this checkout first on PYTHONPATH: a Python child runs this checkout's code from
    any working directory (a temporary one, where whatever it writes by default lands)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return isolated_env(PYTHONPATH=path, **env)


def die_with_parent() -> None:
    """A ``preexec_fn``: the child gets SIGTERM when the process that started it dies (Linux ``PR_SET_PDEATHSIG``),
    so an interrupted run leaves no server behind."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def tail(log: Path) -> str:
    return log.read_bytes()[-4000:].decode("utf-8", errors="replace")


def wait_until_healthy(url: str, process: subprocess.Popen, log: Path, path: str = "/health",
                       timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Poll until the server answers (a readiness poll, not a sleep): fail with its log if it dies or hangs.
    Stopping a server that hangs is the caller's."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}:\n{tail(log)}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{process.args} not healthy after {timeout_s:g}s:\n{tail(log)}")
