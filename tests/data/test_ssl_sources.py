"""Unlabeled sources on generated trees of the real layouts, the two-view pipeline, the resumable sampler."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from reid_ssl.config import AugmentConfig, DataConfig
from reid_ssl.data.augment import two_view_dataset
from reid_ssl.data.datasets import build_source, resolve_positives
from reid_ssl.data.sampler import EpochSampler
from reid_ssl.data.ssl_sources import folder_source, imagenet_source, list_source, sysu30k_source
from reid_ssl.errors import DatasetLayoutError as LayoutError
from tests.helpers import write_person_image

RNG = np.random.default_rng(0)


def test_folder_source_is_recursive_and_bags_by_folder(image_folder):
    items = folder_source(image_folder)
    assert len(items) == 30
    assert len({i.bag for i in items}) == 6
    assert all(i.path.parent.name == f"{i.bag:04d}" for i in items)  # folders sorted -> bag ids in order


def test_list_source(tmp_path, image_folder):
    lst = tmp_path / "train.txt"
    lst.write_text("# comment\n0000/0.jpg\n0001/1.jpg\n\n")
    items = list_source(image_folder, lst)
    assert [i.path.name for i in items] == ["0.jpg", "1.jpg"] and items[0].bag != items[1].bag
    lst.write_text("0000/readme.txt\n")
    with pytest.raises(ValueError, match="not an image file name"):
        list_source(image_folder, lst)


def test_imagenet_layout_gives_no_bags(tmp_path):
    for wnid in ("n01440764", "n01443537"):
        for k in range(3):
            write_person_image(tmp_path / "imagenet" / "train" / wnid / f"{wnid}_{k}.JPEG", k, RNG)
    items = imagenet_source(tmp_path / "imagenet")
    assert len(items) == 6 and all(i.bag == -1 for i in items)  # class folders are labels: never used
    assert len(imagenet_source(tmp_path / "imagenet" / "train")) == 6
    with pytest.raises(LayoutError, match="ImageNet"):
        imagenet_source(tmp_path / "missing")


def make_sysu30k(root: Path, with_list: bool) -> Path:
    names = []
    for folder in ("0000000001", "0000000002", "0000000003"):
        for k in range(4):
            write_person_image(root / "sysu_train_set_all" / folder / f"{folder}_{k}.jpg", int(folder), RNG)
            names.append(f"{folder}/{folder}_{k}.jpg")
    if with_list:
        (root / "meta").mkdir(parents=True)
        (root / "meta" / "train.txt").write_text("\n".join(names[:10]) + "\n")
    bags = [
        {"BagLabel": [3], "BagID": "bag0000000009", "BagImages": ["0000000003/*"]},
        {"BagLabel": [2, 3], "BagID": "bag0000000010", "BagImages": ["0000000002/*", "0000000003/*"]},
    ]
    (root / "bag_level_label.json").write_text(json.dumps(bags))
    return root


@pytest.mark.parametrize("with_list", [True, False])
def test_sysu30k_train_layout(tmp_path, with_list):
    root = make_sysu30k(tmp_path / "sysu30k", with_list)
    items = sysu30k_source(root)
    assert len(items) == (10 if with_list else 12)
    assert len({i.bag for i in items}) == 3 and all(i.path.is_file() for i in items)


def test_sysu30k_bad_bag_file(tmp_path):
    root = make_sysu30k(tmp_path / "s", False)
    (root / "bag_level_label.json").write_text("{not json")
    with pytest.raises(ValueError, match="bag label"):
        sysu30k_source(root)


@pytest.mark.parametrize(
    "name,rel",
    [
        ("market1501", "Market-1501-v15.09.15/bounding_box_train"),
        ("dukemtmcreid", "DukeMTMC-reID/bounding_box_train"),
        ("msmt17", "MSMT17_V1/train"),
    ],
)
def test_reid_train_folders_drop_identities(tmp_path, name, rel):
    for k in range(3):
        write_person_image(tmp_path / rel / f"{k + 1:04d}_c1s1_000151_01.jpg", k, RNG)
    items = build_source(DataConfig(source=name, root=str(tmp_path)))
    assert len(items) == 3 and all(i.bag == -1 for i in items)


def test_wrong_layout_names_what_was_expected_and_found(tmp_path):
    (tmp_path / "query").mkdir()
    with pytest.raises(LayoutError, match=r"bounding_box_train.*query"):
        build_source(DataConfig(source="market1501", root=str(tmp_path)))
    with pytest.raises(LayoutError, match="reid_ssl prepare pets09"):
        build_source(DataConfig(source="pets09", root=str(tmp_path)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        build_source(DataConfig(source="folder", root=str(empty)))


def test_two_views_have_the_configured_size_and_differ(image_folder):
    ds = two_view_dataset(DataConfig(source="folder", root=str(image_folder), height=64, width=32), AugmentConfig())
    a, b, bad = ds[0]
    assert a.shape == b.shape == (3, 64, 32) and bad == "" and not torch.equal(a, b)


def test_bag_positives_draw_the_second_view_from_the_same_bag(image_folder, monkeypatch):
    cfg = DataConfig(source="folder", root=str(image_folder), height=32, width=16, positives="bag")
    ds = two_view_dataset(cfg, AugmentConfig())
    picked = [ds._partner(0) for _ in range(50)]
    assert {ds.items[j].bag for j in picked} == {ds.items[0].bag} and len(set(picked)) > 1
    no_bags = ds.items.subset(np.arange(len(ds.items)))
    no_bags.bags = np.full(len(no_bags), -1, np.int32)
    with pytest.raises(ValueError, match="needs a source with bags"):
        two_view_dataset(cfg, AugmentConfig(), items=no_bags)


def test_corrupt_and_empty_images_are_replaced_and_reported(image_folder):
    (image_folder / "0000" / "0.jpg").write_bytes(b"")
    (image_folder / "0000" / "1.jpg").write_bytes(b"not a jpeg at all")
    good = image_folder / "0000" / "2.jpg"
    (image_folder / "0000" / "3.jpg").write_bytes(good.read_bytes()[:200])  # truncated
    ds = two_view_dataset(DataConfig(source="folder", root=str(image_folder), height=32, width=16), AugmentConfig())
    reasons = [ds[i][2] for i in range(4)]
    assert "empty file" in reasons[0] and "not an image" in reasons[1] and reasons[2] == ""
    assert "cannot decode" in reasons[3] or "truncated" in reasons[3]


def test_sampler_shards_without_overlap_and_resumes():
    a, b = EpochSampler(100, 8, seed=3, rank=0, world_size=2), EpochSampler(100, 8, seed=3, rank=1, world_size=2)
    a.set_epoch(4)
    b.set_epoch(4)
    ia, ib = list(a), list(b)
    assert len(ia) == len(ib) == 48 and not set(ia) & set(ib)
    a.set_epoch(4, start_batch=2)
    assert list(a) == ia[16:] and len(a) == 32
    a.set_epoch(5)
    assert list(a) != ia
    with pytest.raises(ValueError, match="fewer than one batch"):
        EpochSampler(10, 8, 0, 0, 2)


def test_bag_stats_bound_the_number_of_people(tmp_path):
    from reid_ssl.data.ssl_sources import bag_stats, folder_source
    from tests.helpers import write_person_image

    rng = np.random.default_rng(0)
    # three tracklets: 1 and 2 overlap in time (frames 10-20 and 15-30), 3 comes later (40-50)
    for track, frames in {1: (10, 20), 2: (15, 30), 3: (40, 50)}.items():
        for f in frames:
            write_person_image(tmp_path / "bags" / f"{track:04d}" / f"{f:06d}.jpg", track, rng)
    stats = bag_stats(folder_source(tmp_path / "bags"))
    assert (stats.bags, stats.max_cooccurring) == (3, 2)
    write_person_image(tmp_path / "bags" / "0004" / "not_a_frame.jpg", 4, rng)  # no timeline: no lower bound
    assert bag_stats(folder_source(tmp_path / "bags")) == type(stats)(4, 0)


@pytest.mark.parametrize(
    ("source", "packed_from", "expected"),
    [
        ("pets09", None, "bag"),  # bags are one person's tracklets
        ("video", None, "bag"),
        ("folder", None, "augment"),  # a sub-folder may hold anyone
        ("sysu30k", None, "augment"),  # a SYSU-30k bag holds several people
        ("imagenet", None, "augment"),  # folders are classes: never positives
        ("fashion-mnist", None, "augment"),
        ("shards", "pets09", "bag"),  # shards follow what they were packed from
        ("shards", "folder", "augment"),
        ("shards", None, "augment"),
    ],
)
def test_positives_auto_takes_bags_only_where_a_bag_is_one_person(source, packed_from, expected):
    assert resolve_positives(DataConfig(source=source), packed_from) == expected
    for explicit in ("bag", "augment"):  # an explicit choice is kept
        assert resolve_positives(DataConfig(source=source, positives=explicit), packed_from) == explicit
