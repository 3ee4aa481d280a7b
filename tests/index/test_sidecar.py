"""The SQLite item table: rows, lookups, 0-based camera statistics, and paths that are not UTF-8."""

from __future__ import annotations

import os
import sqlite3

import numpy as np
import pytest

from reid_ssl.index import GalleryIndex, GalleryItem, display_path
from reid_ssl.index.sidecar import Sidecar, decode_path, encode_path
from tests.helpers import gallery_items, index_info, unit

LATIN1 = os.fsdecode(b"/g/caf\xe9.jpg")  # what os.listdir gives for a Latin-1 file name


def test_items_lookups_and_statistics():
    side = Sidecar.new()
    side.insert(range(8), gallery_items(8, cams=3), added=12.5)
    assert side.items([3, 99]) == {
        3: {
            "id": 3,
            "path": "/g/3.jpg",
            "pid": 0,
            "camid": 0,
            "frame": 3,
            "tracklet": None,
            "source": None,
            "added": 12.5,
        }
    }
    assert side.ids_where(camid=0).tolist() == [0, 3, 6]
    assert side.ids_for_paths(["/g/1.jpg", "/g/404.jpg"]) == {"/g/1.jpg": 1}
    assert side.stats() == {"items": 8, "identities": 1, "cameras": [0, 1, 2], "sources": {"?": 8}}
    pids, cams = side.labels([7, 0])
    assert pids.tolist() == [1, 0] and cams.tolist() == [1, 0]
    side.delete([0, 1])
    assert side.stats()["items"] == 6
    with pytest.raises(KeyError, match="unknown metadata column"):
        side.ids_where(camera=1)


def test_ids_under_compares_paths_not_text():
    side = Sidecar.new()
    side.insert(range(3), [GalleryItem("/a/b/1.jpg"), GalleryItem("/a/bc/2.jpg"), GalleryItem("/a/b")], added=0)
    assert side.ids_under("/a/b") == [0, 2]


def test_paths_that_are_not_utf8_round_trip_exactly():
    assert encode_path(LATIN1) == b"/g/caf\xe9.jpg" and encode_path("/g/é.jpg") == "/g/é.jpg"
    assert decode_path(encode_path(LATIN1)) == LATIN1
    assert display_path(LATIN1) == "/g/caf\\xe9.jpg"
    side = Sidecar.new()
    side.insert([0, 1], [GalleryItem(LATIN1, pid=1, camid=0), GalleryItem("/g/é.jpg")], added=0)
    assert side.items([0])[0]["path"] == LATIN1
    assert side.ids_for_paths([LATIN1, "/g/é.jpg"]) == {LATIN1: 0, "/g/é.jpg": 1}
    assert side.ids_where(path=LATIN1).tolist() == [0] and side.ids_under("/g") == [0, 1]


def test_a_saved_index_keeps_such_paths_and_opens_from_any_folder_name(tmp_path):
    """Non-UTF-8 bytes and URI characters ('?', '#', '%') in the index folder's name are fine too."""
    folder = tmp_path / os.fsdecode(b"idx \xe9 ?#%20")
    idx = GalleryIndex.create(index_info(8))
    idx.add(unit(np.eye(8)[:2]), [GalleryItem(LATIN1, pid=1, camid=0), GalleryItem("/g/plain.jpg")])
    idx.save(folder)
    back = GalleryIndex.load(folder)
    assert back.items(back.ids)[0]["path"] == LATIN1 and back.search(np.eye(8)[0], 1)[0][0].path == LATIN1
    assert back.ids_for_paths([LATIN1]) == {LATIN1: 0}
    db = sqlite3.connect(folder / "gen-00000001" / "items.sqlite")
    assert db.execute("SELECT typeof(path), path FROM items ORDER BY id").fetchall() == [
        ("blob", b"/g/caf\xe9.jpg"),
        ("text", "/g/plain.jpg"),
    ]
