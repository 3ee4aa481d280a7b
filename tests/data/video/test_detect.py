"""The one person detector: box maths, validated frames (no native crash on tiny frames), the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reid_ssl.data.pets09 import find_video
from reid_ssl.data.video.detect import (
    DETECTORS,
    TORCHVISION_DETECTORS,
    HOGDetector,
    build_detector,
    clip_box,
    iou,
    iou_matrix,
    nms,
)
from reid_ssl.data.video.frames import FrameSource
from reid_ssl.errors import InputError, MissingFileError


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


@pytest.mark.parametrize(
    "shape", [(1, 1, 3), (1, 500, 3), (500, 1, 3), (64, 32, 3), (85, 42, 3), (84, 43, 3), (40, 400, 3), (400, 20, 3)]
)
def test_frames_below_the_hog_window_are_refused_not_crashed(shape) -> None:
    """OpenCV's HOG corrupts memory on frames smaller than its 64x128 window (frames under 800 px are upscaled
    1.5x first and sizes are rounded, so the smallest usable frame is 43x85)."""
    with pytest.raises(InputError, match="frame too small to detect people"):
        HOGDetector()(np.zeros(shape, np.uint8))
    assert HOGDetector()(np.zeros((85, 43, 3), np.uint8)) == []  # at the minimum: runs, finds nobody
    assert HOGDetector()(np.zeros((130, 3000, 3), np.uint8)) == []  # very wide: capped at 4000 px, still runs


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (np.zeros((64, 32, 3), np.uint8), r"frame too small to detect people: 32x64 \(min 43x85"),  # the issue's
        (np.zeros((1, 1, 3), np.uint8), "frame too small to detect people: 1x1"),
        (np.zeros((85, 42, 3), np.uint8), "frame too small"),
        (np.zeros((2000, 10, 3), np.uint8), "frame too small"),
        (np.zeros((128, 64), np.uint8), r"expected an \(H, W, 3\) colour frame"),
        (np.zeros((128, 64, 4), np.uint8), r"expected an \(H, W, 3\) colour frame"),
        (np.zeros((128, 64, 3), np.float32), "expected an 8-bit frame"),
    ],
    ids=["32x64", "1x1", "just-below", "thin", "grey", "rgba", "float"],
)
def test_hog_refuses_frames_opencv_would_crash_on(frame, message):
    with pytest.raises(InputError, match=message):
        HOGDetector()(frame)


def test_shrinking_a_huge_frame_keeps_a_window_high_side():
    """4001x128 is shrunk by 4000/4001 to fit max_side: its 127.97 px height rounds to the window's 128."""
    assert HOGDetector()(np.zeros((128, 4001, 3), np.uint8)) == []
    with pytest.raises(InputError, match=r"4001x127 \(min 64x128"):
        HOGDetector()(np.zeros((127, 4001, 3), np.uint8))


def test_hog_takes_frames_just_above_its_minimum_and_strided_views():
    assert HOGDetector()(np.zeros((86, 43, 3), np.uint8)) == []
    wide = np.zeros((200, 400, 3), np.uint8)
    assert HOGDetector()(wide[::2, ::-2]) == []  # a non-contiguous view is copied before OpenCV sees it


def test_hog_finds_the_people_of_a_pets09_frame() -> None:
    source = FrameSource(find_video())
    frame = next(f for t, f in source.frames(source.select()) if t == 200)
    boxes = build_detector("hog")(frame)
    assert len(boxes) >= 3 and all(60 <= b.h <= 200 for b in boxes)  # people are 86-140 px tall here
    assert all(0 < b.score < 1 for b in boxes) and boxes == sorted(boxes, key=lambda b: -b.score)


@pytest.mark.parametrize("name", sorted(TORCHVISION_DETECTORS))
def test_torchvision_detectors_load_local_weights_and_never_download(name: str, tmp_path) -> None:
    import torchvision

    with pytest.raises(InputError, match=TORCHVISION_DETECTORS[name].weights_file):
        build_detector(name)
    with pytest.raises(MissingFileError, match="not found"):
        build_detector(name, weights=str(tmp_path / "nope.pth"))
    if name != "ssdlite":  # the two-stage / RetinaNet ResNet-50 models are slow on 2 cores: one is enough
        return
    torch.manual_seed(0)
    model = getattr(torchvision.models.detection, TORCHVISION_DETECTORS[name].builder)(
        weights=None, weights_backbone=None
    )
    torch.save(model.state_dict(), tmp_path / "w.pth")
    detector = build_detector(name, weights=str(tmp_path / "w.pth"), min_score=0.0)
    boxes = detector(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8))
    assert isinstance(boxes, list) and all(b.x >= 0 and b.x + b.w <= 160 for b in boxes)


def test_hog_refuses_weights_it_would_ignore() -> None:
    with pytest.raises(InputError, match="needs no --weights"):
        build_detector("hog", weights="x.pth")
    assert set(DETECTORS) == {"hog", *TORCHVISION_DETECTORS}
