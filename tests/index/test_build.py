"""Building from images: embedder identity, calibration, resume after a kill, torchrun shards, odd file names."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from reid_ssl.embedder import load_embedder
from reid_ssl.errors import InputError
from reid_ssl.index import BuildOptions, EmbedderMismatchError, GalleryIndex, build_index, gallery_source
from tests.helpers import (
    SUBPROCESS_ENV,
    build_market_index,
    free_port,
    latin1_name,
    run_cli_process,
    write_checkpoint,
    write_person_image,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One Market tree, checkpoint and index (built through the library) shared by read-only tests."""
    return build_market_index(tmp_path_factory.mktemp("built"))


def test_build_calibrates_and_refuses_another_embedder(tmp_path, built):
    checkpoint, market_tree, res = built["checkpoint"], built["tree"], built["result"]
    embedder = load_embedder(checkpoint, device="cpu")
    assert res["n_indexed"] == 36 and isinstance(res["calibration"], dict)
    assert res["calibration"]["source"] == "5 queries"
    idx = GalleryIndex.load(built["index"])
    assert idx.threshold == res["threshold"] and idx.manifest["embedder"]["checkpoint"] == str(checkpoint.resolve())
    idx.check_embedder(embedder)
    other = load_embedder(write_checkpoint(tmp_path / "other.pt", seed=1), device="cpu")
    with pytest.raises(EmbedderMismatchError, match="rebuild the index"):
        idx.check_embedder(other)
    resized = load_embedder(write_checkpoint(tmp_path / "tall.pt", height=96), device="cpu")
    with pytest.raises(EmbedderMismatchError, match="'height': 64"):
        idx.check_embedder(resized)
    with pytest.raises(EmbedderMismatchError):
        idx.search_embedded(other, [idx.items([0])[0]["path"]])
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_index(embedder, gallery_source(market_tree), built["index"])


def test_interrupted_build_resumes_without_redoing_chunks(tmp_path, checkpoint, image_folder):
    embedder = load_embedder(checkpoint, device="cpu")
    src = gallery_source(image_folder)
    src.items = src.items[:12]
    opt = BuildOptions(chunk_size=4, calibrate=False)
    real, calls, armed = embedder.embed_images, [], [True]

    def dies_on_second_chunk(paths, **kw):
        calls.append(list(paths))
        if len(calls) == 2 and armed[0]:
            raise KeyboardInterrupt  # what Ctrl-C (or a kill) does in the middle of a build
        return real(paths, **kw)

    embedder.embed_images = dies_on_second_chunk
    with pytest.raises(KeyboardInterrupt):
        build_index(embedder, src, tmp_path / "idx", opt)
    assert len(list((tmp_path / "idx" / ".build").glob("chunk-*.npz"))) == 1
    assert not (tmp_path / "idx" / "CURRENT").exists()
    calls.clear()
    armed[0] = False
    res = build_index(embedder, src, tmp_path / "idx", opt)
    assert calls == [[it.path for it in src.items[4:8]], [it.path for it in src.items[8:]]]  # chunk 0 not redone
    assert res["resumed_chunks"] == 1 and res["n_indexed"] == 12
    assert not (tmp_path / "idx" / ".build").exists()
    idx = GalleryIndex.load(tmp_path / "idx")
    assert [m["path"] for m in idx.items(idx.ids).values()] == [it.path for it in src.items]
    np.testing.assert_allclose(idx.vectors, real([it.path for it in src.items]).features, atol=1e-5)


def test_build_reports_corrupt_images_and_keeps_going(tmp_path, checkpoint, image_folder):
    (image_folder / "0001" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (image_folder / "0002" / "empty.png").write_bytes(b"")
    res = build_index(load_embedder(checkpoint, device="cpu"), gallery_source(image_folder), tmp_path / "idx")
    assert res["n_indexed"] == 30 and res["n_failed"] == 2
    assert {Path(p).name for p, _ in res["failures"]} == {"broken.jpg", "empty.png"}


@pytest.mark.slow
def test_sigkilled_cli_build_resumes(tmp_path, checkpoint, image_folder):
    out = tmp_path / "idx"
    argv = [
        "index",
        "build",
        "--checkpoint",
        str(checkpoint),
        "--images",
        str(image_folder),
        "--out",
        str(out),
        "--chunk-size",
        "2",
        "--batch-size",
        "2",
        "--json",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "reid_ssl.cli", *argv],
        env=SUBPROCESS_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while len(list((out / ".build").glob("chunk-*.npz"))) < 3 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "CURRENT").exists()
    done = run_cli_process(*argv)
    assert done.returncode == 0, done.stderr
    res = json.loads(done.stdout)
    assert res["resumed_chunks"] >= 3 and res["embedded_chunks"] == 15 - res["resumed_chunks"]
    assert res["n_indexed"] == 30


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_merge_into_the_single_process_index(tmp_path, checkpoint, market_tree):
    common = ["--checkpoint", str(checkpoint), "--images", str(market_tree), "--chunk-size", "5", "--json"]
    single = run_cli_process("index", "build", "--out", str(tmp_path / "one"), *common)
    assert single.returncode == 0, single.stderr
    dist = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            "-m",
            "reid_ssl.cli",
            "index",
            "build",
            "--out",
            str(tmp_path / "two"),
            "--device",
            "cpu",
            *common,
        ],
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert dist.returncode == 0, dist.stderr[-3000:]
    res = json.loads(dist.stdout)
    assert res["world_size"] == 2 and res["n_indexed"] == 36 and res["chunks"] == 8
    a, b = GalleryIndex.load(tmp_path / "one"), GalleryIndex.load(tmp_path / "two")
    assert a.ids.tolist() == b.ids.tolist()
    assert [m["path"] for m in a.items(a.ids).values()] == [m["path"] for m in b.items(b.ids).values()]
    np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-5)
    assert a.threshold == pytest.approx(b.threshold, abs=1e-5)


def test_a_file_name_that_is_not_utf8_is_indexed_and_round_trips(tmp_path, checkpoint, image_folder):
    """`caf\\xe9.jpg` (Latin-1 bytes) used to abort the build after embedding everything, naming no file."""
    odd = write_person_image(latin1_name(image_folder / "0001", b"caf\xe9.jpg"), 1, np.random.default_rng(5))
    assert os.fsencode(odd).endswith(b"/caf\xe9.jpg") and odd.is_file()
    res = build_index(load_embedder(checkpoint, device="cpu"), gallery_source(image_folder), tmp_path / "idx")
    assert res["n_indexed"] == 31 and res["n_failed"] == 0
    idx = GalleryIndex.load(tmp_path / "idx")
    (i,) = idx.ids_for_paths([str(odd)]).values()
    path = idx.items([i])[i]["path"]
    assert path == str(odd) and os.fsencode(path) == os.fsencode(odd) and Path(path).is_file()


def test_an_index_type_or_factory_that_cannot_work_is_refused_before_embedding(tmp_path, checkpoint, image_folder):
    embedder = load_embedder(checkpoint, device="cpu")
    calls = []
    embedder.embed_images = lambda *a, **k: calls.append(a)
    with pytest.raises(KeyError, match="unknown index type"):
        build_index(embedder, gallery_source(image_folder), tmp_path / "a", BuildOptions(index_type="lsh"))
    with pytest.raises(InputError, match="factory string"):
        build_index(embedder, gallery_source(image_folder), tmp_path / "b", BuildOptions(factory="IVF,Nope"))
    assert calls == [] and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_type_too_big_for_the_gallery_is_built_exact_and_says_so(tmp_path, checkpoint, image_folder):
    """``--type ivf-pq`` on a handful of images cannot train: the index is exact, and the result (text and JSON)
    says which type was asked for, which was built and when it will become the asked one."""
    res = build_index(
        load_embedder(checkpoint, device="cpu"),
        gallery_source(image_folder),
        tmp_path / "idx",
        BuildOptions(index_type="ivf-pq", calibrate=False),
    )
    assert res["index_type"] == "flat" and res["requested_type"] == "ivf-pq"
    assert "ivf-pq needs at least 1,000 images" in res["note"] and "index add" in res["note"]
    proc = run_cli_process(
        "index", "build", "--checkpoint", str(checkpoint), "--images", str(image_folder),
        "--out", str(tmp_path / "cli"), "--type", "ivf-pq", "--no-calibrate",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "note: ivf-pq needs at least" in proc.stdout
    auto = build_index(
        load_embedder(checkpoint, device="cpu"), gallery_source(image_folder), tmp_path / "auto", BuildOptions()
    )
    assert auto["note"] is None


def test_build_refuses_a_folder_of_other_files(tmp_path, checkpoint, image_folder):
    """`index build --out` on a folder of someone else's files (photos, a prepared dataset) is refused unasked."""
    from reid_ssl.errors import AlreadyExistsError

    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"my holiday")
    embedder = load_embedder(checkpoint, device="cpu")
    with pytest.raises(AlreadyExistsError, match="not empty"):
        build_index(embedder, gallery_source(image_folder), out)
    assert sorted(p.name for p in out.iterdir()) == ["holiday.jpg"]
    res = build_index(embedder, gallery_source(image_folder), out, BuildOptions(overwrite=True))
    assert res["n_indexed"] > 0 and (out / "holiday.jpg").read_bytes() == b"my holiday"
