"""Baselines: the colour histogram, scored by the evaluator every model uses."""

from __future__ import annotations

import numpy as np
import pytest

from reid_ssl.eval.baselines import hsv_histogram, stripe_histogram_feature


def test_histogram_is_a_distribution_of_hue_and_saturation() -> None:
    red = np.zeros((20, 10, 3), np.uint8)
    red[..., 2] = 255
    blue = np.zeros((20, 10, 3), np.uint8)
    blue[..., 0] = 255
    h_red, h_blue = hsv_histogram(red), hsv_histogram(blue)
    assert h_red.shape == (128,) and h_red.sum() == pytest.approx(1.0) and float(h_red @ h_blue) == 0.0
    f = stripe_histogram_feature(np.concatenate([red, blue]))
    assert np.linalg.norm(f) == pytest.approx(1.0)
