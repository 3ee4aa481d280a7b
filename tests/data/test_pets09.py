"""PETS09-S2L1: finding and fetching the video, the committed tracks CSV, the build through the video pipeline.

The tests marked by their name ``real_video`` need PETS09's ``vtest.avi`` and fail (never skip) when
:func:`reid_ssl.data.pets09.find_video` cannot find it (``make test`` fetches it).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from reid_ssl.data import pets09
from reid_ssl.data.pets09 import (
    TRACKS_RESOURCE,
    VIDEO_MEMBER,
    VIDEO_SHA256,
    build_pets09,
    fetch_video,
    find_video,
    load_tracks,
    parse_tracks,
    save_tracks,
    sha256_file,
    tracks_sha256,
)
from reid_ssl.data.video.detect import HOGDetector, iou_matrix
from reid_ssl.data.video.frames import FrameSource
from reid_ssl.data.video.split import SplitProtocol
from reid_ssl.data.video.track import TrackBox, track_stats
from reid_ssl.errors import AlreadyExistsError
from reid_ssl.eval.baselines import histogram_baseline

# ---------------------------------------------------------------------------------------------------------
# Tracks CSV
# ---------------------------------------------------------------------------------------------------------


def test_csv_round_trip_and_hash(tmp_path: Path) -> None:
    tracks = [TrackBox(3, 2, 1, 2, 3, 4), TrackBox(0, 1, 5, 6, 7, 8), TrackBox(3, 1, 0, 0, 9, 9)]
    path = tmp_path / "t.csv"
    save_tracks(tracks, path)
    text = path.read_text()
    assert text.splitlines()[0] == "frame,track,x,y,w,h"
    loaded = load_tracks(path)
    assert loaded == sorted(tracks, key=lambda b: (b.frame, b.track))
    assert tracks_sha256(tracks) == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("frame,track,x,y\n", 1),
        ("frame,track,x,y,w,h\n0,1,0,0,5,5\n1,1,0,zero,5,5\n", 3),
        ("frame,track,x,y,w,h\n0,1,0,0,5\n", 2),
        ("frame,track,x,y,w,h\n0,1,0,0,5,5\n0,0,0,0,5,5\n", 3),
        ("frame,track,x,y,w,h\n0,1,-1,0,5,5\n", 2),
        ("frame,track,x,y,w,h\n0,1,0,0,0,5\n", 2),
        ("frame,track,x,y,w,h\n0,1,0,0,5,5\n\n0,1,3,3,5,5\n", 4),
    ],
)
def test_parse_tracks_reports_bad_line(text: str, line: int) -> None:
    with pytest.raises(ValueError, match=rf"x\.csv:{line}:"):
        parse_tracks(text, "x.csv")


def test_packaged_tracks_are_valid() -> None:
    tracks = load_tracks()
    stats = track_stats(tracks)
    assert stats["tracks_ge5"] == stats["tracks"] >= 50
    assert stats["boxes"] > 3000
    assert max(b.frame for b in tracks) < 795
    assert all(b.x + b.w <= 768 and b.y + b.h <= 576 for b in tracks)
    packaged = Path(pets09.__file__).parents[1] / TRACKS_RESOURCE
    assert tracks_sha256(tracks) == hashlib.sha256(packaged.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Video lookup and fetch
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_video(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory without data/, no $REID_SSL_DATA and no system copy."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("REID_SSL_DATA", raising=False)
    monkeypatch.setattr(pets09, "SYSTEM_VIDEO", tmp_path / "absent" / "vtest.avi")
    return tmp_path


def test_find_video_lookup_order(no_video: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get download opencv-doc"):
        find_video()
    env_dir = no_video / "env"
    env_dir.mkdir()
    (env_dir / "vtest.avi").write_bytes(b"x")
    monkeypatch.setenv("REID_SSL_DATA", str(env_dir))
    assert find_video() == env_dir / "vtest.avi"
    (no_video / "data").mkdir()
    (no_video / "data" / "vtest.avi").write_bytes(b"x")
    assert find_video() == Path("data/vtest.avi")
    (no_video / "mine.avi").write_bytes(b"x")
    assert find_video(no_video / "mine.avi") == no_video / "mine.avi"
    with pytest.raises(FileNotFoundError, match=r"PETS09 video not found: .*missing.avi \(the --video path given"):
        find_video(no_video / "missing.avi")


def test_fetch_video_needs_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get"):
        fetch_video(tmp_path / "vtest.avi")


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb to build a fake .deb")
def test_fetch_video_with_a_fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = b"not really a video"
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: opencv-doc\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n"
    )
    member = root / VIDEO_MEMBER.removeprefix("./")
    member.parent.mkdir(parents=True)
    member.write_bytes(payload)
    deb = tmp_path / "opencv-doc_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--build", "-Zgzip", str(root), str(deb)], check=True, capture_output=True)

    def fake_run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
        shutil.copy(deb, cwd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(pets09, "_run", fake_run)
    with pytest.raises(RuntimeError, match="sha256"):
        fetch_video(tmp_path / "out")
    monkeypatch.setattr(pets09, "VIDEO_SHA256", hashlib.sha256(payload).hexdigest())
    (tmp_path / "out").mkdir()
    got = fetch_video(tmp_path / "out")
    assert got == tmp_path / "out" / "vtest.avi" and got.read_bytes() == payload
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["vtest.avi"]


# ---------------------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------------------


def _write_video(path: Path, frames: list[np.ndarray]) -> None:
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (w, h))
    assert writer.isOpened()
    for f in frames:
        writer.write(f)
    writer.release()


@pytest.fixture
def synthetic_video(tmp_path: Path) -> tuple[Path, list[TrackBox]]:
    """A 40-frame MJPG video with six people of distinct colours, and their (perfect) tracks."""
    colours = [(0, 0, 255), (0, 255, 0), (255, 0, 0), (0, 255, 255), (255, 0, 255), (255, 255, 0)]
    frames, tracks = [], []
    for t in range(40):
        frame = np.full((96, 256, 3), 128, np.uint8)
        for k, colour in enumerate(colours, start=1):
            x, y = 40 * (k - 1) + t // 8, 20
            frame[y : y + 48, x : x + 20] = colour
            frame[y + 24 : y + 48, x : x + 20] = (40, 40, 40)
            tracks.append(TrackBox(t, k, x, y, 20, 48))
        frames.append(frame)
    path = tmp_path / "synthetic.avi"
    _write_video(path, frames)
    # track 6 runs off the right edge of the frame: the builder must clip it
    tracks = [b if b.track != 6 else TrackBox(b.frame, 6, 240, 20, 30, 48) for b in tracks]
    return path, tracks


def test_build_pets09_layout_and_resume(tmp_path: Path, synthetic_video: tuple[Path, list[TrackBox]]) -> None:
    video, tracks = synthetic_video
    out = tmp_path / "pets09"
    protocol = SplitProtocol(min_test_len=20, test_every=2, test_offset=1)
    manifest = build_pets09(video, out, tracks, protocol)
    # ids 1..6 all have 40 boxes: test = 2, 4, 6; of 1, 3, 5 every 2nd is validation: 1, 5; train: 3
    assert manifest["split"] == {
        "train_tracklets": 1, "test_tracklets": 3, "val_tracklets": 2,
        "train": 40, "query": 24, "gallery": 96, "val_query": 16, "val_gallery": 64,
    }  # fmt: skip
    assert manifest["counts"]["tracks"] == 6 and manifest["counts"]["boxes"] == 240 and manifest["frames"] == 40
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in (out / "train").iterdir()) == ["vtest-00003"]
    assert len(list((out / "train" / "vtest-00003").glob("*.jpg"))) == 40
    assert (out / "train" / "vtest-00003" / "000007.jpg").is_file()
    market = out / "market"
    assert len(list((market / "bounding_box_train").glob("*.jpg"))) == 40
    assert len(list((market / "query").glob("*.jpg"))) == 24
    assert len(list((market / "bounding_box_test").glob("*.jpg"))) == 96
    assert len(list((out / "market_val" / "query").glob("*.jpg"))) == 16
    assert (market / "bounding_box_test" / "0002_c2s1_000039_00.jpg").is_file()
    crop = cv2.imread(str(market / "bounding_box_test" / "0006_c1s1_000000_00.jpg"))
    assert crop.shape == (48, 16, 3)  # clipped at x = 256
    train_ids = {int(p.name[:4]) for p in (market / "bounding_box_train").iterdir()}
    test_ids = {int(p.name[:4]) for p in (market / "bounding_box_test").iterdir()}
    val_ids = {int(p.name[:4]) for p in (out / "market_val" / "bounding_box_test").iterdir()}
    assert not train_ids & test_ids and not train_ids & val_ids and not test_ids & val_ids
    assert (out / "contact_vtest.png").is_file() and (out / "tracks.csv").is_file()
    # Every person has its own colour: the histogram baseline is perfect.
    result = histogram_baseline(market)
    assert (result["num_query"], result["num_valid_query"], result["num_gallery"]) == (24, 24, 96)
    assert result["rank1"] == 1.0 and result["mAP"] == pytest.approx(1.0)

    # Complete output with the same tracks and protocol: nothing is rewritten.
    stamp = (out / "manifest.json").stat().st_mtime_ns
    (out / "train" / "vtest-00003" / "000000.jpg").unlink()
    assert build_pets09(video, out, tracks, protocol) == manifest
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    # Another protocol rebuilds.
    again = build_pets09(video, out, tracks, SplitProtocol(min_test_len=20, test_every=3, test_offset=1))
    assert again["split"]["test_tracklets"] == 2 and (out / "train").is_dir()
    assert not (out / "train" / "vtest-00003").exists() or (out / "train" / "vtest-00003" / "000000.jpg").is_file()


def test_build_pets09_never_replaces_another_prepared_dataset(
    tmp_path: Path, synthetic_video: tuple[Path, list[TrackBox]]
) -> None:
    """A folder that `prepare video` filled (hours of detection) is not rebuilt as PETS09 unless asked."""
    video, tracks = synthetic_video
    out = tmp_path / "mine"
    (out / "train" / "cam-00001").mkdir(parents=True)
    (out / "train" / "cam-00001" / "000001.jpg").write_bytes(b"my crop")
    (out / "manifest.json").write_text(json.dumps({"format": "reid_ssl.video-bags", "digest": "0123"}))
    with pytest.raises(AlreadyExistsError, match="--overwrite"):
        build_pets09(video, out, tracks)
    assert (out / "train" / "cam-00001" / "000001.jpg").read_bytes() == b"my crop"
    assert build_pets09(video, out, tracks, overwrite=True)["counts"]["tracks"] == 6


def test_build_pets09_fails_cleanly(tmp_path: Path, synthetic_video: tuple[Path, list[TrackBox]]) -> None:
    video, tracks = synthetic_video
    out = tmp_path / "pets09"
    with pytest.raises(ValueError, match="has 40 frames"):
        build_pets09(video, out, [*tracks, TrackBox(60, 1, 0, 0, 5, 5)])
    with pytest.raises(ValueError, match="sha256"):
        build_pets09(video, out, tracks, check_video=True)
    assert list(tmp_path.iterdir()) == [video]


# ---------------------------------------------------------------------------------------------------------
# The real video (CI installs it; these tests fail, not skip, without it)
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_video() -> Path:
    try:
        return find_video()
    except FileNotFoundError as err:
        pytest.fail(f"PETS09 test needs vtest.avi, set REID_SSL_DATA or run:\n{err}")


def test_real_video_matches_packaged_tracks(real_video: Path) -> None:
    assert sha256_file(real_video) == VIDEO_SHA256
    source = FrameSource(real_video)
    frame = next(frame for t, frame in source.frames(source.select()) if t == 100)
    assert frame.shape == (576, 768, 3)
    tracked = np.array([b.box for b in load_tracks() if b.frame == 100])
    found = np.array([b.xywh for b in HOGDetector(upscale=1.5, min_box=(1, 1))(frame)])
    # Every tracked box of this frame is one of the detector's boxes (tracking only drops boxes); allow
    # small differences, as HOG's floating point may vary with the CPU and the OpenCV build.
    assert len(tracked) and len(found)
    assert iou_matrix(tracked, found).max(axis=1).min() > 0.8


def test_real_split_counts_and_histogram_baseline(real_video: Path, tmp_path: Path) -> None:
    manifest = build_pets09(real_video, tmp_path / "pets09")
    # The numbers documented in datasets/README.md.
    assert manifest["counts"]["tracks"] == 88 and manifest["counts"]["boxes"] == 3517
    assert manifest["split"] == {
        "train_tracklets": 53, "test_tracklets": 23, "val_tracklets": 12,
        "train": 1346, "query": 184, "gallery": 1089, "val_query": 96, "val_gallery": 802,
    }  # fmt: skip
    assert manifest["frames"] == 795 and manifest["video_sha256"] == VIDEO_SHA256
    result = histogram_baseline(tmp_path / "pets09" / "market")
    # JPEG coding may differ a little between builds of libjpeg; the ranking barely moves.
    assert result["rank1"] == pytest.approx(0.473, abs=0.05)
    assert result["mAP"] == pytest.approx(0.363, abs=0.05)


def test_build_pets09_never_writes_into_a_folder_of_other_files(
    tmp_path: Path, synthetic_video: tuple[Path, list[TrackBox]]
) -> None:
    video, tracks = synthetic_video
    out = tmp_path / "photos"
    (out / "train" / "myphotos").mkdir(parents=True)
    (out / "train" / "myphotos" / "holiday.jpg").write_bytes(b"my holiday")
    with pytest.raises(AlreadyExistsError, match="not empty"):
        build_pets09(video, out, tracks)
    assert sorted(p.name for p in out.rglob("*")) == ["holiday.jpg", "myphotos", "train"]
