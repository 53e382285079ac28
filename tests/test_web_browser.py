"""The search page in a real headless Chromium (Debian's `chromium`, driven by Playwright), against the waitress server.

Flow: upload (file picker and drag-and-drop) -> spinner -> results count -> tag filter -> drag to favourites -> reload keeps
them -> favourites only -> more like these -> enlarge/shrink -> clear -> random -> model switch -> side by side -> errors.
Set TFR_SCREENSHOTS=1 to (re)write the screenshots in docs/screenshots/.
"""
from __future__ import annotations

import base64
import io
import os
import re
import threading
import time

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "screenshots")

# Skipped where there is no Chromium, except where TFR_REQUIRE_BROWSER=1 (CI): there they run, and fail without it.
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM) and os.environ.get("TFR_REQUIRE_BROWSER") != "1",
                                reason=f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium)")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
expect = sync_api.expect


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The app over two real engines, served by waitress on a free localhost port."""
    from test_web import build_test_engines

    from tf_retrieval.web.app import create_app, create_server

    engines = build_test_engines(tmp_path_factory.mktemp("shapes"))
    server = create_server(create_app(engines, default_k=12, max_k=60), host="127.0.0.1", port=0, threads=4)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.effective_port}", engines
    server.close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, site):
    context = browser.new_context(viewport={"width": 1360, "height": 900}, device_scale_factor=1)
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.on("console", lambda msg: msg.type == "error" and "the server responded with a status of 4" not in msg.text
            and page.errors.append(msg.text))
    page.goto(site[0])
    yield page
    context.close()
    assert page.errors == [], page.errors


def shot(page, name: str, full_page: bool = False):
    if os.environ.get("TFR_SCREENSHOTS") == "1":
        os.makedirs(SCREENSHOTS, exist_ok=True)
        page.wait_for_load_state("networkidle")
        page.evaluate("Promise.all([...document.images].map(i => i.decode().catch(() => null)))")
        page.evaluate("window.scrollTo(0, 0)")
        page.mouse.move(0, 0)  # no hover effects in the picture
        from PIL import Image

        picture = Image.open(io.BytesIO(page.screenshot(full_page=full_page)))
        picture.save(os.path.join(SCREENSHOTS, name), optimize=True)  # lossless, smaller than Chromium's encoding


def image_path(engines, image_id: str) -> str:
    collection = engines["baseline"].collection
    return collection.paths[collection.ids.index(image_id)]


def visible_cards(page):
    return page.locator("#results .card:visible")


def test_full_search_flow(page, site):
    base, engines = site
    expect(page.locator("#intro")).to_contain_text("content-based image retrieval")
    expect(page.locator("#stats-line")).to_contain_text("60 images")
    expect(page.locator("#empty")).to_be_visible()
    shot(page, "01_home.png")

    # upload with the file picker; the spinner shows while the request is held back
    page.set_input_files("#file-input", image_path(engines, "ring/ring_03.png"))
    expect(page.locator("#query-preview")).to_be_visible()
    expect(page.locator("#query-caption")).to_contain_text("ring_03.png")
    held = []
    page.route("**/api/search", lambda route: held.append(route))
    page.click("#search-btn")
    expect(page.locator("#spinner")).to_be_visible()
    expect(page.locator("#search-btn")).to_be_disabled()
    deadline = time.time() + 10
    while not held and time.time() < deadline:
        page.wait_for_timeout(20)
    shot(page, "02_searching.png")
    held[0].continue_()
    page.unroute("**/api/search")
    expect(page.locator("#spinner")).to_be_hidden()

    # results: count, query image and settings stay visible, best result is the image itself
    expect(page.locator("#results .card")).to_have_count(12)
    expect(page.locator("#total")).to_have_text("12 results")
    expect(page.locator("#settings-line")).to_contain_text("query ring_03.png (64×64) · model baseline · k 12")
    expect(page.locator("#summary-query")).to_be_visible()
    expect(page.locator("#query-preview")).to_be_visible()
    assert page.locator("#results .card").first.get_attribute("data-id") == "ring/ring_03.png"
    shot(page, "03_results.png")

    # class tags: distinct colours, click filters to that class, click again shows all
    tag_colours = page.eval_on_selector_all("#tags .tag", "tags => tags.map(t => getComputedStyle(t).backgroundColor)")
    assert len(tag_colours) == len(set(tag_colours)) >= 2
    classes = page.eval_on_selector_all("#results .card", "cards => cards.map(c => c.dataset.class)")
    other = next(c for c in classes if c != "ring")
    page.click(f"#tags .tag[data-class='{other}']")
    expect(visible_cards(page)).to_have_count(classes.count(other))
    assert set(page.eval_on_selector_all("#results .card:not([hidden])", "cs => cs.map(c => c.dataset.class)")) == {other}
    expect(page.locator("#filter-status")).to_contain_text(f"showing {classes.count(other)} of 12")
    shot(page, "04_tag_filter.png")
    page.click(f"#tags .tag[data-class='{other}']")
    expect(visible_cards(page)).to_have_count(12)
    page.locator("#results .card .tag").nth(0).click()  # the tags on the cards filter too
    expect(visible_cards(page)).to_have_count(classes.count("ring"))
    page.locator("#results .card:visible .tag").first.click()
    expect(visible_cards(page)).to_have_count(12)

    # favourites: drag two results onto the area, star a third; they survive a reload
    cards = page.locator("#results .card")
    favourite_ids = [cards.nth(i).get_attribute("data-id") for i in (1, 2, 3)]
    # The drop area in view first: a drag that has to scroll to its target while the button is down starts on
    # whichever card the scroll brought under the pointer.
    page.locator("#favourites").scroll_into_view_if_needed()
    cards.nth(1).drag_to(page.locator("#favourites"))
    expect(page.locator("#favourites .fav")).to_have_count(1)
    cards.nth(2).drag_to(page.locator("#favourites"))
    cards.nth(3).hover()
    cards.nth(3).locator(".star").click()
    expect(page.locator("#favourites .fav")).to_have_count(3)
    expect(page.locator("#fav-count")).to_have_text("3")
    assert page.eval_on_selector_all("#favourites .fav", "fs => fs.map(f => f.dataset.id)") == favourite_ids
    shot(page, "05_favourites_added.png", full_page=True)
    page.reload()
    expect(page.locator("#favourites .fav")).to_have_count(3)

    page.click("#fav-only-btn")
    expect(page.locator("#results .card")).to_have_count(3)
    expect(page.locator("#total")).to_have_text("3 favourites")
    assert page.eval_on_selector_all("#results .card", "cs => cs.map(c => c.dataset.id)") == favourite_ids
    shot(page, "06_favourites_only.png", full_page=True)
    page.click("#fav-only-btn")

    # more like these (Rocchio from the favourites; no query after the reload: their centroid)
    page.click("#more-like-btn")
    expect(page.locator("#settings-line")).to_contain_text("feedback from 3 favourite(s)")
    expect(page.locator("#results .card")).to_have_count(12)
    result_ids = page.eval_on_selector_all("#results .card", "cs => cs.map(c => c.dataset.id)")
    assert not set(result_ids) & set(favourite_ids)

    # enlarge / shrink thumbnails
    width = page.locator("#results .card").first.bounding_box()["width"]
    page.click("#enlarge-btn")
    page.click("#enlarge-btn")
    bigger = page.locator("#results .card").first.bounding_box()["width"]
    assert bigger > width * 1.2
    shot(page, "07_enlarged.png")
    for _ in range(4):
        page.click("#shrink-btn")
    expect(page.locator("#shrink-btn")).to_be_disabled()
    assert page.locator("#results .card").first.bounding_box()["width"] < width

    # clear: back to a fresh search, favourites kept
    page.fill("#k-input", "5")
    page.click("#clear-btn")
    expect(page.locator("#empty")).to_be_visible()
    expect(page.locator("#results .card")).to_have_count(0)
    expect(page.locator("#query-preview")).to_be_hidden()
    expect(page.locator("#k-input")).to_have_value("12")
    expect(page.locator("#favourites .fav")).to_have_count(3)

    # random database image and its neighbours
    page.click("#random-btn")
    expect(page.locator("#settings-line")).to_contain_text("query random database image")
    expect(page.locator("#results .card")).to_have_count(12)
    expect(page.locator("#query-caption")).to_contain_text("database image")
    random_id = page.locator("#query-caption").text_content().split("database image ")[1].split(" · ")[0]
    assert random_id not in page.eval_on_selector_all("#results .card", "cs => cs.map(c => c.dataset.id)")
    shot(page, "08_random.png")

    # model switch: the same query through the other model
    page.select_option("#model-select", "finetuned")
    page.click("#search-btn")
    expect(page.locator("#settings-line")).to_contain_text("model finetuned")
    expect(page.locator("#results .card img").first).to_have_attribute("src", re.compile("model=finetuned"))

    # side by side: both models, one column each
    page.check("#compare-check")
    page.click("#search-btn")
    expect(page.locator("#results .column")).to_have_count(2)
    assert page.eval_on_selector_all("#results .column", "cs => cs.map(c => c.dataset.model)") == ["baseline", "finetuned"]
    for model in ("baseline", "finetuned"):
        expect(page.locator(f"#results .column[data-model='{model}'] .card")).to_have_count(12)
    expect(page.locator("#settings-line")).to_contain_text("side by side")
    page.click("#enlarge-btn")  # from the smallest size to the next one, so both columns fit three across
    shot(page, "09_side_by_side.png", full_page=True)


def test_drag_and_drop_upload_relaxing_and_errors(page, site):
    base, engines = site
    path = image_path(engines, "cross/cross_04.png")
    with open(path, "rb") as f:
        encoded = base64.b64encode(f.read()).decode()
    page.evaluate("""([data, name]) => {
        const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: "image/png"}));
        const zone = document.getElementById("dropzone");
        for (const type of ["dragenter", "dragover", "drop"])
            zone.dispatchEvent(new DragEvent(type, {dataTransfer: transfer, bubbles: true, cancelable: true}));
    }""", [encoded, "dropped cross.png"])
    expect(page.locator("#query-caption")).to_contain_text("dropped cross.png")
    page.check("#threshold-check")
    page.fill("#k-input", "60")
    page.locator("#threshold-input").fill("0.99")
    page.click("#search-btn")
    expect(page.locator("#settings-line")).to_contain_text("threshold 0.99")
    total = int(page.locator("#total strong").text_content())
    assert 1 <= total < 60  # the image itself (score 1.0) passes a 0.99 threshold; far images do not
    assert page.locator("#results .card").first.get_attribute("data-id") == "cross/cross_04.png"
    page.click("#relax [data-relax='threshold']")  # relax the search: lower threshold -> at least as many results
    expect(page.locator("#settings-line")).to_contain_text("threshold 0.89")
    assert int(page.locator("#total strong").text_content()) >= total

    # a class filter from the settings panel, then "include all classes"
    for box in page.locator("#class-filter input").all():
        if box.get_attribute("value") not in ("cross", "square"):
            box.uncheck()
    page.click("#search-btn")
    expect(page.locator("#settings-line")).to_contain_text("classes cross, square")
    assert set(page.eval_on_selector_all("#results .card", "cs => cs.map(c => c.dataset.class)")) <= {"cross", "square"}
    page.click("#relax [data-relax='classes']")
    expect(page.locator("#settings-line")).to_contain_text("classes all")
    for box in page.locator("#class-filter input").all():  # no class ticked: nothing to search, not everything
        box.uncheck()
    page.click("#search-btn")
    expect(page.locator("#error")).to_contain_text("Tick at least one class")
    page.click("#classes-all-btn")

    # dragging a result onto the query area makes it the query
    page.locator("#results .card").nth(2).drag_to(page.locator("#dropzone"))
    expect(page.locator("#query-caption")).to_contain_text("database image")

    # a broken upload: a clear error message, and the page keeps working
    page.set_input_files("#file-input", files=[{"name": "broken.png", "mimeType": "image/png",
                                                "buffer": b"this is not really a png"}])
    page.click("#search-btn")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("not an image")
    shot(page, "10_error.png")
    page.uncheck("#threshold-check")
    page.click("#random-btn")
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#results .card")).to_have_count(59)  # k=60: every other image


def test_a_new_query_cancels_the_search_in_flight(page, site):
    """Results shown under a query image are that image's: choosing another one while a search runs cancels it."""
    base, engines = site
    page.set_input_files("#file-input", image_path(engines, "ring/ring_03.png"))
    held = []
    page.route("**/api/search", lambda route: held.append(route))
    page.click("#search-btn")
    expect(page.locator("#spinner")).to_be_visible()
    deadline = time.time() + 10
    while not held and time.time() < deadline:
        page.wait_for_timeout(20)
    page.set_input_files("#file-input", image_path(engines, "cross/cross_04.png"))
    expect(page.locator("#spinner")).to_be_hidden()
    expect(page.locator("#search-btn")).to_be_enabled()
    page.unroute("**/api/search")
    page.click("#search-btn")
    expect(page.locator("#settings-line")).to_contain_text("query cross_04.png")
    assert page.locator("#results .card").first.get_attribute("data-id") == "cross/cross_04.png"
