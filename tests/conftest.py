"""Shared fixtures: a tiny exported model repository and real gateway processes on free ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

pytest_plugins = ["tests.servers.vllm", "tests.servers.milvus"]  # real vLLM servers (refinement), Milvus (collections)
ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 120
TAG_VOCABULARY = ("cat", "astronaut", "coffee", "rocket", "sky", "grass", "red", "metal")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(log: Path) -> str:
    return log.read_bytes()[-4000:].decode("utf-8", errors="replace")


def wait_until_healthy(url: str, process: subprocess.Popen, log: Path, path: str = "/health",
                       timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Poll until the server answers (a readiness poll, not a sleep): fail with its log if it dies or hangs.
    Stopping a server that hangs is the caller's (its fixture's teardown)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}:\n{_tail(log)}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{process.args} not healthy after {timeout_s:g}s:\n{_tail(log)}")


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


@pytest.fixture(autouse=True)
def _no_sigchld_handler_left_behind():
    """torch's DataLoader, once it has had worker processes, leaves a Python SIGCHLD handler in the process for good,
    so in this long-lived test process every later child exit (servers, CLI runs) interrupts the main thread with
    a signal frame. Once in-process bf16/int8 inference has turned on the AMX tile state (test_precision), such a
    delivery sometimes kills the process with a kernel SIGSEGV (no Python stack; seen in the full suite after
    test_precision, in test_train and test_triton_backend; cores show the main thread asleep, si_code SI_KERNEL).
    Put SIGCHLD back after each test; `hqclip train` itself is a process of its own."""
    before = signal.getsignal(signal.SIGCHLD)
    yield
    if signal.getsignal(signal.SIGCHLD) is not before:
        signal.signal(signal.SIGCHLD, before)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny open_clip checkpoint folder (released-checkpoint layout) with seeded random weights saved in it,
    so every load of it — the export's and the tests' torch reference — has the same weights."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from tests.tiny import write_tiny_checkpoint

    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{folder}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """(model, preprocess, tokenizer) straight from open_clip: the reference the services must match."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_checkpoint}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{tiny_checkpoint}")


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory, tiny_checkpoint) -> Path:
    """The tiny checkpoint, exported by `hqclip export` into a fresh model repository as model 'tiny'."""
    from training.export import export_checkpoint

    repo = tmp_path_factory.mktemp("model-repo")
    export_checkpoint(str(tiny_checkpoint), out=repo, name="tiny")
    return repo


@pytest.fixture(scope="session")
def tagged_repo(tmp_path_factory, tiny_checkpoint) -> Path:
    """The tiny checkpoint with a seeded random short-tag head over ``TAG_VOCABULARY``, exported as model 'tagged'
    (the client tests and the web page need /v1/tags to answer)."""
    import torch

    from tests.tiny import TINY_EMBED_DIM
    from training.export import export_model
    from training.models import load_model
    from training.tag_head import TagHead

    loaded = load_model(str(tiny_checkpoint))
    torch.manual_seed(0)
    head = TagHead(TINY_EMBED_DIM, len(TAG_VOCABULARY))
    repo = tmp_path_factory.mktemp("tagged-repo")
    export_model(loaded.model, loaded.preprocess_cfg, loaded.tokenizer, repo, "tagged", loaded.weights, head,
                 list(TAG_VOCABULARY), architecture=loaded.architecture)
    return repo


@pytest.fixture(scope="session")
def gateway_factory(tmp_path_factory, tiny_repo):
    """``start(**env)`` -> Gateway: a real uvicorn gateway subprocess on a free port, HQCLIP_* env applied
    (defaults: the tiny repository). Every gateway started is stopped at the end of the session."""
    started: list[Gateway] = []

    def start(**env: str) -> Gateway:
        port = free_port()
        full_env = {**os.environ, "HQCLIP_MODEL_REPO": str(tiny_repo), "HQCLIP_HOST": "127.0.0.1",
                    "HQCLIP_PORT": str(port), "HQCLIP_LOG_LEVEL": "warning", **env}
        log = tmp_path_factory.mktemp("gateway") / "gateway.log"
        with open(log, "wb") as out:
            process = subprocess.Popen([sys.executable, "-m", "hqclip.cli", "serve"], cwd=ROOT, env=full_env,
                                       stdout=out, stderr=subprocess.STDOUT)
        gateway = Gateway(f"http://127.0.0.1:{port}", process, full_env, log)
        started.append(gateway)  # stopped at the end, also when it never becomes healthy
        wait_until_healthy(gateway.url, process, log)
        return gateway

    yield start
    for gateway in started:
        if gateway.process.poll() is None:
            gateway.stop()


@pytest.fixture(scope="session")
def client_gateway(gateway_factory, tagged_repo, tmp_path_factory) -> Gateway:
    """A gateway on the tagged model with API keys and its own collections folder (SDK, CLI and web page tests)."""
    return gateway_factory(HQCLIP_MODEL_REPO=str(tagged_repo), HQCLIP_API_KEYS="client-key-1,client-key-2",
                           HQCLIP_INDEX__DIR=str(tmp_path_factory.mktemp("client-collections")))


@pytest.fixture(scope="session")
def lvlm_gateway(gateway_factory, tagged_repo, vllm_server, tmp_path_factory) -> Gateway:
    """A gateway on the tagged model refining through the tiny vLLM server (no API keys)."""
    return gateway_factory(HQCLIP_MODEL_REPO=str(tagged_repo), HQCLIP_REFINE__URLS=vllm_server.url,
                           HQCLIP_REFINE__TEMPERATURE="1.0",  # the tiny model ends its answers when sampled
                           HQCLIP_INDEX__DIR=str(tmp_path_factory.mktemp("lvlm-collections")))


@pytest.fixture(scope="session")
def gateway(gateway_factory) -> Gateway:
    """The default gateway on the tiny repository."""
    return gateway_factory()
