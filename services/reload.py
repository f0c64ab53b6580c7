"""Hot swap: a new export replaces the served model without a restart.

``Serving`` holds the engine that serves now. Every HTTP request leases the engine current at its start
(``LeaseMiddleware``) and keeps it to its end, so a request never pairs one model's text tower with another's image
tower, and batches in flight finish on the model they started on. ``reload`` loads the export the manifest names now
beside the current engine (every file checked against its checksum, sessions built, batchers started), warms it with
a real inference through each of its models, then swaps it in with one assignment; the old engine closes when its
last lease ends. A load that fails leaves the current engine serving and raises ``LoadFailed`` saying why.
``watch`` (``HQCLIP_RELOAD_S``) looks at the manifest file's stamp every few seconds and reloads when it changed.

Collections embedded by the previous model (``in_use``: the fingerprints collections record) still need it for
their text and image queries until `hqclip reindex` replaces them: with ``HQCLIP_RELOAD_KEEP_PREVIOUS`` the previous
engine is kept loaded (``retained``) and leased by such requests (``lease_retained``), then closed once no collection
uses its fingerprint (``release_unused``, after a collection's deletion).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from hqclip.repo.manifest import find_manifest, load_manifest
from services.backends.base import BackendUnavailable
from services.engine import Engine
from services.errors import LoadFailed
from services.metrics import Metrics
from services.settings import Settings

log = logging.getLogger("hqclip.reload")


@dataclass
class Reloaded:
    """What a reload did: ``reloaded`` False when the repository still holds the model being served."""

    reloaded: bool
    model: str
    fingerprint: str
    previous: str
    seconds: float


def _stamp(path: Path) -> tuple[int, int, int]:
    """Changes whenever the manifest is rewritten (the installer replaces it: a new inode)."""
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


class Serving:
    """The served engine, leased per request, and its replacement by ``reload``."""

    def __init__(self, settings: Settings, metrics: Metrics,
                 in_use: Callable[[], set[str]] = frozenset) -> None:
        self.settings, self.metrics, self._in_use = settings, metrics, in_use
        self._path = find_manifest(settings.model_repo, settings.model)
        self._seen = _stamp(self._path)
        self.engine = Engine(settings, metrics)
        self._leases: Counter[Engine] = Counter()
        self._retired: list[Engine] = []
        self._retained: dict[str, Engine] = {}  # fingerprint -> a previous engine collections still need
        self._lock = asyncio.Lock()
        self._watcher: asyncio.Task | None = None

    async def start(self) -> None:
        await self.engine.start()
        if self.settings.reload_s:
            self._watcher = asyncio.create_task(self._watch(self.settings.reload_s), name="reload-watcher")

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        for engine in [*self._retired, *self._retained.values(), self.engine]:
            await engine.close()

    @property
    def retained(self) -> list[str]:
        """Fingerprints of the previous models kept loaded for the collections they embedded."""
        return sorted(self._retained)

    def lease(self) -> AsyncIterator[Engine]:
        """The engine serving now, kept whole for the caller however many reloads happen meanwhile."""
        return self._hold(self.engine)

    @asynccontextmanager
    async def lease_retained(self, fingerprint: str) -> AsyncIterator[Engine | None]:
        """The previous engine of this fingerprint, kept for the caller (None: not retained)."""
        engine = self._retained.get(fingerprint)
        if engine is None:
            yield None
            return
        async with self._hold(engine) as held:
            yield held

    async def release_unused(self) -> None:
        """Close the retained engines no collection needs any more (their last lease ends first)."""
        used = self._in_use()
        for fingerprint in [f for f in self._retained if f not in used]:
            log.info("no collection uses %s any more: closing its engine", fingerprint)
            await self._retire(self._retained.pop(fingerprint))

    async def _retire(self, engine: Engine) -> None:
        self._retired.append(engine)
        if not self._leases[engine]:
            await self._close_retired(engine)

    @asynccontextmanager
    async def _hold(self, engine: Engine) -> AsyncIterator[Engine]:
        self._leases[engine] += 1
        try:
            yield engine
        finally:
            self._leases[engine] -= 1
            if not self._leases[engine]:
                del self._leases[engine]
                if engine in self._retired:
                    await self._close_retired(engine)

    async def _close_retired(self, engine: Engine) -> None:
        self._retired.remove(engine)
        await engine.backend.release()
        await engine.close()
        log.info("closed the engine of %s (%s)", engine.manifest.name, engine.fingerprint)

    async def reload(self) -> Reloaded:
        """Serve what the repository's manifest names now; ``LoadFailed`` (the old model serving on) if it cannot."""
        async with self._lock:
            started = time.perf_counter()
            self._seen = _stamp(self._path)  # before reading: a change during the load is seen by the next look
            new = await asyncio.to_thread(self._load)
            old = self.engine
            if new is None:
                return Reloaded(False, old.manifest.name, old.fingerprint, old.fingerprint,
                                time.perf_counter() - started)
            try:
                await new.backend.prepare(old.backend)  # Triton: load the new versions beside the old
                await new.start()
                if not await new.ready():
                    raise BackendUnavailable(f"{new.backend.name} does not serve the new towers")
            except Exception as exc:
                await new.backend.release()  # Triton: the versions it loaded, unloaded again
                await new.close()
                if isinstance(exc, BackendUnavailable):
                    raise
                raise LoadFailed(f"the new export of '{new.manifest.name}' cannot serve: {exc}; "
                                 f"still serving {old.fingerprint}") from exc
            self.engine = new  # the swap: requests from here on lease the new engine
            stale = self._retained.pop(new.fingerprint, None)  # a swap back to a retained model: loaded afresh
            if stale is not None:
                await self._retire(stale)
            if self.settings.reload_keep_previous and old.fingerprint in self._in_use():
                self._retained[old.fingerprint] = old
                log.info("keeping %s loaded: collections embedded by it answer queries until re-embedded "
                         "(`hqclip reindex`)", old.fingerprint)
            else:
                await self._retire(old)
            seconds = time.perf_counter() - started
            log.info("now serving %s (%s, was %s), loaded in %.1fs", new.manifest.name, new.fingerprint,
                     old.fingerprint, seconds)
            return Reloaded(True, new.manifest.name, new.fingerprint, old.fingerprint, seconds)

    def _load(self) -> Engine | None:
        """A new engine for the manifest as it is now (None: it names the model already served); in a thread."""
        current = self.engine.fingerprint
        try:
            manifest = load_manifest(self.settings.model_repo, self.settings.model, verify=True)
        except FileNotFoundError as exc:
            missing = f" ({exc.filename} is missing)" if exc.filename else ""
            raise LoadFailed(f"{exc}{missing}; re-run `hqclip export`; still serving {current}") from exc
        except (ValueError, ValidationError, OSError) as exc:
            raise LoadFailed(f"{self._path.name}: {exc}; still serving {current}") from exc
        if manifest.fingerprint == current:
            return None
        try:
            return Engine(self.settings, self.metrics, manifest=manifest)
        except BackendUnavailable:
            raise
        except Exception as exc:  # a runtime's own message: ONNX Runtime on a broken graph, a missing variant
            raise LoadFailed(f"cannot load the new export of '{manifest.name}' ({manifest.fingerprint}): {exc}; "
                             f"still serving {current}") from exc

    async def _watch(self, every_s: float) -> None:
        """Reload whenever the manifest file changes; a failed load waits for the next change."""
        while True:
            await asyncio.sleep(every_s)
            try:
                changed = _stamp(self._path) != self._seen
            except OSError:  # between an installer's rename and the next: look again later
                continue
            if changed:
                try:
                    await self.reload()
                except (LoadFailed, BackendUnavailable) as exc:
                    log.error("reload of %s failed: %s", self._path, exc)


class LeaseMiddleware:
    """Every request leases the engine current at its start, as ``request.state.engine`` (services/payloads.py)."""

    def __init__(self, app: ASGIApp, serving: Serving) -> None:
        self.app, self.serving = app, serving

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        async with self.serving.lease() as engine:
            scope.setdefault("state", {})["engine"] = engine
            await self.app(scope, receive, send)

