"""Lists and folders from other machines: BOMs, CRLF, Latin-1 names, Windows separators, junk files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from reid_ssl.config import DataConfig
from reid_ssl.data.datasets import build_source, load_split
from reid_ssl.errors import DatasetLayoutError
from reid_ssl.fileio import read_list_file
from tests.helpers import write_market_tree, write_person_image

LATIN1 = os.fsdecode(b"caf\xe9_0001.jpg")  # a Latin-1 name from an old NAS share: not valid UTF-8


def test_list_file_from_windows_with_bom_and_latin1(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    write_person_image(tmp_path / "bag1" / "a.jpg", 1, rng)
    write_person_image(tmp_path / "bag1" / LATIN1, 1, rng)
    write_person_image(tmp_path / "bag2" / "b.png", 2, rng)
    lines = [b"# images", b"bag1\\a.jpg 0", b"bag1/" + os.fsencode(LATIN1), b"", b"bag2/b.png"]
    (tmp_path / "train.txt").write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")
    assert [n for n, _ in read_list_file(tmp_path / "train.txt")] == [2, 3, 5]
    items = build_source(DataConfig(source="list", root=str(tmp_path), list_file=str(tmp_path / "train.txt")))
    assert [p.path.name for p in items] == ["a.jpg", LATIN1, "b.png"] and all(p.path.is_file() for p in items)
    assert [p.bag for p in items] == [0, 0, 1]


def test_list_file_with_old_mac_line_ends(tmp_path: Path) -> None:
    """A CR alone ends a line too (it used to read the whole file as its first entry)."""
    rng = np.random.default_rng(0)
    for name in ("a/1.jpg", "a/2.jpg", "b/3.jpg"):
        write_person_image(tmp_path / name, 1, rng)
    (tmp_path / "train.txt").write_bytes(b"a/1.jpg\ra/2.jpg\rb/3.jpg\r")
    items = build_source(DataConfig(source="list", root=str(tmp_path), list_file=str(tmp_path / "train.txt")))
    assert [p.path.name for p in items] == ["1.jpg", "2.jpg", "3.jpg"] and [p.bag for p in items] == [0, 0, 1]
    assert [line for _, line in read_list_file(tmp_path / "train.txt")] == ["a/1.jpg", "a/2.jpg", "b/3.jpg"]


def test_training_and_evaluation_accept_the_same_dataset_roots(tmp_path: Path) -> None:
    """data/market1501/Market-1501-v15.09.15/ (torchreid's layout) is found from data/ by train and eval alike."""
    root = write_market_tree(tmp_path / "market1501" / "Market-1501-v15.09.15")
    assert len(load_split("market1501", tmp_path).query) == 5
    items = build_source(DataConfig(source="market1501", root=str(tmp_path)))
    assert len(items) == len(list((root / "bounding_box_train").iterdir())) and set(items.bags.tolist()) == {-1}


def test_bad_list_line_names_the_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_bytes(b"a.jpg\nnotes.txt\n")
    with pytest.raises(DatasetLayoutError, match=r"train.txt:2: 'notes.txt' is not an image file name"):
        build_source(DataConfig(source="list", root=str(tmp_path), list_file=str(tmp_path / "train.txt")))


def test_market_folder_with_junk_and_a_latin1_name_reads_like_torchreid(tmp_path: Path) -> None:
    root = write_market_tree(tmp_path / "market")
    rng = np.random.default_rng(1)
    write_person_image(root / "bounding_box_test" / os.fsdecode(b"0011_c2s1_000777_00\xe9.jpg"), 11, rng)
    (root / "query" / ".DS_Store").write_bytes(b"\0\0")
    write_person_image(root / "query" / "._0011_c1s1_000000_00.jpg", 11, rng)  # macOS resource fork: skipped
    (root / "query" / "Thumbs.db").write_bytes(b"\0")
    split = load_split("market-layout", root)
    assert len(split.query) == 5 and not any(Path(p).name.startswith(".") for p, _, _ in split.query)
    assert any(os.fsencode(p).endswith(b"\xe9.jpg") for p, _, _ in split.gallery)


def test_eval_with_a_latin1_name_writes_its_json(tmp_path: Path, checkpoint: Path) -> None:
    from reid_ssl.eval.reid import evaluate_checkpoint

    root = write_market_tree(tmp_path / "market")
    write_person_image(
        root / "bounding_box_test" / os.fsdecode(b"0012_c3s1_000555_00\xe9.jpg"), 12, np.random.default_rng(2)
    )
    (root / "bounding_box_test" / os.fsdecode(b"0013_c3s1_000556_00\xe9.jpg")).write_bytes(b"not an image")
    result = evaluate_checkpoint(checkpoint, "market-layout", root, out_dir=tmp_path / "out", num_strips=2)
    failed = result["failures"]["gallery"]
    assert len(failed) == 1 and os.fsencode(failed[0]["image"]).endswith(b"\xe9.jpg")
    again = json.loads((tmp_path / "out" / "eval_market-layout.json").read_text())
    assert again["num_gallery"] == result["num_gallery"] and again["cache"] is not None
    assert evaluate_checkpoint(checkpoint, "market-layout", root, out_dir=tmp_path / "out", num_strips=0)["cache"] == {
        "query": True,
        "gallery": True,
    }
