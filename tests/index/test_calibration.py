"""The "no match" threshold: Youden's J by brute force, the Market protocol, reliability, 0-based camids."""

from __future__ import annotations

import numpy as np
import pytest

from reid_ssl.errors import InputError
from reid_ssl.index import GalleryIndex, GalleryItem, calibrate_threshold, describe_calibration, open_set_scores
from tests.helpers import index_info, unit


def test_calibrate_threshold_separable():
    cal = calibrate_threshold(np.array([0.8, 0.85, 0.9]), np.array([0.3, 0.4, 0.5]))
    assert 0.5 < cal["threshold"] < 0.8 and cal["tpr"] == 1.0 and cal["fpr"] == 0.0 and cal["auc"] == 1.0


def test_an_unreliable_calibration_gives_no_threshold():
    """Overlapping true and impostor scores (Youden J < 0.5) must not produce confident "No match" verdicts."""
    rng = np.random.default_rng(0)
    cal = calibrate_threshold(rng.normal(0.95, 0.02, 200), rng.normal(0.95, 0.02, 200))
    assert cal["youden_j"] < 0.5 and cal["reliable"] is False
    idx = GalleryIndex.create(index_info(32), "flat")
    idx.set_calibration(cal)
    assert idx.threshold is None and describe_calibration(cal).startswith("off:")
    good = calibrate_threshold(np.array([0.9, 0.95, 0.97]), np.array([0.5, 0.6, 0.7]))
    idx.set_calibration(good)
    assert good["reliable"] and idx.threshold == good["threshold"]
    assert describe_calibration(None) == "not calibrated" and describe_calibration(good).startswith("0.8")


def test_calibrate_threshold_maximises_youden_j_by_brute_force():
    rng = np.random.default_rng(5)
    pos, neg = rng.normal(0.7, 0.1, 300), rng.normal(0.5, 0.1, 400)
    cal = calibrate_threshold(pos, neg)
    every_cut = np.concatenate([pos, neg, [np.inf]])  # J only changes at observed scores
    j = (pos[None] >= every_cut[:, None]).mean(1) - (neg[None] >= every_cut[:, None]).mean(1)
    assert cal["youden_j"] == pytest.approx(j.max(), abs=1e-9)
    assert cal["youden_j"] == pytest.approx((pos >= cal["threshold"]).mean() - (neg >= cal["threshold"]).mean())


def test_open_set_scores_by_hand():
    # gallery: pid 1 camid 0, pid 1 camid 1, pid 2 camid 1, junk (-1)
    g = unit(np.array([[1, 0, 0], [0.9, 0.1, 0], [0.5, 0.5, 0], [1, 0, 0.01]]))
    q = unit(np.array([[1, 0, 0]]))
    pos, neg = open_set_scores(q, np.array([1]), np.array([0]), g, np.array([1, 1, 2, -1]), np.array([0, 1, 1, 0]))
    # same pid + same camid (row 0) and junk (row 3) are ignored: present -> row 1, removed -> row 2
    np.testing.assert_allclose(pos, [g[1] @ q[0]], atol=1e-6)
    np.testing.assert_allclose(neg, [g[2] @ q[0]], atol=1e-6)


def test_leave_one_out_calibration_treats_camid_0_as_a_camera():
    """camid 0 is the first camera (file name c1), not "unknown": its same-camera matches are junk."""
    rng = np.random.default_rng(3)
    centres = unit(rng.standard_normal((8, 16)))
    pids = np.repeat(np.arange(8), 4)
    x = unit(centres[pids] + 0.2 * rng.standard_normal((32, 16)))
    idx = GalleryIndex.create(index_info(16), "flat")
    idx.add(x, [GalleryItem(f"/g/{i}.jpg", pid=int(p), camid=i % 2) for i, p in enumerate(pids)])
    cal = idx.calibrate()
    assert cal["source"] == "leave-one-out over 32 labelled gallery items" and cal["n_pos"] == 32
    assert cal["reliable"] and idx.threshold == cal["threshold"]
    unlabelled = GalleryIndex.create(index_info(16), "flat")
    unlabelled.add(x, [GalleryItem(f"/g/{i}.jpg") for i in range(32)])
    with pytest.raises(InputError, match="cannot calibrate"):
        unlabelled.calibrate()
