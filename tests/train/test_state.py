"""Run state: the k: auto window resolved from the data, and how a folder holding a checkpoint is treated."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from reid_ssl.config import load_config
from reid_ssl.data.image_list import read_image_list, scan_folder
from reid_ssl.data.ssl_sources import bag_stats, folder_source
from reid_ssl.train.state import resolve_deputy_window
from tests.helpers import write_person_image


def _bags(root: Path, n_bags: int = 12, at_once: int = 3) -> Path:
    """``n_bags`` tracklets of 4 frames each; ``at_once`` of them overlap in time at any moment."""
    rng = np.random.default_rng(0)
    for b in range(n_bags):
        start = (b // at_once) * 100
        for f in range(start, start + 4):
            write_person_image(root / f"{b:04d}" / f"{f:06d}.jpg", b, rng)
    return root


def test_auto_window_from_bags(tmp_path: Path) -> None:
    items = folder_source(_bags(tmp_path / "bags"))
    cfg = load_config(None, ["loss.k=auto", "train.batch_size=64"])
    loss, info = resolve_deputy_window(cfg, bag_stats(items), 63)
    # 3 bags at once (people are distinct), 12 bags in all: sqrt(3 * 12) = 6 identities
    assert (info["bags"], info["max_cooccurring_bags"], info["identities"]) == (12, 3, 6)
    assert loss.k_hi - loss.k_lo == cfg.loss.k_hi - cfg.loss.k_lo and info["p_true_negative"] >= 0.99
    assert loss.k_lo > cfg.loss.k_lo  # few people in a batch of 64: the paper's rank 2 would often be the same person
    given, info = resolve_deputy_window(
        load_config(None, ["loss.k=auto", "loss.identities=1000"]), bag_stats(items), 63
    )
    assert info["identities_source"] == "loss.identities" and given.k_lo == 2  # the paper's rank 2, at 1000 ids
    fixed, info = resolve_deputy_window(load_config(None, ["loss.k=fixed"]), bag_stats(items), 63)
    assert (fixed.k_lo, fixed.k_hi) == (2, 10) and 0 < info["p_true_negative"] < 0.99  # logged, not acted on


def test_auto_window_without_identities_or_bags_keeps_the_configured_window_and_says_so(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for n in range(4):
        write_person_image(tmp_path / "flat" / f"{n}.jpg", n, rng)
    (tmp_path / "list.txt").write_text("".join(f"{n}.jpg\n" for n in range(4)))
    (tmp_path / "one.txt").write_text("".join(f"flat/{n}.jpg\n" for n in range(4)))
    for items in (  # the flat folder as data.source=folder reads it; a list without folders; a single bag
        folder_source(tmp_path / "flat"),
        scan_folder(tmp_path / "flat", bags=False),
        read_image_list(tmp_path / "list.txt", tmp_path / "flat"),
        read_image_list(tmp_path / "one.txt", tmp_path),
    ):
        cfg = load_config(None, ["loss.k=auto", "data.source=folder"])
        loss, info = resolve_deputy_window(cfg, bag_stats(items), 63)
        assert (loss.k_lo, loss.k_hi) == (2, 10) and "p_true_negative" not in info and "identities" not in info
        assert "loss.identities=N" in info["note"] and "loss.k=fixed" in info["note"] and "2..10" in info["note"]
        _, info = resolve_deputy_window(load_config(None, ["loss.k=fixed"]), bag_stats(items), 63)
        assert "identities" not in info and "note" not in info  # no "1 identities, P = 0.000" line
        given, info = resolve_deputy_window(load_config(None, ["loss.identities=1000"]), bag_stats(items), 63)
        assert "note" not in info and given.k_lo == 2


def test_auto_window_below_the_confidence_says_so(tmp_path: Path) -> None:
    items = folder_source(_bags(tmp_path / "bags"))  # 6 identities
    cfg = load_config(None, ["loss.k=auto", "loss.k_lo=1", "loss.k_hi=2", "train.batch_size=3"])
    loss, info = resolve_deputy_window(cfg, bag_stats(items), 2)
    assert (loss.k_lo, loss.k_hi) == (1, 2) and info["p_true_negative"] < 0.99
    assert "no deputy window" in info["note"] and "loss.k_confidence=0.99" in info["note"]
    assert "train.batch_size" in info["note"]
    _, info = resolve_deputy_window(load_config(None, ["loss.k=auto"]), bag_stats(items), 63)
    assert "note" not in info  # 63 negatives: the rule reaches 0.99
