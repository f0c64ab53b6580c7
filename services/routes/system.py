"""What is loaded, liveness, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.backends.base import BackendUnavailable
from services.payloads import engine_of

router = APIRouter(tags=["system"])


@router.get("/v1/models")
async def models(request: Request) -> dict:
    """OpenAI's list shape, with the manifest's facts under each model."""
    engine = engine_of(request)
    manifest = engine.manifest
    card = {
        "id": manifest.name,
        "object": "model",
        "owned_by": "hqclip",
        "created": 0,
        "architecture": manifest.architecture,
        "weights": manifest.weights,
        "description": manifest.description,
        "embed_dim": manifest.embed_dim,
        "image_size": list(manifest.image.size),
        "context_length": manifest.text.tokenizer.context_length,
        "logit_scale": manifest.logit_scale,
        "precision": engine.backend.precision,
        "precisions": [manifest.precision, *manifest.variants],
        "tags": len(manifest.tags.vocabulary) if manifest.tags else 0,
        "fingerprint": engine.fingerprint,
        "backend": engine.backend.name,
        "selection": engine.backend.choice,  # which precision and runtime serve each tower, and why
        "limits": engine.settings.limits.model_dump(),
    }
    return {"object": "list", "data": [card]}


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Ready when a real inference on a tiny input succeeds; each optional component reports on its own."""
    engine = engine_of(request)
    checks: dict[str, object] = {"fingerprint": engine.fingerprint,
                                 "retained": request.app.state.serving.retained}  # kept for old collections
    try:
        checks["model"] = await engine.ready()
    except BackendUnavailable as exc:
        checks["model"] = False
        checks["model_error"] = str(exc)
    for name, probe in request.app.state.readiness.items():
        checks[name] = await probe()
    status = 200 if checks["model"] else 503
    return JSONResponse({"ready": bool(checks["model"]), **checks}, status_code=status)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
