"""The gateway's OpenAPI document, completed where FastAPI cannot say it from the routes alone:

- links: a created collection's name feeds the routes that use it (its items, search, upload, delete), and an
  upsert's ids feed a search by id and a delete, so a schema-driven client or fuzzer (schemathesis: see
  tests/test_openapi_fuzz.py) walks from ``POST /v1/collections`` into the collection instead of guessing names;
- request examples: one valid body per JSON route, the first thing such a tool sends;
- the collection name's pattern (the one ``services.index.manager.check_name`` enforces);
- the documented 503s: every route that runs the model can meet a backend that is down (Triton restarting), the
  refinement routes an LVLM that is not configured or not answering, and ``/ready`` says not ready.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from services.index.collection import NAME

# A 1x1 PNG: the smallest image every image route decodes.
PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGM4IacBAALAAQ/aQIG5AAAAAElFTkSuQmCC"
COLLECTION = "/v1/collections/{collection}"
EXAMPLES = {
    ("/v1/embeddings", "post"): {"input": ["a photo of a yak", "a red apple"]},
    ("/v1/embed", "post"): {"inputs": [{"text": "a photo of a yak"}, {"image": PIXEL}]},
    ("/v1/classify", "post"): {"images": [PIXEL], "labels": ["a yak", "an apple"]},
    ("/v1/tags", "post"): {"images": [PIXEL], "top_k": 5},
    ("/v1/refine", "post"): {"input": {"image": PIXEL, "alt_text": "my photo"}},
    ("/v1/collections", "post"): {"name": "photos"},
    (f"{COLLECTION}/items", "post"): {"items": [{"id": "note", "text": "a yak on a hill", "tags": ["animal"]},
                                                {"id": "pixel", "image": PIXEL, "caption": "one pixel"}]},
    (f"{COLLECTION}/items", "delete"): {"ids": ["note"]},
    (f"{COLLECTION}/search", "post"): {"text": "a yak", "top_k": 5, "filters": {"tags": ["animal"]}},
}
UNAVAILABLE = ("/v1/embeddings", "/v1/embed", "/v1/embed/upload", "/v1/classify", "/v1/tags", "/v1/refine",
               "/v1/refine/upload", f"{COLLECTION}/items", f"{COLLECTION}/items/upload", f"{COLLECTION}/search",
               "/ready")


def install(app: FastAPI) -> None:
    """Make ``app.openapi()`` (what ``/openapi.json`` serves) return the completed document."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            complete(generate())  # FastAPI caches its document in app.openapi_schema; completed once, in place
        return app.openapi_schema

    app.openapi = openapi


def complete(document: dict[str, Any]) -> None:
    paths = document["paths"]

    def operation(path: str, method: str) -> dict[str, Any]:
        return paths[path][method]

    def link(path: str, method: str, **how: Any) -> dict[str, Any]:
        return {"operationId": operation(path, method)["operationId"], **how}

    from_created = {"collection": "$response.body#/name"}
    operation("/v1/collections", "post")["responses"]["201"]["links"] = {
        "GetCollection": link(COLLECTION, "get", parameters=from_created),
        "AddItems": link(f"{COLLECTION}/items", "post", parameters=from_created),
        "UploadItems": link(f"{COLLECTION}/items/upload", "post", parameters=from_created),
        "Search": link(f"{COLLECTION}/search", "post", parameters=from_created),
        "DeleteCollection": link(COLLECTION, "delete", parameters=from_created),
    }
    same = {"collection": "$request.path.collection"}
    operation(f"{COLLECTION}/items", "post")["responses"]["200"]["links"] = {
        "SearchLikeTheFirst": link(f"{COLLECTION}/search", "post", parameters=same,
                                   requestBody={"id": "$response.body#/ids/0"}),
        "DeleteThem": link(f"{COLLECTION}/items", "delete", parameters=same,
                           requestBody={"ids": "$response.body#/ids"}),
    }
    for (path, method), example in EXAMPLES.items():
        operation(path, method)["requestBody"]["content"]["application/json"]["example"] = example
    body = operation("/v1/collections", "post")["requestBody"]["content"]["application/json"]["schema"]
    created = document["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]]
    created["properties"]["name"]["pattern"] = NAME.pattern
    for path in UNAVAILABLE:
        for op in paths[path].values():
            op["responses"]["503"] = {
                "description": "Not available now: the inference backend is down, or (refinement) no LVLM is "
                "configured or answering; the error says which. Retry after Retry-After seconds.",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
