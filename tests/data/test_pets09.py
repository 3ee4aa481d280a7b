"""Tests of reid_ssl.data.pets09 (and the detector / tracker it uses): box maths, tracker, tracks CSV, split builder, histogram baseline.

Synthetic videos and boxes cover the logic; the tests marked by their name ``real_video`` need PETS09's
``vtest.avi`` and fail (never skip) when :func:`reid_ssl.find_video` cannot find it.
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
from reid_ssl.data.market import market_name, parse_market_name
from reid_ssl.data.pets09 import (
    TRACKS_RESOURCE,
    VIDEO_MEMBER,
    VIDEO_SHA256,
    build_pets09,
    fetch_video,
    find_video,
    group_tracks,
    load_tracks,
    parse_tracks,
    read_frames,
    save_tracks,
    sha256_file,
    split_tracklets,
    tracks_sha256,
)
from reid_ssl.data.video.track import assign, bhattacharyya_matrix, centre_motion, foreground_fraction, hsv_histogram, link, track, track_stats
from reid_ssl.eval.baselines import histogram_baseline
from reid_ssl.data.video.detect import HOGDetector, clip_box, iou, iou_matrix, nms
from reid_ssl.eval.metrics import evaluate_rank
from reid_ssl.data.video.track import Detection
from reid_ssl.data.pets09 import TrackBox

# ---------------------------------------------------------------------------------------------------------
# Box maths
# ---------------------------------------------------------------------------------------------------------


def test_iou_known_values() -> None:
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == pytest.approx(1.0)
    assert iou((0, 0, 10, 10), (10, 0, 10, 10)) == 0.0
    assert iou((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_iou_matrix_matches_pairwise() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 50, (5, 4)) + np.array([0, 0, 1, 1])
    b = rng.integers(0, 50, (3, 4)) + np.array([0, 0, 1, 1])
    m = iou_matrix(a, b)
    assert m.shape == (5, 3)
    for i in range(5):
        for j in range(3):
            assert m[i, j] == pytest.approx(iou(tuple(a[i]), tuple(b[j])))


def test_nms_suppresses_overlaps_and_low_scores() -> None:
    boxes = np.array([[0, 0, 10, 20], [1, 0, 10, 20], [30, 0, 10, 20], [60, 0, 10, 20]])
    scores = np.array([0.9, 1.5, 0.5, 0.3])
    # box 0 overlaps the better box 1; box 3 is not above the 0.3 threshold.
    assert nms(boxes, scores, iou_threshold=0.4, score_threshold=0.3) == [1, 2]
    assert nms(np.zeros((0, 4)), np.zeros(0)) == []


def test_clip_box() -> None:
    assert clip_box((-5, -5, 20, 20), 100, 50) == (0, 0, 15, 15)
    assert clip_box((90, 40, 20, 20), 100, 50) == (90, 40, 10, 10)
    assert clip_box((100, 0, 5, 5), 100, 50) is None


def test_histogram_and_bhattacharyya() -> None:
    red = np.zeros((20, 10, 3), np.uint8)
    red[..., 2] = 255
    blue = np.zeros((20, 10, 3), np.uint8)
    blue[..., 0] = 255
    h_red, h_blue = hsv_histogram(red), hsv_histogram(blue)
    assert h_red.shape == (128,) and h_red.sum() == pytest.approx(1.0)
    d = bhattacharyya_matrix(np.stack([h_red, h_blue]), np.stack([h_red, h_blue]))
    np.testing.assert_allclose(d, [[0, 1], [1, 0]], atol=1e-6)
    rng = np.random.default_rng(1)
    p, q = rng.random(128), rng.random(128)
    p, q = p / p.sum(), q / q.sum()
    expected = cv2.compareHist(p.astype(np.float32), q.astype(np.float32), cv2.HISTCMP_BHATTACHARYYA)
    assert bhattacharyya_matrix(p[None], q[None])[0, 0] == pytest.approx(expected, abs=1e-5)


def test_foreground_fraction_ignores_shadows() -> None:
    mask = np.zeros((10, 10), np.uint8)
    mask[:, :5] = 255
    mask[:, 5:] = 127
    assert foreground_fraction(mask, (0, 0, 10, 10)) == pytest.approx(0.5)
    assert foreground_fraction(mask, (0, 0, 5, 10)) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------
# Tracker
# ---------------------------------------------------------------------------------------------------------


def test_assign_is_global_and_gated() -> None:
    # Greedy would give track 0 detection 0 (IoU 0.9) and leave track 1 unmatched; Hungarian matches both.
    ious = np.array([[0.9, 0.8], [0.85, 0.1]])
    dists = np.zeros((2, 2))
    assert assign(ious, dists) == [(0, 1), (1, 0)]
    # Gates: IoU below 0.45 or distance above 0.4 never match, even when nothing else is left.
    assert assign(np.array([[0.44]]), np.array([[0.0]])) == []
    assert assign(np.array([[1.0]]), np.array([[0.41]])) == []
    assert assign(np.zeros((0, 3)), np.zeros((0, 3))) == []


def _hist(k: int) -> np.ndarray:
    h = np.zeros(128)
    h[k] = 1.0
    return h


def test_link_separates_by_colour_and_bridges_gaps() -> None:
    frames = []
    for t in range(10):
        boxes, hists = [], []
        if t != 4:  # track A misses frame 4 only
            boxes.append((10 + t, 10, 20, 40))
            hists.append(_hist(0))
        boxes.append((12 + t, 12, 20, 40))  # overlaps A but has another colour
        hists.append(_hist(1))
        frames.append((t, boxes, hists))
    tracks = link(frames)
    assert sorted(len(t) for t in tracks) == [9, 10]


def test_link_gap_limit() -> None:
    def run(missing: int) -> int:
        frames = [(t, [(10, 10, 20, 40)], [_hist(0)]) for t in range(3)]
        frames += [(3 + missing + t, [(10, 10, 20, 40)], [_hist(0)]) for t in range(3)]
        return len(link(frames, max_gap=2))

    assert run(2) == 1
    assert run(3) == 2


def test_centre_motion() -> None:
    assert centre_motion([(0, 0, 10, 10), (3, 4, 10, 10), (1, 0, 10, 10)]) == pytest.approx(5.0)


def _scene(n_frames: int = 40, size: tuple[int, int] = (160, 120)) -> tuple[list[np.ndarray], list[Detection]]:
    """Textured static background, two moving coloured people, one static coloured block (a "parked van")."""
    w, h = size
    rng = np.random.default_rng(0)
    background = cv2.GaussianBlur(rng.integers(60, 200, (h, w, 3), dtype=np.uint8), (5, 5), 0)
    frames, detections = [], []
    for t in range(n_frames):
        frame = background.copy()
        people = [((5 + 2 * t, 20, 16, 40), (0, 0, 255)), ((130 - 2 * t, 60, 16, 40), (255, 0, 0))]
        van = ((60, 2, 30, 15), (255, 255, 255))
        for (x, y, bw, bh), colour in [*people, van]:
            frame[y : y + bh, x : x + bw] = colour
        frames.append(frame)
        if t >= 2:
            for x, y, bw, bh in [p[0] for p in people] + [van[0]]:
                detections.append(Detection(t, x, y, bw, bh, 1.0))
    return frames, detections


def test_track_end_to_end_on_synthetic_frames() -> None:
    frames, detections = _scene()
    tracks = track(detections, iter(frames))
    groups = group_tracks(tracks)
    assert sorted(groups) == [1, 2]  # the static block is dropped, ids start at 1
    for k, y in [(1, 20), (2, 60)]:
        frames_k = [b.frame for b in groups[k]]
        # MOG2 is still learning the background in the first frames, where a flat-coloured block that moved
        # 2 px is mostly "background"; after that every box of the person is kept, in one track.
        assert frames_k == list(range(frames_k[0], 40)) and frames_k[0] <= 12
        assert {b.y for b in groups[k]} == {y}
    assert tracks == sorted(tracks, key=lambda b: (b.frame, b.track))
    assert track_stats(tracks)["tracks_ge20"] == 2


def test_track_raises_when_video_is_shorter_than_detections() -> None:
    frames, detections = _scene(10)
    with pytest.raises(ValueError, match="video ended"):
        track([*detections, Detection(50, 0, 0, 5, 5, 1.0)], iter(frames))


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
    with pytest.raises(FileNotFoundError, match="given path"):
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
# Split and build
# ---------------------------------------------------------------------------------------------------------


def _tracks(lengths: dict[int, int], start: int = 0) -> list[TrackBox]:
    return [TrackBox(start + t, k, 4 * k, 10, 12, 24) for k, n in lengths.items() for t in range(n)]


def test_split_tracklets_protocol() -> None:
    lengths = {1: 30, 2: 25, 3: 4, 4: 21, 5: 40, 6: 20, 7: 8, 8: 19, 9: 22}
    items = split_tracklets(
        _tracks(lengths), min_test_len=20, test_every=3, test_offset=1, queries_per_tracklet=2
    )
    # tracklets with >= 20 boxes, by id: 1 2 4 5 6 9 -> every 3rd from the 2nd: 2 and 6
    test = {i.box.track for i in items if i.subset != "train"}
    train = {i.box.track for i in items if i.subset == "train"}
    assert test == {2, 6}
    assert train == {1, 4, 5, 7, 8, 9}  # 3 is shorter than min_train_len
    for k in test:
        mine = [i for i in items if i.box.track == k]
        queries = [i for i in mine if i.subset == "query"]
        assert len(queries) == 2 and all(q.camid == 0 for q in queries)
        assert sum(i.camid == 0 for i in mine) == (lengths[k] + 1) // 2
        cam1_frames = [i.box.frame for i in mine if i.camid == 0]
        cam2_frames = [i.box.frame for i in mine if i.camid == 1]
        assert max(cam1_frames) < min(cam2_frames)
    # queries are spread over the camera-1 half: 25 boxes -> 13 in c1 -> positions 3 and 9
    assert sorted(i.box.frame for i in items if i.box.track == 2 and i.subset == "query") == [3, 9]
    # the default takes 8 queries per test tracklet, all from its camera-1 half
    default = split_tracklets(_tracks(lengths), min_test_len=20, test_every=3, test_offset=1)
    queries = [i for i in default if i.box.track == 2 and i.subset == "query"]
    assert len(queries) == 8 and all(q.camid == 0 for q in queries)


def test_market_name_is_parsed_back() -> None:
    name = market_name(7, 1, 123)  # camid 1 = file name camera c2
    assert name == "0007_c2s1_000123_00.jpg"
    m = parse_market_name(name)
    assert m is not None and (m.pid, m.camid, m.frame) == (7, 1, 123)


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
    manifest = build_pets09(video, out, tracks, min_test_len=20, test_every=2, test_offset=1)
    # ids 1..6 all have 40 boxes: test = 2, 4, 6
    assert manifest["test_tracks"] == [2, 4, 6] and manifest["train_tracks"] == [1, 3, 5]
    assert manifest["counts"] == {
        "tracks": 6,
        "boxes": 240,
        "train_tracklets": 3,
        "train_crops": 120,
        "test_tracklets": 3,
        "query": 24,
        "gallery": 96,
    }
    assert manifest["frames"] == 40 and manifest["frame_size"] == [256, 96]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in (out / "train").iterdir()) == ["0001", "0003", "0005"]
    assert len(list((out / "train" / "0001").glob("*.jpg"))) == 40
    assert (out / "train" / "0003" / "000007.jpg").is_file()
    market = out / "market"
    assert len(list((market / "bounding_box_train").glob("*.jpg"))) == 120
    assert len(list((market / "query").glob("*.jpg"))) == 24
    assert len(list((market / "bounding_box_test").glob("*.jpg"))) == 96
    assert (market / "bounding_box_test" / "0002_c2s1_000039_00.jpg").is_file()
    crop = cv2.imread(str(market / "bounding_box_test" / "0006_c1s1_000000_00.jpg"))
    assert crop.shape == (48, 16, 3)  # clipped at x = 256
    train_ids = {int(p.name[:4]) for p in (market / "bounding_box_train").iterdir()}
    test_ids = {int(p.name[:4]) for p in (market / "bounding_box_test").iterdir()}
    assert not train_ids & test_ids
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    # Every person has its own colour: the histogram baseline is perfect.
    result = histogram_baseline(market)
    assert (result["num_query"], result["num_valid_query"], result["num_gallery"]) == (24, 24, 96)
    assert result["rank1"] == 1.0 and result["mAP"] == pytest.approx(1.0)

    # Complete output with the same tracks and protocol: nothing is rewritten.
    stamp = (out / "manifest.json").stat().st_mtime_ns
    (out / "train" / "0001" / "000000.jpg").unlink()
    assert build_pets09(video, out, tracks, min_test_len=20, test_every=2, test_offset=1) == manifest
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    # Another protocol rebuilds from scratch.
    again = build_pets09(video, out, tracks, min_test_len=20, test_every=3, test_offset=1)
    assert again["test_tracks"] == [2, 5] and (out / "train" / "0001" / "000000.jpg").is_file()


def test_build_pets09_fails_cleanly(tmp_path: Path, synthetic_video: tuple[Path, list[TrackBox]]) -> None:
    video, tracks = synthetic_video
    out = tmp_path / "pets09"
    with pytest.raises(ValueError, match="has 40 frames"):
        build_pets09(video, out, [*tracks, TrackBox(60, 1, 0, 0, 5, 5)])
    with pytest.raises(ValueError, match="sha256"):
        build_pets09(video, out, tracks, check_video=True)
    assert list(tmp_path.iterdir()) == [video]


# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------


def test_rank_metrics_market_protocol() -> None:
    # Query 0 (pid 1, cam 1): gallery sorted by distance = [g0 pid1 cam1 (dropped), g1 pid2, g2 pid1 cam2,
    # g3 pid1 cam2]; matches after filtering at ranks 2 and 3 -> AP = (1/2 + 2/3) / 2, rank-1 miss.
    # Query 1 (pid 3) has no valid match and is skipped.
    distmat = np.array([[0.0, 0.1, 0.2, 0.3], [0.5, 0.5, 0.5, 0.5]])
    g_pids, g_cams = np.array([1, 2, 1, 1]), np.array([1, 1, 2, 2])
    r = evaluate_rank(distmat, np.array([1, 3]), g_pids, np.array([1, 1]), g_cams, 3)
    assert r["num_valid_queries"] == 1
    np.testing.assert_allclose(r["cmc"], [0, 1, 1])
    assert r["mAP"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="no query"):
        evaluate_rank(distmat[1:], np.array([3]), g_pids, np.array([1]), g_cams)


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
    frames = read_frames(real_video)
    frame = next(frame for t, frame in enumerate(frames) if t == 100)
    frames.close()
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
    assert manifest["counts"] == {
        "tracks": 88,
        "boxes": 3517,
        "train_tracklets": 65,
        "train_crops": 2244,
        "test_tracklets": 23,
        "query": 184,
        "gallery": 1089,
    }
    assert manifest["frames"] == 795 and manifest["video_sha256"] == VIDEO_SHA256
    result = histogram_baseline(tmp_path / "pets09" / "market")
    # JPEG coding may differ a little between builds of libjpeg; the ranking barely moves.
    assert result["rank1"] == pytest.approx(0.473, abs=0.05)
    assert result["mAP"] == pytest.approx(0.363, abs=0.05)
