"""The Triton backend against a real Triton server: same answers as the in-process backend, and outages survived."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from testkit.photos import b64, jpeg
from testkit.vectors import cosines
from tests.servers.triton import TritonServer, triton_factory  # noqa: F401 (a fixture)
from tests.test_triton_config import TAGS, export_tagged

pytestmark = pytest.mark.slow

TEXTS = ["a photo of a cat", "an astronaut in a white suit", "café & crème brûlée 🍰", ""]
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket"]
RECOVERY_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def tagged_repo(tmp_path_factory, tiny_checkpoint) -> Path:
    """The tiny checkpoint exported with a random short-tag head, so /v1/tags is compared too."""
    return export_tagged(tiny_checkpoint, tmp_path_factory.mktemp("tagged-repo"))


@pytest.fixture(scope="module")
def triton(triton_factory, tagged_repo) -> TritonServer:
    return triton_factory(tagged_repo)


@pytest.fixture(scope="module")
def local_gateway(gateway_factory, tagged_repo):
    """The in-process ONNX Runtime backend: the reference."""
    return gateway_factory(HQCLIP_MODEL_REPO=str(tagged_repo))


@pytest.fixture(scope="module")
def triton_gateway(gateway_factory, tagged_repo, triton):
    """The same repository, its models run on Triton."""
    return gateway_factory(HQCLIP_MODEL_REPO=str(tagged_repo), HQCLIP_BACKEND="triton",
                           HQCLIP_TRITON__URL=triton.grpc_url)


def post(url: str, path: str, **kwargs) -> dict:
    response = httpx.post(url + path, timeout=60, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def vectors(body: dict) -> np.ndarray:
    return np.array([item["embedding"] for item in body["data"]])


def scores(body: dict, key: str, value: str) -> list[dict[str, float]]:
    return [{entry[key]: entry[value] for entry in item[key + "s"]} for item in body["data"]]


def test_every_endpoint_matches_the_in_process_backend(local_gateway, triton_gateway):
    images = [b64(jpeg(name)) for name in PHOTOS]

    def both(path: str, **kwargs) -> tuple[dict, dict]:
        return post(local_gateway.url, path, **kwargs), post(triton_gateway.url, path, **kwargs)

    for payload in ({"model": "tiny", "input": TEXTS}, {"model": "tiny", "input": images, "modality": "image"}):
        local, remote = both("/v1/embeddings", json=payload)
        assert cosines(vectors(local), vectors(remote)).min() >= 0.9999

    mixed = {"inputs": [{"text": TEXTS[0]}, {"image": images[0]}, {"text": TEXTS[1]}, {"image": images[1]}]}
    local, remote = both("/v1/embed", json=mixed)
    assert [d["modality"] for d in remote["data"]] == ["text", "image", "text", "image"]
    assert cosines(vectors(local), vectors(remote)).min() >= 0.9999

    files = [("files", (f"{name}.jpg", jpeg(name), "image/jpeg")) for name in PHOTOS]
    local, remote = both("/v1/embed/upload", files=files)
    assert cosines(vectors(local), vectors(remote)).min() >= 0.9999

    # Scores go through the learned logit scale and a softmax / sigmoid: compare them, not just the ranking.
    labels = ["cat", "astronaut", "coffee", "rocket", "dog"]
    local, remote = both("/v1/classify", json={"images": images, "labels": labels, "top_k": len(labels)})
    for want, got in zip(scores(local, "label", "score"), scores(remote, "label", "score")):
        assert want.keys() == got.keys()
        assert max(abs(want[k] - got[k]) for k in want) < 1e-3

    local, remote = both("/v1/tags", json={"images": images, "top_k": len(TAGS)})
    for want, got in zip(scores(local, "tag", "probability"), scores(remote, "tag", "probability")):
        assert want.keys() == got.keys() == set(TAGS)
        assert max(abs(want[k] - got[k]) for k in want) < 1e-4


def wait_for_ready(url: str) -> httpx.Response:
    """Poll /ready (the gateway's own readiness endpoint) until it says ready."""
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    while (response := httpx.get(url + "/ready", timeout=30)).status_code != 200:
        assert time.monotonic() < deadline, f"gateway not ready {RECOVERY_TIMEOUT_S}s after Triton came back"
        time.sleep(0.2)
    return response


def test_triton_outage_gives_503_and_the_gateway_recovers_without_restart(triton: TritonServer, triton_gateway):
    text = {"model": "tiny", "input": ["a dog on a beach"]}
    before = vectors(post(triton_gateway.url, "/v1/embeddings", json=text))
    assert wait_for_ready(triton_gateway.url).json()["ready"] is True

    assert triton.stop(), "tritonserver or a Python-backend stub outlived SIGTERM to triton_serve.py"
    try:
        response = httpx.post(triton_gateway.url + "/v1/embeddings", json=text, timeout=60)
        assert response.status_code == 503, response.text
        assert "triton" in response.json()["error"]["message"].lower()
        image = httpx.post(triton_gateway.url + "/v1/embeddings", timeout=60,
                           json={"model": "tiny", "input": [b64(jpeg())], "modality": "image"})
        assert image.status_code == 503, image.text
        ready = httpx.get(triton_gateway.url + "/ready", timeout=30)
        assert ready.status_code == 503 and ready.json()["ready"] is False
        assert httpx.get(triton_gateway.url + "/health", timeout=30).status_code == 200  # alive, just not ready
    finally:
        triton.start()

    wait_for_ready(triton_gateway.url)
    assert triton_gateway.process.poll() is None  # the same gateway process, never restarted
    after = vectors(post(triton_gateway.url, "/v1/embeddings", json=text))
    assert cosines(before, after).min() >= 0.9999


def inference_count(server: TritonServer) -> float:
    """Successful inferences this Triton ran, from its own Prometheus metrics."""
    text = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("nv_inference_request_success{"))


def test_two_tritons_share_the_load_and_cover_for_each_other(triton, triton_factory, tagged_repo, gateway_factory):
    """Scale-out: one gateway, two Triton servers on one gRPC target; losing one is not an outage."""
    second = triton_factory(tagged_repo)
    gateway = gateway_factory(HQCLIP_MODEL_REPO=str(tagged_repo), HQCLIP_BACKEND="triton",
                              HQCLIP_TRITON__URL=f"ipv4:{triton.grpc_url},{second.grpc_url}")
    wait_for_ready(gateway.url)
    before = [inference_count(triton), inference_count(second)]
    for i in range(8):
        post(gateway.url, "/v1/embeddings", json={"model": "tiny", "input": [f"a photo of {i} cats"]})
    after = [inference_count(triton), inference_count(second)]
    assert after[0] > before[0] and after[1] > before[1], f"round robin: {before} -> {after}"

    assert second.stop()
    for i in range(4):
        post(gateway.url, "/v1/embeddings", json={"model": "tiny", "input": [f"a photo of {i} dogs"]})
    assert wait_for_ready(gateway.url).json()["ready"] is True
