"""Backbones: image batch (N, 3, H, W) -> pooled feature (N, D), registered by name in :data:`BACKBONES`.

A backbone is built with random weights only: nothing is ever downloaded. Pretrained weights come from a
local file through ``model.init`` (see :mod:`reid_ssl.checkpoint`). Each entry says whether torchreid has the
same architecture (``torchreid_arch``): such checkpoints export to torchreid and fine-tune through its engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from reid_ssl.registry import Registry


class ResNetTrunk(nn.Module):
    """A torchvision ResNet without its classifier: (N, 3, H, W) -> global-average-pooled (N, C).

    Parameter names match torchvision's (``conv1.weight``, ``layer4.2.bn3.bias``...), so the state dict loads
    into torchvision and torchreid ResNets without renaming.

    Args:
        depth: 18, 34 or 50.
        small_input: CIFAR-style stem for 28-64 px images (3x3 stride-1 conv, no max-pool).
    """

    def __init__(self, depth: int, small_input: bool = False) -> None:
        super().__init__()
        net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        self.feature_dim: int = net.fc.in_features
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        if small_input:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
            self.maxpool = nn.Identity()
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> stage-4 map (N, C, H/32, W/32) (H/8 with ``small_input``)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.feature_map(x), 1), 1)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone, and what other tools know it as.

    Attributes:
        build: returns the randomly initialised network; it has a ``feature_dim`` attribute.
        torchreid_arch: the ``torchreid.models.build_model`` name of the same architecture with the same
            parameter names, or ``None`` (then export to torchreid and ``finetune`` are refused).
        description: one line for ``--help``.
    """

    build: Callable[[], nn.Module]
    torchreid_arch: str | None
    description: str


BACKBONES: Registry[BackboneSpec] = Registry("backbone")


def _resnet(depth: int, torchreid: bool = True, small: bool = False) -> BackboneSpec:
    what = f"ResNet-{depth} (torchvision layout"
    what += ", 3x3 stride-1 stem and no max-pool for 28-64 px images)" if small else ")"
    return BackboneSpec(lambda: ResNetTrunk(depth, small), f"resnet{depth}" if torchreid else None, what)


BACKBONES.register("resnet18", _resnet(18), help="ResNet-18, 512-d features (torchvision layout; torchreid resnet18)")
BACKBONES.register("resnet34", _resnet(34), help="ResNet-34, 512-d features (torchreid resnet34)")
BACKBONES.register("resnet50", _resnet(50), help="ResNet-50, 2048-d features, the paper's backbone (torchreid resnet50)")
BACKBONES.register(
    "resnet18_small",
    _resnet(18, torchreid=False, small=True),
    help="ResNet-18 with a 3x3 stride-1 stem and no max-pool, for 28-64 px images (Fashion-MNIST, CIFAR)",
)


def build_backbone(name: str) -> nn.Module:
    """A randomly initialised backbone from :data:`BACKBONES`.

    Raises:
        UnknownNameError: ``name`` is not registered (the message lists the choices).
    """
    return BACKBONES[name].build()
