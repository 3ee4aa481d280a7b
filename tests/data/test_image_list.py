"""Image lists as arrays: list files from anywhere, folder scans, bags, subsets, without a Python object per image."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest

from reid_ssl.data.image_list import ImageList, read_image_list, scan_folder
from reid_ssl.data.ssl_sources import bag_stats
from reid_ssl.errors import DatasetLayoutError, MissingFileError
from reid_ssl.images import IMAGE_EXTENSIONS


def _touch(root: Path, *names: str | bytes) -> None:
    for name in names:
        path = root / (os.fsdecode(name) if isinstance(name, bytes) else name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def test_list_file_quirks_and_bags(tmp_path: Path) -> None:
    _touch(tmp_path, "a/1.jpg", "a/2.JPG", "b/3.png", "b/4.png", b"c/caf\xe9.jpg", "a/5.jpg")
    text = b"\xef\xbb\xbf# comment\r\na/1.jpg 0\r\n\r\na/2.JPG\tlabel\n  b/3.png\nb/4.png 7\nc/caf\xe9.jpg\na/5.jpg"
    (tmp_path / "list.txt").write_bytes(text)
    items = read_image_list(tmp_path / "list.txt", tmp_path)
    assert [p.path.relative_to(tmp_path).as_posix() for p in items] == [
        "a/1.jpg", "a/2.JPG", "b/3.png", "b/4.png", os.fsdecode(b"c/caf\xe9.jpg"), "a/5.jpg",
    ]  # fmt: skip
    assert all(p.path.is_file() for p in items)
    assert items.bags.tolist() == [0, 0, 1, 1, 2, 3]  # a folder's lines are one bag per run
    ids, offsets, order = items.bag_members()
    assert ids.tolist() == [0, 1, 2, 3] and order[offsets[1] : offsets[2]].tolist() == [2, 3]
    sub = items.subset(np.array([4, 0]))
    assert [p.path.name for p in sub] == [os.fsdecode(b"caf\xe9.jpg"), "1.jpg"] and sub.blob is items.blob


def test_windows_lists_and_bad_lines(tmp_path: Path) -> None:
    _touch(tmp_path, "a/1.jpg", "a/2.jpg")
    (tmp_path / "win.txt").write_bytes(b"a\\1.jpg\r\na\\2.jpg\r\n")
    assert [p.path for p in read_image_list(tmp_path / "win.txt", tmp_path)] == [
        tmp_path / "a/1.jpg",
        tmp_path / "a/2.jpg",
    ]
    (tmp_path / "bad.txt").write_bytes(b"a/1.jpg\nnotes.txt\n")
    with pytest.raises(DatasetLayoutError, match=r"bad.txt:2: 'notes.txt' is not an image file name"):
        read_image_list(tmp_path / "bad.txt", tmp_path)
    with pytest.raises(MissingFileError):
        read_image_list(tmp_path / "none.txt", tmp_path)


def test_folder_scan_sorted_bags_and_junk(tmp_path: Path) -> None:
    _touch(
        tmp_path,
        "t2/000010.jpg",
        "t2/000011.jpg",
        "t1/000001.jpg",
        "t1/000002.png",
        "t1/._000001.jpg",
        ".cache/9.jpg",
        "t1/notes.txt",
        "top.jpg",
    )
    items = scan_folder(tmp_path)
    assert [p.path.relative_to(tmp_path).as_posix() for p in items] == [
        "top.jpg",
        "t1/000001.jpg",
        "t1/000002.png",
        "t2/000010.jpg",
        "t2/000011.jpg",
    ]
    assert items.bags.tolist() == [-1, 0, 0, 1, 1]  # an image directly in the root is in no bag
    assert scan_folder(tmp_path, bags=False).bags.tolist() == [-1] * 5
    assert scan_folder(tmp_path / "t1").bags.tolist() == [-1, -1]  # a flat folder is loose images, not one bag
    stats = bag_stats(items.subset(np.array([1, 2])))
    assert (stats.bags, stats.max_cooccurring) == (1, 1)
    assert bag_stats(items).max_cooccurring == 0  # "top" is not a frame number: no timeline, no lower bound


def test_in_memory_rows_and_sizes() -> None:
    rows = ImageList.in_memory_rows(5)
    assert len(rows) == 5 and rows[3].index == 3 and rows[3].path is None and bag_stats(rows).bags == 0


def test_a_million_entries_cost_arrays_not_objects(tmp_path: Path) -> None:
    n = 200_000
    (tmp_path / "big.txt").write_bytes(b"".join(b"%010d/%07d.jpg\n" % (i // 100, i) for i in range(n)))
    items = read_image_list(tmp_path / "big.txt", tmp_path)
    assert len(items) == n and int(items.bags.max()) + 1 == n // 100
    per_image = (items.blob.nbytes + items.starts.nbytes + items.ends.nbytes + items.bags.nbytes) / n
    assert per_image < 60  # bytes per image, all arrays (a Python object per image costs ~350)
    assert items.path(123_456).name == "0123456.jpg"


def test_bags_and_extensions_match_a_plain_python_reading_of_random_lists(tmp_path):
    """The vectorised parser (8-byte word comparisons of folder names, integer extension keys) against the
    obvious per-line Python: same entries, same bags, and the same first bad line."""
    rng = np.random.default_rng(0)
    alphabet = list("abcXYZ019/._-")
    checked = 0
    for trial in range(200):
        lines = []
        for _ in range(int(rng.integers(1, 30))):
            folder = "".join(rng.choice(alphabet, int(rng.integers(0, 25))))
            good, bad = [".jpg", ".JPEG", ".png", ".tif", ".Tiff", ".webp", ".pgm"], [".txt", "jpg", ".jp", ".jpgx"]
            ext = str(rng.choice(bad if rng.random() < 0.02 else good))
            lines += [f"{folder}/{''.join(rng.choice(alphabet[:6], int(rng.integers(0, 6))))}{ext}"] * int(
                rng.integers(1, 4)
            )
        f = tmp_path / f"{trial}.txt"
        f.write_text("\n".join(lines) + "\n")
        bad = next((i for i, line in enumerate(lines) if not _python_is_image(line)), None)
        if bad is not None:
            with pytest.raises(DatasetLayoutError, match=rf"{trial}\.txt:{bad + 1}:"):
                read_image_list(f, tmp_path)
            continue
        items = read_image_list(f, tmp_path)
        checked += 1
        folders = [line.rsplit("/", 1)[0] if "/" in line else "" for line in lines]
        runs = np.cumsum([True] + [a != b for a, b in itertools.pairwise(folders)]) - 1
        foldered = np.array([f != "" for f in folders])  # an entry without a folder is in no bag
        runs[foldered] = np.unique(runs[foldered], return_inverse=True)[1]
        runs[~foldered] = -1
        assert [os.fsdecode(items.blob[a:b].tobytes()) for a, b in zip(items.starts, items.ends, strict=True)] == lines
        assert items.bags.tolist() == runs.tolist()
    assert 50 < checked < 200  # both paths taken: lists that parse, and lists with a bad line


def _python_is_image(entry: str) -> bool:
    lower = entry.lower()
    return any(lower.endswith(e) and len(entry) > len(e) for e in IMAGE_EXTENSIONS)
