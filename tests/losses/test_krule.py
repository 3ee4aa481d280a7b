"""The Bernoulli rule for the deputy's rank: the paper's numbers, and the window k: auto chooses."""

from __future__ import annotations

import pytest

from reid_ssl.losses import prob_rank_k_true_negative, smallest_safe_k
from reid_ssl.losses.krule import auto_window


def test_released_imagenet_setting_and_market() -> None:
    # 195 negatives (batch 196), 1000 classes: rank 1 is a true negative 82% of the time, rank 2 98%, rank 3 99.9%
    assert [round(prob_rank_k_true_negative(195, 1000, k), 3) for k in (1, 2, 3)] == [0.823, 0.983, 0.999]
    assert smallest_safe_k(195, 1000) == 3
    assert smallest_safe_k(195, 751, 0.97) == 2  # Market-1501's 751 train identities


def test_auto_window_keeps_its_width_and_fits_the_batch() -> None:
    # PETS09-sized: 63 negatives, ~20 people -> the first rank that is a true negative with P >= 0.99 is 9
    k_lo, k_hi, p = auto_window(63, 20, width=9)
    assert (k_lo, k_hi) == (9, 17) and p >= 0.99
    assert prob_rank_k_true_negative(63, 20, k_lo - 1) < 0.99  # the smallest such rank
    # fewer identities -> a later, safer window; many identities -> the paper's early ranks
    assert auto_window(63, 8, 9)[0] > k_lo > auto_window(63, 1000, 9)[0]
    # a window that would pass the last negative is shifted down, never cut below its width
    k_lo, k_hi, _ = auto_window(15, 2, width=9)
    assert k_hi == 15 and k_hi - k_lo + 1 == 9
    with pytest.raises(ValueError):
        auto_window(63, 20, width=0)
