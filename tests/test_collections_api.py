"""Collections over HTTP, through a real gateway on the tiny model: lifecycle, ingestion by image, upload, text and
vector, search by text, image, vector and id with filters and paging, clear 4xx errors, a graceful restart,
aliases and the embedding model's fingerprint. Every test runs once per backend (``index_backend``: FAISS,
milvus-lite, a real Milvus standalone server): the API must not change with it."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from testkit.gateway import error, ok
from testkit.photos import b64, data_uri, jpeg

pytestmark = pytest.mark.slow

PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "camera")


@pytest.fixture(scope="module")
def gw(gateway_factory, index_backend):
    _, fresh = index_backend
    return gateway_factory(**fresh())


@pytest.fixture(scope="module")
def dim(gw) -> int:
    return httpx.get(f"{gw.url}/v1/models").json()["data"][0]["embed_dim"]


def call(gw, method: str, path: str, body=None, **kwargs) -> httpx.Response:
    return httpx.request(method, f"{gw.url}{path}", json=body, timeout=120, **kwargs)


def create(gw, name: str, **body) -> dict:
    return ok(call(gw, "POST", "/v1/collections", {"name": name, **body}))


def embed(gw, inputs: list[dict]) -> np.ndarray:
    data = ok(call(gw, "POST", "/v1/embed", {"inputs": inputs}))["data"]
    return np.array([row["embedding"] for row in data], dtype=np.float32)


def search(gw, name: str, **body) -> list[dict]:
    return ok(call(gw, "POST", f"/v1/collections/{name}/search", body))["results"]


def test_collection_lifecycle(gw, dim):
    made = create(gw, "life", index={"kind": "hnsw", "ef_search": 64})
    assert (made["name"], made["kind"], made["dim"], made["count"], made["model"]) == ("life", "hnsw", dim, 0, "tiny")
    assert made["spec"]["ef_search"] == 64
    error(call(gw, "POST", "/v1/collections", {"name": "life"}), 409, "name")
    error(call(gw, "POST", "/v1/collections", {"name": "../etc"}), 400, "name")
    error(call(gw, "POST", "/v1/collections", {"name": "x", "index": {"kind": "lsh"}}), 400, "index.kind")
    error(call(gw, "POST", "/v1/collections", {"name": "x", "index": {"nlist": 0}}), 400, "index.nlist")
    error(call(gw, "POST", "/v1/collections", {"name": "x", "index": {"colour": 1}}), 400, "index.colour")
    assert "life" in [c["name"] for c in ok(call(gw, "GET", "/v1/collections"))["data"]]
    assert ok(call(gw, "GET", "/v1/collections/life"))["kind"] == "hnsw"
    assert ok(call(gw, "DELETE", "/v1/collections/life")) == {"deleted": "life"}
    error(call(gw, "GET", "/v1/collections/life"), 404, "collection")
    error(call(gw, "DELETE", "/v1/collections/life"), 404, "collection")


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_images_and_texts_are_embedded_like_v1_embed(gw, kind):
    name = f"photos-{kind}"
    create(gw, name, index={"kind": kind})
    photos = {n: jpeg(n) for n in PHOTO_NAMES}
    items = [{"id": n, "image": data_uri(data) if i % 2 else b64(data), "tags": ["photo"], "uri": f"skimage:{n}"}
             for i, (n, data) in enumerate(photos.items())]
    items.append({"id": "note", "text": "an astronaut in a white suit", "tags": ["text"]})
    stored = ok(call(gw, "POST", f"/v1/collections/{name}/items", {"items": items}))
    assert stored["upserted"] == len(items) and stored["count"] == len(items)

    references = embed(gw, [{"image": b64(d)} for d in photos.values()] + [{"text": items[-1]["text"]}])
    for (item_id, reference) in zip([*photos, "note"], references):
        hits = search(gw, name, vector=reference.tolist(), top_k=3)
        assert hits[0]["id"] == item_id and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    by_image = search(gw, name, image=b64(photos["coffee"]), top_k=1)[0]
    assert (by_image["id"], by_image["uri"], by_image["tags"]) == ("coffee", "skimage:coffee", ["photo"])
    by_text = search(gw, name, text="an astronaut in a white suit", top_k=1)[0]
    assert by_text["id"] == "note" and by_text["score"] == pytest.approx(1.0, abs=1e-4)


def test_text_search_through_prompt_templates(gw):
    create(gw, "prompts")
    ok(call(gw, "POST", "/v1/collections/prompts/items",
            {"items": [{"id": n, "image": b64(jpeg(n))} for n in PHOTO_NAMES]}))
    plain = search(gw, "prompts", text="a photo of a rocket.", top_k=6)
    templated = search(gw, "prompts", text="rocket", templates=["a photo of a {}."], top_k=6)
    assert [h["id"] for h in templated] == [h["id"] for h in plain]
    assert [h["score"] for h in templated] == pytest.approx([h["score"] for h in plain], abs=1e-5)
    ensemble = search(gw, "prompts", text="rocket", templates=True, top_k=6)
    assert len(ensemble) == 6 and [h["score"] for h in ensemble] != [h["score"] for h in plain]


def test_multipart_upload(gw):
    create(gw, "uploads")
    files = [("files", (f"{n}.jpg", jpeg(n), "image/jpeg")) for n in ("rocket", "chelsea")]
    stored = ok(httpx.post(f"{gw.url}/v1/collections/uploads/items/upload", files=files,
                           data={"items": '[{"id": "r", "tags": ["space"]}, {"id": "c", "caption": "a cat"}]'},
                           timeout=120))
    assert stored["ids"] == ["r", "c"]
    hit = search(gw, "uploads", image=b64(jpeg("chelsea")), top_k=1)[0]
    assert (hit["id"], hit["caption"]) == ("c", "a cat")
    named = ok(httpx.post(f"{gw.url}/v1/collections/uploads/items/upload", files=files[:1], timeout=120))
    assert named["ids"] == ["rocket.jpg"]
    bad = httpx.post(f"{gw.url}/v1/collections/uploads/items/upload", files=files,
                     data={"items": '[{"id": "only one"}]'}, timeout=120)
    error(bad, 400, "items")
    broken = [files[0], ("files", ("broken.jpg", b"not an image", "image/jpeg"))]
    error(httpx.post(f"{gw.url}/v1/collections/uploads/items/upload", files=broken, timeout=120), 400, "files[1]")


def test_vectors_filters_paging_and_search_by_id(gw, dim):
    create(gw, "vectors", index={"kind": "flat"})
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(60, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    items = [{"id": f"v{i}", "vector": v.tolist(), "tags": ["even" if i % 2 == 0 else "odd"],
              "attributes": {"group": i % 3, "source": "synthetic"}} for i, v in enumerate(vectors)]
    ok(call(gw, "POST", "/v1/collections/vectors/items", {"items": items}))
    query = vectors[0] + 0.5 * vectors[1]
    order = [f"v{i}" for i in np.argsort(-(vectors @ (query / np.linalg.norm(query))), kind="stable")]

    pages = [search(gw, "vectors", vector=query.tolist(), top_k=7, offset=o) for o in (0, 7, 14)]
    assert [h["id"] for page in pages for h in page] == order[:21]
    filtered = search(gw, "vectors", vector=query.tolist(), top_k=50,
                      filters={"tags": ["odd"], "attributes": {"group": 1}})
    expected = [i for i in order if int(i[1:]) % 2 == 1 and int(i[1:]) % 3 == 1]
    assert [h["id"] for h in filtered] == expected
    assert all(h["attributes"] == {"group": 1, "source": "synthetic"} for h in filtered)
    assert search(gw, "vectors", vector=query.tolist(), filters={"attributes": {"group": "1"}}) == []

    like_v5 = search(gw, "vectors", id="v5", top_k=5)
    own_order = [f"v{i}" for i in np.argsort(-(vectors @ vectors[5]), kind="stable") if i != 5]
    assert [h["id"] for h in like_v5] == own_order[:5]

    gone = ok(call(gw, "DELETE", "/v1/collections/vectors/items", {"ids": ["v0", "v1", "nope"]}))
    assert (gone["deleted"], gone["not_found"], gone["count"]) == (["v0", "v1"], ["nope"], 58)
    assert {"v0", "v1"}.isdisjoint(h["id"] for h in search(gw, "vectors", vector=query.tolist(), top_k=58))
    replaced = {"id": "v2", "vector": (-vectors[2]).tolist(), "caption": "flipped"}
    assert ok(call(gw, "POST", "/v1/collections/vectors/items", {"items": [replaced]}))["count"] == 58
    hit = search(gw, "vectors", vector=(-vectors[2]).tolist(), top_k=1)[0]
    assert (hit["id"], hit["caption"], hit["tags"]) == ("v2", "flipped", [])


def test_bad_requests_name_the_field_and_keep_the_data(gw, dim):
    create(gw, "strict")
    good = {"id": "a", "vector": [1.0] + [0.0] * (dim - 1)}
    ok(call(gw, "POST", "/v1/collections/strict/items", {"items": [good]}))
    short = {"id": "b", "vector": [1.0, 0.0]}
    cases = [
        (("POST", "/v1/collections/nope/items", {"items": [good]}), 404, "collection"),
        (("POST", "/v1/collections/nope/search", {"text": "x"}), 404, "collection"),
        (("POST", "/v1/collections/strict/items", {"items": [good, short]}), 400, "items[1].vector"),
        (("POST", "/v1/collections/strict/items", {"items": [good, {**good, "vector": [0.0] * dim}]}), 400,
         "items[1].vector"),
        (("POST", "/v1/collections/strict/items", {"items": [good, good]}), 400, "items"),
        (("POST", "/v1/collections/strict/items", {"items": [{"id": "c", "image": "not base64!!"}]}), 400,
         "items[0].image"),
        (("POST", "/v1/collections/strict/items",
          {"items": [{"id": "t", "text": "fine"}, {"id": "c", "image": b64(b"plain text")}]}), 400, "items[1].image"),
        (("POST", "/v1/collections/strict/items", {"items": [{"id": "t", "text": "x" * 30_000}]}), 400,
         "items[0].text"),
        (("POST", "/v1/collections/strict/items", {"items": []}), 400, "items"),
        (("POST", "/v1/collections/strict/items", {"items": [{"id": "c"}]}), 422, "items.0"),
        (("POST", "/v1/collections/strict/items", {"items": [good], "refine": True}), 400, "refine"),
        (("POST", "/v1/collections/strict/search", {"vector": [1.0, 0.0]}), 400, "vector"),
        (("POST", "/v1/collections/strict/search", {"id": "missing"}), 404, "id"),
        (("POST", "/v1/collections/strict/search", {"text": "x", "id": "a"}), 422, "body"),
        (("POST", "/v1/collections/strict/search", {"id": "a", "templates": True}), 422, "body"),
        (("POST", "/v1/collections/strict/search", {"text": "x", "top_k": 0}), 422, "top_k"),
        (("POST", "/v1/collections/strict/search", {"text": "x", "filters": {"attributes": {"a": [1]}}}), 422,
         "filters.attributes.a.str"),
        (("DELETE", "/v1/collections/strict/items", {"ids": []}), 422, "ids"),
    ]
    for (method, path, body), status, param in cases:
        response = call(gw, method, path, body)
        assert response.status_code == status, (body, response.text)
        assert response.json()["error"]["param"].startswith(param), (body, response.json())
    assert ok(call(gw, "GET", "/v1/collections/strict"))["count"] == 1
    assert search(gw, "strict", id="a") == [] and search(gw, "strict", vector=good["vector"])[0]["id"] == "a"


def test_other_dimension_takes_vectors_only(gw, dim):
    create(gw, "wide", dim=dim * 2)
    error(call(gw, "POST", "/v1/collections/wide/items", {"items": [{"id": "t", "text": "hello"}]}), 400, "items[0]")
    error(call(gw, "POST", "/v1/collections/wide/search", {"text": "hello"}), 400, "text")
    ok(call(gw, "POST", "/v1/collections/wide/items", {"items": [{"id": "v", "vector": [0.5] * (dim * 2)}]}))
    assert search(gw, "wide", vector=[0.5] * (dim * 2))[0]["id"] == "v"


def test_graceful_restart_keeps_everything(gateway_factory, index_backend, dim):
    backend, fresh = index_backend
    env = fresh()
    first = gateway_factory(**env, HQCLIP_INDEX__SNAPSHOT_INTERVAL_S="3600")
    create(first, "kept", index={"kind": "hnsw"})
    create(first, "spare")
    ok(call(first, "POST", "/v1/collections/current/alias", {"target": "kept"}))
    vectors = np.random.default_rng(1).normal(size=(20, dim))
    ok(call(first, "POST", "/v1/collections/kept/items",
            {"items": [{"id": f"k{i}", "vector": v.tolist(), "tags": [f"t{i % 2}"]} for i, v in enumerate(vectors)]}))
    ok(call(first, "DELETE", "/v1/collections/kept/items", {"ids": ["k3"]}))
    before = [search(first, "kept", vector=v.tolist(), top_k=5, filters={"tags": ["t1"]}) for v in vectors]
    if backend == "faiss":
        assert ok(call(first, "GET", "/v1/collections/kept"))["wal_pending"] > 0
    first.stop()  # SIGTERM: the final snapshot covers the whole WAL

    second = gateway_factory(**env)
    described = ok(call(second, "GET", "/v1/collections/kept"))
    assert (described["count"], described["wal_pending"], described["kind"]) == (19, 0, "hnsw")
    after = [search(second, "kept", vector=v.tolist(), top_k=5, filters={"tags": ["t1"]}) for v in vectors]
    assert without_scores(after) == without_scores(before)  # Milvus may index the vectors anew: scores within 1e-5
    assert [h["score"] for r in after for h in r] == pytest.approx([h["score"] for r in before for h in r], abs=1e-5)
    assert ok(call(second, "GET", "/v1/collections"))["aliases"] == {"current": "kept"}
    assert search(second, "current", vector=vectors[0].tolist(), top_k=1)[0]["id"] == "k0"


def without_scores(results: list[list[dict]]) -> list[list[dict]]:
    return [[{k: v for k, v in hit.items() if k != "score"} for hit in hits] for hits in results]


def test_an_alias_flips_atomically_between_collections(gw, dim):
    one, two = np.eye(dim)[0], np.eye(dim)[1]
    for name, vector in (("gen-1", one), ("gen-2", two)):
        create(gw, name)
        ok(call(gw, "POST", f"/v1/collections/{name}/items", {"items": [{"id": name, "vector": vector.tolist()}]}))
    assert ok(call(gw, "POST", "/v1/collections/serving/alias", {"target": "gen-1"})) == \
        {"alias": "serving", "target": "gen-1"}
    assert search(gw, "serving", vector=one.tolist())[0]["id"] == "gen-1"
    assert ok(call(gw, "GET", "/v1/collections/serving"))["name"] == "gen-1"
    ok(call(gw, "POST", "/v1/collections/serving/alias", {"target": "gen-2"}))  # the hot swap
    assert search(gw, "serving", vector=one.tolist())[0]["id"] == "gen-2"
    assert ok(call(gw, "GET", "/v1/collections"))["aliases"]["serving"] == "gen-2"

    error(call(gw, "POST", "/v1/collections/serving/alias", {"target": "nope"}), 404, "target")
    error(call(gw, "POST", "/v1/collections/gen-1/alias", {"target": "gen-2"}), 409, "target")
    error(call(gw, "POST", "/v1/collections/x/alias", {"target": "serving"}), 409, "target")
    error(call(gw, "POST", "/v1/collections", {"name": "serving"}), 409, "name")
    error(call(gw, "DELETE", "/v1/collections/gen-2"), 409, "collection")
    assert ok(call(gw, "DELETE", "/v1/collections/serving")) == {"deleted": "serving"}  # the alias, not gen-2
    assert "serving" not in ok(call(gw, "GET", "/v1/collections"))["aliases"]
    assert ok(call(gw, "GET", "/v1/collections/gen-2"))["count"] == 1
    assert ok(call(gw, "DELETE", "/v1/collections/gen-2")) == {"deleted": "gen-2"}


def test_a_query_embedded_by_another_model_is_refused(gateway_factory, index_backend, dim):
    """A collection records the fingerprint of the model that embedded it; one recorded before fingerprints
    existed adopts the serving model's on first use."""
    from services.index.manager import open_catalog
    from services.settings import IndexSettings

    _, fresh = index_backend
    env = fresh()
    first = gateway_factory(**env)
    served = create(first, "mine")["fingerprint"]
    assert served and len(served) == 16
    for name in ("theirs", "legacy"):
        create(first, name)
        ok(call(first, "POST", f"/v1/collections/{name}/items", {"items": [{"id": "a", "text": "a red rocket"}]}))
    first.stop()
    settings = IndexSettings(backend=env["HQCLIP_INDEX__BACKEND"], dir=env["HQCLIP_INDEX__DIR"],
                             milvus_uri=env.get("HQCLIP_INDEX__MILVUS_URI", "unused.db"))
    catalog = open_catalog(settings)
    for collection in catalog.open_all():
        if collection.name == "theirs":
            collection.adopt("f" * 16)  # as if another model (a retrained export) had embedded it
        if collection.name == "legacy":
            forget_fingerprint(collection)
        collection.close()
    catalog.close()

    second = gateway_factory(**env)
    refused = error(call(second, "POST", "/v1/collections/theirs/search", {"text": "a red rocket"}), 409, "text")
    assert "re-embed" in refused["message"].lower() and "alias" in refused["message"]
    error(call(second, "POST", "/v1/collections/theirs/items", {"items": [{"id": "b", "text": "x"}]}), 409,
          "items[0]")
    vector = embed(second, [{"text": "a red rocket"}])[0]
    assert search(second, "theirs", vector=vector.tolist())[0]["id"] == "a"  # vectors are the caller's business
    assert ok(call(second, "GET", "/v1/collections/legacy"))["fingerprint"] is None
    assert search(second, "legacy", text="a red rocket")[0]["id"] == "a"
    assert ok(call(second, "GET", "/v1/collections/legacy"))["fingerprint"] == served


def forget_fingerprint(collection) -> None:
    """Make a collection look like one stored before fingerprints were recorded."""
    collection.info.fingerprint = None
    if collection.backend == "faiss":
        collection._conn.execute("DELETE FROM info WHERE key = 'fingerprint'")
    else:
        collection.catalog.save_info(collection.name, collection.info)


def test_refine_on_ingest_stores_the_lvlm_tags_and_descriptions(gateway_factory, vllm_server, tmp_path):
    from testkit.vllm import MODEL_NAME

    gw = gateway_factory(HQCLIP_REFINE__URLS=vllm_server.url, HQCLIP_INDEX__DIR=str(tmp_path / "collections"),
                         HQCLIP_REFINE__TEMPERATURE="1.0")  # the tiny model ends its answers when sampled
    create(gw, "refined")
    items = [{"id": "cat", "image": b64(jpeg("chelsea")), "caption": "Chelsea the cat", "tags": ["mine"]},
             {"id": "cup", "image": b64(jpeg("coffee")), "caption": "my morning", "tags": ["mine"]}]
    ok(call(gw, "POST", "/v1/collections/refined/items", {"items": items}))  # refine: default = when configured
    ok(call(gw, "POST", "/v1/collections/refined/items",
            {"items": [{"id": "plain", "image": b64(jpeg("rocket"))}], "refine": False}))
    for item_id, name in (("cat", "chelsea"), ("cup", "coffee")):
        hit = search(gw, "refined", image=b64(jpeg(name)), top_k=1)[0]
        refined = hit["attributes"]["refined"]
        assert hit["id"] == item_id and hit["tags"][0] == "mine" and len(hit["tags"]) > 1
        assert refined["model"] == MODEL_NAME and refined["desc"] and refined["neg_desc"] and refined["neg_tags"]
        lvlm_tag = hit["tags"][1]  # an LVLM tag is a filter like any other
        assert item_id in [h["id"] for h in search(gw, "refined", image=b64(jpeg(name)), filters={"tags": [lvlm_tag]})]
    plain = search(gw, "refined", image=b64(jpeg("rocket")), top_k=1)[0]
    assert (plain["id"], plain["tags"], plain["attributes"]) == ("plain", [], {})
