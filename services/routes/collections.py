"""Retrieval collections: create / list / delete them, upsert and delete items, search by text, image, vector or id.

Routes translate HTTP to calls: items are embedded through the engine (the same micro-batcher as /v1/embed),
optionally refined by the LVLM (``app.state.refiner``), and stored by services/index (in worker threads: SQLite
commits and FAISS searches block). A collection's texts and images are embedded by the model that embedded the
collection: the request's engine, or after a reload the previous one while it is retained (services/reload.py).
Each item keeps what it was embedded from, and ``GET .../items`` pages through them for `hqclip reindex`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import numpy as np
from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from hqclip.repo.prompts import DEFAULT_TEMPLATES
from services.access import check_admin
from services.engine import Engine
from services.errors import ApiError, inputs_from
from services.index.collection import (
    AliasConflict,
    Collection,
    CollectionExists,
    CollectionNotFound,
    InvalidInput,
    Item,
)
from services.index.manager import CollectionManager
from services.payloads import check_count, decode_image, engine_of, read_uploads
from services.schemas import (
    AddItemsRequest,
    AliasRequest,
    AliasResponse,
    CollectionInfo,
    CollectionList,
    CreateCollectionRequest,
    DeletedCollection,
    DeleteItemsRequest,
    DeleteItemsResponse,
    ItemMetadata,
    ItemsPage,
    SearchRequest,
    SearchResponse,
    StoredItem,
    UpsertResponse,
)
from services.settings import IndexParams
from services.tagging import add_model_tags

router = APIRouter(tags=["collections"])


# --- helpers ---
def _manager(request: Request) -> CollectionManager:
    return request.app.state.collections


@contextmanager
def _domain_errors(param: str = "collection") -> Iterator[None]:
    """The store's domain errors as HTTP errors; ``param`` names the path field a missing collection came from."""
    try:
        yield
    except CollectionNotFound as exc:
        name = exc.args[0]
        raise ApiError(404, f"no collection '{name}'; create it with POST /v1/collections", param=param,
                       type="not_found_error") from None
    except CollectionExists as exc:
        raise ApiError(409, f"collection '{exc.args[0]}' exists; delete it first or pick another name",
                       param="name") from None
    except AliasConflict as exc:
        raise ApiError(409, str(exc), param=param) from None
    except InvalidInput as exc:
        raise ApiError(400, str(exc), param=exc.field) from None


@contextmanager
def _collection(request: Request, name: str) -> Iterator[Collection]:
    """The collection ``name`` names, held to the end of the block (a deletion meanwhile waits for it)."""
    with _domain_errors(), _manager(request).using(name) as collection:
        yield collection


def _vector(values: list[float], dim: int, param: str) -> np.ndarray:
    if len(values) != dim:
        raise ApiError(400, f"{param} has {len(values)} dimensions; this collection stores {dim}", param=param)
    vector = np.asarray(values, dtype=np.float32)
    if not np.isfinite(vector).all() or not vector.any():
        raise ApiError(400, f"{param} must be finite and not all zeros", param=param)
    return vector


@asynccontextmanager
async def _embedder(request: Request, collection: Collection, param: str) -> AsyncIterator[Engine]:
    """The engine whose vectors live in the collection's space, for everything this request embeds: the request's
    own when it embedded the collection (or the collection has no model yet: it adopts the served one), the
    previous model's while a reload keeps it for this collection; else 409 saying what to do."""
    engine = engine_of(request)
    fingerprint = collection.fingerprint
    if fingerprint is not None and fingerprint != engine.fingerprint:
        async with request.app.state.serving.lease_retained(fingerprint) as previous:
            if previous is not None:
                yield previous
                return
    manifest = engine.manifest
    if manifest.embed_dim != collection.spec.dim:
        raise ApiError(400, f"collection '{collection.name}' stores {collection.spec.dim}-d vectors but model "
                       f"'{manifest.name}' embeds {manifest.embed_dim}-d; give 'vector' instead", param=param)
    if fingerprint is None:
        await run_in_threadpool(collection.adopt, manifest.fingerprint)
    elif fingerprint != manifest.fingerprint:
        raise ApiError(409, f"collection '{collection.name}' was embedded by model '{collection.model}' "
                       f"(fingerprint {fingerprint[:12]}), but this gateway serves '{manifest.name}' "
                       f"(fingerprint {manifest.fingerprint[:12]}): its vectors live in another space. Re-embed "
                       "it with `hqclip reindex` (into a new collection, then an alias flip; docs/reindex.md), "
                       "serve the collection's model, or query with 'vector'", param=param, type="conflict_error")
    yield engine


# --- collections ---
@router.post("/v1/collections", status_code=201)
async def create_collection(body: CreateCollectionRequest, request: Request) -> CollectionInfo:
    manager = _manager(request)
    defaults = request.app.state.settings.index
    unknown = sorted(set(body.index) - set(IndexParams.model_fields))
    if unknown:
        raise ApiError(400, f"index.{unknown[0]} is not an index parameter; known: "
                       f"{', '.join(IndexParams.model_fields)}", param=f"index.{unknown[0]}")
    try:
        params = IndexParams.model_validate({**defaults.model_dump(include=set(IndexParams.model_fields)),
                                             **body.index})
    except ValidationError as exc:
        first = exc.errors()[0]
        param = "index." + ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"{param}: {first['msg']}", param=param) from None
    with _domain_errors():
        collection = await run_in_threadpool(manager.create, body.name, params, body.dim,
                                             engine_of(request).manifest, body.keep_images)
        return CollectionInfo(**await run_in_threadpool(collection.describe))


@router.get("/v1/collections")
async def list_collections(request: Request) -> CollectionList:
    manager = _manager(request)
    described = await run_in_threadpool(lambda: [c.describe() for c in manager.list()])
    return CollectionList(data=[CollectionInfo(**d) for d in described], aliases=manager.aliases())


@router.get("/v1/collections/{collection}")
async def get_collection(collection: str, request: Request) -> CollectionInfo:
    with _collection(request, collection) as target:
        return CollectionInfo(**await run_in_threadpool(target.describe))


@router.delete("/v1/collections/{collection}")
async def delete_collection(collection: str, request: Request) -> DeletedCollection:
    """Delete a collection and its items, or only the alias when ``collection`` is an alias (with an admin key
    when HQCLIP_ADMIN_KEYS is set). A previous model kept for this collection alone is unloaded."""
    manager = _manager(request)
    if collection in manager.aliases():
        check_admin(request, "deleting an alias", required=False)
    with _collection(request, collection):
        pass
    try:
        with _domain_errors():
            await run_in_threadpool(manager.delete, collection)
    except ApiError as exc:
        if exc.status != 404:  # 404: deleted by a concurrent request
            raise
    await request.app.state.serving.release_unused()
    return DeletedCollection(deleted=collection)


@router.post("/v1/collections/{alias}/alias")
async def set_alias(alias: str, body: AliasRequest, request: Request) -> AliasResponse:
    """Point ``alias`` at collection ``target`` in one atomic step: every later request naming the alias goes to
    the new collection (how a re-embedded collection replaces the old one). Creates the alias if it is new. Needs
    an admin key when HQCLIP_ADMIN_KEYS is set."""
    check_admin(request, "pointing an alias", required=False)
    with _domain_errors(param="target"):
        await run_in_threadpool(_manager(request).alias, alias, body.target, body.replace)
    if body.replace:
        await request.app.state.serving.release_unused()
    return AliasResponse(alias=alias, target=body.target)


# --- items ---
async def _refine(request: Request, images: dict[int, bytes], items: list[Item], wanted: bool | None) -> None:
    """Add the LVLM's tags and descriptions of each image to its item's metadata."""
    refiner = getattr(request.app.state, "refiner", None)
    if wanted and refiner is None:
        raise ApiError(400, "refine=true needs an LVLM: set HQCLIP_REFINE__URLS (see docs/refinement.md)",
                       param="refine")
    if wanted is False or refiner is None or not images:
        return
    from services.refine.client import RefineFailed, RefineRejected, RefinerUnavailable

    async def one(i: int, data: bytes):
        try:
            return i, await refiner.refine(data, items[i].caption)
        except RefineRejected as exc:
            raise ApiError(400, f"items[{i}].image: the LVLM refused it: {exc}", param=f"items[{i}].image") from None
        except RefinerUnavailable as exc:
            raise ApiError(503, f"{exc}; or send refine=false", param="refine", type="service_unavailable") from None
        except RefineFailed as exc:
            raise ApiError(502, f"items[{i}]: {exc}; retry, or send refine=false", param=f"items[{i}]",
                           type="upstream_error") from None

    for i, result in await asyncio.gather(*(one(i, data) for i, data in images.items())):
        refined = result.refinement
        item = items[i]
        item.tags = list(dict.fromkeys([*item.tags, *refined.tags]))
        item.attributes = {**item.attributes, "refined": {"desc": refined.desc, "neg_desc": refined.neg_desc,
                                                          "neg_tags": refined.neg_tags, "model": result.model}}


async def _store(request: Request, collection: Collection, items: list[Item], texts: dict[int, str],
                 images: dict[int, bytes], vectors: dict[int, np.ndarray], refine: bool | None,
                 image_name: tuple[str, str] = ("items", "{field}[{i}].image")) -> UpsertResponse:
    """Embed what needs embedding (and refine images), then upsert with each item's source; answered once the
    write is durable."""
    for i, item in enumerate(items):
        item.source = "text" if i in texts else "image" if i in images else "vector"
        item.text, item.image = texts.get(i), images.get(i)
    if not (texts or images):
        await _refine(request, images, items, refine)  # refine=true without an LVLM: 400 all the same
        return await _upsert(collection, items, vectors)
    async with _embedder(request, collection, f"items[{min([*texts, *images])}]") as engine:

        async def run_texts():
            if texts:
                with inputs_from("items", "{field}[{i}].text", list(texts)):
                    embedded = await engine.embed_texts(list(texts.values()))
                vectors.update(zip(texts, embedded.vectors))

        async def run_images():
            if images:
                with inputs_from(*image_name, list(images)):
                    embedded = await engine.embed_images(list(images.values()))
                vectors.update(zip(images, embedded))

        await asyncio.gather(run_texts(), run_images(), _refine(request, images, items, refine))
        if refine is False or getattr(request.app.state, "refiner", None) is None:  # no LVLM tags: the model's
            await add_model_tags(engine, engine.settings.index, items, {i: vectors[i] for i in images})
    return await _upsert(collection, items, vectors)


async def _upsert(collection: Collection, items: list[Item], vectors: dict[int, np.ndarray]) -> UpsertResponse:
    matrix = np.stack([vectors[i] for i in range(len(items))])
    with _domain_errors():
        await run_in_threadpool(collection.upsert, items, matrix)
    count = await run_in_threadpool(lambda: collection.count)
    return UpsertResponse(collection=collection.name, upserted=len(items), ids=[item.id for item in items],
                          count=count)


@router.post("/v1/collections/{collection}/items")
async def add_items(collection: str, body: AddItemsRequest, request: Request) -> UpsertResponse:
    """Upsert items: each embedded from its text or image, or stored with its given vector."""
    engine = engine_of(request)
    check_count(engine, len(body.items), "items")
    with _collection(request, collection) as target:
        texts, images, vectors = {}, {}, {}
        limit = engine.settings.limits.max_image_bytes
        for i, item in enumerate(body.items):
            if item.text is not None:
                texts[i] = item.text
            elif item.image is not None:
                images[i] = decode_image(item.image, f"items[{i}].image", limit)
            else:
                vectors[i] = _vector(item.vector, target.spec.dim, f"items[{i}].vector")
        items = [item.to_item() for item in body.items]
        return await _store(request, target, items, texts, images, vectors, body.refine)


@router.get("/v1/collections/{collection}/items")
async def list_items(
    collection: str,
    request: Request,
    after: str | None = Query(None, description="List the items with ids after this one (the last page's `next`)."),
    limit: int = Query(100, ge=1, le=1000, description="Most items in the page."),
    since: float | None = Query(None, allow_inf_nan=False,
                                description="Only items written after this unix time (a page's `now`)."),
    images: bool = Query(False, description="Include kept image bytes (base64); needs an admin key when "
                         "HQCLIP_ADMIN_KEYS is set."),
) -> ItemsPage:
    """Page through a collection's items in id order, with what each was embedded from (`hqclip reindex`)."""
    if images:
        check_admin(request, "listing image bytes", required=False)
    with _collection(request, collection) as target:
        now = time.time()
        found = await run_in_threadpool(target.items, after, limit, since, images)
    listed = [StoredItem(id=i.id, uri=i.uri, caption=i.caption, tags=i.tags, attributes=i.attributes,
                         source=i.source, text=i.text, updated=i.updated,
                         image=base64.b64encode(i.image).decode() if i.image is not None else None) for i in found]
    return ItemsPage(collection=target.name, fingerprint=target.fingerprint, now=now, items=listed,
                     next=found[-1].id if len(found) == limit else None)


@router.post("/v1/collections/{collection}/items/upload")
async def upload_items(
    collection: str,
    request: Request,
    files: list[UploadFile] = File(...),
    items: str | None = Form(None, description="JSON list of item metadata (id, uri, caption, tags, attributes), "
                             "one per file in order; default: each file's name is its id."),
    refine: bool | None = Form(None),
) -> UpsertResponse:
    """Upsert images sent as multipart uploads (``-F files=@a.jpg -F items='[{"id": "a"}]'``)."""
    engine = engine_of(request)
    with _collection(request, collection):
        pass  # a missing collection answers 404 before the uploads are read
    data = await read_uploads(engine, files)
    if items is None:
        metadata = [{"id": upload.filename or f"upload-{i}"} for i, upload in enumerate(files)]
    else:
        try:
            metadata = json.loads(items)
        except ValueError:
            raise ApiError(400, "items must be a JSON list of objects", param="items") from None
        if not isinstance(metadata, list) or len(metadata) != len(files):
            raise ApiError(400, f"items must be a JSON list with one object per file ({len(files)})", param="items")
    parsed = []
    for i, meta in enumerate(metadata):
        try:
            parsed.append(ItemMetadata.model_validate(meta).to_item())
        except ValidationError as exc:
            first = exc.errors()[0]
            param = f"items[{i}]" + "".join(f".{p}" for p in first["loc"])
            raise ApiError(400, f"{param}: {first['msg']}", param=param) from None
    with _collection(request, collection) as target:
        return await _store(request, target, parsed, {}, dict(enumerate(data)), {}, refine,
                            image_name=("files", "{field}[{i}]"))


@router.delete("/v1/collections/{collection}/items")
async def delete_items(collection: str, body: DeleteItemsRequest, request: Request) -> DeleteItemsResponse:
    with _collection(request, collection) as target:
        deleted = await run_in_threadpool(target.delete, body.ids)
        count = await run_in_threadpool(lambda: target.count)
    gone = set(deleted)
    return DeleteItemsResponse(collection=collection, deleted=deleted,
                               not_found=[i for i in body.ids if i not in gone], count=count)


# --- search ---
async def _query_vector(request: Request, target: Collection, body: SearchRequest) -> np.ndarray:
    if body.vector is not None:
        return _vector(body.vector, target.spec.dim, "vector")
    if body.id is not None:
        try:
            return await run_in_threadpool(target.vector, body.id)
        except KeyError:
            raise ApiError(404, f"no item '{body.id}' in collection '{target.name}'", param="id",
                           type="not_found_error") from None
    if body.text is not None:
        async with _embedder(request, target, "text") as engine:
            if body.templates:
                templates = DEFAULT_TEMPLATES if body.templates is True else tuple(body.templates)
                with inputs_from("text", "{field}"):
                    return (await engine.label_embeddings([body.text], templates))[0]
            with inputs_from("text", "{field}"):
                return (await engine.embed_texts([body.text])).vectors[0]
    async with _embedder(request, target, "image") as engine:
        data = decode_image(body.image, "image", engine.settings.limits.max_image_bytes)
        with inputs_from("image", "{field}"):
            return (await engine.embed_images([data]))[0]


@router.post("/v1/collections/{collection}/search", response_model=SearchResponse)
async def search(collection: str, body: SearchRequest, request: Request) -> Response:
    with _collection(request, collection) as target:
        query = await _query_vector(request, target, body)
        filters = body.filters.to_filters() if body.filters else None
        with _domain_errors():
            results = await run_in_threadpool(target.search, query[None, :], body.top_k, body.offset, filters,
                                              body.id)
    answer = SearchResponse(collection=collection, results=results[0], top_k=body.top_k,
                            offset=body.offset)
    # serialised here, once: FastAPI would validate the model again and walk it with jsonable_encoder (the
    # latency budget of a search is a few hundred microseconds)
    return Response(answer.model_dump_json(), media_type="application/json")
