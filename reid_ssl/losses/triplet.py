"""The truncated ("smoothed rank-k") triplet loss of [0] and its earlier median variant.

With unit vectors, d_ij = -2 <p_i, z_j>; the positive is d_ii and the "negative deputy" the mean of row i's
negatives ranked ``k_lo..k_hi`` by similarity. See docs/method.md, "The truncated triplet loss".

- [0] G. Wang et al., "Solving Inefficiency of Self-supervised Representation Learning", ICCV 2021,
  https://arxiv.org/abs/2104.08760
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from reid_ssl.losses.base import check_pair, upcast

if TYPE_CHECKING:
    from reid_ssl.config import LossConfig


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
    # (docs/method.md, "The truncated triplet loss"), but gathering keeps the gradient of the selected distances.
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
    the loss is linear in the cosines (docs/method.md, "The truncated triplet loss"). ``k_lo == k_hi`` picks a
    single rank-k negative and ``k_lo == k_hi == 1`` the hardest one.

    Args:
        p: (N, D) online predictions of one view.
        z: (M, D) target projections of the other view, M >= N. Rows ``0..N-1`` are the positives of ``p``;
            extra rows (negatives gathered from other devices) only serve as negatives.

    Returns:
        Scalar loss.
    """
    check_pair(p, z)
    if not 1 <= k_lo <= k_hi:
        raise ValueError(f"need 1 <= k_lo <= k_hi, got k_lo={k_lo}, k_hi={k_hi}")
    if z.shape[0] < p.shape[0]:
        raise ValueError(f"z must hold at least the N positives of p, got N={p.shape[0]}, M={z.shape[0]}")
    p = F.normalize(upcast(p), dim=1)
    z = F.normalize(upcast(z), dim=1)
    d = -2.0 * p @ z.t()  # (N, M)
    d_pos = d.diagonal()
    d_neg = deputy_distances(d, k_lo, k_hi)
    return F.relu(gamma * d_pos - d_neg + margin).mean()


@torch.no_grad()
def similarity_stats(p: torch.Tensor, z: torch.Tensor, k_lo: int = 2, k_hi: int = 10) -> dict[str, float]:
    """Diagnostics for the training log: mean positive cosine, mean deputy cosine, mean negative cosine, and
    the per-dimension std of the normalised targets (near 0 means the representation has collapsed).
    """
    p = F.normalize(upcast(p), dim=1)
    z = F.normalize(upcast(z), dim=1)
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


class TruncatedTripletLoss(nn.Module):
    """Module form of :func:`truncated_triplet_loss`, with hyperparameters validated once."""

    def __init__(self, k_lo: int = 2, k_hi: int = 10, gamma: float = 2.0, margin: float = 100.0) -> None:
        super().__init__()
        if not 1 <= k_lo <= k_hi:
            raise ValueError(f"need 1 <= k_lo <= k_hi, got k_lo={k_lo}, k_hi={k_hi}")
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.k_lo, self.k_hi, self.gamma, self.margin = k_lo, k_hi, gamma, margin

    @classmethod
    def from_config(cls, cfg: LossConfig) -> TruncatedTripletLoss:
        """From the ``loss`` section: ``k_lo``, ``k_hi`` (already resolved when ``k: auto``), ``gamma``, ``margin``."""
        return cls(cfg.k_lo, cfg.k_hi, cfg.gamma, cfg.margin)

    def forward(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return truncated_triplet_loss(p, z, self.k_lo, self.k_hi, self.gamma, self.margin)


class MedianTripletLoss(nn.Module):
    """The earlier "median triplet" variant of [0] (its v1/v2): the deputy is the median negative distance."""

    def __init__(self, gamma: float = 2.0, margin: float = 100.0) -> None:
        super().__init__()
        self.gamma, self.margin = gamma, margin

    @classmethod
    def from_config(cls, cfg: LossConfig) -> MedianTripletLoss:
        """From the ``loss`` section: ``gamma``, ``margin``."""
        return cls(cfg.gamma, cfg.margin)

    def forward(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        check_pair(p, z)
        n, m = p.shape[0], z.shape[0]
        d = -2.0 * F.normalize(upcast(p), dim=1) @ F.normalize(upcast(z), dim=1).t()
        # median of the m-1 negatives = rank ceil((m-1)/2) in ascending order (lower median, like torch.median)
        k = max(1, math.ceil((m - 1) / 2))
        d_neg = deputy_distances(d, k, k)
        return F.relu(self.gamma * d[torch.arange(n), torch.arange(n)] - d_neg + self.margin).mean()
