"""Turning request payloads into model inputs and embeddings into response payloads, for every route."""

from __future__ import annotations

import base64
import binascii

import numpy as np
from fastapi import Request, UploadFile

from services.engine import Engine
from services.errors import ApiError


def engine_of(request: Request) -> Engine:
    """The engine this request leased at its start (services/reload.py): one model for the whole request."""
    return request.state.engine


def check_model(engine: Engine, model: str | None, param: str = "model") -> str:
    """The served model's name; 404 when the request names another."""
    name = engine.manifest.name
    if model is not None and model != name:
        raise ApiError(404, f"model '{model}' is not served here; this gateway serves '{name}'", param=param,
                       type="not_found_error")
    return name


def check_count(engine: Engine, count: int, param: str) -> None:
    limit = engine.settings.limits.max_items
    if count == 0:
        raise ApiError(400, f"{param} is empty: give at least one item", param=param)
    if count > limit:
        raise ApiError(400, f"{param} has {count} items, more than the limit of {limit}; split the request",
                       param=param)


def decode_image(value: str, param: str, max_bytes: int) -> bytes:
    """Bytes of an image given as base64 or as a data URI (``data:image/png;base64,...``)."""
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if ";base64" not in header:
            raise ApiError(400, f"{param}: a data URI must be base64-encoded", param=param)
    if len(value) * 3 // 4 > max_bytes:
        raise ApiError(413, f"{param}: the image is larger than the limit of {max_bytes} bytes", param=param)
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{param}: not valid base64 (give base64 or a data URI)", param=param) from None
    if not data:
        raise ApiError(400, f"{param}: the image is empty", param=param)
    return data


def decode_images(engine: Engine, values: list[str], param: str) -> list[bytes]:
    check_count(engine, len(values), param)
    limit = engine.settings.limits.max_image_bytes
    return [decode_image(value, f"{param}[{i}]", limit) for i, value in enumerate(values)]


async def read_uploads(engine: Engine, files: list[UploadFile], param: str = "files") -> list[bytes]:
    """Bytes of uploaded files, refusing any over the size limit before reading it all."""
    check_count(engine, len(files), param)
    limit = engine.settings.limits.max_image_bytes
    out = []
    for i, upload in enumerate(files):
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise ApiError(413, f"{param}[{i}] is larger than the limit of {limit} bytes", param=f"{param}[{i}]")
        out.append(data)
    return out


def encode_embedding(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """As OpenAI does: a list of floats, or base64 of little-endian float32."""
    vector = np.asarray(vector, dtype="<f4")
    if encoding_format == "base64":
        return base64.b64encode(vector.tobytes()).decode("ascii")
    return vector.tolist()
