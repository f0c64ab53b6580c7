"""Embeddings through the real gateway match open_clip's own torch forward of the same checkpoint."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image, ImageOps

from testkit.photos import b64, data_uri, exif_rotated_jpeg, jpeg, odd_images, photo
from testkit.vectors import cosines

pytestmark = pytest.mark.slow

TEXTS = ["a photo of a cat", "an astronaut in a white suit", "café & crème brûlée 🍰", ""]


def torch_texts(tiny_model, texts):
    model, _, tokenizer = tiny_model
    with torch.no_grad():
        return torch.nn.functional.normalize(model.encode_text(tokenizer(texts)), dim=-1).numpy()


def torch_images(tiny_model, images):
    model, preprocess, _ = tiny_model
    with torch.no_grad():
        batch = torch.stack([preprocess(image) for image in images])
        return torch.nn.functional.normalize(model.encode_image(batch), dim=-1).numpy()


def test_openai_client_texts_match_open_clip(gateway, tiny_model):
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused")
    response = client.embeddings.create(model="tiny", input=TEXTS)  # the client asks for base64 by default
    got = np.array([item.embedding for item in response.data])
    assert [item.index for item in response.data] == list(range(len(TEXTS)))
    assert cosines(got, torch_texts(tiny_model, TEXTS)).min() >= 0.9999
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-4)
    assert response.usage.prompt_tokens > 0


def test_openai_client_images_with_modality(gateway, tiny_model):
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused")
    names = ["astronaut", "coffee", "chelsea"]
    payload = [b64(jpeg(names[0])), data_uri(jpeg(names[1])), b64(jpeg(names[2]))]
    response = client.embeddings.create(model="tiny", input=payload, extra_body={"modality": "image"},
                                        encoding_format="float")
    got = np.array([item.embedding for item in response.data])
    decoded = [Image.open(io.BytesIO(jpeg(n))).convert("RGB") for n in names]
    assert cosines(got, torch_images(tiny_model, decoded)).min() >= 0.9999


def test_mixed_batch_keeps_order_and_agrees_with_embeddings(gateway):
    inputs = [{"text": "a red car"}, {"image": b64(jpeg("rocket"))}, {"text": "a rocket"}]
    mixed = httpx.post(f"{gateway.url}/v1/embed", json={"inputs": inputs}, timeout=60).json()
    assert [d["modality"] for d in mixed["data"]] == ["text", "image", "text"]
    texts = httpx.post(f"{gateway.url}/v1/embeddings", json={"model": "tiny", "input": ["a red car", "a rocket"]},
                       timeout=60).json()
    assert cosines([mixed["data"][0]["embedding"], mixed["data"][2]["embedding"]],
                   [d["embedding"] for d in texts["data"]]).min() >= 0.99999


def test_upload_equals_base64(gateway):
    data = jpeg("chelsea")
    uploaded = httpx.post(f"{gateway.url}/v1/embed/upload", files=[("files", ("cat.jpg", data, "image/jpeg"))],
                          timeout=60).json()
    as_json = httpx.post(f"{gateway.url}/v1/embed", json={"inputs": [{"image": b64(data)}]}, timeout=60).json()
    assert cosines([uploaded["data"][0]["embedding"]], [as_json["data"][0]["embedding"]])[0] >= 0.99999


def test_base64_encoding_is_little_endian_float32(gateway):
    body = {"model": "tiny", "input": ["a dog"]}
    floats = httpx.post(f"{gateway.url}/v1/embeddings", json=body, timeout=60).json()["data"][0]["embedding"]
    encoded = httpx.post(f"{gateway.url}/v1/embeddings", json={**body, "encoding_format": "base64"},
                         timeout=60).json()["data"][0]["embedding"]
    assert np.allclose(np.frombuffer(base64.b64decode(encoded), dtype="<f4"), floats, atol=1e-7)


def test_over_long_text_is_truncated_like_open_clip_and_says_so(gateway, tiny_model):
    long_text = "the quick brown fox jumps over the lazy dog " * 40
    body = httpx.post(f"{gateway.url}/v1/embeddings", json={"model": "tiny", "input": [long_text, "short"]},
                      timeout=60).json()
    assert [d["truncated"] for d in body["data"]] == [True, False]
    assert cosines([body["data"][0]["embedding"]], torch_texts(tiny_model, [long_text]))[0] >= 0.9999


def test_odd_image_formats_embed(gateway, tiny_model):
    images = odd_images()
    body = httpx.post(f"{gateway.url}/v1/embed", json={"inputs": [{"image": b64(v)} for v in images.values()]},
                      timeout=60)
    assert body.status_code == 200, body.text
    vectors = np.array([d["embedding"] for d in body.json()["data"]])
    assert np.isfinite(vectors).all() and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    # the RGBA and palette PNGs are the same photo as the JPEG-free RGB reference
    reference = torch_images(tiny_model, [photo("coffee").convert("RGBA").convert("RGB")])
    assert cosines(vectors[2:3], reference)[0] >= 0.9999


def test_exif_rotation_is_applied(gateway, tiny_model):
    rotated, _ = exif_rotated_jpeg("astronaut")
    body = httpx.post(f"{gateway.url}/v1/embed", json={"inputs": [{"image": b64(rotated)}]}, timeout=60).json()
    got = [body["data"][0]["embedding"]]
    reference = ImageOps.exif_transpose(Image.open(io.BytesIO(rotated))).convert("RGB")
    sideways = Image.open(io.BytesIO(rotated)).convert("RGB")
    assert cosines(got, torch_images(tiny_model, [reference]))[0] >= 0.9999
    assert cosines(got, torch_images(tiny_model, [sideways]))[0] < 0.9999


def test_usage_counts_the_tokens_the_text_tower_took(gateway, tiny_model):
    _, _, tokenizer = tiny_model
    texts = ["a photo of a cat", "an astronaut", ""]
    body = httpx.post(f"{gateway.url}/v1/embeddings", json={"model": "tiny", "input": texts}, timeout=60).json()
    assert body["usage"]["prompt_tokens"] == int((tokenizer(texts) != 0).sum()) == body["usage"]["total_tokens"]
    mixed = httpx.post(f"{gateway.url}/v1/embed", json={"inputs": [{"image": b64(jpeg())}, {"text": "a cat"}]},
                       timeout=60).json()
    assert mixed["usage"]["prompt_tokens"] == int((tokenizer(["a cat"]) != 0).sum())
