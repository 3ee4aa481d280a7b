"""The online/target pair and its EMA update, and the multi-resolution resize of the views.

The online network is backbone -> projector -> predictor; the target network is an EMA copy of backbone ->
projector that never receives a gradient (docs/method.md, "The online/target pair" and "The EMA target").
Setting ``target="shared"`` turns the pair into a single network for the SimCLR baseline.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from reid_ssl.models.backbones import build_backbone, feature_dim
from reid_ssl.models.heads import mlp_head

# ---------------------------------------------------------------------------------------------------------
# Multi-resolution resize (docs/method.md, "Views")
# ---------------------------------------------------------------------------------------------------------


def random_resize(x: torch.Tensor, size_range: Sequence[int], reference: int = 224) -> torch.Tensor:
    """Bilinearly resize a whole batch by one random factor s / ``reference``, s uniform in ``size_range``.

    With 224x224 inputs and ``size_range=(96, 224)`` this is the reference's ``96 + U{0..128}`` square resize;
    for other input sizes (e.g. 128x64 pedestrian crops) the same factor scales both sides, keeping the
    aspect ratio.
    """
    lo, hi = int(size_range[0]), int(size_range[1])
    factor = random.randint(lo, hi) / reference
    h, w = max(16, round(x.shape[-2] * factor)), max(8, round(x.shape[-1] * factor))
    if (h, w) == tuple(x.shape[-2:]):
        return x
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------------------------
# Online / target pair
# ---------------------------------------------------------------------------------------------------------


class SSLModel(nn.Module):
    """Online network (backbone, projector, predictor) and its EMA target (backbone, projector).

    Args:
        backbone: name in :data:`BACKBONES`.
        target: ``"ema"`` (BYOL / truncated triplet: frozen copy updated by :func:`update_target`) or
            ``"shared"`` (SimCLR: both views go through the online network, with gradients).
        predictor: add the predictor MLP on the online side.
        multires_online, multires_target: size ranges for :func:`random_resize`, or None to switch it off.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        proj_hidden_dim: int = 4096,
        proj_dim: int = 256,
        pred_hidden_dim: int = 4096,
        predictor: bool = True,
        target: str = "ema",
        multires_online: Sequence[int] | None = None,
        multires_target: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if target not in ("ema", "shared"):
            raise ValueError(f"target must be 'ema' or 'shared', got {target!r}")
        self.backbone_name = backbone
        self.backbone = build_backbone(backbone)
        self.projector = mlp_head(feature_dim(self.backbone), proj_hidden_dim, proj_dim, init="kaiming")
        self.predictor = mlp_head(proj_dim, pred_hidden_dim, proj_dim, init="normal") if predictor else None
        self.target_mode = target
        self.target_backbone: nn.Module | None = None
        self.target_projector: nn.Module | None = None
        if target == "ema":
            self.target_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
            self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.multires_online = tuple(multires_online) if multires_online else None
        self.multires_target = tuple(multires_target) if multires_target else None

    def online(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, proj_dim) predictions p (projections when there is no predictor)."""
        if self.multires_online:
            x = random_resize(x, self.multires_online)
        out = self.projector(self.backbone(x))
        return self.predictor(out) if self.predictor is not None else out

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, proj_dim) target projections z; no gradient in EMA mode."""
        if self.target_mode == "shared":
            return self.online(x)
        assert self.target_backbone is not None and self.target_projector is not None
        if self.multires_target:
            x = random_resize(x, self.multires_target)
        with torch.no_grad():
            return self.target_projector(self.target_backbone(x)).detach()

    def forward(self, v1: torch.Tensor, v2: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Both views through both branches: returns p1, p2 (online) and z1, z2 (target), each (N, proj_dim).

        A single ``forward`` keeps DistributedDataParallel's gradient hooks in charge of every online pass.
        """
        p1, p2 = self.online(v1), self.online(v2)
        if self.target_mode == "shared":  # SimCLR: one pass per view (BN statistics updated once)
            return p1, p2, p1, p2
        return p1, p2, self.target(v1), self.target(v2)

    def online_parameters(self) -> list[nn.Parameter]:
        """Everything the optimizer updates (the target is excluded: it only moves by EMA)."""
        modules = [self.backbone, self.projector] + ([self.predictor] if self.predictor is not None else [])
        return [p for m in modules for p in m.parameters()]


@torch.no_grad()
def update_target(model: SSLModel, momentum: float) -> None:
    """theta_target <- m * theta_target + (1 - m) * theta_online for backbone and projector (§1.13)."""
    if model.target_mode != "ema":
        return
    assert model.target_backbone is not None and model.target_projector is not None
    pairs = [(model.target_backbone, model.backbone), (model.target_projector, model.projector)]
    targets: list[torch.Tensor] = [t for tm, _ in pairs for t in tm.parameters()]
    onlines: list[torch.Tensor] = [o.detach() for _, om in pairs for o in om.parameters()]
    torch._foreach_mul_(targets, momentum)
    torch._foreach_add_(targets, onlines, alpha=1.0 - momentum)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):  # DistributedDataParallel
            model = cast(nn.Module, model.module)
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = cast(nn.Module, model._orig_mod)
        else:
            return model
