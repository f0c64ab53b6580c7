"""A real Milvus standalone server for the collection tests: ``milvus-server`` from the ``milvus`` package (etcd,
the coordinators and nodes in one process group; minio replaced by local storage under ``--data``).

Registered as a pytest plugin from tests/conftest.py. The server runs in its own process group and is stopped by
killing the group: after SIGTERM alone its children may keep running. One per machine at a time: its embedded
etcd's peer port (2380) is fixed, so a second server never gets ready (the readiness poll fails with the log).
Each gateway gets a database of its own (``MilvusServer.database``), so no test sees another's collections.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from testkit.milvus import MilvusServer


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("milvus")
    server = MilvusServer(folder / "data", folder / "milvus.log")
    try:
        yield server.start()
    finally:
        server.kill()


BACKENDS = ("faiss", "milvus-lite", "milvus-server")


def index_env(backend: str, folder: Path, server: MilvusServer | None = None) -> dict[str, str]:
    """The HQCLIP_INDEX__* of a gateway whose collections live on ``backend``, in a place of its own: a fresh
    folder (FAISS), a fresh milvus-lite file, or a fresh database on ``server``."""
    folder.mkdir(parents=True, exist_ok=True)
    if backend == "faiss":
        return {"HQCLIP_INDEX__BACKEND": "faiss", "HQCLIP_INDEX__DIR": str(folder)}
    if backend == "milvus-lite":
        return {"HQCLIP_INDEX__BACKEND": "milvus", "HQCLIP_INDEX__MILVUS_URI": str(folder / "milvus.db"),
                "HQCLIP_INDEX__DIR": str(folder)}
    assert server is not None, "milvus-server needs the milvus_server fixture"
    return {"HQCLIP_INDEX__BACKEND": "milvus", "HQCLIP_INDEX__MILVUS_URI": server.database(),
            "HQCLIP_INDEX__DIR": str(folder)}


@pytest.fixture(scope="module", params=BACKENDS)
def index_backend(request, tmp_path_factory):
    """``(backend, fresh)``: each test module runs once per backend; ``fresh()`` is the HQCLIP_INDEX__* env of a new,
    empty place on it (the Milvus server starts only for its own runs)."""
    backend = request.param
    server = request.getfixturevalue("milvus_server") if backend == "milvus-server" else None
    return backend, lambda: index_env(backend, tmp_path_factory.mktemp(f"collections-{backend}"), server)
