"""What to index: Market-style names (0-based camids), data sets through the registry, folders, files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from reid_ssl.errors import MissingFileError
from reid_ssl.index import gallery_source, market_fields, parse_market_name, path_items
from reid_ssl.index import sources as sources_mod
from tests.helpers import write_market_tree, write_person_image


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("0002_c1s1_000451_03.jpg", {"pid": 2, "camid": 0, "frame": 451, "tracklet": None}),
        ("-1_c3s2_012345_00.jpg", {"pid": -1, "camid": 2, "frame": 12345, "tracklet": None}),
        ("0017_c2_000100.png", {"pid": 17, "camid": 1, "frame": 100, "tracklet": None}),
        ("holiday.jpg", None),
        ("0002_x1s1_000451_03.jpg", None),
    ],
)
def test_parse_market_name(name, expected):
    assert parse_market_name(name) == expected
    assert market_fields(name) == expected


def test_parse_market_name_tracklets():
    assert parse_market_name("0042_c2s1_000007_00.jpg", pid_is_tracklet=True)["tracklet"] == 42


def test_the_index_has_no_file_name_parser_of_its_own():
    """One parser: reid_ssl.data.market (the index used to carry its own regex, with 1-based cameras)."""
    text = Path(sources_mod.__file__).read_text()
    assert "re.compile" not in text and "parse_market_name" in text


def test_gallery_source_market_layout(market_tree):
    src = gallery_source(market_tree)
    assert len(src.items) == 36 and len(src.queries) == 5
    assert all("bounding_box_test" in it.path for it in src.items)
    assert {it.camid for it in src.items} == {0, 1, 2}  # file names c1..c3
    assert {q.camid for q in src.queries} == {0}


def test_gallery_source_pets09_by_name(tmp_path, market_tree):
    (tmp_path / "data" / "pets09").mkdir(parents=True)
    market_tree.rename(tmp_path / "data" / "pets09" / "market")
    src = gallery_source("pets09", tmp_path / "data")
    assert src.pid_is_tracklet and all(it.tracklet == it.pid for it in src.items if it.pid >= 0)
    with pytest.raises(FileNotFoundError, match="prepare pets09"):
        gallery_source("pets09", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="data sets"):
        gallery_source("pets10", tmp_path / "data")


def test_any_reid_dataset_is_read_through_the_dataset_registry(tmp_path):
    """A data set name gives the split's gallery and queries: torchreid's lists (junk dropped, camid 0-based)."""
    write_market_tree(tmp_path / "data" / "market1501")
    src = gallery_source("market1501", tmp_path / "data")
    assert len(src.items) == 33 and len(src.queries) == 5  # the 3 junk (-1) images are not in the split
    assert {it.camid for it in src.items} == {0, 1, 2} and all(it.pid >= 0 for it in src.items)
    assert all(it.source == "gallery" for it in src.items) and all(q.source == "query" for q in src.queries)
    assert src.items[0].frame is not None and not src.pid_is_tracklet
    base = tmp_path / "data" / "market1501"
    assert src.roots == [str((base / "bounding_box_test").resolve()), str((base / "query").resolve())]


def test_gallery_source_skips_symlinks_leaving_the_folder(tmp_path, image_folder):
    secret = write_person_image(tmp_path / "outside" / "secret.jpg", 1, np.random.default_rng(0))
    (image_folder / "link.jpg").symlink_to(secret)
    src = gallery_source(image_folder)
    assert len(src.items) == 30
    assert [p for p, _ in src.skipped] == [str(image_folder / "link.jpg")]


def test_folders_are_walked_by_the_one_image_walker(image_folder):
    """reid_ssl.images.iter_images: hidden files and folders are skipped, as torchreid skips them."""
    write_person_image(image_folder / ".hidden" / "0001.jpg", 1, np.random.default_rng(1))
    write_person_image(image_folder / "._0001.jpg", 1, np.random.default_rng(1))
    assert len(gallery_source(image_folder).items) == 30


def test_path_items_takes_files_and_folders(tmp_path, image_folder):
    one = write_person_image(tmp_path / "more" / "0099_c4s1_000001_00.jpg", 99, np.random.default_rng(9))
    (tmp_path / "more" / "notes.txt").write_text("not an image")
    src = path_items([one, image_folder / "0001", tmp_path / "more" / "notes.txt"])
    assert len(src.items) == 6 and src.items[0].camid == 3 and src.items[0].source == "cli"
    assert src.roots == [str(one.parent.resolve()), str((image_folder / "0001").resolve())]
    assert src.skipped == [(str(tmp_path / "more" / "notes.txt"), "not an image file name")]
    with pytest.raises(MissingFileError, match="no such file"):
        path_items([tmp_path / "nope.jpg"])
