"""``Client`` (blocking) and ``AsyncClient`` (asyncio): the same operations (api.py), two ways to do I/O."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from hqclip_client.api import Api
from hqclip_client.transport import Outcome, Plan, Sleep, T


class Client(Api):
    """Blocking client. ``with Client("http://host:8000", api_key=...) as client: client.embed_texts([...])``"""

    def __init__(self, base_url: str | None = None, **options: Any) -> None:
        super().__init__(base_url, **options)
        self._http = httpx.Client(base_url=self.base_url, headers=self._headers(), timeout=self.timeout)

    def _run(self, plan: Plan[T]) -> T:
        outcome: Outcome = None
        while True:
            try:
                step = plan.send(outcome)
            except StopIteration as done:
                return done.value
            if isinstance(step, Sleep):
                time.sleep(step.seconds)
                outcome = None
                continue
            try:
                outcome = self._http.send(step.build(self._http))
            except httpx.TransportError as exc:
                outcome = exc

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(Api):
    """asyncio client with the methods of ``Client``, each awaited: ``await client.embed_texts([...])``."""

    def __init__(self, base_url: str | None = None, **options: Any) -> None:
        super().__init__(base_url, **options)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self._headers(), timeout=self.timeout)

    async def _run(self, plan: Plan[T]) -> T:
        outcome: Outcome = None
        while True:
            try:
                step = plan.send(outcome)
            except StopIteration as done:
                return done.value
            if isinstance(step, Sleep):
                await asyncio.sleep(step.seconds)
                outcome = None
                continue
            try:
                outcome = await self._http.send(step.build(self._http))
            except httpx.TransportError as exc:
                outcome = exc

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
