"""What the commands share: the one file check (a folder where a file is expected), problem lines that name a
path once, counts in the right number, scores that are cosine similarities, and `train --print-config --json`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from reid_ssl.cli.common import print_problems
from reid_ssl.console import plural
from reid_ssl.errors import InputError, MissingFileError
from reid_ssl.fileio import require_file
from tests.helpers import assert_one_clear_line, build_market_index, index_info, run_cli, write_checkpoint


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    return build_market_index(tmp_path_factory.mktemp("common"))


@pytest.mark.parametrize(
    ("argv", "what"),
    [
        (["eval", "--checkpoint", "{dir}", "--dataset", "pets09"], "checkpoint"),
        (["index", "search", "--index", "{index}", "--query", "{dir}"], "query image"),
        (["train", "-c", "{dir}", "--print-config"], "config file"),
        (["prepare", "pets09", "--video", "{dir}"], "PETS09 video"),
        (["index", "search", "--index", "{index}", "--query", "{query}", "--checkpoint", "{dir}"], "checkpoint"),
    ],
    ids=["checkpoint", "query", "config", "video", "index-checkpoint"],
)
def test_a_folder_where_a_file_is_expected_is_called_a_folder(market, tmp_path, argv, what):
    places = {"dir": str(tmp_path), "index": str(market.index), "query": str(market.queries()[0])}
    code, _, err = run_cli([a.format(**places) for a in argv])
    assert_one_clear_line(code, err, f"{what} {tmp_path} is a folder; expected a file")
    assert code == 2 and "not found" not in err


def test_require_file(tmp_path):
    (tmp_path / "a.pt").write_bytes(b"x")
    assert require_file(tmp_path / "a.pt", "checkpoint") == tmp_path / "a.pt"
    with pytest.raises(InputError, match="is a folder; expected a file"):
        require_file(tmp_path, "checkpoint")
    with pytest.raises(MissingFileError, match=r"checkpoint not found: .*b\.pt \(hint\)"):
        require_file(tmp_path / "b.pt", "checkpoint", " (hint)")


def test_an_unreadable_path_is_printed_once(capsys):
    print_problems([("/g/bad.jpg", "/g/bad.jpg: not an image file"), ("/g/x.jpg", "already indexed")], "unreadable: ")
    err = capsys.readouterr().err
    assert err.count("/g/bad.jpg") == 1 and "unreadable: /g/bad.jpg: not an image file" in err
    assert "/g/x.jpg: already indexed" in err


def test_counts_are_in_the_right_number(market, tmp_path):
    assert (plural(1, "item"), plural(3, "item"), plural(2, "identity", "identities")) == (
        "1 item",
        "3 items",
        "2 identities",
    )
    from reid_ssl.index import GalleryIndex, GalleryItem

    idx = GalleryIndex.create(market.embedder)
    query = market.queries()[0]
    idx.add(market.embedder.embed_image(query)[None], [GalleryItem(path=str(query))])
    idx.save(tmp_path / "one")
    argv = ["index", "search", "--index", str(tmp_path / "one"), "--query", str(query), "-k", "3"]
    code, out, err = run_cli([*argv, "--checkpoint", str(market.checkpoint)])
    assert code == 0 and "the gallery holds only 1 item;" in out + err and "1 items" not in out + err


def test_scores_are_cosine_similarities_within_minus_one_and_one():
    """Float rounding made a query's score against its own vector 1.000000238 in --json output."""
    from reid_ssl.index import GalleryIndex, GalleryItem

    feats = np.random.default_rng(0).normal(size=(300, 64)).astype(np.float32)
    idx = GalleryIndex.create(index_info(64), "flat")
    idx.add(feats, [GalleryItem(path=f"/g/{i}.jpg") for i in range(300)])
    scores = [h.score for hits in idx.search(feats, 2) for h in hits]
    assert max(scores) <= 1.0 and min(scores) >= -1.0
    exact, _ = idx.search_exact(feats, 2)
    assert exact.max() <= 1.0


def test_a_changed_recorded_checkpoint_is_not_called_the_given_one(market, tmp_path):
    """No --checkpoint given: the mismatch is the recorded checkpoint's, which changed since the build."""
    own = build_market_index(tmp_path / "own")
    query = str(own.queries()[0])
    write_checkpoint(own.checkpoint, seed=1)  # the checkpoint the index records, replaced since
    code, _, err = run_cli(["index", "search", "--index", str(own.index), "--query", query])
    assert code == 2 and "the given one" not in err
    assert f"the recorded checkpoint {own.checkpoint}, which has changed since the index was built," in err
    argv = ["index", "search", "--index", str(market.index), "--query", query, "--checkpoint", str(own.checkpoint)]
    code, _, err = run_cli(argv)
    assert code == 2 and f"--checkpoint {own.checkpoint} gives embedder" in err


def test_print_config_json_prints_json(capsys):
    from reid_ssl.cli import main

    assert main(["train", "--print-config", "--json", "train.epochs=3"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["epochs"] == 3
