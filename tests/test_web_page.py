"""The gateway's web page, end to end in headless Chromium (Debian's `chromium`, driven by Playwright):
the page loads without a key and asks for one; a typed query shows thumbnails and scores; an uploaded image is
searched for, classified against typed labels, and tagged; errors from the gateway are shown as it said them."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

from hqclip_client import Client, Item
from hqclip_client.ingest import thumbnail
from tests.photos import jpeg, write_jpegs

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"  # Debian's package (Makefile: apt); never a browser downloaded by Playwright
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
COLLECTION = "web-photos"


@pytest.fixture(scope="module")
def sdk(client_gateway):
    with Client(client_gateway.url, api_key=client_gateway.env["HQCLIP_API_KEYS"].split(",")[0]) as client:
        client.create_collection(COLLECTION)
        client.add(COLLECTION, [Item(id=f"{n}.jpg", image=jpeg(n), caption=f"a photo: {n}",
                                     attributes={"thumbnail": thumbnail(jpeg(n))}) for n in PHOTOS])
        yield client


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return write_jpegs(tmp_path_factory.mktemp("uploads"), PHOTOS)


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).exists(), "install Debian's chromium: apt-get install chromium (the Makefile's apt step)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, client_gateway, sdk):
    """The page, opened like a first visit, then given the API key through its key field."""
    context = browser.new_context()
    page = context.new_page()
    page.goto(client_gateway.url + "/")
    expect(page.locator("#error")).to_contain_text("API key")  # no key yet: the API said 401
    page.fill("#api-key", sdk.api_key)
    page.click("#key-form button")
    expect(page.locator("#model-info")).to_contain_text("tagged")
    expect(page.locator("#error")).to_be_hidden()
    yield page
    context.close()


def test_the_page_and_its_files_need_no_key_but_the_api_does(client_gateway):
    page = httpx.get(client_gateway.url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset in ("static/app.js", "static/style.css"):
        assert asset in page.text
        assert httpx.get(f"{client_gateway.url}/{asset}", timeout=10).status_code == 200
    assert httpx.get(client_gateway.url + "/v1/collections", timeout=10).status_code == 401


def test_a_typed_query_shows_thumbnails_and_scores(page, sdk):
    page.select_option("#collection", COLLECTION)
    page.fill("#query", "a cat sitting")
    page.fill("#top-k", "3")
    page.click("#search-button")
    hits = page.locator("#results .hit")
    expect(hits).to_have_count(3)
    expected = sdk.search(COLLECTION, "a cat sitting", top_k=3).results
    assert hits.locator(".id").all_inner_texts() == [h.id for h in expected]
    assert hits.locator(".score").all_inner_texts() == [f"{h.score:.3f}" for h in expected]
    for image in hits.locator("img").all():
        assert image.get_attribute("src").startswith("data:image/jpeg;base64,")
        assert image.evaluate("img => img.complete && img.naturalWidth > 0"), "the thumbnail decodes"


def test_an_uploaded_image_finds_itself(page, files):
    page.select_option("#collection", COLLECTION)
    page.set_input_files("#query-image", str(files["rocket"]))
    page.click("#search-button")
    expect(page.locator("#results .hit").first.locator(".id")).to_have_text("rocket.jpg")
    expect(page.locator("#search-status")).to_contain_text("rocket.jpg")


def test_an_uploaded_image_is_classified_against_typed_labels_and_tagged(page, sdk, files):
    page.set_input_files("#image-file", str(files["chelsea"]))
    expect(page.locator("#image-preview")).to_be_visible()
    page.fill("#labels", "cat, astronaut, coffee cup")
    page.click("#classify-button")
    rows = page.locator("#classify-result .label-row")
    expect(rows).to_have_count(3)
    expected = sdk.classify([files["chelsea"]], ["cat", "astronaut", "coffee cup"], top_k=3)[0].labels
    assert rows.locator(".label").all_inner_texts() == [s.label for s in expected]
    assert rows.locator(".value").all_inner_texts() == [f"{s.score:.3f}" for s in expected]

    page.click("#tags-button")
    chips = page.locator("#tags-result .chip")
    expected_tags = sdk.tags([files["chelsea"]], top_k=10)[0].tags
    expect(chips).to_have_count(len(expected_tags))
    assert chips.all_inner_texts() == [f"{t.tag} {t.probability:.2f}" for t in expected_tags]
    expect(page.locator("#refine-button")).to_be_hidden()  # this gateway has no LVLM


def test_errors_are_shown_as_the_gateway_said_them(page, files):
    page.set_input_files("#image-file", str(files["coffee"]))
    page.fill("#labels", "cat")
    page.evaluate("localStorage.setItem('hqclip.apiKey', 'wrong')")
    page.click("#classify-button")
    expect(page.locator("#error")).to_contain_text("401")
    expect(page.locator("#error")).to_contain_text("field: authorization")


def test_refine_shows_the_four_fields_when_an_lvlm_is_configured(browser, lvlm_gateway, files):
    context = browser.new_context()
    page = context.new_page()
    page.goto(lvlm_gateway.url + "/")  # no API keys on this gateway: no key needed
    expect(page.locator("#model-info")).to_contain_text("tagged")
    page.set_input_files("#image-file", str(files["astronaut"]))
    page.click("#refine-button")
    fields = page.locator("#refine-result dt")
    expect(fields).to_have_count(4, timeout=120_000)
    assert fields.all_inner_texts() == ["desc", "neg_desc", "tags", "neg_tags"]
    assert all(text.strip() for text in page.locator("#refine-result dd").all_inner_texts())
    expect(page.locator("#error")).to_be_hidden()
    context.close()
