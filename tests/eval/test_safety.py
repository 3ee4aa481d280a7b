"""Evaluation and untrusted or broken inputs: a planted pickle in the feature cache is never loaded, and a
corrupt image in the middle of a dataset is reported, not fatal."""

from __future__ import annotations

import json

import numpy as np
import pytest

from reid_ssl.eval import features as evaluate
from tests.helpers import FakeEmbedder, assert_live, build_market_index, evil


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    return build_market_index(tmp_path_factory.mktemp("market"))


def test_untrusted_feature_cache_pickle_that_would_create_a_file_is_ignored(tmp_path, market):
    """A planted .npy is ignored and the features recomputed (checkpoints and indexes: their own test files)."""
    assert_live("npy", tmp_path)
    marker = tmp_path / "created-by-the-pickle"
    images = market.tree / "bounding_box_train"
    paths = [str(p) for p in sorted(images.iterdir())[:4]]
    fake = FakeEmbedder()
    key = evaluate._list_key(fake.fingerprint, paths)
    cache = tmp_path / "features"
    cache.mkdir()
    (cache / f"features-{key[:20]}.npy").write_bytes(evil("npy", marker))
    meta = {"key": key, "ok": [0, 1, 2, 3], "failures": []}
    (cache / f"features-{key[:20]}.json").write_text(json.dumps(meta))
    feats, ok, _, hit = evaluate.embed_items(fake, paths, cache_dir=cache)
    assert not hit and ok == [0, 1, 2, 3] and feats.dtype == np.float32
    assert not marker.exists()


def test_faults_corrupt_image_in_the_middle_of_a_dataset_is_reported_not_fatal(tmp_path, market):
    """(Index builds and training: see their kill tests, which have a corrupt file in their data.)"""
    paths = [str(p) for p in market.queries()]
    bad = tmp_path / "0013_c1s1_000000_00.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    feats, ok, failures, _ = evaluate.embed_items(market.embedder, [*paths[:2], str(bad), *paths[2:]])
    assert ok == [0, 1, 3, 4, 5] and len(feats) == 5
    assert failures[0][0] == 2 and str(bad) in failures[0][1]
