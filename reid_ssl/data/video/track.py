"""Linking per-frame person boxes into tracklets (the recipe that made the committed PETS09 tracks).

Boxes with little MOG2 foreground are dropped (static false positives such as a parked van), the rest are
linked frame by frame with the Hungarian algorithm on ``(1 - IoU) + Bhattacharyya distance`` of HSV
histograms, gated, with a short gap allowance; tracks that never move or are too short are dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from scipy.optimize import linear_sum_assignment

from reid_ssl.data.video.detect import clip_box, iou_matrix
from reid_ssl.errors import VideoError

Box = tuple[int, int, int, int]  # x, y, w, h in pixels


@dataclass(frozen=True)
class Detection:
    """One person box found by the detector in one frame (frame index 0-based)."""

    frame: int
    x: int
    y: int
    w: int
    h: int
    score: float

    @property
    def box(self) -> Box:
        return (self.x, self.y, self.w, self.h)


@dataclass(frozen=True)
class TrackBox:
    """One box of one tracklet: a row ``frame,track,x,y,w,h`` of a tracks CSV."""

    frame: int
    track: int
    x: int
    y: int
    w: int
    h: int

    @property
    def box(self) -> Box:
        return (self.x, self.y, self.w, self.h)


def hsv_histogram(image: np.ndarray, bins: tuple[int, int] = (16, 8)) -> np.ndarray:
    """L1-normalised hue x saturation histogram of a BGR image, flattened to ``bins[0] * bins[1]``."""
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
    hist = cv2.calcHist([hsv], [0, 1], None, list(bins), [0, 180, 0, 256]).reshape(-1).astype(np.float64)
    total = hist.sum()
    return hist / total if total > 0 else hist


def bhattacharyya_matrix(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Pairwise Bhattacharyya distance ``sqrt(1 - sum(sqrt(p * q)))`` of L1-normalised histograms.

    Equals OpenCV's ``HISTCMP_BHATTACHARYYA`` for normalised inputs.

    Args:
        p: (N, K) histograms.
        q: (M, K) histograms.

    Returns:
        (N, M) distances in [0, 1].
    """
    coeff = np.sqrt(np.asarray(p, np.float64)) @ np.sqrt(np.asarray(q, np.float64)).T
    return np.sqrt(np.clip(1.0 - coeff, 0.0, 1.0))


def foreground_fraction(mask: np.ndarray, box: Box) -> float:
    """Fraction of a box's pixels that a MOG2 mask marks as foreground (255; shadows, 127, do not count)."""
    x, y, w, h = box
    patch = mask[max(0, y) : y + h, max(0, x) : x + w]
    return float(np.count_nonzero(patch == 255)) / patch.size if patch.size else 0.0


@dataclass
class _Track:
    boxes: list[tuple[int, Box]]  # (frame, box)
    hist: np.ndarray

    @property
    def last_frame(self) -> int:
        return self.boxes[-1][0]


def assign(
    ious: np.ndarray, distances: np.ndarray, min_iou: float = 0.45, max_distance: float = 0.4
) -> list[tuple[int, int]]:
    """One Hungarian matching step between tracks (rows) and detections (columns).

    The cost is ``(1 - IoU) + distance``; pairs outside the gates (IoU < ``min_iou`` or distance >
    ``max_distance``) are never matched.

    Args:
        ious: (T, D) IoU of each track's last box with each detection.
        distances: (T, D) appearance distances.

    Returns:
        Matched ``(track_row, detection_column)`` pairs, sorted by row.
    """
    if ious.size == 0:
        return []
    allowed = (ious >= min_iou) & (distances <= max_distance)
    cost = np.where(allowed, (1.0 - ious) + distances, 1e6)
    rows, cols = linear_sum_assignment(cost)
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if allowed[r, c]]


def link(
    frames: Iterable[tuple[int, Sequence[Box], Sequence[np.ndarray]]],
    min_iou: float = 0.45,
    max_distance: float = 0.4,
    max_gap: int = 2,
) -> list[list[tuple[int, Box]]]:
    """Link per-frame boxes into tracks.

    Args:
        frames: ``(frame_index, boxes, histograms)`` in increasing frame order.
        max_gap: a track may miss up to this many frames and still be extended.

    Returns:
        Every track as its ``(frame, box)`` list, in order of creation.
    """
    tracks: list[_Track] = []
    active: list[int] = []
    for t, boxes, hists in frames:
        active = [k for k in active if t - tracks[k].last_frame <= max_gap + 1]
        matched: dict[int, int] = {}
        if active and boxes:
            ious = iou_matrix(np.asarray([tracks[k].boxes[-1][1] for k in active]), np.asarray(boxes))
            dists = bhattacharyya_matrix(np.stack([tracks[k].hist for k in active]), np.stack(hists))
            matched = {c: active[r] for r, c in assign(ious, dists, min_iou, max_distance)}
        for j, box in enumerate(boxes):
            if j in matched:
                tracks[matched[j]].boxes.append((t, box))
                tracks[matched[j]].hist = hists[j]
            else:
                tracks.append(_Track([(t, box)], hists[j]))
                active.append(len(tracks) - 1)
    return [tr.boxes for tr in tracks]


def centre_motion(boxes: Sequence[Box]) -> float:
    """Largest distance of any box centre from the first box's centre, in pixels."""
    c = np.asarray([(x + w / 2, y + h / 2) for x, y, w, h in boxes], dtype=np.float64)
    return float(np.max(np.linalg.norm(c - c[0], axis=1)))


def track(
    detections: Sequence[Detection],
    frames: Iterable[np.ndarray],
    min_foreground: float = 0.15,
    mog2_history: int = 200,
    mog2_var_threshold: float = 16.0,
    min_iou: float = 0.45,
    max_distance: float = 0.4,
    hist_bins: tuple[int, int] = (16, 8),
    max_gap: int = 2,
    min_motion: float = 10.0,
    min_length: int = 5,
) -> list[TrackBox]:
    """Turn detections into tracklets (the recipe of the module docstring).

    Args:
        detections: boxes of the video, any order.
        frames: the video's BGR frames from frame 0 on, in order (e.g. :func:`read_frames`); they feed the
            MOG2 background model and the colour histograms, and are streamed, never held.
        min_foreground: boxes with a smaller MOG2 foreground fraction are dropped before linking.
        min_motion: tracks whose centre never moves this far (pixels) from its start are dropped.
        min_length: tracks with fewer boxes are dropped.

    Returns:
        Track boxes sorted by ``(frame, track)``; track ids are 1, 2, ... in order of first frame.
    """
    by_frame: dict[int, list[Detection]] = {}
    for d in detections:
        by_frame.setdefault(d.frame, []).append(d)
    last = max(by_frame, default=-1)
    mog2 = cv2.createBackgroundSubtractorMOG2(history=mog2_history, varThreshold=mog2_var_threshold)

    def observations() -> Iterator[tuple[int, list[Box], list[np.ndarray]]]:
        t = -1
        for t, frame in enumerate(frames):
            mask = mog2.apply(frame)
            height, width = frame.shape[:2]
            boxes, hists = [], []
            for d in sorted(by_frame.get(t, []), key=lambda d: -d.score):
                box = clip_box(d.box, width, height)
                if box is None or foreground_fraction(mask, box) < min_foreground:
                    continue
                x, y, w, h = box
                boxes.append(box)
                hists.append(hsv_histogram(frame[y : y + h, x : x + w], hist_bins))
            yield t, boxes, hists
        if t < last:
            raise VideoError(f"detections reach frame {last} but the video ended after frame {t}")

    kept = [
        boxes
        for boxes in link(observations(), min_iou, max_distance, max_gap)
        if len(boxes) >= min_length and centre_motion([b for _, b in boxes]) >= min_motion
    ]
    kept.sort(key=lambda boxes: boxes[0][0])
    out = [TrackBox(t, k, *box) for k, boxes in enumerate(kept, start=1) for t, box in boxes]
    return sorted(out, key=lambda b: (b.frame, b.track))


def track_stats(tracks: Sequence[TrackBox]) -> dict[str, int]:
    """Box and track counts of a tracking result (for logs and the README)."""
    lengths = np.bincount([b.track for b in tracks]) if tracks else np.zeros(0, int)
    lengths = lengths[lengths > 0]
    stats = {"boxes": len(tracks), "tracks": len(lengths), "longest": int(lengths.max(initial=0))}
    for n in (5, 10, 20):
        stats[f"tracks_ge{n}"] = int((lengths >= n).sum())
        stats[f"boxes_in_tracks_ge{n}"] = int(lengths[lengths >= n].sum())
    return stats
