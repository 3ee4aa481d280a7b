"""Person boxes -> tracklets: ByteTrack, then every tracklet cut where it could have switched person.

Association is Roboflow's ``trackers`` library (ByteTrack: Kalman-predicted boxes, Hungarian matching in two
rounds, high-score detections first, then low-score ones to keep tracks alive through occlusions; Zhang et al.,
ECCV 2022). A tracklet becomes a bag of positives for self-supervised training, and an impure bag teaches the
network that two people are one, so purity beats length. :func:`cut_uncertain` therefore

* splits a track where it skipped more than ``max_gap`` processed frames (a re-acquired track may be someone
  else),
* drops the boxes that another track's box covers by more than ``max_cover`` of their area (people crossing
  or occluding each other, where identity switches happen and crops show two people) and splits the track
  there,
* drops tracklets shorter than ``min_length`` boxes and those whose centre never moves ``min_motion`` pixels
  (static false positives: a parked van, a pole).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from reid_ssl.data.video.detect import Box, PixelBox


@dataclass(frozen=True)
class Detection(PixelBox):
    """One person box found by the detector in one frame (frame index 0-based, score in [0, 1])."""

    frame: int
    x: int
    y: int
    w: int
    h: int
    score: float


@dataclass(frozen=True)
class TrackBox(PixelBox):
    """One box of one tracklet: a row ``frame,track,x,y,w,h`` of a tracks CSV (track ids from 1)."""

    frame: int
    track: int
    x: int
    y: int
    w: int
    h: int
    score: float = 1.0


@dataclass(frozen=True)
class TrackerOptions:
    """ByteTrack's thresholds (detector scores in [0, 1]) and the purity rules of :func:`cut_uncertain`."""

    activation: float = 0.4  # a detection this confident may start a track
    high: float = 0.5  # first association round: detections at least this confident
    match_iou: float = 0.2  # minimum IoU between a predicted track box and a detection
    lost_seconds: float = 1.0  # a lost track is kept this long for re-acquisition
    max_gap: int = 3  # processed frames a tracklet may skip before it is cut
    max_cover: float = 0.25  # a box covered more than this (share of its area) by another track's box: uncertain
    min_length: int = 5  # boxes
    min_motion: float = 10.0  # pixels the box centre must move from its first position


def bytetrack(frames: Iterable[tuple[int, Sequence[Detection]]], fps: float, opt: TrackerOptions) -> list[TrackBox]:
    """Run ByteTrack over ``(frame index, detections)`` in frame order; returns the confirmed boxes.

    Args:
        fps: processed frames per second (after subsampling), which scales the lost-track buffer.
    """
    import supervision as sv
    import trackers

    tracker = trackers.ByteTrackTracker(
        lost_track_buffer=max(1, round(opt.lost_seconds * 30)),
        frame_rate=fps,
        track_activation_threshold=opt.activation,
        minimum_consecutive_frames=1,
        minimum_iou_threshold=opt.match_iou,
        high_conf_det_threshold=opt.high,
    )
    out: list[TrackBox] = []
    for frame, dets in frames:
        if dets:
            xyxy = np.array([d.xyxy() for d in dets], dtype=np.float32)
            conf = np.array([d.score for d in dets], dtype=np.float32)
            tracked = tracker.update(sv.Detections(xyxy=xyxy, confidence=conf))
        else:
            tracked = tracker.update(sv.Detections.empty())
        # the tracker returns the detections it kept, with their own boxes and ids (-1: not confirmed yet)
        for (x0, y0, x1, y1), tid, score in zip(tracked.xyxy, tracked.tracker_id, tracked.confidence, strict=True):
            if tid >= 0:
                out.append(
                    TrackBox(frame, int(tid) + 1, round(x0), round(y0), round(x1 - x0), round(y1 - y0), float(score))
                )
    return out


def cut_uncertain(boxes: Sequence[TrackBox], frame_step: int, opt: TrackerOptions) -> list[TrackBox]:
    """Tracklets that are probably one person each (module docstring); ids renumbered 1.. by first frame."""
    uncertain = _covered(boxes, opt.max_cover)
    pieces: list[list[TrackBox]] = []
    by_track: dict[int, list[TrackBox]] = {}
    for b in sorted(boxes, key=lambda b: (b.track, b.frame)):
        by_track.setdefault(b.track, []).append(b)
    for track_boxes in by_track.values():
        current: list[TrackBox] = []
        for b in track_boxes:
            if (b.frame, b.track) in uncertain:
                pieces.append(current)
                current = []
                continue
            if current and b.frame - current[-1].frame > (opt.max_gap + 1) * frame_step:
                pieces.append(current)
                current = []
            current.append(b)
        pieces.append(current)
    kept = [p for p in pieces if len(p) >= opt.min_length and centre_motion([b.box for b in p]) >= opt.min_motion]
    kept.sort(key=lambda p: (p[0].frame, p[0].track))
    return sorted(
        (TrackBox(b.frame, k, b.x, b.y, b.w, b.h, b.score) for k, p in enumerate(kept, start=1) for b in p),
        key=lambda b: (b.frame, b.track),
    )


def _covered(boxes: Sequence[TrackBox], threshold: float) -> set[tuple[int, int]]:
    """``(frame, track)`` of every box that a box of another track in the same frame covers by more than
    ``threshold`` of its area."""
    by_frame: dict[int, list[TrackBox]] = {}
    for b in boxes:
        by_frame.setdefault(b.frame, []).append(b)
    out: set[tuple[int, int]] = set()
    for frame, group in by_frame.items():
        if len(group) < 2:
            continue
        cover = cover_matrix(np.array([b.box for b in group], float))
        np.fill_diagonal(cover, 0.0)
        out.update((frame, group[i].track) for i in np.flatnonzero((cover > threshold).any(axis=1)))
    return out


def cover_matrix(boxes: np.ndarray) -> np.ndarray:
    """(N, N): the share of box i's area that box j covers, for (N, 4) ``x, y, w, h`` boxes."""
    x0, y0 = boxes[:, 0], boxes[:, 1]
    x1, y1 = x0 + boxes[:, 2], y0 + boxes[:, 3]
    iw = np.clip(np.minimum(x1[:, None], x1[None]) - np.maximum(x0[:, None], x0[None]), 0, None)
    ih = np.clip(np.minimum(y1[:, None], y1[None]) - np.maximum(y0[:, None], y0[None]), 0, None)
    return iw * ih / np.maximum(boxes[:, 2] * boxes[:, 3], 1e-12)[:, None]


def centre_motion(boxes: Sequence[tuple[int, int, int, int]]) -> float:
    """Largest distance of any box centre from the first box's centre, in pixels."""
    c = np.asarray([(x + w / 2, y + h / 2) for x, y, w, h in boxes], dtype=np.float64)
    return float(np.max(np.linalg.norm(c - c[0], axis=1))) if len(c) else 0.0


def track_stats(tracks: Sequence[TrackBox]) -> dict[str, int]:
    """Box and tracklet counts (for logs, manifests and the README)."""
    lengths = np.bincount([b.track for b in tracks]) if tracks else np.zeros(0, int)
    lengths = lengths[lengths > 0]
    stats = {"boxes": len(tracks), "tracks": len(lengths), "longest": int(lengths.max(initial=0))}
    for n in (5, 10, 20):
        stats[f"tracks_ge{n}"] = int((lengths >= n).sum())
        stats[f"boxes_in_tracks_ge{n}"] = int(lengths[lengths >= n].sum())
    return stats


def detections_of(boxes: Iterable[Box], frame: int) -> list[Detection]:
    """A detector's boxes of one frame as :class:`Detection` s."""
    return [Detection(frame, b.x, b.y, b.w, b.h, b.score) for b in boxes]
