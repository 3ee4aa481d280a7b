"""Screenshots of the app for the README, taken in Debian's Chromium (needs the `test` extra: playwright).

    python app/screenshot.py --index runs/pets09_r18/gallery --frame FRAME.jpg      # -> docs/img/app_*.png

Serves the app (reid_ssl.app, in this process) on a free loopback port, searches with one query crop (the
first query of the index's calibration folder unless ``--query``), excluding the query's camera, and saves
``app_search.png``; with ``--frame`` it also detects people in that whole frame, clicks one and saves
``app_full_frame.png``. Fails if any request leaves loopback.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from reid_ssl.app.browser import free_port, launch_chromium, outside_loopback, wait_for_images


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", default="runs/pets09_r18/gallery")
    p.add_argument("--out", default="docs/img", help="folder for the PNG files (default: docs/img)")
    p.add_argument("--query", help="query crop (default: first image of the index's query folder)")
    p.add_argument("--frame", help="a whole camera frame for the Full-frame tab (optional)")
    p.add_argument("--person", type=int, default=1, help="which detected person to click (1-based)")
    args = p.parse_args(argv)

    os.environ.setdefault("GRADIO_TEMP_DIR", tempfile.mkdtemp(prefix="reid_ssl_shot_"))
    from playwright.sync_api import expect, sync_playwright

    from reid_ssl.app.serve import launch
    from reid_ssl.app.ui import open_demo

    demo = open_demo(args.index)
    index = demo.reid_app.index
    query = args.query
    if query is None:
        folder = Path(index.manifest.get("queries") or "")
        found = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
        query = str(found[0]) if found else next(iter(index.items(index.ids[:1]).values()))["path"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    requests: list[str] = []
    try:
        expect.set_options(timeout=120_000)
        with sync_playwright() as pw:
            browser = launch_chromium(pw)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url)
            page.set_input_files("#query input[type=file]", query)
            expect(page.locator("#query img").first).to_be_visible()
            page.locator("#exclude_camera input").check()
            page.click("#search_button")
            expect(page.locator("#results .thumbnail-item img").first).to_be_visible()
            wait_for_images(page)
            page.screenshot(path=str(out / "app_search.png"), full_page=True)
            print(f"{out / 'app_search.png'}: {page.locator('#status').inner_text()}")
            if args.frame:
                page.get_by_role("tab", name="Full frame").click()
                page.set_input_files("#frame input[type=file]", args.frame)
                expect(page.locator("#frame img").first).to_be_visible()
                page.click("#detect_button")
                expect(page.locator("#people .thumbnail-item").first).to_be_visible()
                page.locator("#people .thumbnail-item").nth(args.person - 1).click()
                expect(page.locator("#frame_results .thumbnail-item img").first).to_be_visible()
                page.wait_for_timeout(1000)
                page.screenshot(path=str(out / "app_full_frame.png"), full_page=True)
                print(f"{out / 'app_full_frame.png'}: {page.locator('#frame_status').inner_text()}")
            browser.close()
    finally:
        demo.close()
    outside = outside_loopback(requests)
    if outside:
        print(f"requests left loopback: {outside[:5]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
