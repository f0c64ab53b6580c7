"""Kill -9 the real gateway while clients upsert, replace and delete items in two collections at once; restart it
on the same folder (FAISS) or the same Milvus database (milvus-lite, a Milvus standalone server). Every
acknowledged write must be there: each live item found by its latest vector,
none twice, none that was deleted. Writes in flight at the kill may land either way, but only whole."""

from __future__ import annotations

import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest

from tests.servers.milvus import index_env

pytestmark = pytest.mark.slow

WRITERS = 4
KINDS = ("flat", "hnsw")
ACKED_BEFORE_KILL = 600  # acknowledged writes (items) across writers before the kill


@dataclass
class Ledger:
    """What one writer was told: per id, the vector of its last acknowledged upsert, or None once deleted."""

    state: dict[str, np.ndarray | None] = field(default_factory=dict)
    uncertain: dict[str, list[np.ndarray | None]] = field(default_factory=dict)  # id -> outcomes allowed


class Writers:
    def __init__(self, url: str, collection: str, dim: int) -> None:
        self.url, self.collection, self.dim = url, collection, dim
        self.ledgers = [Ledger() for _ in range(WRITERS)]
        self.acked = 0
        self.progress = threading.Condition()
        self.threads = [threading.Thread(target=self._write, args=(w,), daemon=True) for w in range(WRITERS)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=60)

    def wait_for(self, acked: int) -> None:
        with self.progress:
            assert self.progress.wait_for(lambda: self.acked >= acked, timeout=300), "ingestion too slow"

    def _write(self, writer: int) -> None:
        rng = np.random.default_rng(writer)
        ledger = self.ledgers[writer]
        client = httpx.Client(base_url=self.url, timeout=60)
        n = 0
        while True:
            live = [i for i, v in ledger.state.items() if v is not None]
            if n % 5 == 4 and len(live) > 10:  # delete a few
                ids = [str(i) for i in rng.choice(live, size=3, replace=False)]
                request = ("DELETE", {"ids": ids})
                outcome = dict.fromkeys(ids)
            else:  # upsert new ids, and replace an old one with a new vector
                ids = [f"w{writer}-{n}-{j}" for j in range(8)]
                if live:
                    ids.append(str(rng.choice(live)))
                vectors = rng.normal(size=(len(ids), self.dim)).astype(np.float32)
                items = [{"id": i, "vector": v.tolist(), "attributes": {"writer": writer}}
                         for i, v in zip(ids, vectors)]
                request = ("POST", {"items": items})
                outcome = dict(zip(ids, vectors))
            method, body = request
            try:
                response = client.request(method, f"/v1/collections/{self.collection}/items", json=body)
                answered = response.status_code == 200
            except httpx.TransportError:  # the gateway died with this write in flight
                answered = False
            if not answered:  # ... or its vector store did (an error answer): the write may have landed or not
                for i, new in outcome.items():
                    ledger.uncertain[i] = [ledger.state.get(i), new]
                client.close()
                return
            ledger.state.update(outcome)
            n += 1
            with self.progress:
                self.acked += len(outcome)
                self.progress.notify_all()


def wait_for_snapshots(folder, names) -> None:
    """Poll until each collection has a snapshot on disk (so the restart loads one and replays after it)."""
    deadline = time.monotonic() + 120
    while not all(list((folder / name).glob("snapshot-*.faiss")) for name in names):
        assert time.monotonic() < deadline, "no snapshot written"
        time.sleep(0.05)


def stored_vector(client: httpx.Client, collection: str, item_id: str) -> bool:
    """Whether ``item_id`` is stored: a search by id answers 404 for an id the collection does not hold."""
    response = client.post(f"/v1/collections/{collection}/search", json={"id": item_id, "top_k": 1})
    assert response.status_code in (200, 404), response.text
    return response.status_code == 200


def top_hit(client: httpx.Client, collection: str, vector: np.ndarray) -> dict:
    return client.post(f"/v1/collections/{collection}/search", json={"vector": vector.tolist(), "top_k": 1}) \
        .json()["results"][0]


def check_acknowledged_writes(client: httpx.Client, collection: str, w: Writers) -> None:
    """Every acknowledged write is there, nothing else is, and in-flight writes landed whole or not at all."""
    certain = {i: v for ledger in w.ledgers for i, v in ledger.state.items() if i not in ledger.uncertain}
    uncertain = {i: options for ledger in w.ledgers for i, options in ledger.uncertain.items()}
    live = {i for i, v in certain.items() if v is not None}
    with ThreadPoolExecutor(8) as pool:  # a Milvus read waits ~0.2 s for its time tick (Strong): wait in parallel
        stored = dict(zip(ids := [*certain, *uncertain], pool.map(lambda i: stored_vector(client, collection, i),
                                                                   ids)))
    lost = [i for i in sorted(live) if not stored[i]]
    assert not lost, f"{collection}: acknowledged items lost: {len(lost)} of {len(live)}, e.g. {lost[:5]}"
    deleted = [i for i, v in certain.items() if v is None and stored[i]]
    assert not deleted, f"{collection}: deleted items came back: {deleted[:5]}"
    landed = {i for i in uncertain if stored[i]}
    count = client.get(f"/v1/collections/{collection}").json()["count"]
    assert count == len(live) + len(landed), f"{collection}: items stored twice, or that nobody wrote"
    for item_id, vector in list(certain.items())[::7]:  # the latest acknowledged vector of a sample of ids
        if vector is None:
            continue
        top = top_hit(client, collection, vector)
        assert top["id"] == item_id and top["score"] == pytest.approx(1.0, abs=1e-4), (collection, item_id, top)
    for item_id, options in uncertain.items():  # a write in flight landed whole or not at all
        if item_id not in landed:
            assert any(o is None for o in options), (collection, item_id, "in-flight write lost a stored item")
            continue
        tops = [top_hit(client, collection, o) for o in options if o is not None]
        assert any(t["id"] == item_id and t["score"] == pytest.approx(1.0, abs=1e-4) for t in tops), item_id


def start_writers(client: httpx.Client, url: str) -> dict[str, Writers]:
    dim = client.get("/v1/models").json()["data"][0]["embed_dim"]
    writers = {}
    for kind in KINDS:
        assert client.post("/v1/collections", json={"name": kind, "index": {"kind": kind}}).status_code == 201
        writers[kind] = Writers(url, kind, dim)
    for w in writers.values():
        w.start()
    return writers


def test_kill_minus_nine_during_ingestion_loses_and_duplicates_nothing(gateway_factory, tmp_path):
    folder = tmp_path / "collections"
    gateway = gateway_factory(HQCLIP_INDEX__DIR=str(folder), HQCLIP_INDEX__SNAPSHOT_INTERVAL_S="0.3")
    client = httpx.Client(base_url=gateway.url, timeout=60)
    writers = start_writers(client, gateway.url)
    for w in writers.values():
        w.wait_for(ACKED_BEFORE_KILL // 2)
    wait_for_snapshots(folder, KINDS)
    for w in writers.values():
        w.wait_for(ACKED_BEFORE_KILL)  # more writes after the first snapshot: these come back from the WAL
    gateway.kill()
    for w in writers.values():
        w.join()
    for kind in KINDS:
        with sqlite3.connect(folder / kind / "meta.sqlite") as db:
            assert db.execute("SELECT count(*) FROM wal").fetchone()[0] > 0, "nothing left to replay"

    restarted = gateway_factory(HQCLIP_INDEX__DIR=str(folder))
    client = httpx.Client(base_url=restarted.url, timeout=60)
    for kind, w in writers.items():
        check_acknowledged_writes(client, kind, w)


def ingest_until(gateway_factory, env: dict[str, str], kill) -> tuple:
    """A gateway on ``env``, writers on two collections through it until ACKED_BEFORE_KILL, then ``kill(gateway)``;
    (the gateway, the writers once they stopped)."""
    gateway = gateway_factory(**env)
    writers = start_writers(httpx.Client(base_url=gateway.url, timeout=60), gateway.url)
    for w in writers.values():
        w.wait_for(ACKED_BEFORE_KILL)
    kill(gateway)
    for w in writers.values():
        w.join()
    return gateway, writers


def check_on_a_new_gateway(gateway_factory, env: dict[str, str], writers: dict[str, Writers]) -> None:
    client = httpx.Client(base_url=gateway_factory(**env).url, timeout=60)
    for kind, w in writers.items():
        assert not any(t.is_alive() for t in w.threads), f"{kind}: a writer went on writing after the kill"
        check_acknowledged_writes(client, kind, w)


@pytest.mark.parametrize("backend", ["milvus-lite", "milvus-server"])
def test_kill_minus_nine_of_the_gateway_on_milvus(backend, gateway_factory, tmp_path, request):
    server = request.getfixturevalue("milvus_server") if backend == "milvus-server" else None
    env = index_env(backend, tmp_path / "collections", server)
    _, writers = ingest_until(gateway_factory, env, lambda gateway: gateway.kill())
    check_on_a_new_gateway(gateway_factory, env, writers)


def test_kill_minus_nine_of_the_milvus_server(milvus_server, gateway_factory, tmp_path):
    """The Milvus server (standalone: its own etcd and RocksMQ log) killed mid-ingest and restarted on its data:
    every write the gateway acknowledged is there. The gateway's writes in flight fail (its answer or its connection
    does), so their writers stop with those writes uncertain; a new gateway reads the restarted server."""
    env = index_env("milvus-server", tmp_path / "collections", milvus_server)
    gateway, writers = ingest_until(gateway_factory, env, lambda gateway: milvus_server.kill())
    gateway.kill()
    milvus_server.start()  # on the same data; the port may move (see testkit/milvus.py)
    env["HQCLIP_INDEX__MILVUS_URI"] = milvus_server.on_this_port(env["HQCLIP_INDEX__MILVUS_URI"])
    check_on_a_new_gateway(gateway_factory, env, writers)
