"""reid_ssl.reid_data: every layout on a small generated tree, clear layout errors, torchreid registration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from reid_ssl.data.datasets import REID_DATASETS, load_split
from reid_ssl.data.reid import SYSU_DISTRACTOR_PID, TRACKLET_NOTE, DatasetLayoutError, read_market_dir, relabel
from reid_ssl.data.torchreid_bridge import import_torchreid, register_torchreid_datasets, torchreid_dataset_class
from reid_ssl.images import ImageError
from tests.helpers import write_market_tree, write_person_image


def pids(items) -> set[int]:
    return {pid for _, pid, _ in items}


def test_market1501_nested_layout_drops_junk_keeps_distractors(tmp_path: Path) -> None:
    base = write_market_tree(tmp_path / "market1501" / "Market-1501-v15.09.15")
    split = load_split("market1501", tmp_path)
    assert split.root == base
    assert len(split.train) == 6 * 3 * 2 and pids(split.train) == set(range(1, 7))
    assert len(split.query) == 5 and pids(split.query) == set(range(11, 16))
    assert 0 in pids(split.gallery) and -1 not in pids(split.gallery)  # 0000 kept, -1 dropped as torchreid does
    assert len(split.gallery) == 5 * 3 * 2 + 3
    assert {c for _, _, c in split.gallery} == {0, 1, 2}  # 0-based cameras
    assert split.summary()["query"] == {"images": 5, "ids": 5, "cameras": 1}


def test_market_names_parse_like_torchreid(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("0002_c1s1_000451_03.jpg", "-1_c6s2_000123_01.jpg", "1501_c3s3_076646_02.png"):
        write_person_image(tmp_path / "q" / name, 1, rng)
    items = sorted(read_market_dir(tmp_path / "q", drop_junk=False), key=lambda t: t[1])
    assert [(p, c) for _, p, c in items] == [(-1, 5), (2, 0), (1501, 2)]
    (tmp_path / "q" / "thumbnail.jpg").write_bytes(b"x")
    with pytest.raises(DatasetLayoutError, match=r"thumbnail\.jpg"):
        read_market_dir(tmp_path / "q")


def test_dukemtmcreid_layout(tmp_path: Path) -> None:
    write_market_tree(tmp_path / "dukemtmc-reid" / "DukeMTMC-reID", cams=2)
    split = load_split("dukemtmcreid", tmp_path)
    assert split.root.name == "DukeMTMC-reID" and len(split.query) == 5 and len(split.train) == 24


def test_market_layout_and_pets09(tmp_path: Path) -> None:
    root = write_market_tree(tmp_path / "pets" / "market", train_ids=range(0))
    split = load_split("pets09", tmp_path / "pets")
    assert split.root == root and split.train == [] and any(TRACKLET_NOTE in n for n in split.notes)
    assert any("bounding_box_train" in n for n in split.notes)
    assert load_split("market-layout", root).query == split.query


def test_msmt17_lists(tmp_path: Path) -> None:
    base = tmp_path / "msmt17" / "MSMT17_V1"
    rng = np.random.default_rng(0)
    lines = {}
    for subset, folder, ids in (("train", "train", [0, 1]), ("query", "test", [0, 1]), ("gallery", "test", [0, 1])):
        rows = []
        for pid in ids:
            for cam in (1, 2) if subset != "query" else (3,):
                rel = f"{pid:04d}/{pid:04d}_{len(rows):03d}_{cam:02d}_0303morning_0015_0.jpg"
                write_person_image(base / folder / rel, pid, rng)
                rows.append(f"{rel} {pid}")
        lines[subset] = rows
        (base / f"list_{subset}.txt").write_text("\n".join(rows) + "\n")
    split = load_split("msmt17", tmp_path)
    assert split.root == base
    assert [(p, c) for _, p, c in split.query] == [(0, 2), (1, 2)]
    assert len(split.gallery) == 4 and len(split.train) == 4
    assert Path(split.gallery[0][0]).is_file()
    (base / "list_query.txt").write_text("garbage\n")
    with pytest.raises(DatasetLayoutError, match=r"list_query\.txt:1"):
        load_split("msmt17", tmp_path)


def test_cuhk03_json_with_stale_absolute_paths(tmp_path: Path) -> None:
    base = tmp_path / "cuhk03"
    rng = np.random.default_rng(0)
    items = []
    for pid in range(3):
        for view in (1, 2):
            name = f"1_{pid + 1:03d}_{view}_{view:02d}.png"
            write_person_image(base / "images_detected" / name, pid, rng)
            items.append([f"/elsewhere/cuhk03/images_detected/{name}", pid, view - 1])
    split_json = [{"train": items[:2], "query": items[2::2], "gallery": items[3::2]}]
    (base / "splits_new_detected.json").write_text(json.dumps(split_json))
    split = load_split("cuhk03", tmp_path)
    assert all(Path(p).is_file() for p, _, _ in split.query + split.gallery)
    assert [(p, c) for _, p, c in split.query] == [(1, 0), (2, 0)]
    with pytest.raises(DatasetLayoutError, match="split_id 3 does not exist"):
        load_split("cuhk03", tmp_path, split_id=3)
    with pytest.raises(DatasetLayoutError, match=r"splits_new_labeled\.json"):
        load_split("cuhk03", tmp_path, labeled=True)


def write_sysu(root: Path, ids: range = range(28311, 28315), distractors: int = 5) -> Path:
    rng = np.random.default_rng(0)
    for pid in ids:
        write_person_image(root / "query" / f"{pid:09d}" / f"{pid:09d}_c2_2.jpg", pid, rng)
        write_person_image(root / "gallery" / f"{pid:09d}" / f"{pid:09d}_c1_1.jpg", pid, rng)
    for n in range(distractors):
        write_person_image(root / "gallery" / "0000others" / f"{n:06d}_c3_{n}.jpg", 900 + n, rng)
    return root


def test_sysu30k_test_set_with_distractors(tmp_path: Path) -> None:
    base = write_sysu(tmp_path / "sysu_test_set_all")
    split = load_split("sysu30k", tmp_path)
    assert split.root == base and split.train == []
    assert [(p, c) for _, p, c in split.query] == [(pid, 1) for pid in range(28311, 28315)]
    distractors = [it for it in split.gallery if it[1] == SYSU_DISTRACTOR_PID]
    assert len(distractors) == 5 and len(split.gallery) == 9
    assert {c for _, p, c in split.gallery if p != SYSU_DISTRACTOR_PID} == {0}
    (base / "gallery" / "notanid").mkdir()
    with pytest.raises(DatasetLayoutError, match="notanid"):
        load_split("sysu30k", base)


def test_layout_errors_name_expected_and_found(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match=r"root .*nowhere not found"):
        load_split("market1501", tmp_path / "nowhere")
    (tmp_path / "data" / "images").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError) as err:
        load_split("market1501", tmp_path / "data")
    message = str(err.value)
    assert "bounding_box_test/" in message and "Market-1501-v15.09.15" in message and "found in" in message
    assert "images/" in message
    with pytest.raises(KeyError, match="market1501"):
        load_split("market", tmp_path)
    (tmp_path / "m" / "query").mkdir(parents=True)
    (tmp_path / "m" / "bounding_box_test").mkdir()
    with pytest.raises(DatasetLayoutError, match=r"query list .* is empty"):
        load_split("market-layout", tmp_path / "m")


def test_relabel_is_dense_and_ordered() -> None:
    items = [("a", 7, 0), ("b", 3, 1), ("c", 7, 2)]
    assert relabel(items) == [("a", 1, 0), ("b", 0, 1), ("c", 1, 2)]


def test_registry_names() -> None:
    assert set(REID_DATASETS()) >= {"market1501", "dukemtmcreid", "msmt17", "cuhk03", "sysu30k", "pets09"}


def test_torchreid_registration_and_safe_image_reading(tmp_path: Path) -> None:
    torchreid = import_torchreid()
    write_sysu(tmp_path / "sysu", distractors=2)
    pets = write_market_tree(tmp_path / "pets" / "market")
    names = register_torchreid_datasets(prefix="test_")
    assert names == ["test_sysu30k", "test_pets09"]
    assert register_torchreid_datasets(prefix="test_") == names  # idempotent
    init = torchreid.data.datasets.init_image_dataset
    sysu = init("test_sysu30k", root=str(tmp_path / "sysu"), mode="gallery", verbose=False)
    assert len(sysu) == 6 and len(sysu.train) == 1  # stub train list
    dataset = init("test_pets09", root=str(tmp_path / "pets"), mode="train", verbose=False)
    assert dataset.num_train_pids == 6 and {p for _, p, _, _ in dataset.train} == set(range(6))
    item = dataset[0]
    assert item["img"].size == (24, 48) and item["pid"] in range(6)
    broken = Path(dataset.train[0][0])
    broken.write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ImageError):  # torchreid's read_image would retry forever
        dataset[0]
    assert pets.is_dir()
    cls = torchreid_dataset_class("market-layout", split=load_split("market-layout", pets))
    assert len(cls(root="ignored", mode="query", verbose=False)) == 5
