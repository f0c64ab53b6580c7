"""`POST /v1/refine` through a real gateway to real vLLM servers: the four fields for real photos, failover when a
server dies, and 503 (with the embedding API still up) when no LVLM is configured or reachable."""

from __future__ import annotations

import asyncio

import httpx
import jsonschema
import pytest

from services.refine.client import RefineClient, RefineFailed
from services.refine.schema import JSON_SCHEMA
from testkit.photos import b64, data_uri, encode, jpeg, photo
from testkit.processes import free_port
from testkit.vllm import MODEL_NAME

pytestmark = pytest.mark.slow

PHOTOS = {"astronaut": "NASA portrait of Eileen Collins", "coffee": "my morning", "chelsea": "Chelsea the cat",
          "rocket": "launch day"}
SAMPLING = {"HQCLIP_REFINE__TEMPERATURE": "1.0"}  # the tiny model ends its answers when sampled (build_tiny_vlm.py)


@pytest.fixture(scope="module")
def refine_gateway(gateway_factory, vllm_server):
    return gateway_factory(HQCLIP_REFINE__URLS=vllm_server.url, **SAMPLING)


def assert_normalised(item: dict) -> None:
    fields = {name: item[name] for name in ("desc", "neg_desc", "tags", "neg_tags")}
    jsonschema.validate(fields, JSON_SCHEMA)
    for text in [text for values in fields.values() for text in values]:
        assert text == text.strip() and text[0] not in "\"'" and text[-1] not in "\"'" and "  " not in text
    for name in ("desc", "neg_desc", "tags"):
        assert len({t.lower() for t in fields[name]}) == len(fields[name]), f"{name} has duplicates"
    assert len(fields["tags"]) == len(fields["neg_tags"])


def test_refine_returns_the_four_normalised_fields_for_real_photos(refine_gateway):
    body = {"input": [{"image": data_uri(jpeg(name)), "alt_text": alt} for name, alt in PHOTOS.items()]}
    response = httpx.post(f"{refine_gateway.url}/v1/refine", json=body, timeout=300)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model"] == MODEL_NAME and answer["latency_ms"] > 0
    assert [item["index"] for item in answer["data"]] == list(range(len(PHOTOS)))
    for item in answer["data"]:
        assert_normalised(item)
        assert 0 < item["latency_ms"] <= answer["latency_ms"]


def test_refine_takes_one_image_without_alt_text_and_uploads(refine_gateway):
    single = httpx.post(f"{refine_gateway.url}/v1/refine", json={"input": {"image": b64(jpeg("coffee"))}},
                        timeout=300)
    assert single.status_code == 200, single.text
    assert len(single.json()["data"]) == 1
    assert_normalised(single.json()["data"][0])
    files = [("files", ("cat.png", encode(photo("chelsea"), "PNG"), "image/png")),
             ("files", ("rocket.jpg", jpeg("rocket"), "image/jpeg"))]
    upload = httpx.post(f"{refine_gateway.url}/v1/refine/upload", files=files,
                        data={"alt_text": ["a cat", "a rocket"]}, timeout=300)
    assert upload.status_code == 200, upload.text
    for item in upload.json()["data"]:
        assert_normalised(item)


@pytest.mark.parametrize("body, param", [
    ({"input": [{"image": b64(jpeg())}, {"image": b64(b"plain text, no picture")}]}, "input[1]"),
    ({"input": [{"image": "not base64!!"}]}, "input[0].image"),
    ({"input": []}, "input"),
    ({"images": []}, "input"),
])
def test_bad_input_gets_a_4xx_naming_the_field(refine_gateway, body, param):
    response = httpx.post(f"{refine_gateway.url}/v1/refine", json=body, timeout=60)
    assert 400 <= response.status_code < 500
    assert response.json()["error"]["param"] == param


def test_ready_reports_the_lvlm_beside_the_model(refine_gateway):
    ready = httpx.get(f"{refine_gateway.url}/ready", timeout=30).json()
    assert ready["ready"] is True and ready["model"] is True and ready["lvlm"] is True


def embeddings_work(gateway) -> bool:
    response = httpx.post(f"{gateway.url}/v1/embeddings", json={"model": "tiny", "input": ["a cat"]}, timeout=60)
    return response.status_code == 200 and len(response.json()["data"][0]["embedding"]) > 0


def test_without_an_lvlm_refine_is_503_saying_what_to_set_and_embeddings_work(gateway_factory):
    gateway = gateway_factory()
    response = httpx.post(f"{gateway.url}/v1/refine", json={"input": {"image": b64(jpeg())}}, timeout=60)
    assert response.status_code == 503
    assert "HQCLIP_REFINE__URLS" in response.json()["error"]["message"]
    assert embeddings_work(gateway)
    ready = httpx.get(f"{gateway.url}/ready", timeout=30)
    assert ready.status_code == 200 and "lvlm" not in ready.json()


def test_with_no_lvlm_reachable_refine_is_503_and_embeddings_work(gateway_factory):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    gateway = gateway_factory(HQCLIP_REFINE__URLS=dead)
    response = httpx.post(f"{gateway.url}/v1/refine", json={"input": {"image": b64(jpeg())}}, timeout=60)
    assert response.status_code == 503
    assert "no LVLM server reachable" in response.json()["error"]["message"] and dead in response.text
    assert embeddings_work(gateway)
    ready = httpx.get(f"{gateway.url}/ready", timeout=30)
    assert ready.status_code == 200 and ready.json()["lvlm"] is False and ready.json()["model"] is True


def test_requests_go_round_robin_and_fail_over_when_a_server_dies(gateway_factory, vllm_servers):
    first, second = vllm_servers
    gateway = gateway_factory(HQCLIP_REFINE__URLS=f"{first.url},{second.url}", **SAMPLING)
    body = {"input": [{"image": b64(jpeg(name)), "alt_text": alt} for name, alt in PHOTOS.items()]}
    before = [first.requests_done(), second.requests_done()]
    assert httpx.post(f"{gateway.url}/v1/refine", json=body, timeout=300).status_code == 200
    after = [first.requests_done(), second.requests_done()]
    assert after[0] > before[0] and after[1] > before[1], "both servers should have taken requests"

    async def during_the_crash() -> list[int]:
        async with httpx.AsyncClient(timeout=300) as client:
            requests = [asyncio.create_task(client.post(f"{gateway.url}/v1/refine", json=body)) for _ in range(3)]
            await asyncio.sleep(0)  # let the requests leave before the crash
            await asyncio.to_thread(second.kill)
            return [r.status_code for r in await asyncio.gather(*requests)]

    assert asyncio.run(during_the_crash()) == [200, 200, 200]
    served_before = first.requests_done()
    after_crash = httpx.post(f"{gateway.url}/v1/refine", json=body, timeout=300)
    assert after_crash.status_code == 200, after_crash.text
    assert first.requests_done() >= served_before + len(PHOTOS)
    assert httpx.get(f"{gateway.url}/ready", timeout=30).json()["lvlm"] is True


def test_unusable_answers_are_retried_a_bounded_number_of_times(vllm_server):
    """max_tokens too small for the JSON: each answer is cut off, so invalid, and retried `retries` times."""
    async def refine() -> None:
        client = RefineClient([vllm_server.url], retries=2, backoff_s=0.01, max_tokens=16, temperature=1.0)
        try:
            await client.refine(jpeg("chelsea"), "a cat")
        finally:
            await client.aclose()

    before = vllm_server.requests_done()
    with pytest.raises(RefineFailed, match=r"after 3 attempts.*not JSON"):
        asyncio.run(refine())
    assert vllm_server.requests_done() - before == 3


def test_a_seed_makes_sampled_answers_repeatable(vllm_server):
    async def twice() -> list:
        client = RefineClient([vllm_server.url], temperature=1.0, seed=7)
        try:
            return [(await client.refine(jpeg("rocket"), "launch day")).refinement for _ in range(2)]
        finally:
            await client.aclose()

    first, second = asyncio.run(twice())
    assert first == second
