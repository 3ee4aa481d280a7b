"""Networks: backbone registry, projector/predictor heads, the online/target pair and its EMA update.

The online network is backbone -> projector -> predictor; the target network is an EMA copy of backbone ->
projector that never receives a gradient (method.md §1.1, §1.12, §1.13). Setting ``target="shared"`` turns
the pair into a single network for the SimCLR baseline.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

# ---------------------------------------------------------------------------------------------------------
# Backbones
# ---------------------------------------------------------------------------------------------------------


class ResNetTrunk(nn.Module):
    """A torchvision ResNet without its classifier: image batch (N, 3, H, W) -> pooled feature (N, C).

    Parameter names match torchvision's (``conv1.weight``, ``layer4.2.bn3.bias``...), so the state dict loads
    into torchvision and torchreid ResNets without renaming (torchreid.md).
    """

    def __init__(self, depth: int, small_input: bool = False) -> None:
        super().__init__()
        net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        self.feature_dim: int = net.fc.in_features
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        if small_input:  # CIFAR-style stem for 28-64 px images: 3x3 stride-1 conv, no max-pool
            self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
            self.maxpool = nn.Identity()
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.feature_map(x), 1), 1)


BACKBONES: dict[str, Callable[[], ResNetTrunk]] = {
    "resnet18": lambda: ResNetTrunk(18),
    "resnet34": lambda: ResNetTrunk(34),
    "resnet50": lambda: ResNetTrunk(50),
    # small images (Fashion-MNIST, CIFAR): same parameter names, 3x3 stem; not loadable into torchreid
    "resnet18_small": lambda: ResNetTrunk(18, small_input=True),
}


def build_backbone(name: str) -> ResNetTrunk:
    """Build a randomly initialised backbone from :data:`BACKBONES`."""
    if name not in BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[name]()


# ---------------------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------------------


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int, init: str) -> nn.Sequential:
    """Linear(bias) -> BN -> ReLU -> Linear(bias), the "NonLinearNeckSimCLR" layout of the reference (§2.2).

    ``init="kaiming"`` is the projector's init, ``init="normal"`` (std 0.01, bias 0) the predictor's (§2.3).
    """
    head = nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )
    for m in head.modules():
        if isinstance(m, nn.Linear):
            if init == "kaiming":
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            else:
                nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm1d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return head


# ---------------------------------------------------------------------------------------------------------
# Multi-resolution resize (method.md §1.3)
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
        self.projector = mlp_head(self.backbone.feature_dim, proj_hidden_dim, proj_dim, init="kaiming")
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
    targets = [t for tm, _ in pairs for t in tm.parameters()]
    onlines = [o.detach() for _, om in pairs for o in om.parameters()]
    torch._foreach_mul_(targets, momentum)
    torch._foreach_add_(targets, onlines, alpha=1.0 - momentum)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
