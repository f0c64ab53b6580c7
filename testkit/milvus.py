"""A real Milvus standalone server (``milvus-server`` from the ``milvus`` package) for tests and benchmarks.

The server runs in its own process group and is stopped by killing the group: after SIGTERM alone its children may
keep running. One per machine at a time: its embedded etcd's peer port (2380) is fixed, so a second server never
gets ready (the readiness poll fails with the log).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import yaml

from testkit.processes import free_port

SERVER = Path(sys.executable).with_name("milvus-server")
STARTUP_TIMEOUT_S = 600  # ~11 s on a quiet box; minutes on busy shared cores


class MilvusServer:
    """One ``milvus-server`` process group on a free proxy port of 127.0.0.1, its data in ``data``."""

    def __init__(self, data: Path, log: Path, port: int | None = None) -> None:
        self.data, self.log = data, log
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> MilvusServer:
        """Start it on ``data`` (new or kept from an earlier run) and wait until it answers."""
        self._config.unlink(missing_ok=True)  # the wrapper writes it anew with the ports it bound
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen([str(SERVER), "--data", str(self.data), "--proxy-port", str(self.port)],
                                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready()
        return self

    @property
    def _config(self) -> Path:
        return self.data / "configs" / "milvus.yaml"

    def _bound_port(self) -> int | None:
        """The proxy port the wrapper bound: the one asked for, or the next free one when it cannot bind that (after a
        kill -9 the closed connections' TIME_WAIT still hold it). None until the wrapper has written its config."""
        try:
            return int(yaml.safe_load(self._config.read_text())["proxy"]["port"])
        except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
            return None

    def wait_ready(self) -> None:
        """Poll until the proxy answers a request (not a sleep); fail with the log when the server dies or hangs."""
        from pymilvus import MilvusClient

        logging.getLogger("pymilvus").setLevel(logging.CRITICAL)  # each refused poll would log a traceback
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"milvus-server exited with {self.process.returncode}:\n{self.tail()}")
            port = self._bound_port()
            try:
                if port is None:
                    raise ConnectionError("no config written yet")
                self.port, self.uri = port, f"http://127.0.0.1:{port}"
                client = MilvusClient(self.uri, timeout=2)
                client.list_collections()
                client.close()
                return
            except Exception:  # not listening yet, or its coordinators not up yet
                time.sleep(0.2)
        raise RuntimeError(f"milvus-server not ready after {STARTUP_TIMEOUT_S}s:\n{self.tail()}")

    def on_this_port(self, database_uri: str) -> str:
        """``database_uri`` (from :meth:`database`) on the port the server listens on now (a restart may move it)."""
        return f"{self.uri}/{database_uri.rsplit('/', 1)[1]}"

    def tail(self) -> str:
        return self.log.read_bytes()[-4000:].decode("utf-8", errors="replace")

    def database(self) -> str:
        """A new empty database; the URI of a gateway that uses it (``http://host:port/<db>``)."""
        from pymilvus import MilvusClient

        name = f"t_{uuid.uuid4().hex[:12]}"
        client = MilvusClient(self.uri)
        client.create_database(name)
        client.close()
        return f"{self.uri}/{name}"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group and wait for the server."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=60)
