"""reid_ssl.finetune: a few torchreid-engine steps on a tiny generated Market tree, saved in our format."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from reid_ssl.checkpoint import load_checkpoint
from reid_ssl.embedder import load_embedder
from reid_ssl.eval.finetune import default_output, finetune


@pytest.mark.parametrize("loss", ["softmax", "triplet"])
def test_smoke_finetune_saves_a_loadable_changed_checkpoint(tmp_path, checkpoint, market_tree, loss) -> None:
    bad = sorted((market_tree / "bounding_box_train").glob("*.jpg"))[3]
    bad.write_bytes(b"broken")  # reported and skipped, not fatal (torchreid's own reader would retry forever)
    lines: list[str] = []
    res = finetune(
        checkpoint,
        "market-layout",
        market_tree,
        loss=loss,
        batch_size=8,
        num_instances=2,
        max_steps=2,
        epochs=5,
        log=lines.append,
    )
    assert res["steps"] == 2 and res["epochs"] == 1 and res["num_train_ids"] == 6
    assert [s["image"] for s in res["skipped_train_images"]] == [str(bad)] and res["num_train_images"] == 35
    assert Path(res["checkpoint"]) == default_output(checkpoint, "market-layout", loss)
    assert lines and lines[0].startswith("epoch 1/5")
    keys = {"softmax": {"loss", "acc"}, "triplet": {"loss_t", "loss_x", "acc"}}[loss]
    assert keys <= set(res["history"][0])
    parent, child = load_checkpoint(checkpoint), load_checkpoint(res["checkpoint"])
    assert child["preprocess"] == parent["preprocess"]
    assert child["config"]["finetune"]["loss"] == loss
    assert child["config"]["finetune"]["parent_sha256"] == parent["backbone"]["sha256"]
    assert child["backbone"]["sha256"] != parent["backbone"]["sha256"]  # the weights moved
    assert set(child["backbone"]["state_dict"]) == set(parent["backbone"]["state_dict"])
    embedder = load_embedder(res["checkpoint"], flip=False)  # our eval stack reads it
    assert embedder.embed_tensor(torch.randn(2, 3, 64, 32)).shape == (2, 512)


def test_bad_settings_are_refused(tmp_path, checkpoint, market_tree) -> None:
    with pytest.raises(ValueError, match="unknown loss"):
        finetune(checkpoint, "market-layout", market_tree, loss="arcface")
    with pytest.raises(ValueError, match="at least 8 train identities"):
        finetune(checkpoint, "market-layout", market_tree, loss="triplet", batch_size=32, num_instances=4)
    with pytest.raises(ValueError, match="fewer than one batch"):
        finetune(checkpoint, "market-layout", market_tree, batch_size=64)
    no_train = tmp_path / "eval_only"
    for sub in ("query", "bounding_box_test"):
        (no_train / sub).mkdir(parents=True)
        for f in (market_tree / sub).iterdir():
            (no_train / sub / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match="no train list"):
        finetune(checkpoint, "market-layout", no_train)


PETS09_ROOT = Path(__file__).resolve().parents[2] / "data" / "pets09"


@pytest.mark.skipif(not (PETS09_ROOT / "market" / "query").is_dir(), reason="PETS09 crops not built (make data)")
def test_finetune_on_the_real_pets09_split_through_torchreid(tmp_path, checkpoint) -> None:
    """torchreid's data manager and engine on real pedestrian crops: every train tracklet, then our eval."""
    out = tmp_path / "ft" / "checkpoint.pt"
    res = finetune(checkpoint, "pets09", PETS09_ROOT, loss="triplet", batch_size=16, max_steps=3, out=out)
    split = json.loads((PETS09_ROOT / "manifest.json").read_text())["split"]  # what the builder wrote
    assert res["steps"] == 3 and res["num_train_ids"] == split["train_tracklets"] == 53
    assert res["num_train_images"] == split["train"]
    assert res["skipped_train_images"] == [] and math.isfinite(res["history"][0]["loss_t"])
    assert load_checkpoint(out)["backbone"]["sha256"] != load_checkpoint(checkpoint)["backbone"]["sha256"]


@pytest.mark.skipif(not (PETS09_ROOT / "market_val" / "query").is_dir(), reason="PETS09 crops not built (make data)")
def test_finetune_on_a_validation_split_names_the_split_to_use(tmp_path, checkpoint) -> None:
    from reid_ssl.errors import DatasetLayoutError

    with pytest.raises(DatasetLayoutError, match=r"no train list .*--dataset pets09 "):
        finetune(
            checkpoint, "pets09-val", PETS09_ROOT, loss="triplet", batch_size=16, max_steps=1, out=tmp_path / "c.pt"
        )
