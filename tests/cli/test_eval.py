"""`reid_ssl eval | finetune | export` end to end through ``cli.main``: outputs, JSON and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reid_ssl.cli.main import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_prints_table_and_writes_files(capsys, tmp_path, checkpoint, market_tree) -> None:
    code, out, err = run(
        capsys,
        "eval",
        "--checkpoint",
        str(checkpoint),
        "--dataset",
        "market-layout",
        "--root",
        str(market_tree),
        "--strips",
        "2",
    )
    assert code == 0, err
    assert "rank1" in out and "mAP" in out and "mINP" in out and "5 queries" in out
    folder = checkpoint.parent  # default output folder: the checkpoint's
    saved = json.loads((folder / "eval_market-layout.json").read_text())
    assert {"rank1", "rank5", "rank10", "rank20", "mAP", "mINP", "cmc"} <= set(saved)
    assert (folder / "cmc_market-layout.png").is_file()
    assert len(list((folder / "ranked_market-layout").glob("*.png"))) == 2


def test_eval_json_output_is_pure_json(capsys, tmp_path, checkpoint, market_tree) -> None:
    code, out, _ = run(
        capsys,
        "eval",
        "--checkpoint",
        str(checkpoint),
        "--dataset",
        "market-layout",
        "--root",
        str(market_tree),
        "--out",
        str(tmp_path / "o"),
        "--json",
        "--strips",
        "0",
        "--metric",
        "euclidean",
        "--no-flip",
        "--streaming",
        "on",
        "--no-cache",
    )
    assert code == 0
    result = json.loads(out)
    assert result["metric"] == "euclidean" and result["flip"] is False and result["mode"] == "streaming"
    assert Path(result["files"]["json"]).parent == tmp_path / "o"


def test_eval_classification_protocol(capsys, tmp_path, checkpoint, image_folder) -> None:
    root = tmp_path / "inet"
    for split in ("train", "val"):
        for f in image_folder.rglob("*.jpg"):
            dst = root / split / f.parent.name / f.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(f.read_bytes())
    code, out, err = run(
        capsys,
        "eval",
        "--checkpoint",
        str(checkpoint),
        "--dataset",
        "imagenet",
        "--root",
        str(root),
        "--protocol",
        "knn",
        "--k",
        "3",
        "--out",
        str(tmp_path),
    )
    assert code == 0, err
    assert "top1" in out and (tmp_path / "eval_imagenet_knn.json").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--checkpoint", "{missing}"], "checkpoint not found"),
        (["--checkpoint", "{notckpt}"], "not a loadable reid_ssl checkpoint"),
        (["--root", "{tmp}/nowhere"], "not found"),
        (["--root", "{tmp}"], "expected query/, bounding_box_test/"),
        (["--protocol", "linear"], "does not apply"),
    ],
)
def test_eval_bad_input_is_one_line_exit_2(capsys, tmp_path, checkpoint, market_tree, args, message) -> None:
    (tmp_path / "x.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    fill = {"missing": str(tmp_path / "none.pt"), "notckpt": str(tmp_path / "x.pt"), "tmp": str(tmp_path)}
    argv = ["eval", "--checkpoint", str(checkpoint), "--dataset", "market-layout", "--root", str(market_tree)]
    argv += [a.format(**fill) for a in args]
    code, out, err = run(capsys, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and out == ""


@pytest.mark.parametrize(
    "args", [["--dataset", "mnist"], ["--batch-size", "-3"], ["--batch-size", "1000000"], ["--strips", "-1"]]
)
def test_eval_bad_options_are_usage_errors(capsys, checkpoint, args) -> None:
    with pytest.raises(SystemExit) as e:
        main(["eval", "--checkpoint", str(checkpoint), *args])
    assert e.value.code == 2


def test_export_cli(capsys, tmp_path, checkpoint) -> None:
    code, out, _ = run(
        capsys,
        "export",
        "--checkpoint",
        str(checkpoint),
        "--to",
        "torchvision",
        "--out",
        str(tmp_path / "tv.pt"),
        "--json",
    )
    assert code == 0 and json.loads(out)["format"] == "torchvision"
    assert "conv1.weight" in torch.load(tmp_path / "tv.pt", weights_only=True)
    code, _, err = run(capsys, "export", "--checkpoint", str(tmp_path / "nope.pt"), "--to", "onnx", "--out", "m")
    assert code == 2 and "checkpoint not found" in err


def test_export_never_replaces_a_file_unasked(capsys, tmp_path, checkpoint) -> None:
    """Nothing is lost: not the checkpoint itself, not an unrelated file, not a folder."""
    copy = tmp_path / "ck.pt"
    copy.write_bytes(checkpoint.read_bytes())
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    before = copy.read_bytes()
    for out, message in [(copy, "itself"), (notes, "--overwrite"), (tmp_path, "is a folder")]:
        for extra in ([], ["--overwrite"]) if out != tmp_path else ([],):
            code, _, err = run(
                capsys, "export", "--checkpoint", str(copy), "--to", "reid_ssl", "--out", str(out), *extra
            )
            if out == notes and extra:
                assert code == 0  # asked for: replaced
            else:
                assert code == 2 and message in err, err
    assert copy.read_bytes() == before


def test_finetune_cli_then_eval(capsys, tmp_path, checkpoint, market_tree) -> None:
    code, out, err = run(
        capsys,
        "finetune",
        "--checkpoint",
        str(checkpoint),
        "--dataset",
        "market-layout",
        "--root",
        str(market_tree),
        "--train-batch-size",
        "8",
        "--max-steps",
        "1",
        "--out",
        str(tmp_path / "ft" / "ck.pt"),
        "--strips",
        "1",
        "--json",
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["steps"] == 1 and Path(result["checkpoint"]).is_file()
    assert result["eval"]["dataset"] == "market-layout" and (tmp_path / "ft" / "eval_market-layout.json").is_file()
    code, _, err = run(
        capsys,
        "finetune",
        "--checkpoint",
        str(checkpoint),
        "--dataset",
        "market-layout",
        "--root",
        str(market_tree),
        "--loss",
        "triplet",
        "--train-batch-size",
        "64",
    )
    assert code == 2 and "identities" in err


def test_finetune_never_replaces_its_input_or_an_existing_out(capsys, tmp_path, checkpoint, market_tree) -> None:
    """The user test: `finetune --out X/checkpoint.pt` with X/checkpoint.pt the --checkpoint replaced it."""
    copy = tmp_path / "ck.pt"
    copy.write_bytes(checkpoint.read_bytes())
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    common = ["finetune", "--checkpoint", str(copy), "--dataset", "market-layout", "--root", str(market_tree)]
    common += ["--train-batch-size", "8", "--max-steps", "1", "--no-eval"]
    for out, extra, message in [(copy, [], "itself"), (copy, ["--overwrite"], "itself"), (notes, [], "--overwrite")]:
        code, _, err = run(capsys, *common, "--out", str(out), *extra)
        assert code == 2 and message in err, err
    assert copy.read_bytes() == checkpoint.read_bytes() and notes.read_text() == "my notes"
    code, _, err = run(capsys, *common, "--out", str(notes), "--overwrite")
    assert code == 0, err


def test_eval_keeps_results_of_other_options(capsys, tmp_path, checkpoint, market_tree) -> None:
    """The user test: a second `eval --rerank` replaced the first eval's JSON; an identical re-run may rewrite."""
    argv = ["eval", "--checkpoint", str(checkpoint), "--dataset", "market-layout", "--root", str(market_tree)]
    argv += ["--out", str(tmp_path / "o"), "--strips", "0"]
    assert run(capsys, *argv)[0] == 0
    first = (tmp_path / "o" / "eval_market-layout.json").read_text()
    code, _, err = run(capsys, *argv, "--rerank")
    assert code == 2 and "rerank: False -> True" in err and "--overwrite" in err
    assert (tmp_path / "o" / "eval_market-layout.json").read_text() == first
    assert run(capsys, *argv)[0] == 0  # the same options again
    assert run(capsys, *argv, "--rerank", "--overwrite")[0] == 0
    assert json.loads((tmp_path / "o" / "eval_market-layout.json").read_text())["rerank"] is True
