"""The Python SDK (clients/python): against a real gateway it gives what raw HTTP gives, sync and async alike; it
splits inputs under the gateway's limits, retries a full queue's 429, and raises the gateway's errors with their
message, param and status. The pure parts (retry policy, chunking, PNG encoding) are checked without a server."""

from __future__ import annotations

import asyncio
import email.utils
import io
import re
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from hqclip_client import (
    APIConnectionError,
    APITimeoutError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    ConflictError,
    Item,
    NotFoundError,
    RateLimitError,
    RetryPolicy,
    ServiceUnavailableError,
)
from hqclip_client.api import chunks, shift_index
from hqclip_client.images import png
from testkit.photos import b64, encode, jpeg, photo
from testkit.processes import free_port
from testkit.vllm import MODEL_NAME

LABELS = ["cat", "astronaut", "coffee cup", "rocket"]
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")


def key(gateway) -> str:
    return gateway.env["HQCLIP_API_KEYS"].split(",")[0]


def raw(gateway, path: str, body: dict) -> httpx.Response:
    headers = {"authorization": f"Bearer {key(gateway)}"} if "HQCLIP_API_KEYS" in gateway.env else {}
    return httpx.post(f"{gateway.url}{path}", json=body, headers=headers, timeout=60)


def raw_vectors(gateway, inputs: list[str], modality: str = "text") -> np.ndarray:
    body = {"model": "tagged", "input": inputs, "modality": modality}
    response = raw(gateway, "/v1/embeddings", body)
    assert response.status_code == 200, response.text
    return np.array([row["embedding"] for row in response.json()["data"]], dtype=np.float32)


@pytest.fixture(scope="module")
def client(client_gateway):
    with Client(client_gateway.url, api_key=key(client_gateway)) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def small_gateway(gateway_factory, tagged_repo, tmp_path_factory):
    """Limits of 3 items and 64 characters; a queue of 6 items that holds each batch 250 ms (so it fills up)."""
    return gateway_factory(HQCLIP_MODEL_REPO=str(tagged_repo), HQCLIP_LIMITS__MAX_ITEMS="3",
                           HQCLIP_LIMITS__MAX_TEXT_CHARS="64", HQCLIP_BATCH__QUEUE_SIZE="6",
                           HQCLIP_BATCH__MAX_SIZE="32", HQCLIP_BATCH__MAX_DELAY_MS="250",
                           HQCLIP_INDEX__DIR=str(tmp_path_factory.mktemp("small-collections")))


# --- without a server ---
def _response(status: int, **headers: str) -> httpx.Response:
    return httpx.Response(status, headers=headers, request=httpx.Request("POST", "http://gateway/v1/embed"))


def test_retry_backs_off_exponentially_with_jitter_and_stops():
    policy = RetryPolicy(max_retries=4, backoff_s=1.0, max_backoff_s=3.0)
    for attempt in range(4):
        ceiling = min(3.0, 2.0**attempt)
        delays = {policy.delay(attempt, _response(429)) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1, "jitter: the delays must not all be equal"
    assert policy.delay(4, _response(429)) is None


def test_retry_honours_retry_after_and_refuses_what_it_should_not_retry():
    policy = RetryPolicy(backoff_s=0.01, max_retry_after_s=60)
    assert policy.delay(0, _response(429, **{"retry-after": "7"})) >= 7
    in_five = email.utils.formatdate(time.time() + 5, usegmt=True)
    assert 3 <= policy.delay(0, _response(429, **{"retry-after": in_five})) <= 5
    assert policy.delay(0, _response(429, **{"retry-after": "3600"})) is None  # too long: raise at once
    assert policy.delay(0, _response(503, **{"retry-after": "2"})) >= 2  # an outage: the gateway says when
    assert policy.delay(0, _response(503)) is None  # not configured (e.g. no LVLM): no use waiting
    for status in (400, 401, 404, 500, 502):
        assert policy.delay(0, _response(status)) is None
    request = httpx.Request("POST", "http://gateway/")
    assert policy.delay(0, httpx.ConnectError("refused", request=request)) is not None
    assert policy.delay(0, httpx.ReadTimeout("slow", request=request)) is None  # the work may be running


def test_chunks_respect_count_and_bytes():
    assert list(chunks(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    parts = list(chunks([b"aa", b"bbbb", b"c" * 10, b"d"], max_items=10, max_bytes=6))
    assert parts == [[b"aa", b"bbbb"], [b"c" * 10], [b"d"]]  # an item larger than the budget goes alone
    assert list(chunks([], 3)) == [[]]  # the gateway answers an empty input itself


def test_errors_of_a_later_chunk_name_the_input_in_the_whole_call():
    error = shift_index(BadRequestError(400, "inputs[1]: 70 characters", "inputs[1]"), offset=3)
    assert (error.param, error.message, str(error).count("inputs[4]")) == ("inputs[4]", "inputs[4]: 70 characters", 2)
    nested = shift_index(BadRequestError(400, "items[0].image: not base64", "items[0].image"), offset=256)
    assert nested.param == "items[256].image"


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1), (6, 4, 3), (3, 9, 4)])
def test_arrays_encode_to_png_with_the_same_pixels(shape):
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(png(pixels))))
    assert np.array_equal(decoded, pixels.reshape(decoded.shape))


def test_arrays_that_are_not_images_are_refused():
    with pytest.raises(TypeError, match="uint8"):
        png(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        png(np.zeros((4, 4, 5), dtype=np.uint8))


def test_a_gateway_that_never_answers_times_out():
    with socket.socket() as silent:  # accepts connections (kernel backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        with (Client(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.5) as sdk,
              pytest.raises(APITimeoutError, match="timed out")):
            sdk.embed_texts(["hello"])


def test_an_unreachable_gateway_is_a_connection_error():
    retry = RetryPolicy(max_retries=2, backoff_s=0.01)
    with (Client(f"http://127.0.0.1:{free_port()}", retry=retry) as sdk,
          pytest.raises(APIConnectionError, match="cannot reach")):
        sdk.embed_texts(["hello"])


# --- against the real gateway ---
@pytest.mark.slow
def test_text_embeddings_equal_raw_http(client, client_gateway):
    texts = ["a photo of a cat", "an astronaut", "word " * 200]  # the last is cut to the context length
    result = client.embed_texts(texts)
    assert isinstance(result.vectors, np.ndarray) and result.vectors.dtype == np.float32
    np.testing.assert_allclose(result.vectors, raw_vectors(client_gateway, texts), atol=1e-5)
    assert result.truncated == [False, False, True] and result.model == "tagged"
    assert result.prompt_tokens > 0


@pytest.mark.slow
def test_images_as_path_bytes_pil_or_array_embed_like_raw_http(client, client_gateway, tmp_path):
    image = photo("chelsea")
    data = encode(image, "PNG")
    path = tmp_path / "chelsea.png"
    path.write_bytes(data)
    expected = raw_vectors(client_gateway, [b64(data), b64(jpeg("rocket"))], modality="image")
    result = client.embed_images([path, data, Image.open(path), np.asarray(image), str(path), jpeg("rocket")])
    assert result.vectors.shape == (6, expected.shape[1])
    np.testing.assert_allclose(result.vectors[:5], np.repeat(expected[:1], 5, axis=0), atol=1e-5)
    np.testing.assert_allclose(result.vectors[5], expected[1], atol=1e-5)
    single = client.embed_images(np.asarray(image))  # one [H, W, 3] array is one image, not a batch of rows
    np.testing.assert_allclose(single.vectors, expected[:1], atol=1e-5)


@pytest.mark.slow
def test_classify_and_tags_equal_raw_http(client, client_gateway):
    images = [jpeg("chelsea"), jpeg("rocket")]
    body = {"images": [b64(d) for d in images], "labels": LABELS, "top_k": 3}
    expected = raw(client_gateway, "/v1/classify", body).json()["data"]
    got = client.classify(images, LABELS, top_k=3)
    assert [[s.model_dump() for s in c.labels] for c in got] == [row["labels"] for row in expected]
    assert [c.index for c in got] == [0, 1] and got[0].label == expected[0]["labels"][0]["label"]
    expected_tags = raw(client_gateway, "/v1/tags", {"images": [b64(images[0])], "top_k": 4}).json()["data"]
    tags = client.tags(images[0], top_k=4)
    assert [[t.model_dump() for t in r.tags] for r in tags] == [row["tags"] for row in expected_tags]


@pytest.mark.slow
async def test_async_client_gives_the_sync_results(client, client_gateway):
    async with AsyncClient(client_gateway.url, api_key=key(client_gateway)) as sdk:
        texts, images = await asyncio.gather(sdk.embed_texts(["a cat", "a rocket"]),
                                             sdk.embed_images([jpeg("coffee")]))
        classified = await sdk.classify([jpeg("chelsea")], LABELS)
        with pytest.raises(NotFoundError) as caught:
            await sdk.get_collection("no-such-collection")
    np.testing.assert_allclose(texts.vectors, client.embed_texts(["a cat", "a rocket"]).vectors, atol=1e-5)
    np.testing.assert_allclose(images.vectors, client.embed_images([jpeg("coffee")]).vectors, atol=1e-5)
    assert classified == client.classify([jpeg("chelsea")], LABELS)
    assert caught.value.status == 404 and caught.value.param == "collection"


@pytest.mark.slow
def test_collections_add_search_delete(client):
    name = "sdk-lifecycle"
    created = client.create_collection(name, index={"kind": "flat"})
    assert (created.name, created.count, created.dim) == (name, 0, client.embed_texts("x").vectors.shape[1])
    with pytest.raises(ConflictError) as caught:
        client.create_collection(name)
    assert caught.value.status == 409 and caught.value.param == "name"
    vector = client.embed_texts("a red planet").vectors[0]
    items = [Item(id=n, image=jpeg(n), caption=f"the {n} photo", tags=["photo", n], attributes={"n": i})
             for i, n in enumerate(PHOTOS[:4])]
    items += [Item(id="note", text="a cat sleeping on a sofa", tags=["text"]), {"id": "vec", "vector": vector}]
    added = client.add(name, items)
    assert added.upserted == 6 and added.count == 6 and added.ids == [*PHOTOS[:4], "note", "vec"]
    assert name in [c.name for c in client.list_collections()] and client.get_collection(name).count == 6

    by_image = client.search(name, image=jpeg(PHOTOS[1]), top_k=3)
    assert by_image.results[0].id == PHOTOS[1] and by_image.results[0].score > 0.99
    assert by_image.results[0].caption == f"the {PHOTOS[1]} photo" and by_image.results[0].attributes["n"] == 1
    assert client.search(name, vector=vector, top_k=1).results[0].id == "vec"
    assert client.search(name, "a cat sleeping on a sofa", top_k=1).results[0].id == "note"
    filtered = client.search(name, "a photo", top_k=10, tags=["photo"], attributes={"n": 2})
    assert [h.id for h in filtered.results] == [PHOTOS[2]]
    similar = client.search(name, id=PHOTOS[0], top_k=10)
    assert PHOTOS[0] not in [h.id for h in similar.results] and len(similar.results) == 5
    page = client.search(name, image=jpeg(PHOTOS[1]), top_k=2, offset=1)
    assert [h.id for h in page.results] == [h.id for h in by_image.results[1:3]]

    deleted = client.delete(name, ["note", "nothing-here"])
    assert (deleted.deleted, deleted.not_found, deleted.count) == (["note"], ["nothing-here"], 5)
    client.delete_collection(name)
    with pytest.raises(NotFoundError):
        client.search(name, "anything")


@pytest.mark.slow
def test_errors_carry_the_gateways_message_param_and_status(client, client_gateway):
    expected = raw(client_gateway, "/v1/classify", {"images": [b64(jpeg())], "labels": []}).json()["error"]
    with pytest.raises(BadRequestError) as caught:
        client.classify([jpeg()], [])
    assert (caught.value.status, caught.value.message, caught.value.param) == (400, expected["message"], "labels")
    assert expected["message"] in str(caught.value) and "labels" in str(caught.value)
    with pytest.raises(BadRequestError) as caught:
        client.embed_images([jpeg(), b"plain text, not a picture"])
    assert caught.value.param == "files[1]" and caught.value.status == 400
    with pytest.raises(NotFoundError) as caught:
        Client(client_gateway.url, api_key=key(client_gateway), model="gpt-4").embed_texts(["hi"])
    assert caught.value.param == "model" and "gpt-4" in caught.value.message


@pytest.mark.slow
def test_api_key_header(client_gateway, monkeypatch):
    monkeypatch.delenv("HQCLIP_API_KEY", raising=False)
    with pytest.raises(AuthenticationError) as caught:
        Client(client_gateway.url).embed_texts(["hi"])
    assert caught.value.status == 401 and caught.value.param == "authorization"
    with pytest.raises(AuthenticationError):
        Client(client_gateway.url, api_key="wrong").embed_texts(["hi"])
    second = client_gateway.env["HQCLIP_API_KEYS"].split(",")[1]
    assert len(Client(client_gateway.url, api_key=second).embed_texts(["hi"])) == 1
    monkeypatch.setenv("HQCLIP_API_KEY", key(client_gateway))
    monkeypatch.setenv("HQCLIP_URL", client_gateway.url)
    assert len(Client().embed_texts(["from the environment"])) == 1


@pytest.mark.slow
def test_without_numpy_embeddings_are_lists_of_the_same_floats(client, client_gateway):
    script = ("import sys, json; sys.modules['numpy'] = None\n"
              "from hqclip_client import Client\n"
              f"v = Client({client_gateway.url!r}, api_key={key(client_gateway)!r}).embed_texts(['a cat']).vectors\n"
              "print(json.dumps(v))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    rows = __import__("json").loads(out.stdout)
    assert isinstance(rows, list) and isinstance(rows[0][0], float)
    np.testing.assert_allclose(rows, client.embed_texts(["a cat"]).vectors, atol=1e-5)


# --- the gateway's limits ---
@pytest.mark.slow
def test_inputs_beyond_max_items_are_sent_in_chunks(small_gateway):
    texts = [f"text number {i}" for i in range(8)]
    assert raw(small_gateway, "/v1/embeddings", {"model": "tagged", "input": texts}).json()["error"]["param"] == "input"
    expected = np.concatenate([raw_vectors(small_gateway, [t]) for t in texts])
    with Client(small_gateway.url, max_items=3) as sdk:
        np.testing.assert_allclose(sdk.embed_texts(texts).vectors, expected, atol=1e-5)
        images = [jpeg(name) for name in PHOTOS] + [jpeg("chelsea")]
        # one template: 4 prompts fit the queue of 6 (the default ensemble's 28 never would)
        classified = sdk.classify(images, LABELS, templates=["a photo of a {}."], top_k=2)
        assert [c.index for c in classified] == list(range(6))
        assert classified[5] == classified[2].model_copy(update={"index": 5})  # chelsea twice, in two chunks
        assert sdk.embed_images(images).vectors.shape[0] == 6
        sdk.create_collection("chunked")
        added = sdk.add("chunked", [Item(id=f"t{i}", text=t) for i, t in enumerate(texts)])
        assert (added.upserted, added.count, len(added.ids)) == (8, 8, 8)
        deleted = sdk.delete("chunked", [f"t{i}" for i in range(7)])
        assert (len(deleted.deleted), deleted.count) == (7, 1)


@pytest.mark.slow
def test_an_error_in_a_later_chunk_names_the_input_in_the_whole_call(small_gateway):
    texts = ["short"] * 8
    texts[5] = "x" * 100  # over HQCLIP_LIMITS__MAX_TEXT_CHARS=64; in the second chunk, at position 2
    with Client(small_gateway.url, max_items=3) as sdk, pytest.raises(BadRequestError) as caught:
        sdk.embed_texts(texts)
    assert caught.value.param == "inputs[5]" and "inputs[5]" in caught.value.message


def _count_429(gateway) -> float:
    metrics = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    return sum(float(m) for m in re.findall(r'^hqclip_requests_total\{[^}]*status="429"[^}]*\} (\S+)$', metrics, re.M))


@pytest.mark.slow
async def test_a_full_queue_is_retried_until_it_has_room(small_gateway):
    batches = [[f"batch {b} text {i}" for i in range(3)] for b in range(8)]  # 24 items for a queue of 6
    before = _count_429(small_gateway)
    async with AsyncClient(small_gateway.url, max_items=3) as sdk:
        results = await asyncio.gather(*(sdk.embed_texts(texts) for texts in batches))
    assert _count_429(small_gateway) > before, "the gateway never answered 429: the queue did not fill"
    with Client(small_gateway.url, max_items=3) as sdk:
        for texts, result in zip(batches, results):
            np.testing.assert_allclose(result.vectors, sdk.embed_texts(texts).vectors, atol=1e-5)

    async with AsyncClient(small_gateway.url, max_items=3, retry=RetryPolicy(max_retries=0)) as impatient:
        outcomes = await asyncio.gather(*(impatient.embed_texts(t) for t in batches), return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, Exception)]
    assert refused and all(isinstance(o, RateLimitError) for o in refused)
    assert refused[0].status == 429 and "queue is full" in refused[0].message
    assert refused[0].headers.get("retry-after") == "1"


# --- refinement ---
def _requests(gateway, route: str, status: str) -> float:
    metrics = httpx.get(f"{gateway.url}/metrics", headers={"authorization": f"Bearer {key(gateway)}"}, timeout=10)
    metrics.raise_for_status()
    metrics = metrics.text
    pattern = rf'^hqclip_requests_total\{{route="{re.escape(route)}",status="{status}"\}} (\S+)$'
    return sum(float(m) for m in re.findall(pattern, metrics, re.M))


@pytest.mark.slow
def test_refine_without_an_lvlm_fails_at_once_saying_what_to_set(client, client_gateway):
    before = _requests(client_gateway, "/v1/refine", "503")
    with pytest.raises(ServiceUnavailableError) as caught:
        client.refine(jpeg("coffee"))
    assert caught.value.status == 503 and "HQCLIP_REFINE__URLS" in caught.value.message
    assert _requests(client_gateway, "/v1/refine", "503") == before + 1, "a 503 without Retry-After is not retried"


def _assert_refined(refinement, index: int) -> None:
    assert refinement.index == index and refinement.model == MODEL_NAME and refinement.latency_ms > 0
    assert all(refinement.desc) and all(refinement.neg_desc) and refinement.tags
    assert len(refinement.tags) == len(refinement.neg_tags)


@pytest.mark.slow
async def test_refine_through_a_real_lvlm_sync_async_and_on_ingest(lvlm_gateway, tmp_path):
    path = tmp_path / "cat.png"
    path.write_bytes(encode(photo("chelsea"), "PNG"))
    with Client(lvlm_gateway.url, max_items=1) as sdk:  # two images: two requests
        refined = sdk.refine([path, jpeg("rocket")], alt_texts=["Chelsea the cat", None])
        for i, refinement in enumerate(refined):
            _assert_refined(refinement, i)
        with pytest.raises(ValueError, match="one per image"):
            sdk.refine([path], alt_texts=["a", "b"])
        sdk.create_collection("refined")
        sdk.add("refined", [Item(id="cat", image=path, tags=["mine"], caption="Chelsea the cat")], refine=True)
        stored = sdk.search("refined", id="cat", top_k=1)  # the only item is left out of its own results
        assert stored.results == []
        hit = sdk.search("refined", image=path, top_k=1).results[0]
        assert hit.tags[0] == "mine" and len(hit.tags) > 1 and hit.attributes["refined"]["model"] == MODEL_NAME
    async with AsyncClient(lvlm_gateway.url) as sdk:
        _assert_refined((await sdk.refine(jpeg("coffee")))[0], 0)
