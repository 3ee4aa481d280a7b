"""On-disk inverted lists (``index build --on-disk``): the same results as in RAM, mapped not read, round trips,
changes that never write a published generation, and the types that cannot have lists refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from reid_ssl.errors import InputError
from reid_ssl.index import GalleryIndex, ondisk
from tests.helpers import build_market_index, clustered, gallery_items, hit_ids, index_info, run_cli

N, DIM = 3000, 32


def twins(tmp_path: Path, index_type: str, **kw) -> tuple[GalleryIndex, GalleryIndex, np.ndarray]:
    """The same gallery saved twice, lists in RAM and on disk, and loaded again; returns (ram, disk, queries)."""
    x, q, _ = clustered(N, DIM)
    for name, on_disk in (("ram", False), ("disk", True)):
        idx = GalleryIndex.create(index_info(DIM), index_type, on_disk=on_disk, **kw)
        idx.add(x, gallery_items(N))
        idx.save(tmp_path / name)
    return GalleryIndex.load(tmp_path / "ram"), GalleryIndex.load(tmp_path / "disk"), q


def mapped_files() -> set[str]:
    """Files this process has memory-mapped now (Linux)."""
    return {line.split(maxsplit=5)[5].strip() for line in open("/proc/self/maps") if len(line.split()) == 6}


def results(idx: GalleryIndex, q: np.ndarray, **kw) -> tuple[list, list]:
    hits = idx.search(q, 10, **kw)
    return hit_ids(hits), [[round(h.score, 5) for h in row] for row in hits]


def gen_file(folder: Path, name: str = "index.faiss") -> Path:
    return folder / (folder / "CURRENT").read_text().strip() / name


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("index_type", ["ivf-flat", "ivf-pq"])
def test_on_disk_lists_give_the_in_ram_results_and_are_mapped_not_read(tmp_path, index_type):
    ram, disk, q = twins(tmp_path, index_type)
    assert not ram.lists_on_disk and disk.lists_on_disk and disk.info()["lists_on_disk"]
    lists = ondisk.mapped_lists(disk._index)
    assert lists is not None and lists.read_only and lists.prefetch_nthread == ondisk.PREFETCH_THREADS
    assert isinstance(disk._vectors, np.memmap)  # vectors.npy is mapped too: neither file is read into RAM
    mapped = mapped_files()
    assert str(gen_file(tmp_path / "disk")) in mapped and str(gen_file(tmp_path / "ram")) not in mapped
    assert results(disk, q) == results(ram, q)
    for kw in ({"nprobe": 1}, {"nprobe": 64}, {"exclude_camid": 0, "exclude_ids": [1, 2, 3]}):
        assert results(disk, q, **kw) == results(ram, q, **kw), kw
    # and both equal brute force where the search is exhaustive
    nlist = faiss.extract_index_ivf(disk._index).nlist
    _, exact = disk.search_exact(q, 10)
    if index_type == "ivf-flat":
        assert results(disk, q, nprobe=nlist)[0] == exact.tolist()


def test_mmap_false_reads_the_lists_into_ram(tmp_path):
    ram, _, q = twins(tmp_path, "ivf-flat")
    loaded = GalleryIndex.load(tmp_path / "disk", mmap=False)
    assert not loaded.lists_on_disk and not isinstance(loaded._vectors, np.memmap)
    assert results(loaded, q) == results(ram, q)


def test_a_save_without_changes_links_the_mapped_file_and_round_trips(tmp_path):
    ram, disk, q = twins(tmp_path, "ivf-flat")
    first = gen_file(tmp_path / "disk")
    disk.set_calibration({"threshold": 0.5, "reliable": True})
    disk.save()
    second = gen_file(tmp_path / "disk")
    assert second != first and second.stat().st_ino == first.stat().st_ino  # a hard link, not a rewrite
    assert disk.lists_on_disk
    again = GalleryIndex.load(tmp_path / "disk")
    assert again.lists_on_disk and again.threshold == 0.5
    assert results(again, q) == results(ram, q)


@pytest.mark.parametrize("index_type", ["ivf-flat", "ivf-pq"])
def test_add_and_remove_never_write_the_published_generation(tmp_path, index_type):
    ram, disk, q = twins(tmp_path, index_type)
    published = gen_file(tmp_path / "disk")
    before = digest(published)
    extra, _, _ = clustered(200, DIM, seed=5)
    for idx in (ram, disk):
        new = idx.add(extra, gallery_items(200, start=N))
        assert idx.remove([0, 5, int(new[0])]) == 3
    assert not disk.lists_on_disk  # changed: the lists are in RAM until the save
    assert digest(published) == before
    assert results(disk, q) == results(ram, q)
    assert disk.search(extra[7], 1)[0][0].id == N + 7
    disk.save()
    assert disk.lists_on_disk and digest(published) == before  # serves the new generation from disk again
    assert isinstance(disk._vectors, np.memmap)
    assert results(disk, q) == results(ram, q)
    loaded = GalleryIndex.load(tmp_path / "disk")
    assert loaded.lists_on_disk and loaded.ntotal == N + 197
    assert results(loaded, q) == results(ram, q)


def test_a_gallery_too_small_to_train_stays_exact_then_maps_its_lists(tmp_path):
    x, _, _ = clustered(N, DIM)
    idx = GalleryIndex.create(index_info(DIM), "ivf-flat", on_disk=True)
    idx.add(x[:50], gallery_items(50))
    idx.save(tmp_path / "idx")
    small = GalleryIndex.load(tmp_path / "idx")
    assert small.spec.type == "flat" and not small.lists_on_disk and small.info()["on_disk"]
    with GalleryIndex.open_for_update(tmp_path / "idx") as up:
        up.add(x[50:], gallery_items(N - 50, start=50))
    big = GalleryIndex.load(tmp_path / "idx")
    assert big.spec.type == "ivf-flat" and big.lists_on_disk
    assert big.search(x[1234], 1)[0][0].id == 1234


@pytest.mark.parametrize(
    ("index_type", "factory"), [("hnsw", None), ("flat", None), ("auto", "HNSW16,Flat"), ("auto", "PQ8")]
)
def test_types_without_inverted_lists_refuse_on_disk(index_type, factory):
    with pytest.raises(InputError, match="inverted lists"):
        GalleryIndex.create(index_info(DIM), index_type, factory=factory, on_disk=True)
    GalleryIndex.create(index_info(DIM), "auto", on_disk=True)
    GalleryIndex.create(index_info(DIM), "auto", factory="OPQ8,IVF64,PQ8", on_disk=True)


def test_lists_under_a_transform_are_mapped_too(tmp_path):
    """OPQ is a transform above the IVF index; a random rotation is one that trains in no time."""
    ram, disk, q = twins(tmp_path, "auto", factory="RR32,IVF32,Flat")
    assert disk.lists_on_disk and isinstance(disk._index, faiss.IndexPreTransform)
    assert results(disk, q) == results(ram, q)


def test_cli_build_on_disk_and_info(tmp_path):
    market = build_market_index(tmp_path / "m")
    build = ["index", "build", "--checkpoint", str(market.checkpoint), "--images", str(market.tree), "--on-disk"]
    code, _, err = run_cli([*build, "--out", str(tmp_path / "h"), "--type", "hnsw"])
    assert code == 2 and "inverted lists" in err
    code, out, err = run_cli([*build, "--out", str(tmp_path / "d"), "--no-calibrate", "--json"])
    assert code == 0, err
    assert json.loads(out)["lists_on_disk"] is False  # 36 images: exact until it can train
    code, out, _ = run_cli(["index", "info", "--index", str(tmp_path / "d"), "--json"])
    info = json.loads(out)
    assert code == 0 and info["on_disk"] is True and info["lists_on_disk"] is False
    code, out, _ = run_cli(["index", "info", "--index", str(tmp_path / "d")])
    assert code == 0 and "on disk when the index has lists" in out
