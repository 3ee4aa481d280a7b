"""The paper's Bernoulli rule for choosing the deputy's rank k (docs/method.md, "Choosing k").

With C roughly balanced identities and N-1 in-batch negatives per anchor, the number X of negatives that
share the anchor's identity ("false negatives") is Binomial(N-1, 1/C). If an encoder ranks them first, the
negative ranked k is a true negative exactly when X < k.
"""

from __future__ import annotations

import math


def prob_rank_k_true_negative(negatives: int, classes: int, k: int) -> float:
    """P(X < k) for X ~ Binomial(negatives, 1/classes): the chance that the rank-k negative is a true one.

    X counts the same-class "false negatives" among the in-batch negatives; if they rank first, the rank-k
    negative is from another class exactly when fewer than k of them exist.
    """
    if negatives < 1 or classes < 1 or k < 1:
        raise ValueError(f"need negatives, classes, k >= 1, got {negatives}, {classes}, {k}")
    p = 1.0 / classes
    if p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    total = 0.0
    for i in range(min(k, negatives + 1)):
        log_c = math.lgamma(negatives + 1) - math.lgamma(i + 1) - math.lgamma(negatives - i + 1)
        total += math.exp(log_c + i * log_p + (negatives - i) * log_q)
    return min(total, 1.0)


def smallest_safe_k(negatives: int, classes: int, confidence: float = 0.99) -> int:
    """Smallest k whose rank-k negative is a true negative with probability >= ``confidence``."""
    for k in range(1, negatives + 1):
        if prob_rank_k_true_negative(negatives, classes, k) >= confidence:
            return k
    return negatives


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
