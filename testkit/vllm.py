"""Real vLLM servers: `vllm serve` on the tiny LLaVA (tests/servers/build_tiny_vlm.py), for the refinement tests
and benchmarks/refine_bench.py. The venv and the model come from ``bash tests/servers/setup_vllm.sh`` (idempotent;
:func:`ensure_setup` runs it when either is missing).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import httpx

from testkit.processes import ROOT, die_with_parent, free_port, isolated_env, wait_until_healthy

VLLM = ROOT / "build" / "venvs" / "vllm" / "bin" / "vllm"
MODEL = ROOT / "build" / "tiny-vlm"
MODEL_NAME = "tiny-vlm"
STARTUP_TIMEOUT_S = 600  # about 30-60 s alone; two at once on 2 busy cores take longer


def ensure_setup() -> None:
    if not VLLM.exists() or not (MODEL / "hqclip-tiny-vlm.json").exists():
        subprocess.run(["bash", str(ROOT / "tests" / "servers" / "setup_vllm.sh")], check=True)


class VllmServer:
    """One `vllm serve` process group (API server, engine core, worker) on a free port of 127.0.0.1."""

    def __init__(self, log: Path, cpus: set[int] | None = None) -> None:
        """``cpus``: the cores the server's processes may run on (all, when None)."""
        self.port = free_port()
        self.log = log
        self.url = f"http://127.0.0.1:{self.port}/v1"
        env = isolated_env(VLLM_CPU_KVCACHE_SPACE="1", VLLM_CACHE_ROOT=str(ROOT / "build" / "vllm-cache"),
                           HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
        command = [
            str(VLLM), "serve", str(MODEL), "--served-model-name", MODEL_NAME, "--runner", "generate",
            "--host", "127.0.0.1", "--port", str(self.port), "--enforce-eager", "--dtype", "float32",
            "--max-model-len", "2048", "--uvicorn-log-level", "warning",
        ]

        def prepare() -> None:  # in the child: die with the test run; stay on ``cpus``
            die_with_parent()
            if cpus is not None:
                os.sched_setaffinity(0, cpus)

        with open(log, "wb") as out:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True, preexec_fn=prepare)

    def wait_ready(self) -> None:
        """Poll /health until it answers (not a sleep): fail with the log when the server dies or hangs."""
        try:
            wait_until_healthy(f"http://127.0.0.1:{self.port}", self.process, self.log, timeout_s=STARTUP_TIMEOUT_S)
        except RuntimeError:
            self.kill()
            raise

    def requests_done(self) -> int:
        """Chat completions this server answered to the end (not aborted by a client gone), from its metrics."""
        text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=10).text
        pattern = r'^vllm:request_success_total\{[^}]*finished_reason="(?:stop|length)"[^}]*\} (\S+)$'
        return int(sum(float(v) for v in re.findall(pattern, text, re.M)))

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group: a crash, no shutdown."""
        self._signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if not self.alive:
            self._signal(signal.SIGKILL)  # children the API server left behind, if any
            return
        self._signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.process.wait(timeout=30)
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass
