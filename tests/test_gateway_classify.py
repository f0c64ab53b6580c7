"""Zero-shot classification: the model's own logit scale, a prompt ensemble, top-k; and tags."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch

from testkit.photos import b64, jpeg, photo
from tests.test_gateway_embeddings import torch_images, torch_texts

pytestmark = pytest.mark.slow

LABELS = ["cat", "astronaut", "coffee cup", "rocket"]


def expected_probabilities(tiny_model, image_name, templates):
    model = tiny_model[0]
    image = torch_images(tiny_model, [photo(image_name)])
    labels = []
    for label in LABELS:
        prompts = torch_texts(tiny_model, [t.format(label) for t in templates]).mean(0)
        labels.append(prompts / np.linalg.norm(prompts))
    scale = float(model.logit_scale.detach().exp())
    assert abs(scale - 100) > 1, "the tiny checkpoint's scale must differ from 100 for this test to mean anything"
    logits = scale * image @ np.array(labels).T
    return torch.softmax(torch.from_numpy(logits), dim=1).numpy()[0]


@pytest.mark.parametrize("templates", [None, ["a photo of a {}.", "a drawing of a {}."]])
def test_classify_matches_softmax_over_learned_scale(gateway, tiny_model, templates):
    from hqclip.repo.prompts import DEFAULT_TEMPLATES

    body = {"images": [b64(jpeg("chelsea"))], "labels": LABELS, "top_k": len(LABELS)}
    if templates:
        body["templates"] = templates
    response = httpx.post(f"{gateway.url}/v1/classify", json=body, timeout=60)
    assert response.status_code == 200, response.text
    scores = {s["label"]: s["score"] for s in response.json()["data"][0]["labels"]}
    expected = expected_probabilities(tiny_model, "chelsea", templates or DEFAULT_TEMPLATES)
    assert np.allclose([scores[label] for label in LABELS], expected, atol=2e-3)
    assert abs(sum(scores.values()) - 1) < 1e-4


def test_classify_top_k_is_sorted_and_bounded(gateway):
    body = {"images": [b64(jpeg("rocket")), b64(jpeg("coffee"))], "labels": LABELS, "top_k": 2}
    data = httpx.post(f"{gateway.url}/v1/classify", json=body, timeout=60).json()["data"]
    assert [d["index"] for d in data] == [0, 1]
    for item in data:
        scores = [s["score"] for s in item["labels"]]
        assert len(scores) == 2 and scores == sorted(scores, reverse=True)


TAGS = ["cat", "dog", "yak", "apple", "rocket"]


@pytest.fixture(scope="module")
def tagged(tmp_path_factory, tiny_checkpoint, gateway_factory):
    """The tiny model exported with a seeded random tag head, served; and that head in torch."""
    from training.export import export_model
    from training.models import load_model

    loaded = load_model(str(tiny_checkpoint))
    torch.manual_seed(1)
    head = torch.nn.Linear(loaded.model.text_projection.shape[1], len(TAGS))
    repo = tmp_path_factory.mktemp("tagged-repo")
    export_model(loaded.model, loaded.preprocess_cfg, loaded.tokenizer, repo, "tagged", loaded.weights, head, TAGS)
    return gateway_factory(HQCLIP_MODEL_REPO=str(repo)), head


def test_tags_are_the_heads_sigmoid_over_image_embeddings(tagged, tiny_model):
    server, head = tagged
    body = {"images": [b64(jpeg("chelsea")), b64(jpeg("rocket"))], "top_k": 3}
    response = httpx.post(f"{server.url}/v1/tags", json=body, timeout=60)
    assert response.status_code == 200, response.text
    with torch.no_grad():
        images = torch.from_numpy(torch_images(tiny_model, [photo("chelsea"), photo("rocket")]))
        expected = torch.sigmoid(head(images)).numpy()
    for item, row in zip(response.json()["data"], expected):
        order = np.argsort(-row)[:3]
        assert [t["tag"] for t in item["tags"]] == [TAGS[j] for j in order]
        assert np.allclose([t["probability"] for t in item["tags"]], row[order], atol=2e-3)
    strict = httpx.post(f"{server.url}/v1/tags", json={**body, "threshold": 0.999}, timeout=60).json()
    assert all(t["probability"] >= 0.999 for item in strict["data"] for t in item["tags"])


def test_tags_without_a_tag_head_is_404(gateway):
    response = httpx.post(f"{gateway.url}/v1/tags", json={"images": [b64(jpeg())]}, timeout=60)
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "model"


def test_bad_template_names_the_field(gateway):
    body = {"images": [b64(jpeg())], "labels": LABELS, "templates": ["no placeholder"]}
    response = httpx.post(f"{gateway.url}/v1/classify", json=body, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "templates[0]"
