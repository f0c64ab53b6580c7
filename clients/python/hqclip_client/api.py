"""The gateway's operations, written once as plans (see transport.py) that ``Client`` and ``AsyncClient`` run.

Each public method here is a generator function wrapped by ``operation``: on ``Client`` it returns the result, on
``AsyncClient`` an awaitable of it. Large inputs are split into requests of at most ``max_items`` inputs and about
``max_request_bytes`` of images, sent one after another; an error in a later chunk names the input by its position
in the whole call.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar
from urllib.parse import quote

from hqclip_client import images as imaging
from hqclip_client import vectors as vec
from hqclip_client.errors import APIStatusError
from hqclip_client.images import ImageInput
from hqclip_client.transport import Call, Plan, RetryPolicy, exchange
from hqclip_client.types import (
    AddResult,
    Classification,
    Collection,
    DeleteResult,
    Embeddings,
    ImageTags,
    Item,
    Refinement,
    SearchResult,
)

T = TypeVar("T")
DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_MAX_ITEMS = 256  # the gateway's default HQCLIP_LIMITS__MAX_ITEMS
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024


def operation(plan: Callable[..., Plan[T]]) -> Callable[..., Any]:
    """A plan as a method: ``Client`` runs it to the result, ``AsyncClient`` returns an awaitable."""

    @functools.wraps(plan)
    def method(self: Api, *args: Any, **kwargs: Any) -> Any:
        return self._run(plan(self, *args, **kwargs))

    return method


def chunks(items: Iterable[T], max_items: int, max_bytes: int | None = None,
           size: Callable[[T], int] = len) -> Iterator[list[T]]:
    """Consecutive runs of at most ``max_items`` items and (unless one item alone is larger) ``max_bytes``.
    An empty input gives one empty chunk, so the gateway answers it (with its own error)."""
    chunk: list[T] = []
    used = 0
    for item in items:
        weight = size(item) if max_bytes else 0
        if chunk and (len(chunk) >= max_items or (max_bytes and used + weight > max_bytes)):
            yield chunk
            chunk, used = [], 0
        chunk.append(item)
        used += weight
    yield chunk


_INDEX = re.compile(r"^([A-Za-z_][\w.]*)\[(\d+)\]")


def shift_index(error: APIStatusError, offset: int) -> APIStatusError:
    """An error about ``items[3]`` of a chunk that began at input 256 is about ``items[259]`` of the call."""
    match = _INDEX.match(error.param or "")
    if offset and match:
        local, total = match.group(0), f"{match.group(1)}[{int(match.group(2)) + offset}]"
        error.param = total + error.param[len(local):]
        error.message = error.message.replace(local, total, 1)
        error.args = (error.message,)
    return error


def _as_list(values: Any, single: tuple[type, ...]) -> list:
    if isinstance(values, single):
        return [values]
    if hasattr(values, "ndim") and values.ndim in (2, 3):  # one image array, not a batch of them
        return [values]
    return list(values)


_SINGLE_IMAGE = (str, bytes, bytearray, memoryview, os.PathLike)


def _image_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    if hasattr(images, "save") and hasattr(images, "mode"):  # a PIL image
        return [images]
    return _as_list(images, _SINGLE_IMAGE)


def _b64_size(data: bytes) -> int:
    return (len(data) + 2) // 3 * 4


class Api:
    """Settings and operations shared by ``Client`` and ``AsyncClient``.

    ``base_url`` defaults to HQCLIP_URL or http://127.0.0.1:8000, ``api_key`` to HQCLIP_API_KEY (sent as
    ``Authorization: Bearer``); ``timeout`` is seconds per request; ``max_items`` must not exceed the gateway's
    HQCLIP_LIMITS__MAX_ITEMS (default from HQCLIP_MAX_ITEMS, else 256); ``retry`` says how 429/503 are retried.
    """

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None, timeout: float = 60.0,
                 max_items: int | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 retry: RetryPolicy | None = None, model: str | None = None) -> None:
        self.base_url = (base_url or os.environ.get("HQCLIP_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("HQCLIP_API_KEY") or None
        self.timeout = timeout
        self.max_items = max_items or int(os.environ.get("HQCLIP_MAX_ITEMS", DEFAULT_MAX_ITEMS))
        if self.max_items < 1:
            raise ValueError("max_items must be at least 1")
        self.max_request_bytes = max_request_bytes
        self.retry = retry or RetryPolicy()
        self.model = model

    def _headers(self) -> dict[str, str]:
        headers = {"user-agent": "hqclip-client"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        return headers

    def _run(self, plan: Plan[T]) -> Any:
        raise NotImplementedError

    def _call(self, method: str, path: str, **kwargs: Any) -> Plan[Any]:
        return exchange(Call(method, path, **kwargs), self.retry)

    def _chunked(self, parts: Iterable[list[T]], request: Callable[[list[T]], Call]) -> Plan[list[tuple[int, Any]]]:
        """(offset, answer) of each chunk's request."""
        answers, offset = [], 0
        for part in parts:
            try:
                answers.append((offset, (yield from exchange(request(part), self.retry))))
            except APIStatusError as exc:
                raise shift_index(exc, offset) from None
            offset += len(part)
        return answers

    def _with_model(self, body: dict[str, Any]) -> dict[str, Any]:
        return {**body, "model": self.model} if self.model else body

    def _image_chunks(self, images: ImageInput | Sequence[ImageInput]) -> Iterator[list[tuple[str, bytes]]]:
        """(file name, encoded bytes) of the images, read one at a time, in chunks."""
        encoded = ((imaging.filename(image, i), imaging.to_bytes(image)) for i, image in enumerate(_image_list(images)))
        return chunks(encoded, self.max_items, self.max_request_bytes, lambda pair: _b64_size(pair[1]))

    # --- embeddings ---
    @operation
    def embed_texts(self, texts: str | Sequence[str]) -> Plan[Embeddings]:
        """L2-normalised embeddings of texts, one row each."""
        texts = _as_list(texts, (str,))

        def request(part: list[str]) -> Call:
            return Call("POST", "/v1/embed", json=self._with_model(
                {"inputs": [{"text": t} for t in part], "encoding_format": "base64"}))

        answers = yield from self._chunked(chunks(texts, self.max_items), request)
        return _embeddings([body for _, body in answers])

    @operation
    def embed_images(self, images: ImageInput | Sequence[ImageInput]) -> Plan[Embeddings]:
        """L2-normalised embeddings of images (paths, encoded bytes, PIL images or uint8 arrays), one row each."""

        def request(part: list[tuple[str, bytes]]) -> Call:
            files = [("files", (name, data, imaging.mime(name))) for name, data in part]
            return Call("POST", "/v1/embed/upload", params={"encoding_format": "base64"}, files=files)

        answers = yield from self._chunked(self._image_chunks(images), request)
        return _embeddings([body for _, body in answers])

    # --- classification and tags ---
    @operation
    def classify(self, images: ImageInput | Sequence[ImageInput], labels: Sequence[str], *,
                 templates: Sequence[str] | None = None, top_k: int = 5) -> Plan[list[Classification]]:
        """Zero-shot: for each image, its ``top_k`` labels with softmax scores, best first."""

        def request(part: list[tuple[str, bytes]]) -> Call:
            body = {"images": [imaging.b64(data) for _, data in part], "labels": list(labels), "top_k": top_k}
            if templates is not None:
                body["templates"] = list(templates)
            return Call("POST", "/v1/classify", json=self._with_model(body))

        answers = yield from self._chunked(self._image_chunks(images), request)
        return [Classification.model_validate({**row, "index": row["index"] + offset})
                for offset, body in answers for row in body["data"]]

    @operation
    def tags(self, images: ImageInput | Sequence[ImageInput], *, top_k: int = 10,
             threshold: float = 0.0) -> Plan[list[ImageTags]]:
        """The short-tag head's most probable tags for each image."""

        def request(part: list[tuple[str, bytes]]) -> Call:
            return Call("POST", "/v1/tags", json=self._with_model(
                {"images": [imaging.b64(data) for _, data in part], "top_k": top_k, "threshold": threshold}))

        answers = yield from self._chunked(self._image_chunks(images), request)
        return [ImageTags.model_validate({**row, "index": row["index"] + offset})
                for offset, body in answers for row in body["data"]]

    @operation
    def models(self) -> Plan[list[dict[str, Any]]]:
        """What the gateway serves (``/v1/models``): name, embedding size, context length, tags, backend."""
        body = yield from self._call("GET", "/v1/models")
        return body["data"]

    # --- collections ---
    @operation
    def create_collection(self, name: str, *, dim: int | None = None,
                          index: dict[str, Any] | None = None) -> Plan[Collection]:
        """A new collection; ``index`` overrides the gateway's index defaults, e.g. ``{"kind": "hnsw"}``."""
        body: dict[str, Any] = {"name": name, "index": index or {}}
        if dim is not None:
            body["dim"] = dim
        answer = yield from self._call("POST", "/v1/collections", json=body)
        return Collection.model_validate(answer)

    @operation
    def list_collections(self) -> Plan[list[Collection]]:
        body = yield from self._call("GET", "/v1/collections")
        return [Collection.model_validate(c) for c in body["data"]]

    @operation
    def get_collection(self, name: str) -> Plan[Collection]:
        body = yield from self._call("GET", f"/v1/collections/{quote(name, safe='')}")
        return Collection.model_validate(body)

    @operation
    def delete_collection(self, name: str) -> Plan[None]:
        yield from self._call("DELETE", f"/v1/collections/{quote(name, safe='')}")

    @operation
    def add(self, collection: str, items: Iterable[Item | dict[str, Any]], *,
            refine: bool | None = None) -> Plan[AddResult]:
        """Upsert items (each with an id and one of text, image or vector); answered once stored durably.
        ``refine``: store the LVLM's tags and descriptions of images (default: when the gateway has an LVLM)."""
        parsed = [item if isinstance(item, Item) else Item.model_validate(item) for item in items]

        def wire(item: Item) -> dict[str, Any]:
            body = item.model_dump(exclude={"image", "vector", "text"})
            if item.text is not None:
                body["text"] = item.text
            elif item.image is not None:
                body["image"] = imaging.b64(imaging.to_bytes(item.image))
            else:
                body["vector"] = vec.to_lists(item.vector)[0]
            return body

        def request(part: list[dict[str, Any]]) -> Call:
            body: dict[str, Any] = {"items": part}
            if refine is not None:
                body["refine"] = refine
            return Call("POST", f"/v1/collections/{quote(collection, safe='')}/items", json=body)

        wired = (wire(item) for item in parsed)
        answers = yield from self._chunked(
            chunks(wired, self.max_items, self.max_request_bytes, lambda body: len(body.get("image") or "")), request)
        last = answers[-1][1]
        return AddResult(collection=last["collection"], upserted=sum(b["upserted"] for _, b in answers),
                         ids=[i for _, b in answers for i in b["ids"]], count=last["count"])

    @operation
    def delete(self, collection: str, ids: str | Sequence[str]) -> Plan[DeleteResult]:
        """Delete items by id; ids not in the collection are listed in ``not_found``."""

        def request(part: list[str]) -> Call:
            return Call("DELETE", f"/v1/collections/{quote(collection, safe='')}/items", json={"ids": part})

        answers = yield from self._chunked(chunks(_as_list(ids, (str,)), self.max_items), request)
        return DeleteResult(collection=collection, deleted=[i for _, b in answers for i in b["deleted"]],
                            not_found=[i for _, b in answers for i in b["not_found"]], count=answers[-1][1]["count"])

    @operation
    def search(self, collection: str, text: str | None = None, *, image: ImageInput | None = None,
               vector: Any = None, id: str | None = None, top_k: int = 10, offset: int = 0,
               tags: Sequence[str] | None = None, attributes: dict[str, Any] | None = None,
               templates: bool | Sequence[str] = False) -> Plan[SearchResult]:
        """The ``top_k`` items nearest to one query: a text, an image, a vector, or a stored item's id.
        Filters: items carrying all ``tags``, with every ``attributes`` key equal."""
        body: dict[str, Any] = {"top_k": top_k, "offset": offset}
        if text is not None:
            body["text"] = text
            if templates:
                body["templates"] = templates if templates is True else list(templates)
        if image is not None:
            body["image"] = imaging.b64(imaging.to_bytes(image))
        if vector is not None:
            body["vector"] = vec.to_lists(vector)[0]
        if id is not None:
            body["id"] = id
        if tags or attributes:
            body["filters"] = {"tags": list(tags or []), "attributes": dict(attributes or {})}
        answer = yield from self._call("POST", f"/v1/collections/{quote(collection, safe='')}/search", json=body)
        return SearchResult.model_validate(answer)

    # --- refinement ---
    @operation
    def refine(self, images: ImageInput | Sequence[ImageInput],
               alt_texts: Sequence[str | None] | None = None) -> Plan[list[Refinement]]:
        """The LVLM's descriptions, negative descriptions, tags and negative tags of each image; ``alt_texts``
        (one per image, None for none) are given to the LVLM as a noisy reference. Needs an LVLM on the gateway."""
        images = _image_list(images)
        alts = list(alt_texts) if alt_texts is not None else [None] * len(images)
        if len(alts) != len(images):
            raise ValueError(f"alt_texts: {len(alts)} given for {len(images)} images; give one per image or none")
        numbered = ((i, imaging.to_bytes(image)) for i, image in enumerate(images))

        def request(part: list[tuple[int, bytes]]) -> Call:
            return Call("POST", "/v1/refine", json={"input": [
                {"image": imaging.b64(data), **({"alt_text": alts[i]} if alts[i] is not None else {})}
                for i, data in part]})

        parts = chunks(numbered, self.max_items, self.max_request_bytes, lambda pair: _b64_size(pair[1]))
        answers = yield from self._chunked(parts, request)
        return [Refinement.model_validate({**row, "index": row["index"] + offset, "model": body["model"]})
                for offset, body in answers for row in body["data"]]


def _embeddings(bodies: list[dict[str, Any]]) -> Embeddings:
    parts = [vec.decode([row["embedding"] for row in body["data"]]) for body in bodies]
    return Embeddings(
        vectors=vec.concat(parts),
        truncated=[bool(row.get("truncated", False)) for body in bodies for row in body["data"]],
        model=bodies[-1]["model"],
        prompt_tokens=sum(body.get("usage", {}).get("prompt_tokens", 0) for body in bodies),
    )
