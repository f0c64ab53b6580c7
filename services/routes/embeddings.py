"""Embeddings: OpenAI-compatible `/v1/embeddings`, native mixed `/v1/embed`, and image uploads."""

from __future__ import annotations

import asyncio

import numpy as np
from fastapi import APIRouter, File, Request, UploadFile

from services.engine import TextEmbeddings
from services.errors import ApiError, inputs_from
from services.payloads import (
    check_count,
    check_model,
    decode_image,
    decode_images,
    encode_embedding,
    engine_of,
    read_uploads,
)
from services.schemas import (
    EmbedData,
    EmbeddingData,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbedRequest,
    EmbedResponse,
    Usage,
)

router = APIRouter(tags=["embeddings"])


@router.post("/v1/embeddings", response_model=EmbeddingsResponse)
async def embeddings(body: EmbeddingsRequest, request: Request) -> EmbeddingsResponse:
    engine = engine_of(request)
    name = check_model(engine, body.model)
    if body.dimensions is not None and body.dimensions != engine.manifest.embed_dim:
        raise ApiError(400, f"dimensions must be {engine.manifest.embed_dim} for '{name}'", param="dimensions")
    inputs = [body.input] if isinstance(body.input, str) else body.input
    check_count(engine, len(inputs), "input")
    with inputs_from("input"):
        if body.modality == "image":
            vectors = await engine.embed_images(decode_images(engine, inputs, "input"))
            truncated, tokens = [False] * len(inputs), 0
        else:
            texts = await engine.embed_texts(inputs)
            vectors, truncated, tokens = texts.vectors, texts.truncated, texts.tokens
    data = [
        EmbeddingData(index=i, embedding=encode_embedding(v, body.encoding_format), truncated=t)
        for i, (v, t) in enumerate(zip(vectors, truncated))
    ]
    return EmbeddingsResponse(data=data, model=name, usage=Usage(prompt_tokens=tokens, total_tokens=tokens))


@router.post("/v1/embed", response_model=EmbedResponse)
async def embed(body: EmbedRequest, request: Request) -> EmbedResponse:
    """A mixed batch of texts and images, embedded into one space, answered in the order given."""
    engine = engine_of(request)
    name = check_model(engine, body.model)
    check_count(engine, len(body.inputs), "inputs")
    text_at = [i for i, item in enumerate(body.inputs) if item.text is not None]
    image_at = [i for i, item in enumerate(body.inputs) if item.image is not None]
    texts = [body.inputs[i].text for i in text_at]
    limit = engine.settings.limits.max_image_bytes
    images = [decode_image(body.inputs[i].image, f"inputs[{i}].image", limit) for i in image_at]

    async def run_texts() -> TextEmbeddings:
        with inputs_from("inputs", at=text_at):
            return await engine.embed_texts(texts) if texts else TextEmbeddings(np.empty((0, 0)), [], 0)

    async def run_images() -> np.ndarray | list:
        with inputs_from("inputs", at=image_at):
            return await engine.embed_images(images) if images else []

    embedded, image_vectors = await asyncio.gather(run_texts(), run_images())
    data: list[EmbedData | None] = [None] * len(body.inputs)
    for i, vector, cut in zip(text_at, embedded.vectors, embedded.truncated):
        data[i] = EmbedData(index=i, modality="text", embedding=encode_embedding(vector, body.encoding_format),
                            truncated=cut)
    for i, vector in zip(image_at, image_vectors):
        data[i] = EmbedData(index=i, modality="image", embedding=encode_embedding(vector, body.encoding_format))
    usage = Usage(prompt_tokens=embedded.tokens, total_tokens=embedded.tokens)
    return EmbedResponse(data=data, model=name, usage=usage)


@router.post("/v1/embed/upload", response_model=EmbedResponse)
async def embed_upload(request: Request, files: list[UploadFile] = File(...), encoding_format: str = "float"):
    """Images as multipart file uploads (``-F files=@photo.jpg``)."""
    engine = engine_of(request)
    if encoding_format not in ("float", "base64"):
        raise ApiError(400, "encoding_format must be 'float' or 'base64'", param="encoding_format")
    with inputs_from("files"):
        vectors = await engine.embed_images(await read_uploads(engine, files))
    data = [EmbedData(index=i, modality="image", embedding=encode_embedding(v, encoding_format))
            for i, v in enumerate(vectors)]
    return EmbedResponse(data=data, model=engine.manifest.name, usage=Usage(prompt_tokens=0, total_tokens=0))
