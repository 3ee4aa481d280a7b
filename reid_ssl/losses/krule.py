"""The paper's Bernoulli rule for choosing the deputy's rank k (docs/method.md, "Choosing k").

With C roughly balanced identities and N-1 in-batch negatives per anchor, the number X of negatives that
share the anchor's identity ("false negatives") is Binomial(N-1, 1/C). If an encoder ranks them first, the
negative ranked k is a true negative exactly when X < k.
"""

from __future__ import annotations


def prob_rank_k_true_negative(negatives: int, classes: int, k: int) -> float:
    """P(X < k) for X ~ Binomial(negatives, 1/classes): the chance that the rank-k negative is a true one.

    X counts the same-class "false negatives" among the in-batch negatives; if they rank first, the rank-k
    negative is from another class exactly when fewer than k of them exist. Exact (SciPy's binomial CDF), in
    constant time for any size.

    Raises:
        ValueError: an argument below 1.
    """
    if negatives < 1 or classes < 1 or k < 1:
        raise ValueError(f"need negatives, classes, k >= 1, got {negatives}, {classes}, {k}")
    if classes == 1:
        return 0.0
    from scipy.stats import binom

    return float(min(binom.cdf(k - 1, negatives, 1.0 / classes), 1.0))


def smallest_safe_k(negatives: int, classes: int, confidence: float = 0.99) -> int:
    """Smallest k whose rank-k negative is a true negative with probability >= ``confidence`` (at most
    ``negatives``): one quantile of the binomial, checked against the CDF at its neighbours."""
    if classes == 1:
        return negatives
    from scipy.stats import binom

    k = int(binom.ppf(confidence, negatives, 1.0 / classes)) + 1  # P(X <= k - 1) >= confidence
    while k > 1 and prob_rank_k_true_negative(negatives, classes, k - 1) >= confidence:
        k -= 1
    while k < negatives and prob_rank_k_true_negative(negatives, classes, k) < confidence:
        k += 1
    return max(1, min(k, negatives))


def auto_window(negatives: int, identities: int, width: int, confidence: float = 0.99) -> tuple[int, int, float]:
    """The deputy window the Bernoulli rule chooses: ``(k_lo, k_hi, P(rank-k_lo negative is a true one))``.

    ``k_lo`` is :func:`smallest_safe_k`; the window keeps ``width`` ranks (the paper's 2..10 has width 9) and is
    shifted down when it would pass the last negative.

    Args:
        negatives: negatives per anchor (batch size - 1, times the processes when negatives are gathered).
        identities: number of identities (classes) in the training data.
        width: ranks averaged into the deputy, >= 1.
    """
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    k_lo = min(smallest_safe_k(negatives, identities, confidence), max(1, negatives - width + 1))
    k_hi = min(k_lo + width - 1, negatives)
    return k_lo, k_hi, prob_rank_k_true_negative(negatives, identities, k_lo)
