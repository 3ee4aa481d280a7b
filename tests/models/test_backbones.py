"""Every registered backbone: features of the same shape in train and eval mode, weights from local files in
each foreign format, and the torchreid bridge for the torchreid architectures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reid_ssl.checkpoint import backbone_block, make_preprocess, read_backbone_weights, save_checkpoint
from reid_ssl.config import load_config
from reid_ssl.errors import CheckpointError, InputError
from reid_ssl.export import build_torchreid_model
from reid_ssl.models import BACKBONES, build_backbone
from reid_ssl.train.state import build_model, load_backbone_init


@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_backbone_gives_one_feature_per_image_in_both_modes(name: str) -> None:
    torch.manual_seed(0)
    net = build_backbone(name)
    x = torch.randn(2, 3, 64, 32)
    net.train()
    a = net(x)
    net.eval()
    with torch.no_grad():
        b = net(x)
    assert a.shape == b.shape == (2, net.feature_dim) and torch.isfinite(b).all()
    assert net(torch.randn(2, 3, 96, 48)).shape == (2, net.feature_dim)  # any input size (multi-resolution)


@pytest.mark.parametrize("name", ["osnet_x0_25", "resnet50_ibn_a"])
def test_torchreid_architectures_export_to_torchreid_unchanged(tmp_path: Path, name: str) -> None:
    torch.manual_seed(1)
    net = build_backbone(name)
    block = backbone_block(name, net.feature_dim, net.state_dict())
    ckpt = {"backbone": block, "preprocess": make_preprocess(64, 32), "config": {}}
    model = build_torchreid_model(ckpt, num_classes=3).eval()
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), net.eval()(x), atol=1e-5)  # torchreid's eval-mode feature = ours
    with pytest.raises(CheckpointError, match="no torchreid counterpart"):
        build_torchreid_model({**ckpt, "backbone": backbone_block("vit_tiny_patch16", 1, {"w": torch.zeros(1)})})


def test_init_from_timm_and_torchreid_files(tmp_path: Path) -> None:
    torch.manual_seed(2)
    vit = build_backbone("vit_tiny_patch16")
    timm_file = tmp_path / "vit_tiny.pth"  # timm's format: the model's own keys plus a classifier head
    torch.save({**vit.state_dict(), "head.weight": torch.zeros(1000, 192), "head.bias": torch.zeros(1000)}, timm_file)
    osnet = build_backbone("osnet_x0_25")
    torchreid_file = tmp_path / "osnet.pth.tar"  # torchreid's: {"state_dict": DataParallel keys + classifier}
    sd = {f"module.{k}": v for k, v in osnet.state_dict().items()} | {"module.classifier.weight": torch.zeros(751, 512)}
    torch.save({"state_dict": sd, "epoch": 10}, torchreid_file)
    for name, path, source in [("vit_tiny_patch16", timm_file, vit), ("osnet_x0_25", torchreid_file, osnet)]:
        model = build_model(
            load_config(None, [f"model.backbone={name}", "model.proj_hidden_dim=32", "model.pred_hidden_dim=32"])
        )
        load_backbone_init(model, str(path))
        for k, v in source.state_dict().items():
            assert torch.equal(model.backbone.state_dict()[k], v), k
            assert torch.equal(model.target_backbone.state_dict()[k], v), k
    assert read_backbone_weights(torchreid_file)[1] == "state dict"


def test_init_never_downloads_and_refuses_what_does_not_fit(tmp_path: Path) -> None:
    model = build_model(load_config(None, ["model.proj_hidden_dim=32", "model.pred_hidden_dim=32"]))
    for name in ("https://download.pytorch.org/models/resnet18-f37072fd.pth", "hf-hub:timm/vit_small", "imagenet"):
        with pytest.raises(InputError, match="never downloads"):
            load_backbone_init(model, name)
    torch.save(build_backbone("osnet_x0_25").state_dict(), tmp_path / "osnet.pth")
    with pytest.raises(CheckpointError, match="do not fit resnet18"):
        load_backbone_init(model, str(tmp_path / "osnet.pth"))
    ckpt = save_checkpoint(
        tmp_path / "r.pt",
        {
            "backbone": backbone_block("resnet18", 512, build_backbone("resnet18").state_dict()),
            "preprocess": make_preprocess(64, 32),
            "config": {},
        },
    )
    load_backbone_init(model, str(ckpt))  # a reid_ssl checkpoint of the same architecture loads
