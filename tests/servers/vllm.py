"""Real vLLM servers for the refinement tests (testkit/vllm.py), as session fixtures.

Registered as a pytest plugin from tests/conftest.py.
"""

from __future__ import annotations

import pytest

from testkit.vllm import VllmServer, ensure_setup


@pytest.fixture(scope="session")
def vllm_servers(tmp_path_factory) -> list[VllmServer]:
    """Two vLLM servers on the tiny LLaVA, started side by side (the failover test kills the second)."""
    ensure_setup()
    folder = tmp_path_factory.mktemp("vllm")
    servers = [VllmServer(folder / f"vllm-{i}.log") for i in range(2)]
    try:
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="session")
def vllm_server(vllm_servers) -> VllmServer:
    """The vLLM server every refinement test may use (never killed)."""
    return vllm_servers[0]
