"""People in a whole camera frame: OpenCV's HOG + linear SVM pedestrian detector.

Settings as measured on PETS09-S2L1 (shared/data.md): winStride 8, padding 8, scale step 1.05, NMS IoU 0.4,
SVM score > 0.3. People there are 86-140 px tall, below HOG's 64x128 window, so frames under 800 px high
are upscaled 1.5x first (about 6 boxes per frame instead of 3, ~0.5 s per 768x576 frame on 2 cores).
Very large frames are shrunk to ``max_side`` first so that one upload cannot tie up the CPU for minutes.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Box:
    """A detection in frame pixels: top-left corner, size, and the SVM score."""

    x: int
    y: int
    w: int
    h: int
    score: float

    def xyxy(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.x + self.w, self.y + self.h


def detect_people(
    rgb: np.ndarray, *, upscale: float | None = None, min_score: float = 0.3, nms_iou: float = 0.4, max_side: int = 1600
) -> list[Box]:
    """HOG people boxes in an (H, W, 3) uint8 RGB frame, left to right.

    Args:
        upscale: resize factor before detection; default 1.5 for frames under 800 px high, else 1.
        max_side: frames larger than this (after upscaling) are shrunk to it.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB frame, got shape {rgb.shape}")
    h, w = rgb.shape[:2]
    factor = upscale if upscale is not None else (1.5 if h < 800 else 1.0)
    factor = min(factor, max_side / max(h, w))
    img = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if factor != 1.0:
        img = cv2.resize(
            img,
            (round(w * factor), round(h * factor)),
            interpolation=cv2.INTER_LINEAR if factor > 1 else cv2.INTER_AREA,
        )
    hog = cv2.HOGDescriptor()  # one per call: cheap, and never shared between threads
    hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())
    rects, weights = hog.detectMultiScale(img, winStride=(8, 8), padding=(8, 8), scale=1.05)
    if len(rects) == 0:
        return []
    scores = np.asarray(weights, np.float32).ravel()
    keep = cv2.dnn.NMSBoxes([list(map(int, r)) for r in rects], scores.tolist(), min_score, nms_iou)
    boxes = []
    for i in np.asarray(keep).ravel():
        x, y, bw, bh = (float(v) / factor for v in rects[i])
        x0, y0 = max(0, round(x)), max(0, round(y))
        x1, y1 = min(w, round(x + bw)), min(h, round(y + bh))
        if x1 - x0 >= 8 and y1 - y0 >= 16:
            boxes.append(Box(x0, y0, x1 - x0, y1 - y0, float(scores[i])))
    return sorted(boxes, key=lambda b: (b.x, b.y))


def crop(rgb: np.ndarray, box: Box, pad: float = 0.05) -> Image.Image:
    """The box (grown by ``pad`` of its size on each side, clipped to the frame) as a PIL image."""
    h, w = rgb.shape[:2]
    dx, dy = round(box.w * pad), round(box.h * pad)
    x0, y0 = max(0, box.x - dx), max(0, box.y - dy)
    x1, y1 = min(w, box.x + box.w + dx), min(h, box.y + box.h + dy)
    return Image.fromarray(np.ascontiguousarray(rgb[y0:y1, x0:x1]))
