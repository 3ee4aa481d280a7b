"""SimCLR's NT-Xent (InfoNCE) loss [2], the contrastive baseline.

- [2] T. Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020,
  https://arxiv.org/abs/2002.05709
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from reid_ssl.losses.base import check_pair, upcast

if TYPE_CHECKING:
    from reid_ssl.config import LossConfig


def nt_xent_loss(p: torch.Tensor, z: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """NT-Xent (InfoNCE) of SimCLR [2], one direction.

    Anchor ``p_i``'s positive is ``z_i``; its negatives are every other ``z_j`` and every other ``p_j``
    (2N - 2 in all), as in SimCLR. The mean of both directions equals the usual symmetric NT-Xent over 2N
    anchors; the training loop sums them, like every other loss here.

    Args:
        p: (N, D) embeddings of one view; z: (M, D) embeddings of the other view, M >= N.
    """
    check_pair(p, z)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    p = F.normalize(upcast(p), dim=1)
    z = F.normalize(upcast(z), dim=1)
    n = p.shape[0]
    same_view = (p @ p.t()).masked_fill(torch.eye(n, dtype=torch.bool, device=p.device), float("-inf"))
    logits = torch.cat([p @ z.t(), same_view], dim=1) / temperature
    return F.cross_entropy(logits, torch.arange(n, device=p.device))


class NTXentLoss(nn.Module):
    """Module form of :func:`nt_xent_loss`."""

    def __init__(self, temperature: float = 0.2) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    @classmethod
    def from_config(cls, cfg: LossConfig) -> NTXentLoss:
        """From the ``loss`` section: ``temperature``."""
        return cls(cfg.temperature)

    def forward(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return nt_xent_loss(p, z, self.temperature)
