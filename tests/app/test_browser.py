"""The app in Debian's Chromium through Playwright: upload -> search -> captions, gallery uploads, error toasts,
and not one request leaving loopback. These tests FAIL (never skip) when /usr/bin/chromium is missing.

Set REID_SSL_SCREENSHOT_DIR to keep the screenshots (e.g. for the README).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest

from reid_ssl.app.browser import CHROMIUM, launch_chromium, outside_loopback, wait_for_images
from reid_ssl.embedder import load_embedder
from reid_ssl.index import GalleryIndex, build_index, gallery_source
from tests.helpers import REPO, free_port, write_checkpoint, write_market_tree, write_person_image

pytestmark = pytest.mark.browser

CAPTION = re.compile(r"^[01]\.\d{3} · (pid \d+|junk) · camid \d+ · frame \d+$")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`reid_ssl app` in its own process group on a free port, over a Market-style gallery index."""
    root = tmp_path_factory.mktemp("browser")
    ckpt = write_checkpoint(root / "ckpt.pt", height=128, width=64)
    tree = write_market_tree(root / "market")
    build_index(load_embedder(ckpt, device="cpu"), gallery_source(tree), root / "idx", checkpoint=ckpt)
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "GRADIO_TEMP_DIR": str(root / "gradio_tmp"),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    log = open(root / "server.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        [sys.executable, "-m", "reid_ssl.cli", "app", "--index", str(root / "idx"), "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 90
    while True:
        try:
            if httpx.get(url + "gradio_api/info", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the app did not start:\n{(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.25)
    yield {"url": url, "root": root, "tree": tree, "index": root / "idx"}
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (browser tests must not be skipped)")
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60_000)  # a CPU model on 2 shared cores is slow
    with sync_playwright() as p:
        b = launch_chromium(p)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    """A fresh page on the app; every request it makes is recorded and must stay on loopback."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    requests: list[str] = []
    pg.on("request", lambda r: requests.append(r.url))
    pg.set_default_timeout(60_000)
    pg.goto(server["url"])
    pg.requests = requests
    yield pg
    context.close()
    outside = outside_loopback(requests)
    assert requests and not outside, f"requests left loopback: {outside[:5]}"


def screenshot(pg, tmp_path: Path, name: str, full_page: bool = True) -> Path:
    path = tmp_path / name
    pg.screenshot(path=str(path), full_page=full_page)
    assert path.stat().st_size > 10_000
    if keep := os.environ.get("REID_SSL_SCREENSHOT_DIR"):
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / name)
    return path


def test_upload_search_shows_captioned_results(page, server, tmp_path):
    from playwright.sync_api import expect

    query = sorted((server["tree"] / "query").iterdir())[0]
    page.set_input_files("#query input[type=file]", str(query))
    expect(page.locator("#query img").first).to_be_visible()  # preview first, else the click sends None
    page.locator("#k input[type=number]").fill("6")
    page.locator("#k input[type=number]").press("Enter")
    page.click("#search_button")
    thumbs = page.locator("#results .thumbnail-item img")
    expect(thumbs).to_have_count(6)
    captions = page.locator("#results .caption-label").all_inner_texts()
    assert len(captions) == 6 and all(CAPTION.match(c.strip()) for c in captions), captions
    scores = [float(c.split(" ")[0]) for c in captions]
    assert scores == sorted(scores, reverse=True)
    wait_for_images(page)
    expect(page.locator("#status")).to_contain_text(re.compile(r"Match|No match"))
    screenshot(page, tmp_path, "app_search.png")


def test_gallery_upload_adds_items(page, server, tmp_path):
    from playwright.sync_api import expect

    before = GalleryIndex.load(server["index"]).ntotal
    rng = np.random.default_rng(11)
    files = [str(write_person_image(tmp_path / f"0042_c2s1_00010{n}_00.jpg", 42, rng)) for n in range(2)]
    page.get_by_role("tab", name="Gallery").click()
    expect(page.locator("#stats")).to_contain_text(re.compile(rf"Images\s+{before}\b"))
    page.set_input_files("#gallery_upload input[type=file]", files)
    expect(page.locator("#gallery_upload")).to_contain_text("0042_c2s1_000101_00")
    page.click("#add_button")
    expect(page.locator("#add_status")).to_contain_text("Added 2 images")
    expect(page.locator("#stats")).to_contain_text(re.compile(rf"Images\s+{before + 2}\b"))
    assert GalleryIndex.load(server["index"]).ntotal == before + 2
    screenshot(page, tmp_path, "app_gallery.png")


def test_bad_upload_shows_the_error_and_leaves_the_index(page, server, tmp_path):
    from playwright.sync_api import expect

    before = GalleryIndex.load(server["index"])
    bad = tmp_path / "holiday.jpg"
    bad.write_text("this is not a picture")
    page.get_by_role("tab", name="Gallery").click()
    page.set_input_files("#gallery_upload input[type=file]", str(bad))
    expect(page.locator("#gallery_upload")).to_contain_text("holiday")
    page.click("#add_button")
    toast = page.get_by_text(re.compile("Nothing was added: holiday.jpg: not an image file"))
    expect(toast.first).to_be_visible()
    after = GalleryIndex.load(server["index"])
    assert (after.ntotal, after.generation) == (before.ntotal, before.generation)
    screenshot(page, tmp_path, "app_bad_upload.png", full_page=False)  # toasts are fixed-position


def test_every_tab_loads_with_local_assets_only(page, server):
    from playwright.sync_api import expect

    for tab in ("Gallery", "Full frame", "Search"):
        page.get_by_role("tab", name=tab).click()
    expect(page.locator("#search_button")).to_be_visible()
    page.wait_for_timeout(500)
    assets = [u for u in page.requests if re.search(r"\.(js|css|woff2?|ttf)(\?|$)", u)]
    assert assets and all(urlparse(u).hostname == "127.0.0.1" for u in assets)
