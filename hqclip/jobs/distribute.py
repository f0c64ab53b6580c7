"""The distributor of the offline jobs: one Ray Data actor call per shard, on a local Ray or a cluster.

The jobs (refine, embed) describe their work as a picklable :class:`ShardWork`: built once in each actor (it opens
its client or engine there), then called with one shard name at a time; it reads the input shard, writes the whole
output shard atomically (hqclip/shards.py) and returns a JSON-able dict of counts. This module only hands out names:

- resume: shards whose output exists are left out before anything starts (the job says which exist);
- one actor call per shard: ``from_items(names)`` -> ``map_batches(actor, batch_size=1)``; Ray Data keeps the
  actor pool busy, places actors by their CPU/GPU needs, restarts an actor whose worker or node died and gives its
  shard to another (``max_restarts``/``max_task_retries`` are unbounded for actor pools);
- a shard whose work raises is retried ``retries`` times in the actor, then reported by name as failed; an
  exception never reaches Ray Data, so one bad shard does not end the dataset.

Why a dataset of shard names, not of samples with Ray Data's own checkpointing: Ray Data reads webdataset samples
into pandas blocks, its checkpointing crashed on them (Ray 2.60), and a sample-level dataset would move every image
through the object store. Shards stay where they are (a filesystem every node sees); only names and counts travel.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

SCALE_HINT = "to spread it over cores, GPUs or machines: pip install 'hqclip[ray]' (docs/scale.md)"
OBJECT_STORE_BYTES = 256 * 1024**2  # a local Ray's object store: names and counts travel, not images


class ShardWork(Protocol):
    """What a job hands the distributor: ``await open()`` once per actor (on the actor's event loop), then
    ``await shard(name)`` per shard, several at once when ``shards_per_actor`` > 1; ``await close()`` at the end
    of an in-process run (a Ray actor's resources go with its process)."""

    async def open(self) -> Callable[[str], Awaitable[dict[str, Any]]]: ...

    async def close(self) -> None: ...


@dataclass
class ShardResult:
    shard: str
    ok: bool
    counts: dict[str, Any]  # what the job's shard function returned (empty when it failed)
    error: str = ""


def tar_shards(sources: list[Path]) -> list[Path]:
    """The .tar shards named, or found (sorted) in the folders named. Outputs are named after them, so two of one
    name are refused."""
    shards: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            shards.extend(sorted(source.glob("*.tar")))
        elif source.suffix == ".tar" and source.is_file():
            shards.append(source)
        else:
            raise ValueError(f"{source} is neither a .tar shard nor a folder of them")
    names = [shard.name for shard in shards]
    if len(set(names)) != len(names):
        raise ValueError("two input shards share a file name; output shards are named after input shards")
    return shards


def ray_installed() -> bool:
    """Whether ``ray[data]`` is importable (without importing it: that takes seconds)."""
    return importlib.util.find_spec("ray") is not None and importlib.util.find_spec("pyarrow") is not None


def connect(address: str | None, log_to_driver: bool = True) -> None:
    """Join the cluster at ``address`` (``auto``: the one `ray start` runs here; ``ray://host:10001``: a remote
    head), or start a local Ray sized to this machine with a small object store."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        ray.init(num_cpus=os.cpu_count() or 1, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False,
                 log_to_driver=log_to_driver)
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the jobs show one bar over shards
    context.print_on_execution_start = False


class _ShardActor:
    """One Ray Data actor (an asyncio actor): the job's work, opened on first use, called per shard; failures
    become results."""

    def __init__(self, work: ShardWork, retries: int) -> None:
        self.work, self.retries = work, retries
        self.shard: Callable[[str], Awaitable[dict[str, Any]]] | None = None
        self.opening = asyncio.Lock()
        self.loop: tuple[asyncio.AbstractEventLoop, int] | None = None  # the loop the work runs on, and its thread

    async def one(self, name: str) -> ShardResult:
        self.loop = (asyncio.get_running_loop(), threading.get_ident())
        error = ""
        for _ in range(self.retries + 1):
            try:
                async with self.opening:
                    if self.shard is None:
                        self.shard = await self.work.open()
                return ShardResult(name, True, await self.shard(name))
            except Exception as exc:  # any failure of one shard is that shard's, reported by name
                error = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
        return ShardResult(name, False, {}, error)

    async def close(self) -> None:
        if self.shard is not None:
            self.shard = None
            await self.work.close()

    def __del__(self) -> None:
        """Ray Data drops an actor's UDF when the actor shuts down gracefully: close the engine or client on the
        loop they run on (from another thread; a killed actor's resources go with its process)."""
        if self.shard is None or self.loop is None:
            return
        loop, thread = self.loop
        if loop.is_closed() or not loop.is_running() or thread == threading.get_ident():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.close(), loop).result(timeout=10)
        except Exception:  # at shutdown, best effort: the process is going anyway
            pass

    async def __call__(self, batch: dict) -> dict:
        results = [await self.one(str(name)) for name in batch["shard"]]
        return {"shard": [r.shard for r in results], "ok": [r.ok for r in results],
                "counts": [json.dumps(r.counts) for r in results], "error": [r.error for r in results]}


def run_on_ray(names: list[str], work: ShardWork, *, actors: int, actor_cpus: float, actor_gpus: float = 0.0,
               shards_per_actor: int = 1, retries: int = 1) -> Iterator[ShardResult]:
    """Each shard of ``names`` through one actor call; results in the order they finish. Call :func:`connect`
    first. ``actors`` is the pool's size, each working on up to ``shards_per_actor`` shards at once (so an actor's
    requests keep flowing while one shard ends and the next begins); fractional ``actor_cpus`` let I/O-bound
    actors share a core."""
    import ray.data

    if not names:
        return
    dataset = ray.data.from_items([{"shard": name} for name in names], override_num_blocks=len(names))
    pool = ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=shards_per_actor,
                                      max_concurrent_calls_per_actor=shards_per_actor)
    dataset = dataset.map_batches(
        _ShardActor, fn_constructor_kwargs={"work": work, "retries": retries}, batch_size=1, batch_format="numpy",
        compute=pool, num_cpus=actor_cpus, num_gpus=actor_gpus or None)
    for row in dataset.iter_rows():
        yield ShardResult(str(row["shard"]), bool(row["ok"]), json.loads(str(row["counts"])), str(row["error"]))


def run_here(names: list[str], work: ShardWork, retries: int = 1) -> Iterator[ShardResult]:
    """The same contract in this process, one shard after another (no Ray)."""
    actor, loop = _ShardActor(work, retries), asyncio.new_event_loop()
    try:
        for name in names:
            yield loop.run_until_complete(actor.one(name))
    finally:
        loop.run_until_complete(actor.close())
        loop.close()


@dataclass
class Tally:
    """Shards done/skipped/failed and the sum of the jobs' counts, with the rate of one count."""

    total: int
    skipped: int
    done: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # shard -> the last error
    counts: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    seconds: float = 0.0
    first: tuple[float, dict[str, float]] | None = None  # when the first shard finished, and the counts then

    def add(self, result: ShardResult) -> None:
        if result.ok:
            self.done += 1
            for key, value in result.counts.items():
                if isinstance(value, (int, float)):
                    self.counts[key] = self.counts.get(key, 0) + value
        else:
            self.failed[result.shard] = result.error
        self.seconds = time.monotonic() - self.started
        if self.first is None:
            self.first = (self.seconds, dict(self.counts))

    def rate(self, count: str) -> float:
        """Over the whole run: start-up (actors, engines) included."""
        return self.counts.get(count, 0) / self.seconds if self.seconds else 0.0

    def steady_rate(self, count: str) -> float:
        """From the first shard's end to the last's: the rate once the actors are up (0 with one shard)."""
        if self.first is None or self.seconds <= self.first[0]:
            return 0.0
        return (self.counts.get(count, 0) - self.first[1].get(count, 0)) / (self.seconds - self.first[0])

    def lines(self, unit: str, count: str) -> list[str]:
        lines = [f"shards: {self.done} done now, {self.skipped} already done, {len(self.failed)} failed, "
                 f"of {self.total}",
                 f"{unit}: {int(self.counts.get(count, 0))} in {self.seconds:.0f}s ({self.rate(count):.2f}/s; "
                 f"{self.steady_rate(count):.2f}/s after the first shard)"]
        for shard, error in sorted(self.failed.items()):
            lines.append(f"failed: {shard}: {error}")
        if self.failed:
            lines.append("rerun the same command to retry the failed shards (written shards are kept)")
        return lines


def distribute(names: list[str], done: Callable[[str], bool], work: ShardWork, *, use_ray: bool,
               address: str | None, actors: int, actor_cpus: float, actor_gpus: float = 0.0,
               shards_per_actor: int = 1, retries: int = 1, progress: bool = True, label: str = "shards") -> Tally:
    """The runner shared by the jobs: skip shards ``done`` says exist, run the rest on Ray or here, one progress
    bar over shards, a :class:`Tally` at the end."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    pending = [name for name in names if not done(name)]
    if use_ray:
        connect(address)
    tally = Tally(total=len(names), skipped=len(names) - len(pending))  # from here: actors start, shards flow
    if use_ray:
        results = run_on_ray(pending, work, actors=actors, actor_cpus=actor_cpus, actor_gpus=actor_gpus,
                             shards_per_actor=shards_per_actor, retries=retries)
    else:
        results = run_here(pending, work, retries=retries)
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task(label, total=len(pending))
        for result in results:
            tally.add(result)
            bar.advance(task)
    tally.seconds = time.monotonic() - tally.started
    return tally
