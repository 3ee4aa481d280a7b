"""Results that cannot be trusted say so: collapsed features warn, NaN weights blame the checkpoint by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reid_ssl.checkpoint import backbone_block, load_checkpoint, make_preprocess, save_checkpoint
from reid_ssl.cli import main
from reid_ssl.errors import CheckpointError
from reid_ssl.eval.reid import evaluate_checkpoint
from reid_ssl.models import build_backbone


def _checkpoint(path: Path, edit) -> Path:
    torch.manual_seed(0)
    net = build_backbone("resnet18")
    with torch.no_grad():
        edit(net)
    payload = {"backbone": backbone_block("resnet18", 512, net.state_dict()), "preprocess": make_preprocess(64, 32)}
    return save_checkpoint(path, {**payload, "config": {}, "step": 0, "epoch": 0})


def _zero_convs(net: torch.nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.weight.zero_()


def test_collapsed_checkpoint_is_flagged(tmp_path: Path, market_tree: Path, capsys) -> None:
    ckpt = _checkpoint(tmp_path / "collapsed.pt", _zero_convs)
    result = evaluate_checkpoint(ckpt, "market-layout", market_tree, out_dir=tmp_path / "o", num_strips=0)
    assert result["feature_spread"] < 1e-3 and len(result["warnings"]) == 1
    assert "collapsed" in result["warnings"][0] and str(ckpt) in result["warnings"][0]
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(ckpt),
                "--dataset",
                "market-layout",
                "--root",
                str(market_tree),
                "--strips",
                "0",
            ]
        )
        == 0
    )
    assert "WARNING" in capsys.readouterr().err


def test_healthy_checkpoint_has_no_warning(tmp_path: Path, market_tree: Path, checkpoint: Path) -> None:
    result = evaluate_checkpoint(checkpoint, "market-layout", market_tree, out_dir=tmp_path / "o", num_strips=0)
    assert result["warnings"] == [] and result["feature_spread"] > 1e-3


def test_nan_weights_are_blamed_on_the_checkpoint(tmp_path: Path, market_tree: Path, capsys) -> None:
    ckpt = _checkpoint(
        tmp_path / "diverged.pt", lambda net: net.layer4[0].conv1.weight.__setitem__((0, 0, 0, 0), float("nan"))
    )
    with pytest.raises(CheckpointError, match=r"diverged.pt: 1 backbone tensors hold NaN.*layer4.0.conv1.weight"):
        load_checkpoint(ckpt)
    assert main(["eval", "--checkpoint", str(ckpt), "--dataset", "market-layout", "--root", str(market_tree)]) == 2
    err = capsys.readouterr().err
    assert "diverged.pt" in err and "NaN" in err and "distmat" not in err


def test_a_single_identity_split_is_flagged(tmp_path: Path, market_tree: Path, checkpoint: Path) -> None:
    """With one query identity every top match can be right: the 100% is flagged, not reported bare."""
    import shutil

    tree = tmp_path / "one"
    shutil.copytree(market_tree, tree)
    queries = sorted((tree / "query").glob("*.jpg"))
    keep = queries[0].name.split("_")[0]
    for q in queries:
        if q.name.split("_")[0] != keep:
            q.unlink()
    result = evaluate_checkpoint(checkpoint, "market-layout", tree, out_dir=tmp_path / "o", num_strips=0)
    assert any("only 1 query identity" in w for w in result["warnings"])
