"""Self-supervised losses: the truncated triplet of [0] and the BYOL [1] / SimCLR [2] baselines.

Every loss takes the online predictions ``p`` of one view and the target embeddings ``z`` of the other view,
row ``i`` of both coming from the same image, and returns a scalar. The training loop sums both directions
(method.md §1.10). Nothing distributed happens here: gathering negatives across ranks is the caller's job
(``z_negatives`` argument).

- [0] G. Wang et al., "Solving Inefficiency of Self-supervised Representation Learning", ICCV 2021,
  https://arxiv.org/abs/2104.08760
- [1] J.-B. Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020, https://arxiv.org/abs/2006.07733
- [2] T. Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020,
  https://arxiv.org/abs/2002.05709
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _check_pair(p: torch.Tensor, z: torch.Tensor) -> None:
    if p.ndim != 2 or z.ndim != 2 or p.shape[1] != z.shape[1]:
        raise ValueError(f"expected p (N, D) and z (M, D) with the same D, got {tuple(p.shape)} and {tuple(z.shape)}")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half precision (autocast outputs) -> float32; float32/float64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def deputy_distances(d: torch.Tensor, k_lo: int, k_hi: int) -> torch.Tensor:
    """Mean of each row's off-diagonal distances at ranks ``k_lo..k_hi`` (1-based, smallest distance first).

    Args:
        d: (N, M) distances, M >= N; column ``i`` of row ``i`` is the positive and is never a negative.

    Returns:
        (N,) the "negative deputy" distance of each row.
    """
    n, m = d.shape
    if k_hi > m - 1:
        raise ValueError(f"deputy window {k_lo}..{k_hi} needs at least {k_hi} negatives per anchor, got {m - 1}")
    # Mask the positive with +inf so that it sorts last; the top-k indices are not differentiated
    # (method.md §1.12), but gathering keeps the gradient of the selected distances.
    positive = torch.zeros_like(d, dtype=torch.bool)
    positive[torch.arange(n), torch.arange(n)] = True
    masked = d.masked_fill(positive, float("inf"))
    ranks = torch.topk(masked.detach(), k_hi, dim=1, largest=False).indices  # (N, k_hi), ascending
    selected = masked.gather(1, ranks[:, k_lo - 1 : k_hi])
    return selected.mean(dim=1)


def truncated_triplet_loss(
    p: torch.Tensor,
    z: torch.Tensor,
    k_lo: int = 2,
    k_hi: int = 10,
    gamma: float = 2.0,
    margin: float = 100.0,
) -> torch.Tensor:
    """Truncated ("smoothed rank-k") triplet loss of [0], one direction, as the reference code computes it.

    With unit vectors, d_ij = -2 <p_i, z_j>; the positive is d_ii and the negative deputy the mean of row i's
    negatives ranked ``k_lo..k_hi`` by similarity (most similar first). The loss is the mean over rows of
    ``max(0, gamma * d_pos - d_deputy + margin)``. With the reference margin 100 the hinge is always active and
    the loss is linear in the cosines (method.md §1.11). ``k_lo == k_hi`` picks a single rank-k negative and
    ``k_lo == k_hi == 1`` the hardest one.

    Args:
        p: (N, D) online predictions of one view.
        z: (M, D) target projections of the other view, M >= N. Rows ``0..N-1`` are the positives of ``p``;
            extra rows (negatives gathered from other devices) only serve as negatives.

    Returns:
        Scalar loss.
    """
    _check_pair(p, z)
    if not 1 <= k_lo <= k_hi:
        raise ValueError(f"need 1 <= k_lo <= k_hi, got k_lo={k_lo}, k_hi={k_hi}")
    if z.shape[0] < p.shape[0]:
        raise ValueError(f"z must hold at least the N positives of p, got N={p.shape[0]}, M={z.shape[0]}")
    p = F.normalize(_upcast(p), dim=1)
    z = F.normalize(_upcast(z), dim=1)
    d = -2.0 * p @ z.t()  # (N, M)
    d_pos = d.diagonal()
    d_neg = deputy_distances(d, k_lo, k_hi)
    return F.relu(gamma * d_pos - d_neg + margin).mean()


@torch.no_grad()
def similarity_stats(p: torch.Tensor, z: torch.Tensor, k_lo: int = 2, k_hi: int = 10) -> dict[str, float]:
    """Diagnostics for the training log: mean positive cosine, mean deputy cosine, mean negative cosine, and
    the per-dimension std of the normalised targets (near 0 means the representation has collapsed).
    """
    p = F.normalize(_upcast(p), dim=1)
    z = F.normalize(_upcast(z), dim=1)
    cos = p @ z.t()
    n, m = cos.shape
    k_hi = min(k_hi, m - 1)
    deputy = -0.5 * deputy_distances(-2.0 * cos, min(k_lo, k_hi), k_hi)
    off = cos.masked_fill(torch.eye(n, m, dtype=torch.bool, device=cos.device), float("nan"))
    return {
        "pos_cos": cos.diagonal().mean().item(),
        "deputy_cos": deputy.mean().item(),
        "neg_cos": off.nanmean().item(),
        "target_std": z.std(dim=0).mean().item(),
    }


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL regression loss ``2 - 2 cos(p_i, z_i)`` averaged over rows [1].

    Args:
        p: (N, D) online predictions; z: (M, D) target projections, only the first N rows are used.
    """
    _check_pair(p, z)
    n = p.shape[0]
    return (2.0 - 2.0 * F.cosine_similarity(_upcast(p), _upcast(z[:n]), dim=1)).mean()


def nt_xent_loss(p: torch.Tensor, z: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """NT-Xent (InfoNCE) of SimCLR [2], one direction.

    Anchor ``p_i``'s positive is ``z_i``; its negatives are every other ``z_j`` and every other ``p_j``
    (2N - 2 in all), as in SimCLR. The mean of both directions equals the usual symmetric NT-Xent over 2N
    anchors; the training loop sums them, like every other loss here.

    Args:
        p: (N, D) embeddings of one view; z: (M, D) embeddings of the other view, M >= N.
    """
    _check_pair(p, z)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    p = F.normalize(_upcast(p), dim=1)
    z = F.normalize(_upcast(z), dim=1)
    n = p.shape[0]
    same_view = (p @ p.t()).masked_fill(torch.eye(n, dtype=torch.bool, device=p.device), float("-inf"))
    logits = torch.cat([p @ z.t(), same_view], dim=1) / temperature
    return F.cross_entropy(logits, torch.arange(n, device=p.device))


class TruncatedTripletLoss(nn.Module):
    """Module form of :func:`truncated_triplet_loss`, with hyperparameters validated once."""

    def __init__(self, k_lo: int = 2, k_hi: int = 10, gamma: float = 2.0, margin: float = 100.0) -> None:
        super().__init__()
        if not 1 <= k_lo <= k_hi:
            raise ValueError(f"need 1 <= k_lo <= k_hi, got k_lo={k_lo}, k_hi={k_hi}")
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.k_lo, self.k_hi, self.gamma, self.margin = k_lo, k_hi, gamma, margin

    def forward(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return truncated_triplet_loss(p, z, self.k_lo, self.k_hi, self.gamma, self.margin)


class MedianTripletLoss(nn.Module):
    """The earlier "median triplet" variant (method.md §1.14): the deputy is the median negative distance."""

    def __init__(self, gamma: float = 2.0, margin: float = 100.0) -> None:
        super().__init__()
        self.gamma, self.margin = gamma, margin

    def forward(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        _check_pair(p, z)
        n, m = p.shape[0], z.shape[0]
        d = -2.0 * F.normalize(_upcast(p), dim=1) @ F.normalize(_upcast(z), dim=1).t()
        # median of the m-1 negatives = rank ceil((m-1)/2) in ascending order (lower median, like torch.median)
        k = max(1, math.ceil((m - 1) / 2))
        d_neg = deputy_distances(d, k, k)
        return F.relu(self.gamma * d[torch.arange(n), torch.arange(n)] - d_neg + self.margin).mean()


class BYOLLoss(nn.Module):
    """Module form of :func:`byol_loss`."""

    def forward(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return byol_loss(p, z)


class NTXentLoss(nn.Module):
    """Module form of :func:`nt_xent_loss`."""

    def __init__(self, temperature: float = 0.2) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return nt_xent_loss(p, z, self.temperature)


LOSSES: dict[str, Callable[..., nn.Module]] = {
    "truncated_triplet": TruncatedTripletLoss,
    "median_triplet": MedianTripletLoss,
    "byol": BYOLLoss,
    "simclr": NTXentLoss,
}


def build_loss(name: str, **kwargs: float) -> nn.Module:
    """Build a loss by name from :data:`LOSSES`; ``kwargs`` that the loss does not take are an error."""
    if name not in LOSSES:
        raise KeyError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[name](**kwargs)


# ---------------------------------------------------------------------------------------------------------
# The Bernoulli rule for choosing k (method.md §1.16)
# ---------------------------------------------------------------------------------------------------------


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
