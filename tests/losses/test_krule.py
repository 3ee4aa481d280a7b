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


def test_the_rule_is_exact_and_instant_at_any_size() -> None:
    """The CDF against a direct sum of binomial terms, and k for 10^11 negatives without a loop over k."""
    import math
    import time

    def direct(n: int, c: int, k: int) -> float:
        lp, lq = math.log(1 / c), math.log1p(-1 / c)
        terms = (
            math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq for i in range(k)
        )
        return min(sum(math.exp(t) for t in terms), 1.0)

    for n, c, k in [(63, 20, 9), (195, 1000, 2), (1000, 10, 130), (5, 2, 3)]:
        assert prob_rank_k_true_negative(n, c, k) == pytest.approx(direct(n, c, k), abs=1e-12)
    t = time.perf_counter()
    k = smallest_safe_k(10**11, 20)
    assert time.perf_counter() - t < 1.0  # was a quadratic loop: hours at this size
    assert prob_rank_k_true_negative(10**11, 20, k) >= 0.99 > prob_rank_k_true_negative(10**11, 20, k - 1)
