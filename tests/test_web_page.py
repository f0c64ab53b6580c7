"""The gateway's web page, end to end in headless Chromium (Debian's `chromium`, driven by Playwright):
the page loads without a key and asks for one; a typed query shows thumbnails and scores; an uploaded image is
searched for, classified against typed labels, and tagged; errors from the gateway are shown as it said them.

Playwright's async API on pytest-asyncio's session loop, not its sync API: the sync API switches greenlets inside
the pytest process, and the suite's CI run once ended in a segmentation fault while these fixtures were torn down."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from playwright.async_api import async_playwright, expect

from hqclip_client import Client, Item
from hqclip_client.ingest import thumbnail
from testkit.photos import jpeg, write_jpegs

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]

CHROMIUM = "/usr/bin/chromium"  # Debian's package (Makefile: apt); never a browser downloaded by Playwright
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
COLLECTION = "web-photos"
TAGGED = "web-tagged"  # items with tags of their own (and the model's): the page shows them and filters by one


@pytest.fixture(scope="module")
def sdk(client_gateway):
    with Client(client_gateway.url, api_key=client_gateway.env["HQCLIP_API_KEYS"].split(",")[0]) as client:
        client.create_collection(COLLECTION)
        client.add(COLLECTION, [Item(id=f"{n}.jpg", image=jpeg(n), caption=f"a photo: {n}",
                                     attributes={"thumbnail": thumbnail(jpeg(n))}) for n in PHOTOS])
        yield client


@pytest.fixture(scope="module")
def tagged(sdk):
    sdk.create_collection(TAGGED)
    sdk.add(TAGGED, [Item(id=n, image=jpeg(n), tags=["space" if n in ("astronaut", "rocket") else "earth", n],
                          attributes={"thumbnail": thumbnail(jpeg(n))}) for n in PHOTOS])
    return TAGGED


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return write_jpegs(tmp_path_factory.mktemp("uploads"), PHOTOS)


@pytest.fixture(scope="module")
async def browser():
    assert Path(CHROMIUM).exists(), "install Debian's chromium: apt-get install chromium (the Makefile's apt step)"  # noqa: ASYNC240
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


@pytest.fixture
async def page(browser, client_gateway, sdk):
    """The page, opened like a first visit, then given the API key through its key field."""
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(client_gateway.url + "/")
    await expect(page.locator("#error")).to_contain_text("API key")  # no key yet: the API said 401
    await page.fill("#api-key", sdk.api_key)
    await page.click("#key-form button")
    await expect(page.locator("#model-info")).to_contain_text("tagged")
    await expect(page.locator("#error")).to_be_hidden()
    yield page
    await context.close()


async def test_the_page_and_its_files_need_no_key_but_the_api_does(client_gateway):
    async with httpx.AsyncClient(base_url=client_gateway.url, timeout=10) as http:
        page = await http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        for asset in ("static/app.js", "static/style.css"):
            assert asset in page.text
            assert (await http.get(f"/{asset}")).status_code == 200
        assert (await http.get("/v1/collections")).status_code == 401


async def test_a_typed_query_shows_thumbnails_and_scores(page, sdk):
    await page.select_option("#collection", COLLECTION)
    await page.fill("#query", "a cat sitting")
    await page.fill("#top-k", "3")
    await page.click("#search-button")
    hits = page.locator("#results .hit")
    await expect(hits).to_have_count(3)
    expected = sdk.search(COLLECTION, "a cat sitting", top_k=3).results
    assert await hits.locator(".id").all_inner_texts() == [h.id for h in expected]
    assert await hits.locator(".score").all_inner_texts() == [f"{h.score:.3f}" for h in expected]
    for image in await hits.locator("img").all():
        assert (await image.get_attribute("src")).startswith("data:image/jpeg;base64,")
        assert await image.evaluate("img => img.complete && img.naturalWidth > 0"), "the thumbnail decodes"


async def test_hits_show_their_tags_and_a_click_on_one_filters_by_it(tagged, page, sdk):
    await page.select_option("#collection", tagged)
    await page.fill("#query", "a photo")
    await page.click("#search-button")
    hits = page.locator("#results .hit")
    await expect(hits).to_have_count(len(PHOTOS))
    expected = sdk.search(tagged, "a photo", top_k=len(PHOTOS)).results
    assert [await hit.locator(".chip").all_inner_texts() for hit in await hits.all()] == [h.tags for h in expected]
    rocket = hits.filter(has=page.locator(".id", has_text="rocket"))
    await rocket.get_by_role("button", name="space", exact=True).click()
    await expect(page.locator("#search-status")).to_contain_text("tagged “space”")
    await expect(hits).to_have_count(2)
    assert sorted(await hits.locator(".id").all_inner_texts()) == ["astronaut", "rocket"]
    assert await page.input_value("#tag-filter") == "space"


async def test_an_uploaded_image_finds_itself(page, files):
    await page.select_option("#collection", COLLECTION)
    await page.set_input_files("#query-image", str(files["rocket"]))
    await page.click("#search-button")
    await expect(page.locator("#results .hit").first.locator(".id")).to_have_text("rocket.jpg")
    await expect(page.locator("#search-status")).to_contain_text("rocket.jpg")


async def test_an_uploaded_image_is_classified_against_typed_labels_and_tagged(page, sdk, files):
    await page.set_input_files("#image-file", str(files["chelsea"]))
    await expect(page.locator("#image-preview")).to_be_visible()
    await page.fill("#labels", "cat, astronaut, coffee cup")
    await page.click("#classify-button")
    rows = page.locator("#classify-result .label-row")
    await expect(rows).to_have_count(3)
    expected = sdk.classify([files["chelsea"]], ["cat", "astronaut", "coffee cup"], top_k=3)[0].labels
    assert await rows.locator(".label").all_inner_texts() == [s.label for s in expected]
    assert await rows.locator(".value").all_inner_texts() == [f"{s.score:.3f}" for s in expected]

    await page.click("#tags-button")
    chips = page.locator("#tags-result .chip")
    expected_tags = sdk.tags([files["chelsea"]], top_k=10)[0].tags
    await expect(chips).to_have_count(len(expected_tags))
    assert await chips.all_inner_texts() == [f"{t.tag} {t.probability:.2f}" for t in expected_tags]
    await expect(page.locator("#refine-button")).to_be_hidden()  # this gateway has no LVLM


async def test_errors_are_shown_as_the_gateway_said_them(page, files):
    await page.set_input_files("#image-file", str(files["coffee"]))
    await page.fill("#labels", "cat")
    await page.evaluate("localStorage.setItem('hqclip.apiKey', 'wrong')")
    await page.click("#classify-button")
    await expect(page.locator("#error")).to_contain_text("401")
    await expect(page.locator("#error")).to_contain_text("field: authorization")


async def test_refine_shows_the_four_fields_when_an_lvlm_is_configured(browser, lvlm_gateway, files):
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(lvlm_gateway.url + "/")  # no API keys on this gateway: no key needed
    await expect(page.locator("#model-info")).to_contain_text("tagged")
    await page.set_input_files("#image-file", str(files["astronaut"]))
    await page.click("#refine-button")
    fields = page.locator("#refine-result dt")
    await expect(fields).to_have_count(4, timeout=120_000)
    assert await fields.all_inner_texts() == ["desc", "neg_desc", "tags", "neg_tags"]
    assert all(text.strip() for text in await page.locator("#refine-result dd").all_inner_texts())
    await expect(page.locator("#error")).to_be_hidden()
    await context.close()
