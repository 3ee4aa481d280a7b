"""BYOL's regression loss [1], the baseline the truncated triplet extends.

- [1] J.-B. Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020, https://arxiv.org/abs/2006.07733
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from reid_ssl.losses.base import check_pair, upcast

if TYPE_CHECKING:
    from reid_ssl.config import LossConfig


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL regression loss ``2 - 2 cos(p_i, z_i)`` averaged over rows [1].

    Args:
        p: (N, D) online predictions; z: (M, D) target projections, only the first N rows are used.
    """
    check_pair(p, z)
    n = p.shape[0]
    return (2.0 - 2.0 * F.cosine_similarity(upcast(p), upcast(z[:n]), dim=1)).mean()


class BYOLLoss(nn.Module):
    """Module form of :func:`byol_loss`."""

    @classmethod
    def from_config(cls, cfg: LossConfig) -> BYOLLoss:
        """BYOL has no hyperparameters in the ``loss`` section."""
        return cls()

    def forward(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return byol_loss(p, z)
