"""`POST /v1/refine`: the LVLM's four texts (desc, neg_desc, tags, neg_tags) for one image or a batch.

JSON (base64 / data URIs with optional alt texts) or multipart uploads on ``/v1/refine/upload``. The refiner is
``app.state.refiner`` (a services.refine.client.RefineClient), None when no LVLM is configured: then, and when no
server answers, the answer is 503 with what to configure; the embedding endpoints are not affected.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, File, Form, Request, UploadFile

from services.errors import ApiError
from services.payloads import check_count, decode_image, engine_of, read_uploads
from services.refine.client import RefineClient, RefineFailed, RefineRejected, RefinerUnavailable
from services.refine.prompt import image_mime
from services.schemas import RefinementData, RefineRequest, RefineResponse

router = APIRouter(tags=["refine"])

NOT_CONFIGURED = ("no LVLM configured for refinement: set HQCLIP_REFINE__URLS to the URLs of OpenAI-compatible "
                  "vision-language servers (e.g. `vllm serve Qwen/Qwen2-VL-7B-Instruct` at http://HOST:8000/v1; "
                  "see docs/refinement.md)")


def refiner_of(request: Request) -> RefineClient:
    refiner = getattr(request.app.state, "refiner", None)
    if refiner is None:
        raise ApiError(503, NOT_CONFIGURED, type="service_unavailable")
    return refiner


async def _refine_all(refiner: RefineClient, images: list[bytes], alt_texts: list[str | None],
                      param: str) -> RefineResponse:
    started = time.perf_counter()
    for i, image in enumerate(images):
        try:
            image_mime(image)
        except ValueError as exc:
            raise ApiError(400, f"{param}[{i}]: {exc}", param=f"{param}[{i}]") from None

    async def one(i: int):
        try:
            return await refiner.refine(images[i], alt_texts[i])
        except RefinerUnavailable as exc:
            raise ApiError(503, str(exc), type="service_unavailable", headers={"Retry-After": "5"}) from None
        except RefineRejected as exc:
            raise ApiError(400, f"{param}[{i}]: {exc}", param=f"{param}[{i}]") from None
        except RefineFailed as exc:
            raise ApiError(502, f"{param}[{i}]: {exc}; retry the request", param=f"{param}[{i}]",
                           type="upstream_error") from None

    tasks = [asyncio.ensure_future(one(i)) for i in range(len(images))]
    try:
        results = await asyncio.gather(*tasks)
    except BaseException:  # one failed (or the client left): the others' answers would go nowhere
        for task in tasks:
            task.cancel()
        raise
    data = [RefinementData(index=i, latency_ms=round(r.latency_ms, 1), **r.refinement.model_dump())
            for i, r in enumerate(results)]
    return RefineResponse(data=data, model=results[0].model,
                          latency_ms=round((time.perf_counter() - started) * 1000, 1))


@router.post("/v1/refine", response_model=RefineResponse)
async def refine(body: RefineRequest, request: Request) -> RefineResponse:
    refiner = refiner_of(request)
    engine = engine_of(request)
    inputs = body.input if isinstance(body.input, list) else [body.input]
    check_count(engine, len(inputs), "input")
    limit = engine.settings.limits.max_image_bytes
    images = [decode_image(item.image, f"input[{i}].image", limit) for i, item in enumerate(inputs)]
    return await _refine_all(refiner, images, [item.alt_text for item in inputs], "input")


@router.post("/v1/refine/upload", response_model=RefineResponse)
async def refine_upload(
    request: Request,
    files: list[UploadFile] = File(...),
    alt_text: list[str] | None = Form(None, description="Alt texts, one per file in order (repeat the field)."),
) -> RefineResponse:
    """Images as multipart uploads (``-F files=@photo.jpg -F alt_text='a dog'``)."""
    refiner = refiner_of(request)
    alt_texts = list(alt_text or [])
    if alt_texts and len(alt_texts) != len(files):
        raise ApiError(400, f"alt_text: {len(alt_texts)} given for {len(files)} files; give one per file or none",
                       param="alt_text")
    images = await read_uploads(engine_of(request), files)
    return await _refine_all(refiner, images, alt_texts or [None] * len(files), "files")
