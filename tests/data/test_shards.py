"""reid_ssl.data.shards: packing any source into tar shards, and streaming them exactly once per epoch."""

from __future__ import annotations

import collections
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from reid_ssl.cli.main import main
from reid_ssl.data.image_list import scan_folder
from reid_ssl.data.shards import ShardStream, assign_shards, read_manifest, write_shards
from reid_ssl.errors import AlreadyExistsError, DatasetLayoutError, MissingFileError
from tests.helpers import write_person_image


def _tensor(im) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im.resize((8, 16)), np.float32)).permute(2, 0, 1)


@pytest.fixture(scope="module")
def bags(tmp_path_factory) -> Path:
    """11 bags of 3..9 images (60 in all), frame-numbered file names."""
    root = tmp_path_factory.mktemp("bags")
    rng = np.random.default_rng(0)
    for b in range(11):
        for n in range(3 + b % 7):
            write_person_image(root / f"cam-{b:05d}" / f"{100 * b + n:06d}.jpg", b, rng)
    return root


def test_shards_keep_bags_whole_and_bytes_unchanged(bags: Path, tmp_path: Path) -> None:
    items = scan_folder(bags)
    manifest = write_shards(items, tmp_path / "s", samples_per_shard=10)
    assert manifest["samples"] == len(items) == 60 and manifest["bags"] == 11
    assert sum(s["samples"] for s in manifest["shards"]) == 60 and len(manifest["shards"]) == 5
    assert manifest["bag_stats"]["bags"] == 11
    where: dict[int, set[str]] = collections.defaultdict(set)
    for shard in manifest["shards"]:
        with tarfile.open(tmp_path / "s" / shard["name"]) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    where[meta["bag"]].add(shard["name"])
                    image = tar.extractfile(member.name[:-5] + ".jpg").read()
                    assert image == (bags / meta["path"]).read_bytes()
    assert len(where) == 11 and all(len(names) == 1 for names in where.values())


def test_every_sample_once_per_epoch_across_ranks_and_workers(bags: Path, tmp_path: Path) -> None:
    write_shards(scan_folder(bags), tmp_path / "s", samples_per_shard=8)
    for epoch in (0, 1):
        seen = collections.Counter()
        for rank in range(3):
            stream = ShardStream(tmp_path / "s", _tensor, _tensor, bag_positives=True, seed=5, rank=rank, world_size=3)
            stream.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=2)
            seen.update(int(i) for chunk in loader for i in chunk[5])
        assert sorted(seen) == list(range(60)) and set(seen.values()) == {1}


def test_assignment_is_a_partition_that_changes_with_the_epoch() -> None:
    parts = [assign_shards(23, 1, 4, r, 3, w, 2) for r in range(3) for w in range(2)]
    assert sorted(s for p in parts for s in p) == list(range(23))
    assert assign_shards(23, 1, 4, 0, 3, 0, 1) != assign_shards(23, 1, 5, 0, 3, 0, 1)


def test_resume_skips_exactly_what_was_consumed(bags: Path, tmp_path: Path) -> None:
    write_shards(scan_folder(bags), tmp_path / "s", samples_per_shard=8)
    stream = ShardStream(tmp_path / "s", _tensor, _tensor, seed=2)
    stream.set_epoch(3)
    full = [(s, p, int(i)) for *_, s, p, i in stream]
    consumed = {0: 4, 2: 100}  # 4 samples of shard 0 done, shard 2 finished
    stream.set_epoch(3, consumed)
    rest = [(s, p, int(i)) for *_, s, p, i in stream]
    assert rest == [x for x in full if x[1] >= consumed.get(x[0], 0)]
    assert stream.samples_per_rank(3, consumed) == [len(rest)]


def test_bag_positives_come_from_the_same_bag(tmp_path: Path) -> None:
    """The second view is another crop of the anchor's bag: bags here are single colours, so views match."""
    from PIL import Image

    for b, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        for n in range(4):
            (tmp_path / "src" / str(b)).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 16), colour).save(tmp_path / "src" / str(b) / f"{n}.png")
    write_shards(scan_folder(tmp_path / "src"), tmp_path / "s", samples_per_shard=5)
    for a, b, *_ in ShardStream(tmp_path / "s", _tensor, _tensor, bag_positives=True):
        assert torch.equal(a.mean((1, 2)), b.mean((1, 2)))


@pytest.fixture
def damaged(bags: Path, tmp_path: Path):
    """A copy of ``bags`` listed, then damaged: one file deleted, one not a JPEG, one JPEG cut in half."""
    src = tmp_path / "src"
    for path in bags.rglob("*.jpg"):
        (src / path.relative_to(bags)).parent.mkdir(parents=True, exist_ok=True)
        (src / path.relative_to(bags)).write_bytes(path.read_bytes())
    (src / "cam-00000" / "000001.jpg").write_bytes(b"not a jpeg")
    cut = src / "cam-00002" / "000200.jpg"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # decodes partly: a truncated file
    gone = src / "cam-00001" / "000100.jpg"
    items = scan_folder(src)
    gone.unlink()
    return items


def test_unreadable_and_corrupt_images_are_listed_and_left_out(damaged, tmp_path: Path) -> None:
    """Packing decodes every image with the training decoder: missing, non-image and truncated files are named
    in the manifest and not packed, so training never meets them."""
    manifest = write_shards(damaged, tmp_path / "s", samples_per_shard=10)
    assert manifest["num_unreadable"] == 3 and manifest["samples"] == 57 and manifest["verified"] is True
    reasons = "\n".join(manifest["unreadable"])
    assert "000100.jpg: No such file" in reasons and "000001.jpg: not an image file" in reasons
    assert "000200.jpg: cannot decode (Truncated File Read)" in reasons
    out = list(ShardStream(tmp_path / "s", _tensor, _tensor))
    assert len(out) == 57 and not any(x[2] for x in out)


def test_without_verify_corrupt_images_are_packed_and_replaced_while_training(damaged, tmp_path: Path) -> None:
    manifest = write_shards(damaged, tmp_path / "s", samples_per_shard=10, verify=False)
    assert manifest["num_unreadable"] == 1 and manifest["samples"] == 59 and manifest["verified"] is False
    out = list(ShardStream(tmp_path / "s", _tensor, _tensor))
    bad = [x[2] for x in out if x[2]]
    assert len(out) == 59 and len(bad) == 2  # each replaced by a readable image of its shard, and reported
    assert any("not an image file" in b for b in bad) and any("Truncated File Read" in b for b in bad)


def test_nothing_is_overwritten_and_bad_folders_are_named(bags: Path, tmp_path: Path) -> None:
    write_shards(scan_folder(bags), tmp_path / "s")
    with pytest.raises(AlreadyExistsError, match="--overwrite"):
        write_shards(scan_folder(bags), tmp_path / "s")
    assert read_manifest(tmp_path / "s")["samples"] == 60
    with pytest.raises(MissingFileError, match="prepare shards"):
        read_manifest(tmp_path)
    (tmp_path / "s" / "shard-000000.tar").unlink()
    with pytest.raises(DatasetLayoutError, match=r"shard-000000\.tar"):
        read_manifest(tmp_path / "s")


def test_cli_prepare_shards_then_train(bags: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "shards"
    argv = ["prepare", "shards", "folder", "--root", str(bags), "--out", str(out), "--samples-per-shard", "12"]
    assert main([*argv, "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["samples"] == 60 and manifest["source"]["source"] == "folder"
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err  # never replaced silently
    smoke = str(Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml")
    run = tmp_path / "run"
    common = [
        "train",
        "-c",
        smoke,
        "data.source=shards",
        f"data.root={out}",
        f"train.out_dir={run}",
        "train.sample_log=true",
    ]
    assert main([*common, "train.max_steps=3", "--json"]) == 0  # stops inside epoch 0
    capsys.readouterr()
    assert main([*common, "--json"]) == 0  # continues: the rest of epoch 0, then epoch 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["epochs"] == 2 and summary["k_rule"]["bags"] == 11
    rows = np.loadtxt(run / "samples-rank0.csv", delimiter=",", skiprows=1, dtype=np.int64)
    for epoch in (0, 1):
        assert sorted(rows[rows[:, 0] == epoch, 1].tolist()) == list(range(60))  # each image once per epoch


def test_a_folder_of_other_files_is_refused_not_deleted(bags: Path, tmp_path: Path) -> None:
    """Without --overwrite shards never replace a folder they did not write (it used to be deleted whole)."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my notes")
    with pytest.raises(AlreadyExistsError, match="not empty"):
        write_shards(scan_folder(bags), tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "my notes"
    assert write_shards(scan_folder(bags), tmp_path / "mine", overwrite=True)["samples"] == 60
