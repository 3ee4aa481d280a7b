"""The app in a real browser: Debian's Chromium under Playwright, kept on loopback. For the screenshot script
(``app/screenshot.py``) and the browser tests (``tests/app/test_browser.py``).

Chromium resolves every host name but 127.0.0.1 and localhost to nothing (:data:`CHROMIUM_FLAGS`), and
:func:`outside_loopback` lists the requests a page still sent anywhere else: a page that would load a remote
asset fails instead of leaking. Playwright (the ``test`` extra) is imported by the callers, never here.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
]
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
RESULT_IMAGES = "#results .thumbnail-item img"  # the thumbnails of the Search tab's results


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_chromium(playwright: Playwright) -> Browser:
    """Headless Chromium (:data:`CHROMIUM`) with :data:`CHROMIUM_FLAGS`."""
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)


def outside_loopback(urls: Iterable[str]) -> list[str]:
    """The network requests among ``urls`` (http, https, ws, wss) that went to a host other than loopback."""
    return [
        u
        for u in urls
        if urlparse(u).scheme in ("http", "https", "ws", "wss") and urlparse(u).hostname not in LOOPBACK_HOSTS
    ]


def wait_for_images(page: Page, selector: str = RESULT_IMAGES) -> None:
    """Wait until every image that ``selector`` matches has loaded and decoded (before a screenshot)."""
    page.wait_for_function(
        f"() => [...document.querySelectorAll({selector!r})].every(i => i.complete && i.naturalWidth > 0)"
    )
