"""Self-supervised losses, registered by name in :data:`LOSSES`.

Every loss takes the online predictions ``p`` (N, D) of one view and the target embeddings ``z`` (M, D) of the
other view, row ``i`` of both coming from the same image, and returns a scalar; the training loop sums both
directions. Nothing distributed happens here: rows of ``z`` beyond N (negatives gathered from other
processes) only serve as negatives. Each loss class builds itself from the config's ``loss`` section with
``from_config``, so a new loss is one module and one :data:`LOSSES` entry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from torch import nn

from reid_ssl.losses.byol import BYOLLoss, byol_loss
from reid_ssl.losses.krule import prob_rank_k_true_negative, smallest_safe_k
from reid_ssl.losses.simclr import NTXentLoss, nt_xent_loss
from reid_ssl.losses.triplet import (
    MedianTripletLoss,
    TruncatedTripletLoss,
    deputy_distances,
    similarity_stats,
    truncated_triplet_loss,
)
from reid_ssl.registry import Registry

if TYPE_CHECKING:
    from reid_ssl.config import LossConfig


class LossClass(Protocol):
    """What a :data:`LOSSES` entry is: an ``nn.Module`` class that builds itself from the ``loss`` section."""

    def __call__(self, *args: Any, **kwargs: Any) -> nn.Module: ...

    def from_config(self, cfg: LossConfig) -> nn.Module: ...


LOSSES: Registry[Any] = Registry("loss")
LOSSES.register(
    "truncated_triplet",
    TruncatedTripletLoss,
    help="the paper's loss: pull the positive, push the mean of negatives ranked k_lo..k_hi",
)
LOSSES.register("median_triplet", MedianTripletLoss, help="the paper's earlier variant: push the median negative")
LOSSES.register("byol", BYOLLoss, help="BYOL: pull the positive only (2 - 2 cos)")
LOSSES.register("simclr", NTXentLoss, help="SimCLR NT-Xent; needs model.target=shared model.predictor=false")

# Losses whose deputy window (loss.k_lo..k_hi, loss.k) matters; the others ignore those keys.
WINDOWED_LOSSES = ("truncated_triplet",)


def build_loss(name: str, **kwargs: Any) -> nn.Module:
    """A loss by name with explicit hyperparameters; keywords the loss does not take are an error."""
    return LOSSES[name](**kwargs)


def loss_from_config(cfg: LossConfig) -> nn.Module:
    """The loss the ``loss`` section describes (``cfg.name`` in :data:`LOSSES`)."""
    return LOSSES[cfg.name].from_config(cfg)


__all__ = [
    "LOSSES",
    "WINDOWED_LOSSES",
    "BYOLLoss",
    "MedianTripletLoss",
    "NTXentLoss",
    "TruncatedTripletLoss",
    "build_loss",
    "byol_loss",
    "deputy_distances",
    "loss_from_config",
    "nt_xent_loss",
    "prob_rank_k_true_negative",
    "similarity_stats",
    "smallest_safe_k",
    "truncated_triplet_loss",
]
