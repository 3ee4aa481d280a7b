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


# ---------------------------------------------------------------------------------------------------------
# Where a resumed run writes, and what it may replace (plan_run)
# ---------------------------------------------------------------------------------------------------------

SMOKE = str(Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml")


def _train(capsys, images: Path, out: Path | None, *extra: str) -> tuple[int, str]:
    from reid_ssl.cli import main

    argv = ["train", "-c", SMOKE, f"data.root={images}", "model.multires=false", "--no-eval", "-q", *extra]
    code = main([*argv, f"train.out_dir={out}"] if out is not None else argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_resume_writes_next_to_the_checkpoint_and_never_replaces_another(tmp_path: Path, capsys) -> None:
    """The user test: `train --resume runs/b/checkpoint.pt` (a copy of runs/a's) wrote into runs/a, replacing its
    later checkpoint, metrics and config; the copied folder resumed under its own name was refused."""
    import shutil

    from reid_ssl.checkpoint import load_checkpoint

    images = _bags(tmp_path / "images", n_bags=8)
    a, b = tmp_path / "a", tmp_path / "b"
    assert _train(capsys, images, a, "train.max_steps=2")[0] == 0
    b.mkdir()
    shutil.copy(a / "checkpoint.pt", b / "checkpoint.pt")
    assert _train(capsys, images, a, "train.max_steps=4", "--resume")[0] == 0  # runs/a moves on to step 4
    before = {p.name: p.read_bytes() for p in a.iterdir() if p.is_file()}

    code, _ = _train(capsys, images, None, "--resume", str(b / "checkpoint.pt"), "train.max_steps=3")
    assert code == 0 and load_checkpoint(b / "checkpoint.pt")["step"] == 3 and (b / "metrics.csv").is_file()
    assert {p.name: p.read_bytes() for p in a.iterdir() if p.is_file()} == before  # runs/a untouched

    # into a folder holding another checkpoint: refused, unless --overwrite
    code, err = _train(capsys, images, a, "--resume", str(b / "checkpoint.pt"), "train.max_steps=5")
    assert code == 2 and "holds another checkpoint" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in a.iterdir() if p.is_file()} == before

    # the copied folder resumes in place under its own name (its stored out_dir is runs/a)
    code, err = _train(capsys, images, b, "--resume", "train.max_steps=5")
    assert code == 0, err
    assert load_checkpoint(b / "checkpoint.pt")["step"] == 5
    code, out = _train(capsys, images, b, "--resume", "train.max_steps=5")  # finished: nothing to do
    assert code == 0 and "nothing to do" in out
    code, err = _train(capsys, images, b, "train.max_steps=5", "optim.lr=0.2")  # another run in the same folder
    assert code == 2 and "differs in what it trains" in err and "optim.lr" in err and "train.out_dir:" not in err


def test_resume_with_nothing_to_resume_is_an_error(tmp_path: Path, capsys) -> None:
    """A mistyped train.out_dir with --resume used to start a whole new run."""
    images = _bags(tmp_path / "images", n_bags=8)
    code, err = _train(capsys, images, tmp_path / "typo", "--resume")
    assert code == 2 and "nothing to resume at" in err and "drop --resume" in err
    assert not (tmp_path / "typo").exists()
    code, err = _train(capsys, images, tmp_path / "typo", "--resume", "--overwrite")
    assert code == 2 and "--overwrite" in err and not (tmp_path / "typo").exists()


def test_a_fresh_run_never_writes_into_a_folder_of_other_files(tmp_path: Path, capsys) -> None:
    """A new run into a folder without a checkpoint but with the user's files (a config.json, notes) used to
    replace same-named files; a folder holding only a run's own files (stopped before its first checkpoint) is
    reused."""
    images = _bags(tmp_path / "images", n_bags=8)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}')
    (mine / "notes.txt").write_text("my notes")
    code, err = _train(capsys, images, mine, "train.max_steps=2")
    assert code == 2 and "train.out_dir" in err and "not empty" in err and "--overwrite" in err
    assert sorted(p.name for p in mine.iterdir()) == ["config.json", "notes.txt"]
    assert (mine / "config.json").read_text() == '{"my": "settings"}'
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "metrics.jsonl").write_text("")
    assert _train(capsys, images, stopped, "train.max_steps=2")[0] == 0
    assert _train(capsys, images, mine, "train.max_steps=2", "--overwrite")[0] == 0  # asked for
    assert (mine / "notes.txt").read_text() == "my notes" and (mine / "checkpoint.pt").is_file()


def test_auto_window_below_the_confidence_says_so(tmp_path: Path) -> None:
    items = folder_source(_bags(tmp_path / "bags"))  # 6 identities
    cfg = load_config(None, ["loss.k=auto", "loss.k_lo=1", "loss.k_hi=2", "train.batch_size=3"])
    loss, info = resolve_deputy_window(cfg, bag_stats(items), 2)
    assert (loss.k_lo, loss.k_hi) == (1, 2) and info["p_true_negative"] < 0.99
    assert "no deputy window" in info["note"] and "loss.k_confidence=0.99" in info["note"]
    assert "train.batch_size" in info["note"]
    _, info = resolve_deputy_window(load_config(None, ["loss.k=auto"]), bag_stats(items), 63)
    assert "note" not in info  # 63 negatives: the rule reaches 0.99
