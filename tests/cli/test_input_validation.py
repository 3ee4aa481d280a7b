"""Input validation at every command-line boundary: each bad argument gives one clear line (exit code != 0,
no traceback), and a refused command creates nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import SMOKE_CONFIG, assert_one_clear_line, build_market_index, run_cli

SMOKE = str(SMOKE_CONFIG)

BAD_INPUT = [
    # train: unknown names, wrong layouts, missing paths, absurd sizes
    (["train", "data.source=nope"], "data.source='nope' is not one of"),
    (["train", "-c", SMOKE, "data.root={missing}"], "expected an image folder at"),
    (["train", "-c", SMOKE, "data.root={empty}"], "no images found"),
    (["train", "-c", SMOKE, "data.root={tree}", "train.batch_size=-4"], "batch_size >= 2"),
    (["train", "-c", SMOKE, "data.root={tree}/query", "train.batch_size=100000000"], "fewer than one batch"),
    (["train", "-c", "{missing}.yaml"], "config file not found"),
    (["train", "--resume", "{missing}.pt"], "nothing to resume at"),
    (["train", "-c", SMOKE, "model.backbone=resnet9000"], "is not one of"),
    (["train", "-c", SMOKE, "data.root={tree}", "optim.lr=inf"], "optim.lr expects a finite number"),
    (["train", "-c", SMOKE, "data.root={tree}", "loss.margin=nan"], "loss.margin expects a finite number"),
    # eval / finetune / export
    (["eval", "--checkpoint", "{ckpt}", "--dataset", "mnist"], "invalid choice: 'mnist'"),
    (["eval", "--checkpoint", "{missing}.pt"], "checkpoint not found"),
    (["eval", "--checkpoint", "{ckpt}", "--dataset", "market-layout", "--root", "{missing}"], "not found"),
    (["eval", "--checkpoint", "{ckpt}", "--dataset", "market-layout", "--root", "{empty}"], "expected query/"),
    (["eval", "--checkpoint", "{ckpt}", "--batch-size", "-3"], "--batch-size"),
    (["eval", "--checkpoint", "{ckpt}", "--batch-size", "1000000"], "--batch-size"),
    (["eval", "--checkpoint", "{ckpt}", "--dataset", "fashion-mnist", "--k", "0"], "--k"),
    (["finetune", "--checkpoint", "{ckpt}", "--dataset", "nope"], "invalid choice: 'nope'"),
    (["finetune", "--checkpoint", "{ckpt}", "--dataset", "market-layout", "--train-batch-size", "0"], "batch-size"),
    (["export", "--checkpoint", "{missing}.pt", "--to", "onnx", "--out", "{empty}/x.onnx"], "checkpoint not found"),
    (["export", "--checkpoint", "{ckpt}", "--to", "pickle", "--out", "{empty}/x"], "invalid choice: 'pickle'"),
    # index
    (["index", "build", "--checkpoint", "{ckpt}", "--images", "nope_dataset", "--out", "{out}"], "no such image"),
    (
        ["index", "build", "--checkpoint", "{ckpt}", "--images", "pets09", "--data-root", "{empty}", "--out", "{out}"],
        "reid_ssl prepare pets09",
    ),
    (["index", "build", "--checkpoint", "{ckpt}", "--images", "{empty}", "--out", "{out}"], "no image files"),
    (["index", "build", "--checkpoint", "{ckpt}", "--images", "{file}", "--out", "{out}"], "must be a folder"),
    (["index", "build", "--checkpoint", "{missing}.pt", "--images", "{tree}", "--out", "{out}"], "not found"),
    (
        ["index", "build", "--checkpoint", "{ckpt}", "--images", "{tree}", "--out", "{out}", "--batch-size", "0"],
        "--batch-size",
    ),
    (
        ["index", "build", "--checkpoint", "{ckpt}", "--images", "{tree}", "--out", "{out}", "--batch-size", "9999999"],
        "--batch-size",
    ),
    (
        ["index", "build", "--checkpoint", "{ckpt}", "--images", "{tree}", "--out", "{out}", "--workers", "-2"],
        "--workers",
    ),
    (["index", "add", "{missing}.jpg", "--index", "{index}"], "no such file or folder"),
    (["index", "add", "{query}", "--index", "{missing}"], "index not found"),
    (["index", "search", "--index", "{index}", "--query", "{query}", "-k", "0"], "-k"),
    (["index", "search", "--index", "{index}", "--query", "{query}", "-k", "-5"], "-k"),
    (["index", "search", "--index", "{index}", "--query", "{query}", "-k", "100000"], "-k"),
    (["index", "search", "--index", "{index}", "--query", "{missing}.jpg"], "query image not found"),
    (["index", "search", "--index", "{index}", "--query", "{file}"], "not an image file"),
    (["index", "info", "--index", "{missing}"], "index not found"),
    (["index", "info", "--index", "{empty}"], "no reid_ssl index"),
    (["index", "info", "--index", "{file}"], "is a file, not an index folder"),
    (["index", "remove", "--index", "{missing}", "--ids", "1"], "index not found"),
    (["index", "remove", "--index", "{index}"], "nothing to remove"),
    (["index", "calibrate", "--index", "{index}", "--queries", "{missing}"], "query folder not found"),
    # app, k-rule, prepare
    (["app", "--index", "{missing}"], "no gallery index at"),
    (["app", "--index", "{index}", "--port", "0"], "--port"),
    (["app", "--index", "{index}", "--port", "70000"], "--port"),
    (["app", "--index", "{index}", "--max-upload-mb", "-1"], "--max-upload-mb"),
    (["app", "--index", "{index}", "--auth-file", "{missing}"], "auth file not found"),
    (["app", "--index", "{index}", "--checkpoint", "{missing}.pt"], "checkpoint not found"),
    (["k-rule", "--negatives", "-1", "--classes", "5"], "must be >= 1"),
    (["k-rule", "--negatives", "63", "--classes", "5", "--confidence", "nan"], "--confidence"),
    (["k-rule", "--negatives", "63", "--classes", "5", "--confidence", "inf"], "--confidence"),
    (["finetune", "--checkpoint", "{ckpt}", "--dataset", "market-layout", "--lr", "inf"], "--lr"),
    (["finetune", "--checkpoint", "{ckpt}", "--dataset", "market-layout", "--margin", "nan"], "--margin"),
    (["eval", "--checkpoint", "{ckpt}", "--dataset", "fashion-mnist", "--temperature", "inf"], "--temperature"),
    (["prepare", "video", "{file}", "--out", "{out}", "--min-score", "inf"], "--min-score"),
    (["prepare", "video", "{file}", "--out", "{out}", "--fps", "nan"], "--fps"),
    (["k-rule", "--negatives", "63", "--classes", "20", "--max-k", "100000000"], "at most 1000 rows"),
    (["prepare", "nope"], "invalid choice: 'nope'"),
    (["prepare", "pets09", "--video", "{missing}.avi"], "not found"),
    (["nope"], "invalid choice: 'nope'"),
]


@pytest.fixture(scope="module")
def bad_input_places(tmp_path_factory):
    market = build_market_index(tmp_path_factory.mktemp("market"))
    root = tmp_path_factory.mktemp("bad_input")
    (root / "empty").mkdir()
    (root / "file.txt").write_text("not an image, not a folder")
    return {
        "ckpt": str(market.checkpoint),
        "index": str(market.index),
        "tree": str(market.tree),
        "query": str(market.queries()[0]),
        "missing": str(root / "missing"),
        "empty": str(root / "empty"),
        "file": str(root / "file.txt"),
        "out": str(root / "out"),
    }


@pytest.mark.parametrize(("argv", "message"), BAD_INPUT, ids=[" ".join(a[:3]) for a, _ in BAD_INPUT])
def test_input_validation_every_cli_subcommand_gives_one_clear_line(bad_input_places, argv, message, monkeypatch):
    monkeypatch.delenv("REID_SSL_APP_AUTH", raising=False)
    code, _, err = run_cli([a.format(**bad_input_places) for a in argv])
    assert_one_clear_line(code, err, message)
    assert not Path(bad_input_places["missing"]).exists()  # a refused command creates nothing


def test_resume_followed_by_an_override_reads_it_as_an_override(capsys) -> None:
    """`reid_ssl train --resume train.epochs=60` (the help's own example): the override is not a checkpoint path."""
    from reid_ssl.cli import main

    assert main(["train", "--resume", "train.epochs=60", "optim.lr=0.05", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 60" in out and "lr: 0.05" in out


def test_a_wrong_kind_of_path_is_a_usage_error_and_a_full_disk_is_not(capsys, tmp_path) -> None:
    """`--out FILE` where a folder is needed (or an existing file) is the user's to fix: exit 2, path named."""
    import argparse
    import errno

    from reid_ssl.cli.main import _run

    def raising(exc: Exception):
        def handler(_: argparse.Namespace) -> int:
            raise exc

        return argparse.Namespace(command="eval", handler=handler)

    assert _run(raising(FileExistsError(errno.EEXIST, "File exists", str(tmp_path / "out")))) == 2
    assert str(tmp_path / "out") in capsys.readouterr().err
    assert _run(raising(NotADirectoryError(errno.ENOTDIR, "Not a directory", "x.pt/.work"))) == 2
    assert _run(raising(OSError(errno.ENOSPC, "No space left on device"))) == 1  # the machine's, not the input's


def test_k_rule_says_when_no_rank_is_safe(capsys) -> None:
    from reid_ssl.cli import main

    assert main(["k-rule", "--negatives", "63", "--classes", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["smallest_k"] is None
    assert main(["k-rule", "--negatives", "63", "--classes", "1"]) == 0
    assert "no k up to 63 reaches" in capsys.readouterr().out


def test_app_on_a_port_in_use_is_refused_before_it_claims_to_serve() -> None:
    import socket

    from reid_ssl.cli.app import _check_port_free
    from reid_ssl.errors import InputError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(InputError, match=rf"127\.0\.0\.1:{port}.*--port"):
            _check_port_free("127.0.0.1", port)
    _check_port_free("127.0.0.1", port)  # free again
