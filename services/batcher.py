"""The micro-batcher: the one place that merges concurrent requests into backend batches.

Each model gets one batcher. A request submits its rows; a worker takes the first waiting row, waits at most
``max_delay`` for others (from any request) up to ``max_size``, runs one backend call and hands each row its result.
With ``max_delay`` 0 (the default) nobody waits: a batch is whatever is queued when a worker is free, and under
load the queue fills while the backend runs, so batches grow by themselves.
The backlog is bounded: items submitted and not yet answered (waiting or running) never exceed ``queue_size``;
a request that would pass it is refused at once (``QueueFull``), never queued without limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from services.errors import QueueFull
from services.metrics import Metrics


@dataclass
class _Row:
    data: np.ndarray
    future: asyncio.Future


class MicroBatcher:
    def __init__(
        self,
        name: str,
        run: Callable[[np.ndarray], Awaitable[np.ndarray]],
        max_size: int,
        max_delay_s: float,
        queue_size: int,
        workers: int,
        metrics: Metrics,
    ) -> None:
        self.name, self._run = name, run
        self._max_size, self._max_delay, self._queue_size = max_size, max_delay_s, queue_size
        self._queue: asyncio.Queue[_Row] = asyncio.Queue()
        self._pending = 0
        self._metrics = metrics
        self._workers = [asyncio.create_task(self._work(), name=f"batcher-{name}-{i}") for i in range(workers)]

    async def submit(self, rows: np.ndarray) -> np.ndarray:
        """Results for ``rows`` (one per row, in order), computed in batches shared with other requests."""
        if self._pending + len(rows) > self._queue_size:
            raise QueueFull(f"the {self.name} queue is full ({self._pending} items pending, "
                            f"room for {self._queue_size})")
        loop = asyncio.get_running_loop()
        pending = [_Row(row, loop.create_future()) for row in rows]
        for row in pending:
            self._queue.put_nowait(row)
        self._pending += len(rows)
        self._metrics.queue_depth.labels(self.name).set(self._pending)
        try:
            return np.stack(await asyncio.gather(*(row.future for row in pending)))
        finally:
            self._pending -= len(rows)
            self._metrics.queue_depth.labels(self.name).set(self._pending)

    async def _collect(self) -> list[_Row]:
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._max_delay
        while len(batch) < self._max_size:
            if self._queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            else:
                batch.append(self._queue.get_nowait())
        return [row for row in batch if not row.future.done()]  # a cancelled request leaves done futures

    async def _work(self) -> None:
        while True:
            batch = await self._collect()
            if not batch:
                continue
            self._metrics.batch_size.labels(self.name).observe(len(batch))
            try:
                outputs = await self._run(np.stack([row.data for row in batch]))
            except Exception as exc:  # the backend's failure belongs to every request in the batch
                for row in batch:
                    if not row.future.done():
                        row.future.set_exception(exc)
                continue
            for row, output in zip(batch, outputs):
                if not row.future.done():
                    row.future.set_result(output)

    async def close(self) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
