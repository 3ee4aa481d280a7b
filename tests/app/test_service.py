"""GallerySearchApp without a server: one size limit, one crop-shape rule, the duplicate rule of `index add`,
refused k, and a query camid the gallery does not have (each an input from a user test)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from reid_ssl.app.service import GallerySearchApp
from reid_ssl.app.uploads import UploadLimits, check_image
from reid_ssl.errors import ImageError, InputError, UploadError
from reid_ssl.index import GalleryIndex, current_generation
from tests.helpers import build_market_index


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    return build_market_index(tmp_path_factory.mktemp("service"))


@pytest.fixture
def app(market, tmp_path) -> GallerySearchApp:
    """An app over a private copy of the index (uploads change it)."""
    shutil.copytree(market.index, tmp_path / "idx")
    return GallerySearchApp(GalleryIndex.load(tmp_path / "idx"), market.embedder)


def noise_png(path, width: int, height: int):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8)).save(path)
    return path


def test_the_upload_option_is_the_one_size_limit_of_an_image(tmp_path):
    """--max-upload-mb 50 let the server take a 25.8 MB PNG that a fixed 20 MB check then refused."""
    big = noise_png(tmp_path / "big.png", 2000, 1500)  # about 9 MB
    mb = big.stat().st_size / 2**20
    assert check_image(big, UploadLimits(max_upload_mb=int(mb) + 1)) is None
    assert UploadLimits(max_upload_mb=50).max_file_bytes == 50 * 2**20
    reason = check_image(big, UploadLimits(max_upload_mb=int(mb) - 1))
    assert f"> {int(mb) - 1} MB, the app's --max-upload-mb" in reason


@pytest.mark.parametrize(("size", "message"), [((1, 1), "too small for a person crop: 1x1"),
                                               ((10, 5000), "not the shape of a person crop: 10x5000")])  # fmt: skip
def test_degenerate_crops_are_refused_by_search_and_add_alike(app, tmp_path, size, message):
    path = tmp_path / "odd.png"
    Image.new("RGB", size, (90, 80, 70)).save(path)
    generation = current_generation(app.index.path)
    with pytest.raises(ImageError, match=message):
        app.search(str(path), 3)
    with pytest.raises(UploadError, match=message):
        app.add_files([str(path)])
    assert current_generation(app.index.path) == generation


def test_the_same_image_is_added_once(app, market):
    query = str(market.queries()[0])
    before = app.index.ntotal
    status, _ = app.add_files([query, query])  # twice in one upload
    assert "Added **1** image to the gallery (id" in status and "already in the gallery" in status
    for _ in range(2):  # and again later
        with pytest.raises(UploadError, match=r"Nothing was added: .*already in the gallery"):
            app.add_files([query])
    assert app.index.ntotal == before + 1
    assert len(list((app.index.path / "uploads").iterdir())) == 1


@pytest.mark.parametrize("k", [0, -3, 51, 2.5])
def test_a_k_outside_1_to_50_is_refused_not_changed(app, market, k):
    with pytest.raises(InputError, match=r"number of results \(k\) must be a whole number from 1 to 50"):
        app.search(str(market.queries()[0]), k)


def test_a_query_camid_the_gallery_lacks_is_named(app, market):
    _, status = app.search(str(market.queries()[0]), 3, True, "9")
    assert "camid 9 is not a camera of this gallery, whose camids are 0, 1, 2: nothing was excluded" in status
    _, status = app.search(str(market.queries()[0]), 3, True, "1")
    assert "(camid 1 excluded)" in status
