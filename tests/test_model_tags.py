"""Ingestion without an LVLM stores the model's own tags: the short-tag head's (what /v1/tags answers) at or above
HQCLIP_INDEX__AUTO_TAG_THRESHOLD, at most HQCLIP_INDEX__AUTO_TAG_TOP_K, beside the item's own tags; a tag filter
finds them. Real gateway processes on the tagged tiny model (a seeded random tag head over eight tags)."""

from __future__ import annotations

import httpx
import pytest

from testkit.photos import b64, jpeg

pytestmark = pytest.mark.slow

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
THRESHOLD, TOP_K = 0.1, 2  # the seeded head says ~0.13 for its top tags


def post(gateway, path: str, body: dict) -> dict:
    response = httpx.post(gateway.url + path, json=body, timeout=60)
    assert response.status_code < 300, response.text
    return response.json()


def stored(gateway, name: str) -> dict[str, dict]:
    """Every item of a small collection, by id."""
    hits = post(gateway, f"/v1/collections/{name}/search", {"text": "anything", "top_k": 100})["results"]
    return {hit["id"]: hit for hit in hits}


def add(gateway, name: str, **body) -> None:
    post(gateway, "/v1/collections", {"name": name})
    items = [{"id": n, "image": b64(jpeg(n)), "tags": ["mine"]} for n in PHOTOS]
    post(gateway, f"/v1/collections/{name}/items", {"items": [*items, {"id": "note", "text": "a cat"}], **body})


@pytest.fixture(scope="module")
def tagging(gateway_factory, tagged_repo):
    return gateway_factory(HQCLIP_MODEL_REPO=str(tagged_repo), HQCLIP_INDEX__AUTO_TAG_THRESHOLD=str(THRESHOLD),
                           HQCLIP_INDEX__AUTO_TAG_TOP_K=str(TOP_K))


def test_images_get_the_tag_heads_confident_tags_and_a_filter_finds_them(tagging):
    add(tagging, "auto", refine=False)
    items = stored(tagging, "auto")
    heads = post(tagging, "/v1/tags", {"images": [b64(jpeg(n)) for n in PHOTOS], "top_k": TOP_K,
                                       "threshold": THRESHOLD})["data"]
    assert any(row["tags"] for row in heads), "the seeded head is confident about some photo: else this proves nothing"
    for name, row in zip(PHOTOS, heads):
        expected = {t["tag"]: t["probability"] for t in row["tags"]}
        assert items[name]["tags"] == ["mine", *expected]
        assert items[name]["attributes"].get("model_tags", {}) == pytest.approx(expected, abs=1e-4)
    assert (items["note"]["tags"], items["note"]["attributes"]) == ([], {})  # a text has no tag head's view
    tag, holders = next((t["tag"], [n for n, r in zip(PHOTOS, heads) if t["tag"] in [x["tag"] for x in r["tags"]]])
                        for row in heads for t in row["tags"])
    found = post(tagging, "/v1/collections/auto/search", {"text": "a photo", "top_k": 10,
                                                         "filters": {"tags": [tag]}})["results"]
    assert sorted(h["id"] for h in found) == sorted(holders)


def test_top_k_0_turns_it_off_and_a_model_without_a_tag_head_stores_none(gateway_factory, tagged_repo, gateway):
    off = gateway_factory(HQCLIP_MODEL_REPO=str(tagged_repo), HQCLIP_INDEX__AUTO_TAG_TOP_K="0")
    for server in (off, gateway):  # `gateway`: the tiny model, no tag head
        add(server, "untagged")
        assert {i: (h["tags"], h["attributes"]) for i, h in stored(server, "untagged").items()} == {
            **{n: (["mine"], {}) for n in PHOTOS}, "note": ([], {})}
