"""The app factory: wires settings, engine, routes, auth, errors and metrics. No model logic lives here.

Optional components (retrieval, refinement) hang off ``app.state`` and are started and stopped in ``lifespan``;
one that has its own readiness adds an async probe to ``app.state.readiness`` (name -> coroutine function), and
``/ready`` reports it beside the model.
"""

from __future__ import annotations

import hmac
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from services.engine import Engine
from services.errors import error_body, install_error_handlers
from services.index.manager import CollectionManager
from services.metrics import Metrics
from services.refine.client import RefineClient
from services.routes import classify, collections, embeddings, page, refine, system
from services.settings import Settings

OPEN_PATHS = frozenset({"/health", "/ready"})


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    engine = Engine(settings, metrics)
    index = CollectionManager(settings.index, engine.manifest.name, engine.manifest.embed_dim)
    refiner = RefineClient.from_settings(settings.refine) if settings.refine.urls else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        await run_in_threadpool(index.start)  # opens every collection: snapshot + WAL replay
        try:
            yield
        finally:
            await run_in_threadpool(index.close)  # final snapshots
            await engine.close()
            if refiner is not None:
                await refiner.aclose()

    app = FastAPI(title="HQ-CLIP gateway", version="0.1.0", lifespan=lifespan)
    app.state.settings, app.state.metrics, app.state.engine = settings, metrics, engine
    app.state.readiness = {}
    app.state.collections = index
    app.state.refiner = refiner
    if refiner is not None:
        app.state.readiness["lvlm"] = refiner.ready
    install_error_handlers(app)
    for module in (embeddings, classify, collections, refine, system):
        app.include_router(module.router)
    page.mount(app)

    keys = [key.encode() for key in settings.api_keys]

    @app.middleware("http")
    async def authenticate_and_measure(request: Request, call_next):
        started = time.perf_counter()
        if keys and request.url.path not in OPEN_PATHS and not page.is_public(request.url.path):
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip().encode()
            # compare against every key, in constant time, so timing reveals neither key nor position
            if not any([hmac.compare_digest(given, key) for key in keys]):
                return JSONResponse(
                    error_body("missing or wrong API key: send 'Authorization: Bearer <key>'",
                               "authentication_error", "authorization", 401),
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.requests.labels(path, str(response.status_code)).inc()
        metrics.latency.labels(path).observe(time.perf_counter() - started)
        return response

    return app
