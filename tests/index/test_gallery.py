"""GalleryIndex search: brute-force ground truth, filters, and searches that return fewer than k results."""

from __future__ import annotations

import numpy as np
import pytest

from reid_ssl.index import GalleryIndex, Hits
from tests.helpers import clustered, gallery_items, hit_ids, index_info, unit


def test_flat_top_k_equals_brute_force_with_gaps_in_ids():
    rng = np.random.default_rng(1)
    x = unit(rng.standard_normal((1500, 32)))
    idx = GalleryIndex.create(index_info(32), "flat")
    idx.add(x, gallery_items(1500))
    idx.remove(np.arange(0, 1500, 7))  # ids with gaps: results must be ids, not row numbers
    q = unit(rng.standard_normal((50, 32)))
    hits = idx.search(q, 10)
    keep = np.setdiff1d(np.arange(1500), np.arange(0, 1500, 7))
    sim = q @ x[keep].T
    expected = keep[np.argsort(-sim, axis=1, kind="stable")[:, :10]]
    assert hit_ids(hits) == expected.tolist()
    np.testing.assert_allclose([[h.score for h in r] for r in hits], -np.sort(-sim, axis=1)[:, :10], atol=1e-5)
    assert hits[0][0].path == f"/g/{hits[0][0].id}.jpg"
    assert all(isinstance(r, Hits) and r.k == 10 and r.shortfall is None for r in hits)


def test_exclude_camera_and_ids():
    rng = np.random.default_rng(2)
    x = unit(rng.standard_normal((400, 16)))
    idx = GalleryIndex.create(index_info(16), "flat")
    idx.add(x, gallery_items(400, cams=3))
    q = x[:5]
    hits = idx.search(q, 10, exclude_camid=1, exclude_ids=[1, 2])
    cams = np.array([it.camid for it in gallery_items(400, cams=3)])
    allowed = np.flatnonzero((cams != 1) & ~np.isin(np.arange(400), [1, 2]))
    expected = allowed[np.argsort(-(q @ x[allowed].T), axis=1, kind="stable")[:, :10]]
    assert hit_ids(hits) == expected.tolist()
    assert all(h.camid != 1 for row in hits for h in row)
    no_cam0 = idx.search(q[:3], 5, exclude_camid=0)  # camid 0 is a camera too (file name c1), not "unknown"
    assert [r[0].id for r in no_cam0[1:]] == [1, 2] and all(h.camid != 0 for r in no_cam0 for h in r)


def test_empty_index_searches_to_nothing_and_k_is_validated():
    idx = GalleryIndex.create(index_info(8))
    assert idx.search(np.ones(8), 5) == [[]]
    idx.add(unit(np.eye(8)[:3]), gallery_items(3))
    assert len(idx.search(np.ones(8), 5)[0]) == 3  # k larger than the gallery
    with pytest.raises(ValueError, match="k must be"):
        idx.search(np.ones(8), 0)
    with pytest.raises(ValueError, match="shape"):
        idx.search(np.ones(9), 1)
    with pytest.raises(ValueError, match="nprobe must be"):
        idx.search(np.ones(8), 1, nprobe=0)


def test_a_short_ivf_search_says_how_many_and_which_setting_finds_the_rest():
    """`-k 150 --nprobe 1` on an IVF index used to return 55 results without a word."""
    x, q, _ = clustered(3000, 32)
    idx = GalleryIndex.create(index_info(32), "ivf-flat")
    idx.add(x, gallery_items(3000))
    nlist = int(idx.spec.factory[3:].split(",")[0])
    hits = idx.search(q[:20], 150, nprobe=1)
    short = [row for row in hits if len(row) < 150]
    assert short, "a single list of this index should hold fewer than 150 items for some query"
    for row in short:
        s = row.shortfall
        assert (s.k, s.returned, s.available, s.cause) == (150, len(row), 3000, "nprobe")
        assert (s.setting, s.current, s.maximum) == ("nprobe", 1, nlist) and "nprobe" in s.message
    full = idx.search(q[:20], 150, nprobe=nlist)  # the setting the shortfall names fixes it
    assert all(len(row) == 150 and row.shortfall is None for row in full)


def test_a_short_search_blames_the_gallery_or_the_filters_when_they_hold_fewer():
    idx = GalleryIndex.create(index_info(8), "flat")
    idx.add(unit(np.eye(8)[:6]), gallery_items(6, cams=3))
    row = idx.search(np.ones(8), 10)[0]
    assert len(row) == 6 and row.shortfall.cause == "gallery" and "only 6 items" in row.shortfall.message
    row = idx.search(np.ones(8), 10, exclude_camid=0, exclude_ids=[1])[0]
    assert len(row) == 3 and (row.shortfall.cause, row.shortfall.available) == ("filters", 3)
    assert "camid 0" in row.shortfall.message and "1 id)" in row.shortfall.message  # "1 ids" before plural()
    assert row.shortfall.to_dict()["returned"] == 3
    empty = GalleryIndex.create(index_info(8)).search(np.ones(8), 3)[0]
    assert empty == [] and empty.shortfall.cause == "gallery"


def test_a_filtered_hnsw_search_that_comes_back_short_names_ef_search():
    x, _, _ = clustered(2000, 16)
    idx = GalleryIndex.create(index_info(16), "hnsw")
    idx.add(x, gallery_items(2000, cams=50))  # excluding camid 0 leaves 1960 items: k=300 > efSearch 128
    row = idx.search(x[0], 300, exclude_camid=0, ef_search=16)[0]  # FAISS's filtered HNSW stops early
    assert len(row) < 300 and (row.shortfall.cause, row.shortfall.current) == ("ef_search", 16)
    assert len(idx.search(x[0], 300, exclude_camid=0, ef_search=1000)[0]) == 300
