"""Bad input gets a 4xx in OpenAI's error shape naming the field, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest
from PIL import Image

from testkit.photos import b64, encode, jpeg

pytestmark = pytest.mark.slow


def post(gateway, path, body):
    return httpx.post(f"{gateway.url}{path}", json=body, timeout=60)


def images_body(*values):
    return {"model": "tiny", "modality": "image", "input": list(values)}


def bomb_png() -> bytes:
    """A small file that decodes to 100 megapixels."""
    return encode(Image.new("L", (10_000, 10_000)), "PNG", optimize=True)


CASES = {
    "invalid base64": (images_body("not base64 at all!!"), 400, "input[0]"),
    "not an image": (images_body(b64(b"hello, I am plain text, not a picture")), 400, "input[0]"),
    "truncated jpeg": (images_body(b64(jpeg()), b64(jpeg()[:3000])), 400, "input[1]"),
    "empty list": ({"model": "tiny", "input": []}, 400, "input"),
    "unknown model": ({"model": "gpt-4", "input": ["hi"]}, 404, "model"),
    "wrong modality": ({"model": "tiny", "input": ["x"], "modality": "audio"}, 422, "modality"),
    "missing input": ({"model": "tiny"}, 422, "input"),
    "decompression bomb": (images_body(b64(bomb_png())), 400, "input[0]"),
    "data uri not base64": (images_body("data:image/png,abc"), 400, "input[0]"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_a_clear_4xx_and_the_server_survives(gateway, case):
    body, status, param = CASES[case]
    response = post(gateway, "/v1/embeddings", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]
    assert post(gateway, "/v1/embeddings", {"model": "tiny", "input": ["still serving"]}).status_code == 200


def test_too_many_items_and_too_many_bytes(gateway_factory):
    small = gateway_factory(HQCLIP_LIMITS__MAX_ITEMS="3", HQCLIP_LIMITS__MAX_IMAGE_BYTES="2000")
    response = post(small, "/v1/embeddings", {"model": "tiny", "input": ["a"] * 4})
    assert response.status_code == 400 and response.json()["error"]["param"] == "input"
    response = post(small, "/v1/embeddings", images_body(b64(jpeg())))
    assert response.status_code == 413 and response.json()["error"]["param"] == "input[0]"
    upload = httpx.post(f"{small.url}/v1/embed/upload", files=[("files", ("a.jpg", jpeg(), "image/jpeg"))])
    assert upload.status_code == 413 and upload.json()["error"]["param"] == "files[0]"


def test_mixed_input_needs_exactly_one_field(gateway):
    response = post(gateway, "/v1/embed", {"inputs": [{"text": "a", "image": b64(jpeg())}]})
    assert response.status_code == 422
    assert response.json()["error"]["param"].startswith("inputs.0")


def test_a_bad_input_of_a_mixed_batch_is_named_where_it_stands(gateway):
    body = {"inputs": [{"text": "fine"}, {"image": b64(jpeg())}, {"image": b64(b"not an image")}]}
    response = httpx.post(f"{gateway.url}/v1/embed", json=body, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "inputs[2]", response.text
