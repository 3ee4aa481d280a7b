"""The app served in-process on a free loopback port (one server per test module), with a gradio_client."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_TEMP_DIR", tempfile.mkdtemp(prefix="reid_ssl_gradio_"))

import pytest

from reid_ssl.app.serve import launch
from reid_ssl.app.ui import build_demo
from reid_ssl.app.uploads import UploadLimits
from reid_ssl.index import GalleryIndex
from tests.helpers import MarketIndex, build_market_index, free_port

UPLOAD_MB = 1  # the served app's upload cap (tests/app/test_uploads.py checks the server enforces it)


@dataclass
class Served(MarketIndex):
    """A :class:`MarketIndex` served by the app: the Blocks, their logic, where it listens, a client."""

    demo: Any = None
    app: Any = None
    port: int = 0
    url: str = ""
    client: Any = None

    def search(self, path: Path, k: int = 5, *args: Any) -> Any:
        from gradio_client import handle_file

        return self.client.predict(handle_file(str(path)), k, *args, api_name="/search")

    def add(self, *paths: Path) -> Any:
        from gradio_client import handle_file

        return self.client.predict([handle_file(str(p)) for p in paths], api_name="/add")

    def detect(self, path: Path) -> Any:
        from gradio_client import handle_file

        return self.client.predict(handle_file(str(path)), api_name="/detect")

    def captions(self, query: Path, k: int, **search_options: Any) -> list[str]:
        """The captions a search of the index itself gives (what the app must show)."""
        from reid_ssl.app.service import caption

        idx = GalleryIndex.load(self.index)
        return [caption(h) for h in idx.search(self.embedder.embed_image(query), k, **search_options)[0]]


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Served:
    from gradio_client import Client

    market = build_market_index(tmp_path_factory.mktemp("app"))
    limits = UploadLimits(max_upload_mb=UPLOAD_MB)
    demo = build_demo(GalleryIndex.load(market.index), market.embedder, examples=market.queries()[:2], limits=limits)
    port = free_port()
    launch(demo, "127.0.0.1", port, limits=limits, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    client = Client(url, analytics_enabled=False, verbose=False)
    yield Served(**vars(market), demo=demo, app=demo.reid_app, port=port, url=url, client=client)
    demo.close()
