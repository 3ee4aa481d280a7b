"""reid_ssl.train.monitor: which split watches a training run (validation first), and naming the folders."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from reid_ssl.config import load_config
from reid_ssl.data.datasets import load_split
from reid_ssl.errors import DatasetLayoutError
from reid_ssl.train import monitor as monitor_mod
from tests.helpers import write_market_tree


@pytest.fixture
def tracklets(tmp_path: Path) -> Path:
    """A `prepare video --split` output: market/ (test) and market_val/ (validation) with different ids."""
    write_market_tree(tmp_path / "out" / "market", train_ids=range(0), test_ids=range(11, 16))
    write_market_tree(tmp_path / "out" / "market_val", train_ids=range(0), test_ids=range(21, 24))
    return tmp_path / "out"


def test_auto_watches_the_validation_split(tracklets: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    watched = []
    monkeypatch.setattr(monitor_mod, "retrieval_monitor", lambda name, root: watched.append(name) or (lambda e: {}))
    cfg = load_config(None, ["data.source=video", f"data.root={tracklets}"])
    assert monitor_mod.monitor_for(cfg) is not None and watched == ["video-val"]
    (tracklets / "market_val" / "query").rename(tracklets / "no_query")
    monkeypatch.setattr(monitor_mod, "retrieval_monitor", _real_monitor)
    with caplog.at_level(logging.INFO, logger="reid_ssl.train.monitor"):
        assert monitor_mod.monitor_for(cfg) is not None
    assert "monitoring video, its test split" in caplog.text
    (tracklets / "market" / "query").rename(tracklets / "no_query2")
    assert monitor_mod.monitor_for(cfg) is None  # nothing to watch: training goes on without a monitor
    assert monitor_mod.monitor_for(load_config(None, ["data.source=video", "train.eval_dataset="])) is None


_real_monitor = monitor_mod.retrieval_monitor


def test_a_split_folder_is_read_only_under_its_own_name(tracklets: Path) -> None:
    """market/ given as the root of the validation split (or market_val/ for the test split) is refused."""
    assert {pid for _, pid, _ in load_split("video-val", tracklets / "market_val").query} == {21, 22, 23}
    assert {pid for _, pid, _ in load_split("video", tracklets / "market").query} == set(range(11, 16))
    with pytest.raises(DatasetLayoutError, match="market_val"):
        load_split("video-val", tracklets / "market")
    with pytest.raises(DatasetLayoutError, match="market"):
        load_split("video", tracklets / "market_val")
