"""Zero-shot classification and short tags."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Request

from hqclip.repo.prompts import DEFAULT_TEMPLATES
from services.errors import ApiError, inputs_from
from services.payloads import check_model, decode_images, engine_of
from services.schemas import (
    Classification,
    ClassifyRequest,
    ClassifyResponse,
    ImageTags,
    LabelScore,
    TagScore,
    TagsRequest,
    TagsResponse,
)

router = APIRouter(tags=["classification"])


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _templates(given: list[str] | None) -> tuple[str, ...]:
    if given is None:
        return DEFAULT_TEMPLATES
    if not given:
        raise ApiError(400, "templates is empty: give at least one, or leave it out for the default ensemble",
                       param="templates")
    for i, template in enumerate(given):
        if template.count("{}") != 1:
            raise ApiError(400, f"templates[{i}] must contain '{{}}' exactly once, where the label goes",
                           param=f"templates[{i}]")
    return tuple(given)


@router.post("/v1/classify", response_model=ClassifyResponse)
async def classify(body: ClassifyRequest, request: Request) -> ClassifyResponse:
    """Softmax over the model's learned logit scale times cosine similarity, top-k labels per image."""
    engine = engine_of(request)
    name = check_model(engine, body.model)
    labels = list(dict.fromkeys(label.strip() for label in body.labels))
    if not labels or any(not label for label in labels):
        raise ApiError(400, "labels must be a non-empty list of non-empty names", param="labels")
    if len(labels) > engine.settings.limits.max_labels:
        raise ApiError(400, f"labels has {len(labels)} names, more than {engine.settings.limits.max_labels}",
                       param="labels")
    templates = _templates(body.templates)
    with inputs_from("images"):
        images = await engine.embed_images(decode_images(engine, body.images, "images"))
    with inputs_from("labels"):
        probabilities = _softmax(engine.logits(images, await engine.label_embeddings(labels, templates)))
    top_k = min(body.top_k, len(labels))
    data = []
    for i, row in enumerate(probabilities):
        order = np.argsort(-row)[:top_k]
        data.append(Classification(index=i, labels=[LabelScore(label=labels[j], score=float(row[j])) for j in order]))
    return ClassifyResponse(data=data, model=name)


@router.post("/v1/tags", response_model=TagsResponse)
async def tags(body: TagsRequest, request: Request) -> TagsResponse:
    """The short-tag head's most probable tags for each image (a head trained with HQ-CLIP's STC loss)."""
    engine = engine_of(request)
    name = check_model(engine, body.model)
    images = decode_images(engine, body.images, "images")
    with inputs_from("images"):
        probabilities = await engine.tag_probabilities(await engine.embed_images(images))
    vocabulary = engine.manifest.tags.vocabulary
    data = []
    for i, row in enumerate(probabilities):
        order = [j for j in np.argsort(-row)[: body.top_k] if row[j] >= body.threshold]
        data.append(ImageTags(index=i, tags=[TagScore(tag=vocabulary[j], probability=float(row[j])) for j in order]))
    return TagsResponse(data=data, model=name)
