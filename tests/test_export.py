"""reid_ssl.export: the checked torchreid bridge and the export round trips (torchreid, torchvision, ONNX)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from reid_ssl.checkpoint import (
    CheckpointError,
    backbone_block,
    backbone_state_dict,
    load_checkpoint,
    make_preprocess,
    save_checkpoint,
)
from reid_ssl.data.torchreid_bridge import import_torchreid
from reid_ssl.embedder import backbone_from_checkpoint, load_embedder
from reid_ssl.errors import InputError
from reid_ssl.export import build_torchreid_model, export_checkpoint
from reid_ssl.models import SSLModel, build_backbone
from tests.helpers import run_cli, write_checkpoint


def test_bridge_weights_and_forward_equal(checkpoint: Path) -> None:
    ckpt = load_checkpoint(checkpoint)
    ours = backbone_from_checkpoint(ckpt).eval()
    model = build_torchreid_model(checkpoint, num_classes=7).eval()
    theirs = model.state_dict()
    for key, value in ckpt["backbone"]["state_dict"].items():
        assert torch.equal(theirs[key], value), key
    assert set(theirs) - set(ckpt["backbone"]["state_dict"]) == {"classifier.weight", "classifier.bias"}
    assert model.classifier.out_features == 7
    x = torch.randn(3, 3, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ours(x), rtol=0, atol=0)


def test_prefixes_are_stripped() -> None:
    net = build_backbone("resnet18")
    sd = {f"module.online.backbone.{k}": v for k, v in net.state_dict().items()}
    sd["module.online.fc.weight"] = torch.zeros(3)
    assert set(backbone_state_dict(sd)) == set(net.state_dict())
    ssl = SSLModel("resnet18", proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32)
    whole = {f"_orig_mod.{k}": v for k, v in ssl.state_dict().items()}  # backbone + heads + EMA target
    stripped = backbone_state_dict(whole)
    assert set(stripped) == set(net.state_dict())
    assert torch.equal(stripped["conv1.weight"], ssl.backbone.conv1.weight)


def _checkpoint_with(path: Path, name: str, state: dict[str, torch.Tensor]) -> Path:
    return save_checkpoint(
        path, {"backbone": backbone_block(name, 512, state), "preprocess": make_preprocess(64, 32), "config": {}}
    )


def test_bridge_fails_loudly(tmp_path: Path) -> None:
    sd = build_backbone("resnet18").state_dict()
    missing = {k: v for k, v in sd.items() if not k.startswith("layer4.1.")}
    with pytest.raises(CheckpointError, match=r"missing \['layer4\.1\."):
        build_torchreid_model(_checkpoint_with(tmp_path / "a.pt", "resnet18", missing))
    extra = {**sd, "projector.0.weight": torch.zeros(2, 2)}
    with pytest.raises(CheckpointError, match="unexpected"):
        build_torchreid_model(_checkpoint_with(tmp_path / "b.pt", "resnet18", extra))
    with pytest.raises(CheckpointError, match="do not fit torchreid's resnet50"):  # resnet18 weights, wrong name
        build_torchreid_model(_checkpoint_with(tmp_path / "c.pt", "resnet50", sd))
    with pytest.raises(CheckpointError, match="no torchreid counterpart"):
        build_torchreid_model(_checkpoint_with(tmp_path / "d.pt", "vit_tiny", sd))


def test_export_torchreid_loads_with_torchreids_loader(tmp_path: Path, checkpoint: Path) -> None:
    torchreid = import_torchreid()
    info = export_checkpoint(checkpoint, "torchreid", tmp_path / "tr.pt")
    blob = torch.load(tmp_path / "tr.pt", weights_only=True)
    assert blob["arch"] == "resnet18" and info["bytes"] > 0 and "classifier.weight" not in blob["state_dict"]
    model = torchreid.models.build_model("resnet18", num_classes=4, pretrained=False)
    torchreid.utils.load_pretrained_weights(model, str(tmp_path / "tr.pt"))
    ref = load_checkpoint(checkpoint)["backbone"]["state_dict"]
    for key, value in ref.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_export_torchvision_round_trip(tmp_path: Path, checkpoint: Path) -> None:
    export_checkpoint(checkpoint, "torchvision", tmp_path / "tv.pt")
    net = torchvision.models.resnet18(weights=None).eval()
    missing, unexpected = net.load_state_dict(torch.load(tmp_path / "tv.pt", weights_only=True), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    net.fc = torch.nn.Identity()
    ours = backbone_from_checkpoint(load_checkpoint(checkpoint)).eval()
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ours(x), rtol=0, atol=0)


def test_export_onnx_close_to_torch(tmp_path: Path, checkpoint: Path) -> None:
    import onnxruntime as ort

    export_checkpoint(checkpoint, "onnx", tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["reid_ssl.backbone"] == "resnet18" and '"height": 64' in meta["reid_ssl.preprocess"]
    x = torch.randn(5, 3, 64, 32)  # another batch size than the export example: the batch axis is dynamic
    (out,) = session.run(None, {"images": x.numpy()})
    ref = load_embedder(checkpoint, flip=False).embed_tensor(x).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_export_slim_checkpoint_and_errors(tmp_path: Path) -> None:
    src = write_checkpoint(tmp_path / "src.pt")
    full = torch.load(src, weights_only=True)
    full["optimizer"] = {"state": {}, "param_groups": []}
    torch.save(full, src)
    export_checkpoint(src, "reid_ssl", tmp_path / "slim.pt")
    slim = load_checkpoint(tmp_path / "slim.pt")
    assert "optimizer" not in slim and slim["backbone"]["sha256"] == full["backbone"]["sha256"]
    with pytest.raises(ValueError, match="unknown export format"):
        export_checkpoint(src, "tflite", tmp_path / "x")
    not_a_checkpoint = tmp_path / "x.pt"
    not_a_checkpoint.write_bytes(b"hello")
    with pytest.raises(CheckpointError):
        export_checkpoint(not_a_checkpoint, "onnx", tmp_path / "y.onnx")


def test_onnx_opset_is_checked_up_front_and_honoured(tmp_path: Path, checkpoint: Path, monkeypatch) -> None:
    import onnx

    import reid_ssl.export as export

    for opset, message in ((99, r"writes opsets 18\.\.\d+"), (7, r"writes opsets 18\.\.")):
        with pytest.raises(InputError, match=rf"--opset {opset}: the ONNX exporter {message}"):
            export_checkpoint(checkpoint, "onnx", tmp_path / "m.onnx", opset=opset)
    with pytest.raises(InputError, match="applies to --to onnx only"):
        export_checkpoint(checkpoint, "torchvision", tmp_path / "m.pt", opset=18)
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.pt").exists()
    export_checkpoint(checkpoint, "onnx", tmp_path / "m.onnx", opset=20)
    assert [o.version for o in onnx.load(str(tmp_path / "m.onnx")).opset_import if o.domain == ""] == [20]
    # an opset the exporter cannot convert to (it falls back to its own): refused, nothing written
    monkeypatch.setattr(export, "onnx_opset_range", lambda: (1, 99))
    with pytest.raises(InputError, match="could not convert this model to opset 17"):
        export_checkpoint(checkpoint, "onnx", tmp_path / "old.onnx", opset=17)
    assert not [p.name for p in tmp_path.iterdir() if "old" in p.name]


def test_export_cli_refuses_a_bad_opset_with_exit_code_2(tmp_path: Path, checkpoint: Path) -> None:
    code, out, err = run_cli(
        ["export", "--checkpoint", str(checkpoint), "--to", "onnx", "--opset", "99", "--out", str(tmp_path / "m.onnx")]
    )
    assert code == 2 and "--opset 99" in err and "exported" not in out and not (tmp_path / "m.onnx").exists()
