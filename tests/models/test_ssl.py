"""Online/target pair: no gradient into the target, EMA arithmetic, multi-resolution sizes, the registry."""

from __future__ import annotations

import random

import pytest
import torch
import torchvision

from reid_ssl.losses import truncated_triplet_loss
from reid_ssl.models import BACKBONES, SSLModel, build_backbone, random_resize, update_target


def small_model(**kw) -> SSLModel:
    return SSLModel("resnet18", proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32, **kw)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_gives_pooled_features(name):
    net = build_backbone(name).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 64, 32))
    assert out.shape == (2, net.feature_dim)
    assert set(net.state_dict()) <= reference_names(name)  # loads into torchvision / torchreid / timm unrenamed


def reference_names(name: str) -> set[str]:
    """Parameter names of the same architecture as its home library builds it."""
    spec = BACKBONES[name]
    if spec.torchreid_arch is not None:
        from reid_ssl.data.torchreid_bridge import import_torchreid

        net = import_torchreid().models.build_model(spec.torchreid_arch, num_classes=1, pretrained=False)
    elif name.startswith("vit_"):
        import timm

        net = timm.create_model(f"{name}_224", pretrained=False, num_classes=0)
    else:
        net = getattr(torchvision.models, name.split("_")[0])(weights=None)
    return set(net.state_dict())


def test_unknown_backbone_lists_choices():
    with pytest.raises(KeyError, match="resnet18"):
        build_backbone("vgg")


def test_no_gradient_reaches_target():
    model = small_model()
    x1, x2 = torch.randn(12, 3, 32, 16), torch.randn(12, 3, 32, 16)
    p1, p2, z1, z2 = model(x1, x2)
    assert not z1.requires_grad and not z2.requires_grad
    (truncated_triplet_loss(p1, z2, 2, 5) + truncated_triplet_loss(p2, z1, 2, 5)).backward()
    assert all(p.grad is None for p in model.target_backbone.parameters())
    assert all(p.grad is None for p in model.target_projector.parameters())
    assert all(not p.requires_grad for p in model.target_backbone.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.predictor.parameters())


def test_target_starts_as_a_copy_and_predictor_is_not_mirrored():
    model = small_model()
    for a, b in zip(model.backbone.parameters(), model.target_backbone.parameters(), strict=True):
        assert torch.equal(a, b)
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert names == {"backbone", "projector", "predictor", "target_backbone", "target_projector"}


def test_ema_update_formula():
    model = small_model()
    before = [t.clone() for t in model.target_projector.parameters()]
    with torch.no_grad():
        for p in model.projector.parameters():
            p.add_(1.0)
    update_target(model, 0.9)
    for t0, t1, o in zip(before, model.target_projector.parameters(), model.projector.parameters(), strict=True):
        assert torch.allclose(t1, 0.9 * t0 + 0.1 * o)
    snapshot = [t.clone() for t in model.target_projector.parameters()]
    update_target(model, 1.0)  # m = 1: the target no longer moves
    assert all(torch.equal(a, b) for a, b in zip(snapshot, model.target_projector.parameters(), strict=True))


def test_shared_target_is_the_online_network():
    model = small_model(target="shared", predictor=False)
    assert model.target_backbone is None
    x = torch.randn(4, 3, 32, 16)
    model.eval()
    assert torch.allclose(model.online(x), model.target(x))
    assert model.target(x).requires_grad
    p1, p2, z1, z2 = model(x, x.flip(3))
    assert z1 is p1 and z2 is p2  # one pass per view: BN statistics are updated once


def test_random_resize_reproduces_the_reference_sizes_at_224():
    random.seed(0)
    x = torch.zeros(1, 3, 224, 224)
    sizes = {random_resize(x, (96, 224)).shape[-1] for _ in range(400)}
    assert min(sizes) >= 96 and max(sizes) <= 224 and len(sizes) > 60
    targets = {random_resize(x, (128, 224)).shape[-1] for _ in range(400)}
    assert min(targets) >= 128


def test_random_resize_keeps_pedestrian_aspect():
    random.seed(1)
    for _ in range(20):
        h, w = random_resize(torch.zeros(2, 3, 128, 64), (96, 224)).shape[-2:]
        assert abs(h / w - 2.0) < 0.1 and 54 <= h <= 128


def test_multires_model_runs_on_varying_sizes():
    model = small_model(multires_online=(96, 224), multires_target=(128, 224))
    p1, _, _, z2 = model(torch.randn(6, 3, 64, 32), torch.randn(6, 3, 64, 32))
    assert p1.shape == z2.shape == (6, 16)
