"""The person detector on a real PETS09 frame, and on frames OpenCV's HOG must never see.

The PETS09 test needs ``vtest.avi`` and fails (never skips) when :func:`reid_ssl.data.pets09.find_video`
cannot find it.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from reid_ssl.data.pets09 import find_video
from reid_ssl.data.video.detect import HOGDetector
from reid_ssl.errors import InputError, MissingFileError


def test_hog_finds_people_in_a_pets09_frame():
    try:
        video = find_video()
    except MissingFileError as err:
        pytest.fail(f"this test needs the PETS09 video vtest.avi:\n{err}")
    cap = cv2.VideoCapture(str(video))
    cap.set(cv2.CAP_PROP_POS_FRAMES, 200)
    ok, bgr = cap.read()
    cap.release()
    assert ok
    boxes = HOGDetector()(bgr)
    assert len(boxes) >= 3 and all(60 <= b.h <= 200 for b in boxes)  # people are 86-140 px tall here


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (np.zeros((64, 32, 3), np.uint8), r"frame too small to detect people: 32x64 \(min 43x86"),  # the issue's
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


def test_hog_takes_frames_just_above_its_minimum_and_strided_views():
    assert HOGDetector()(np.zeros((86, 43, 3), np.uint8)) == []
    wide = np.zeros((200, 400, 3), np.uint8)
    assert HOGDetector()(wide[::2, ::-2]) == []  # a non-contiguous view is copied before OpenCV sees it
