"""Shared fixtures: a tiny exported model repository and real gateway processes on free ports."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from testkit import gateway as gateways
from testkit.gateway import Gateway
from testkit.tiny import export_tiny_repo

pytest_plugins = ["tests.servers.vllm", "tests.servers.milvus"]  # real vLLM servers (refinement), Milvus (collections)
TAG_VOCABULARY = ("cat", "astronaut", "coffee", "rocket", "sky", "grass", "red", "metal")


def pytest_configure(config):
    """The user's HQCLIP_* variables (their gateway's index folder, URL, keys) never reach a test or what it starts,
    modules that read the environment at import included: every test sees the defaults and sets what it means."""
    for name in [k for k in os.environ if k.startswith("HQCLIP_")]:
        del os.environ[name]


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
    from testkit.tiny import write_seeded_checkpoint

    return write_seeded_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"), seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """(model, preprocess, tokenizer) straight from open_clip: the reference the services must match."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_checkpoint}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{tiny_checkpoint}")


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory, tiny_checkpoint) -> Path:
    """The tiny checkpoint, exported by `hqclip export` into a fresh model repository as model 'tiny'."""
    return export_tiny_repo(tiny_checkpoint, tmp_path_factory.mktemp("model-repo"))


@pytest.fixture(scope="session")
def tagged_repo(tmp_path_factory, tiny_checkpoint) -> Path:
    """The tiny checkpoint with a seeded random short-tag head over ``TAG_VOCABULARY``, exported as model 'tagged'
    (the client tests and the web page need /v1/tags to answer)."""
    import torch

    from testkit.tiny import TINY_EMBED_DIM
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
    """``start(**env)`` -> Gateway: a real uvicorn gateway subprocess on a free port (testkit/gateway.py), HQCLIP_*
    env applied (default: the tiny repository), in a temporary folder of its own with its own collections folder
    unless HQCLIP_INDEX__DIR is given. Every gateway started is stopped at the end of the session."""
    started: list[Gateway] = []

    def start(**env: str) -> Gateway:
        gateway = gateways.start(env.pop("HQCLIP_MODEL_REPO", tiny_repo), tmp_path_factory.mktemp("gateway"), **env)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        if gateway.process.poll() is None:
            gateway.stop()


@pytest.fixture(scope="session")
def client_gateway(gateway_factory, tagged_repo) -> Gateway:
    """A gateway on the tagged model with API keys (SDK, CLI and web page tests)."""
    return gateway_factory(HQCLIP_MODEL_REPO=str(tagged_repo), HQCLIP_API_KEYS="client-key-1,client-key-2")


@pytest.fixture(scope="session")
def lvlm_gateway(gateway_factory, tagged_repo, vllm_server) -> Gateway:
    """A gateway on the tagged model refining through the tiny vLLM server (no API keys)."""
    return gateway_factory(HQCLIP_MODEL_REPO=str(tagged_repo), HQCLIP_REFINE__URLS=vllm_server.url,
                           HQCLIP_REFINE__TEMPERATURE="1.0")  # the tiny model ends its answers when sampled


@pytest.fixture(scope="session")
def gateway(gateway_factory) -> Gateway:
    """The default gateway on the tiny repository."""
    return gateway_factory()
