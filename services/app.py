"""The app factory: wires settings, engine, routes, auth, errors and metrics. No model logic lives here.

Optional components (retrieval, refinement) hang off ``app.state`` and are started and stopped in ``lifespan``;
one that has its own readiness adds an async probe to ``app.state.readiness`` (name -> coroutine function), and
``/ready`` reports it beside the model.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from services.access import AccessMiddleware
from services.engine import Engine
from services.errors import install_error_handlers
from services.index.manager import CollectionManager
from services.metrics import Metrics
from services.refine.client import RefineClient
from services.routes import classify, collections, embeddings, page, refine, system
from services.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    engine = Engine(settings, metrics)
    index = CollectionManager(settings.index, engine.manifest.name, engine.manifest.embed_dim,
                              engine.manifest.fingerprint)
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

    app.add_middleware(AccessMiddleware, keys=settings.api_keys, metrics=metrics)
    return app
