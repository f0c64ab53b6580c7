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
from services.errors import install_error_handlers
from services.index.manager import CollectionManager
from services.metrics import Metrics
from services.openapi import install as complete_openapi
from services.refine.client import RefineClient
from services.reload import LeaseMiddleware, Serving
from services.routes import admin, classify, collections, embeddings, page, refine, system
from services.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    index = CollectionManager(settings.index)
    serving = Serving(settings, metrics, in_use=index.fingerprints)  # the engine, swapped by a reload
    refiner = RefineClient.from_settings(settings.refine) if settings.refine.urls else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await serving.start()
        await run_in_threadpool(index.start)  # opens every collection: snapshot + WAL replay
        try:
            yield
        finally:
            await run_in_threadpool(index.close)  # final snapshots
            await serving.close()
            if refiner is not None:
                await refiner.aclose()

    app = FastAPI(title="HQ-CLIP gateway", version="0.1.0", lifespan=lifespan)
    app.state.settings, app.state.metrics, app.state.serving = settings, metrics, serving
    app.state.readiness = {}
    app.state.collections = index
    app.state.refiner = refiner
    if refiner is not None:
        app.state.readiness["lvlm"] = refiner.ready
    install_error_handlers(app)
    for module in (embeddings, classify, collections, refine, system, admin):
        app.include_router(module.router)
    page.mount(app)
    complete_openapi(app)

    app.add_middleware(LeaseMiddleware, serving=serving)  # inside the access check: each request's engine
    keys = [*settings.api_keys, *settings.admin_keys] if settings.api_keys else []  # admin keys pass where API keys do
    app.add_middleware(AccessMiddleware, keys=keys, metrics=metrics)
    return app
