"""The search page and the `query --html` report in real headless Chromium (Playwright).

Skips with the reason when Playwright, FastAPI or a Chromium binary is absent; the
browser is the system's (`chromium`, or $RETRIEVAL_CHROMIUM), never a download.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="fastapi is not installed (pip install 'retrieval[serve]')")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install 'retrieval[serve]')")

from PIL import Image  # noqa: E402

from conftest import make_scene, run_cli  # noqa: E402
from serving import build_tiny_index, serve_process  # noqa: E402

CHROMIUM = os.environ.get("RETRIEVAL_CHROMIUM") or next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium found (apt-get install chromium, or set RETRIEVAL_CHROMIUM)")
WAIT_MS = 60_000
TOKEN = "page-token"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_index(tmp_path_factory.mktemp("browser"), 6)


@pytest.fixture(scope="module")
def server(tiny):
    with serve_process(tiny[0]) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        try:
            b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        except sync_api.Error as err:
            pytest.skip(f"the Chromium at {CHROMIUM} does not start under Playwright: {str(err).splitlines()[0]}")
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = context.new_page()
    pg.requested = []
    pg.on("request", lambda request: pg.requested.append(request.url))
    yield pg
    context.close()


def _boxes_drawn(page, selector: str) -> list[dict]:
    """Bounding boxes of the elements matching `selector`, each checked to have an area."""
    boxes = [el.bounding_box() for el in page.query_selector_all(selector)]
    assert boxes and all(b and b["width"] > 1 and b["height"] > 1 for b in boxes), (selector, boxes)
    return boxes


def _all_images_loaded(page) -> bool:
    return page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)")


def test_page_upload_shows_ranked_hits_with_windows(page, server, tiny, tmp_path):
    _, paths = tiny
    page.goto(server)
    page.wait_for_function("document.getElementById('info').textContent.includes('6 images')", timeout=WAIT_MS)
    assert "resnet18" in page.inner_text("#info")
    page.set_input_files("#file", str(paths[2]))
    page.wait_for_selector('#result[data-state="done"]', timeout=WAIT_MS)
    hits = page.query_selector_all("figure.hit")
    assert len(hits) == 6
    assert hits[0].get_attribute("data-path") == str(paths[2])
    assert str(paths[2]) in hits[0].get_attribute("title") and "distance" in hits[0].get_attribute("title")
    # One window per hit on the query, one on each hit, in the hit's colour.
    assert len(_boxes_drawn(page, ".query-shot .box[data-rank]")) == 6
    for i, hit in enumerate(hits):
        box = hit.query_selector(".box")
        assert box.bounding_box()["width"] > 1
        assert f"c{i}" in box.get_attribute("class")
        colour = page.evaluate("b => getComputedStyle(b).borderTopColor", box)
        query_colour = page.evaluate(
            f"() => getComputedStyle(document.querySelector('.query-shot .box[data-rank=\"{i + 1}\"]')).borderTopColor")
        assert colour == query_colour
    page.wait_for_function("[...document.images].every(i => i.complete && i.naturalWidth > 0)", timeout=WAIT_MS)
    shot = tmp_path / "serve.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 5_000
    assert all(url.startswith(server) or url.startswith("blob:") for url in page.requested), page.requested


def test_page_searches_from_a_hit_and_from_a_path(page, server, tiny):
    _, paths = tiny
    page.goto(server)
    page.set_input_files("#file", str(paths[0]))
    page.wait_for_selector('#result[data-state="done"]', timeout=WAIT_MS)
    second = page.query_selector_all("figure.hit")[1]
    target = second.get_attribute("data-path")
    second.click()
    page.wait_for_function(
        f"document.getElementById('query-name').textContent === {target!r} && "
        "document.getElementById('result').dataset.state === 'done'", timeout=WAIT_MS)
    assert page.query_selector("figure.hit").get_attribute("data-path") == target

    page.fill("#indexed", str(paths[4]))
    page.press("#indexed", "Enter")
    page.wait_for_function(
        f"document.getElementById('query-name').textContent === {str(paths[4])!r} && "
        "document.getElementById('result').dataset.state === 'done'", timeout=WAIT_MS)
    assert page.query_selector("figure.hit").get_attribute("data-path") == str(paths[4])

    page.fill("#indexed", "/etc/passwd")
    page.press("#indexed", "Enter")
    page.wait_for_selector("#status.error", timeout=WAIT_MS)
    assert "not in the index" in page.inner_text("#status")


def test_html_report_opens_offline_with_every_query(page, tiny, tmp_path):
    index, paths = tiny
    report = tmp_path / "report.html"
    out = run_cli("query", str(index), str(paths[0]), str(paths[3]), "-k", "3", "--html", str(report), "--quiet")
    assert out.returncode == 0, out.stderr
    # Offline: anything but the file itself and its data: URIs is refused.
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file:", "data:")) else route.abort())
    page.goto(report.as_uri())
    sections = page.query_selector_all("section.query")
    assert [s.query_selector("h2").inner_text() for s in sections] == [str(paths[0]), str(paths[3])]
    for section, query in zip(sections, (paths[0], paths[3])):
        hits = section.query_selector_all("figure.hit")
        assert len(hits) == 3 and str(query) in hits[0].get_attribute("title")
        assert len(section.query_selector_all(".query-shot .box")) == 3
        assert all(h.query_selector(".box").bounding_box()["width"] > 1 for h in hits)
    assert _all_images_loaded(page)
    assert all(url.startswith(("file:", "data:")) for url in page.requested), page.requested
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)


def test_page_drag_on_the_query_searches_the_crop(page, server, tiny):
    _, paths = tiny
    page.goto(server)
    page.set_input_files("#file", str(paths[1]))
    page.wait_for_selector('#result[data-state="done"]', timeout=WAIT_MS)
    frame = page.query_selector(".query-shot .frame").bounding_box()
    page.mouse.move(frame["x"] + 0.1 * frame["width"], frame["y"] + 0.1 * frame["height"])
    page.mouse.down()
    page.mouse.move(frame["x"] + 0.6 * frame["width"], frame["y"] + 0.7 * frame["height"], steps=5)
    page.mouse.up()
    page.wait_for_function("document.getElementById('status').textContent.includes('crop')", timeout=WAIT_MS)
    page.wait_for_selector('#result[data-state="done"]', timeout=WAIT_MS)
    (crop,) = _boxes_drawn(page, ".query-shot .box.crop")
    # Every deciding query window now lies inside the crop, give or take the crop's
    # rounding to whole image pixels (2 screen pixels here: 160 px shown at 320).
    tol = 1.5 * frame["width"] / 160
    for box in _boxes_drawn(page, ".query-shot .box[data-rank]"):
        assert crop["x"] - tol <= box["x"] and box["x"] + box["width"] <= crop["x"] + crop["width"] + tol
        assert crop["y"] - tol <= box["y"] and box["y"] + box["height"] <= crop["y"] + crop["height"] + tol
    page.dblclick(".query-shot .frame")
    page.wait_for_function("!document.querySelector('.query-shot .box.crop') && "
                           "document.getElementById('result').dataset.state === 'done'", timeout=WAIT_MS)


def test_page_with_a_token_asks_once_and_shows_every_thumbnail(browser, tmp_path):
    """`serve --token`: the page asks for the token once, its cookie then carries the
    thumbnails; the header count follows an `add` made by another process."""
    index, paths = build_tiny_index(tmp_path, 3)
    extra = tmp_path / "images" / "extra.jpg"
    make_scene(7).save(extra, quality=90)
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    asked = []
    page.on("dialog", lambda dialog: (asked.append(dialog.message), dialog.accept(TOKEN)))
    try:
        with serve_process(index, "--token", TOKEN) as url:
            page.goto(url)
            page.wait_for_function("document.getElementById('info').textContent.includes('3 images')", timeout=WAIT_MS)
            assert run_cli("add", str(index), str(extra), "--quiet").returncode == 0
            page.set_input_files("#file", str(paths[1]))
            page.wait_for_selector('#result[data-state="done"]', timeout=WAIT_MS)
            assert page.query_selector("figure.hit").get_attribute("data-path") == str(paths[1])
            page.wait_for_function("[...document.images].every(i => i.complete && i.naturalWidth > 0)", timeout=WAIT_MS)
            page.wait_for_function("document.getElementById('info').textContent.includes('4 images')", timeout=WAIT_MS)
            assert len(asked) == 1 and "token" in asked[0]
    finally:
        context.close()


def test_page_error_clears_old_hits_and_reranking_controls_work(page, server, tiny):
    _, paths = tiny
    page.goto(server)
    page.set_input_files("#file", str(paths[0]))
    page.wait_for_selector('#result[data-state="done"]', timeout=WAIT_MS)
    page.fill("#rotations", "45")
    page.press("#rotations", "Enter")
    page.wait_for_selector('#result[data-state="error"]', state="attached", timeout=WAIT_MS)
    assert "query_rotations" in page.inner_text("#status")
    assert page.query_selector_all("figure.hit") == [] and not page.is_visible("#result")
    # Query expansion and rotations from the page; more than the old cap of 100 hits is allowed.
    assert page.get_attribute("#k", "max") == "1000"
    page.fill("#rotations", "0,180")
    page.fill("#qe", "1")
    page.press("#rotations", "Enter")
    page.wait_for_selector('#result[data-state="done"]', timeout=WAIT_MS)
    assert page.query_selector("figure.hit").get_attribute("data-path") == str(paths[0])
@pytest.fixture(scope="module")
def with_copies(tmp_path_factory):
    """The tiny index of 4 scenes plus a half-size copy of the first two."""
    root = tmp_path_factory.mktemp("dups")
    index, paths = build_tiny_index(root, 4)
    copies = []
    for p in paths[:2]:
        copy = p.with_name(f"{p.stem}-half.png")
        Image.open(p).resize((80, 60)).save(copy)
        copies.append(copy)
    out = run_cli("add", str(index), *map(str, copies), "--quiet")
    assert out.returncode == 0, out.stderr
    return index


def test_duplicates_page_opens_offline_with_every_group(page, with_copies, tmp_path):
    report = tmp_path / "dups.html"
    out = run_cli("duplicates", str(with_copies), "--max-distance", "0.3", "--html", str(report), "--json", "--quiet")
    assert out.returncode == 0, out.stderr
    groups = json.loads(out.stdout)["groups"]
    assert groups and {"img0.jpg", "img0-half.png"} <= {Path(m["path"]).name for m in groups[0]["images"]}
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file:", "data:")) else route.abort())
    page.goto(report.as_uri())
    sections = page.query_selector_all("section.group")
    assert len(sections) == len(groups)
    for section, group in zip(sections, groups):
        assert len(section.query_selector_all("figure.shot")) == len(group["images"])
    # Each member after the first: its matched window on it and on the first image.
    assert len(_boxes_drawn(page, ".group .box")) == 2 * sum(len(g["images"]) - 1 for g in groups)
    assert _all_images_loaded(page)


def test_serve_duplicates_view_shows_every_group(page, with_copies):
    with serve_process(with_copies) as url:
        page.goto(url + "duplicates")
        page.wait_for_function("document.getElementById('status').textContent.includes('groups in')", timeout=WAIT_MS)
        page.fill("#max-distance", "0.3")
        page.click("button[type=submit]")
        page.wait_for_function("document.getElementById('status').textContent.includes('max distance 0.3000')", timeout=WAIT_MS)
        shown = int(re.search(r"(\d+) groups in", page.inner_text("#status")).group(1))
        sections = page.query_selector_all("section.group")
        assert shown >= 1 and len(sections) == shown
        members = sum(len(s.query_selector_all("figure.shot")) for s in sections)
        assert len(_boxes_drawn(page, ".group .box")) == 2 * (members - shown)
        page.wait_for_function("[...document.images].every(i => i.complete && i.naturalWidth > 0)", timeout=WAIT_MS)
