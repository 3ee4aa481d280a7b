"""Backbones: image batch (N, 3, H, W) -> pooled feature (N, D), registered by name in :data:`BACKBONES`.

Three families, all built with random weights only (nothing is ever downloaded; pretrained weights come from
a local file through ``model.init``, in torchvision, timm, torchreid or reid_ssl format):

* torchvision ResNets (the paper's ResNet-50, and smaller ones for CPUs);
* torchreid's re-ID architectures: OSNet (Zhou et al., ICCV 2019; x0.25 has 0.2M parameters) and its
  AIN variant, ResNet-50-IBN; their parameter names are torchreid's, so checkpoints export to torchreid as is;
* timm's Vision Transformers (ViT-Tiny/Small with 16-pixel patches, the backbone of the LUPerson-based
  self-supervised re-ID papers), with position embeddings resized to any input size.

Each entry says whether torchreid has the same architecture (``torchreid_arch``): such checkpoints export to
torchreid and fine-tune through its engine.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

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


class TorchreidTrunk(nn.Module):
    """A torchreid model without its classifier: (N, 3, H, W) -> its test-time feature (N, D), always.

    torchreid's models return logits in training mode and features in eval mode; this trunk always returns the
    feature (feature maps, global pooling, the model's bottleneck ``fc`` when it has one). Its submodules keep
    torchreid's names, so its state dict loads into ``torchreid.models.build_model(arch)`` unchanged.
    """

    def __init__(self, arch: str) -> None:
        super().__init__()
        import contextlib
        import io

        from reid_ssl.data.torchreid_bridge import import_torchreid

        with contextlib.redirect_stdout(io.StringIO()):
            net = import_torchreid().models.build_model(arch, num_classes=1, loss="softmax", pretrained=False)
        self._featuremaps = type(net).featuremaps
        for name, child in net.named_children():
            if name != "classifier":
                self.add_module(name, child)
        self.feature_dim: int = int(net.feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = torch.flatten(F.adaptive_avg_pool2d(self._featuremaps(self, x), 1), 1)
        fc = getattr(self, "fc", None)
        return fc(v) if fc is not None else v


def timm_trunk(arch: str) -> nn.Module:
    """A timm model without its classifier head: (N, 3, H, W) -> pooled feature (N, num_features).

    Built with ``pretrained=False`` (timm would otherwise download); ``dynamic_img_size`` lets a ViT take any
    input size (position embeddings are interpolated), as multi-resolution training and pedestrian crops need.
    The model is timm's own, so timm state dicts load into it unchanged; ``feature_dim`` is set on it.
    """
    import timm

    # Any: timm models have plain attributes (num_features) that nn.Module's annotations do not know
    model: Any = timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True, dynamic_img_pad=True)
    model.feature_dim = int(model.num_features)
    return model


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
BACKBONES.register(
    "resnet50", _resnet(50), help="ResNet-50, 2048-d features, the paper's backbone (torchreid resnet50)"
)
BACKBONES.register(
    "resnet18_small",
    _resnet(18, torchreid=False, small=True),
    help="ResNet-18 with a 3x3 stride-1 stem and no max-pool, for 28-64 px images (Fashion-MNIST, CIFAR)",
)


for _arch, _what in [
    ("osnet_x1_0", "OSNet x1.0, 2.2M parameters, 512-d"),
    ("osnet_x0_75", "OSNet x0.75, 512-d"),
    ("osnet_x0_5", "OSNet x0.5, 512-d"),
    ("osnet_x0_25", "OSNet x0.25, 0.2M parameters, 512-d: the fastest on a CPU"),
    ("osnet_ain_x1_0", "OSNet-AIN x1.0 (instance normalisation for cross-domain re-ID), 512-d"),
    ("osnet_ain_x0_25", "OSNet-AIN x0.25, 512-d"),
    ("resnet50_ibn_a", "ResNet-50-IBN-a (instance + batch normalisation), 2048-d"),
]:
    BACKBONES.register(
        _arch, BackboneSpec(functools.partial(TorchreidTrunk, _arch), _arch, _what), help=f"torchreid {_what}"
    )
for _name, _timm, _what in [
    ("vit_tiny_patch16", "vit_tiny_patch16_224", "ViT-Tiny/16, 5.5M parameters, 192-d"),
    ("vit_small_patch16", "vit_small_patch16_224", "ViT-Small/16, 21.6M parameters, 384-d"),
]:
    BACKBONES.register(_name, BackboneSpec(functools.partial(timm_trunk, _timm), None, _what), help=f"timm {_what}")


def feature_dim(backbone: nn.Module) -> int:
    """D, the width of the features of a backbone built from :data:`BACKBONES` (its ``feature_dim``).

    A plain int attribute, which ``nn.Module``'s annotations (tensors and submodules only) do not know of.
    """
    return cast(int, backbone.feature_dim)


def build_backbone(name: str) -> nn.Module:
    """A randomly initialised backbone from :data:`BACKBONES`.

    Raises:
        UnknownNameError: ``name`` is not registered (the message lists the choices).
    """
    return BACKBONES[name].build()
