"""What an operator relies on: models, health, readiness, metrics, API keys, a bounded queue."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from testkit.photos import b64, jpeg

pytestmark = pytest.mark.slow


def test_models_describes_the_manifest(gateway, tiny_repo):
    from hqclip.repo.manifest import load_manifest

    manifest = load_manifest(tiny_repo)
    card = httpx.get(f"{gateway.url}/v1/models").json()["data"][0]
    assert card["id"] == "tiny" and card["embed_dim"] == manifest.embed_dim
    assert card["weights"].endswith("open_clip_model.safetensors") and card["precision"] == "fp32"
    assert card["logit_scale"] == pytest.approx(manifest.logit_scale)


def test_health_ready_and_metrics(gateway):
    assert httpx.get(f"{gateway.url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{gateway.url}/ready")
    assert ready.status_code == 200 and ready.json()["model"] is True
    httpx.post(f"{gateway.url}/v1/embeddings", json={"model": "tiny", "input": ["a", "b", "c"]})
    text = httpx.get(f"{gateway.url}/metrics").text
    assert re.search(r'hqclip_requests_total\{route="/v1/embeddings",status="200"\} [1-9]', text)
    assert "hqclip_batch_size_bucket" in text and "hqclip_queue_depth" in text
    assert 'hqclip_request_seconds_count{route="/v1/embeddings"}' in text


def _batches(gateway, model: str) -> tuple[int, int]:
    """(backend calls, calls of at most 8 items) for ``model`` so far, from /metrics; none yet: (0, 0)."""
    text = httpx.get(f"{gateway.url}/metrics").text
    count = re.search(rf'hqclip_batch_size_count\{{model="{model}"\}} ([0-9.]+)', text)
    small = re.search(rf'hqclip_batch_size_bucket\{{le="8.0",model="{model}"\}} ([0-9.]+)', text)
    return (int(float(count.group(1))), int(float(small.group(1)))) if count else (0, 0)


def test_images_go_to_the_backend_in_batches_of_8_and_texts_of_up_to_32(gateway):
    images_before, texts_before = _batches(gateway, "tiny_image"), _batches(gateway, "tiny_text")
    body = {"model": "tiny", "modality": "image", "input": [b64(jpeg())] * 12}
    assert httpx.post(f"{gateway.url}/v1/embeddings", json=body, timeout=60).status_code == 200
    body = {"model": "tiny", "input": [f"text {i}" for i in range(12)]}
    assert httpx.post(f"{gateway.url}/v1/embeddings", json=body, timeout=60).status_code == 200
    images_after, texts_after = _batches(gateway, "tiny_image"), _batches(gateway, "tiny_text")
    assert (images_after[0] - images_before[0], images_after[1] - images_before[1]) == (2, 2)  # 8 + 4
    assert (texts_after[0] - texts_before[0], texts_after[1] - texts_before[1]) == (1, 0)  # 12 at once


def test_batches_never_pass_the_models_max_batch_size(gateway_factory, tiny_checkpoint, tmp_path):
    """A model exported with --max-batch-size 4: Triton would refuse a larger batch, so the gateway never sends one."""
    from training.export import export_checkpoint

    export_checkpoint(str(tiny_checkpoint), out=tmp_path / "repo", name="tiny", max_batch_size=4)
    gateway = gateway_factory(HQCLIP_MODEL_REPO=str(tmp_path / "repo"))
    body = {"model": "tiny", "input": [f"text {i}" for i in range(12)]}
    assert httpx.post(f"{gateway.url}/v1/embeddings", json=body, timeout=60).status_code == 200
    text = httpx.get(f"{gateway.url}/metrics").text
    calls = re.search(r'hqclip_batch_size_count\{model="tiny_text"\} ([0-9.]+)', text).group(1)
    at_most_4 = re.search(r'hqclip_batch_size_bucket\{le="4.0",model="tiny_text"\} ([0-9.]+)', text).group(1)
    assert float(calls) == float(at_most_4) == 3  # 12 texts in three calls of 4


def test_api_keys(gateway_factory):
    secured = gateway_factory(HQCLIP_API_KEYS="key-one, key-two")
    body = {"model": "tiny", "input": ["hello"]}
    missing = httpx.post(f"{secured.url}/v1/embeddings", json=body)
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    wrong = httpx.post(f"{secured.url}/v1/embeddings", json=body, headers={"Authorization": "Bearer key-three"})
    assert wrong.status_code == 401
    for key in ("key-one", "key-two"):
        ok = httpx.post(f"{secured.url}/v1/embeddings", json=body, headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200
    assert httpx.get(f"{secured.url}/v1/models").status_code == 401
    assert httpx.get(f"{secured.url}/health").status_code == 200
    assert httpx.get(f"{secured.url}/ready").status_code == 200


async def _queue_depth(client: httpx.AsyncClient) -> float:
    text = (await client.get("/metrics")).text
    values = re.findall(r'hqclip_queue_depth\{model="tiny_text"\} ([0-9.]+)', text)
    return float(values[0]) if values else 0.0


async def test_full_queue_is_429_with_retry_after(gateway_factory):
    # the batcher holds a first request for up to 3 s waiting for company; meanwhile the queue (4 items) is full
    slow = gateway_factory(HQCLIP_BATCH__QUEUE_SIZE="4", HQCLIP_BATCH__MAX_DELAY_MS="3000",
                           HQCLIP_BATCH__MAX_SIZE="64")
    async with httpx.AsyncClient(base_url=slow.url, timeout=60) as client:
        first = asyncio.create_task(client.post("/v1/embeddings", json={"model": "tiny", "input": ["a", "b", "c"]}))
        while await _queue_depth(client) < 3:  # wait until the first request is queued (seen through /metrics)
            assert not first.done(), (await first).text
        refused = await client.post("/v1/embeddings", json={"model": "tiny", "input": ["d", "e"]})
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert (await first).status_code == 200
        after = await client.post("/v1/embeddings", json={"model": "tiny", "input": ["d", "e"]})
        assert after.status_code == 200
        # more than the whole queue could ever hold is the request's fault: 413 naming the field, not 429 forever
        too_big = await client.post("/v1/embeddings", json={"model": "tiny", "input": list("abcde")})
        assert too_big.status_code == 413 and too_big.json()["error"]["param"] == "input"


def test_classification_prompts_fit_a_small_queue(gateway_factory):
    """3 labels x 7 default templates = 21 prompts, embedded a batch at a time through a queue of 4."""
    small = gateway_factory(HQCLIP_BATCH__QUEUE_SIZE="4")
    body = {"images": [b64(jpeg())], "labels": ["cat", "dog", "yak"]}
    response = httpx.post(f"{small.url}/v1/classify", json=body, timeout=60)
    assert response.status_code == 200, response.text
