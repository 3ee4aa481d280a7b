"""PETS 2009 S2.L1 (``vtest.avi``): person tracklets for SSL pretraining and a single-camera retrieval split.

The video ships inside Debian's ``opencv-doc`` package (795 frames, 768x576, 10 fps, one static camera, about
20 people). No identity ground truth exists, so this module makes weak labels itself:

1. **Detection** (slow, run once by ``datasets/pets09_detect_and_track.py``): OpenCV's HOG people detector on
   frames upscaled 1.5x (people are 86-140 px tall, under HOG's 128-px window), winStride 8, padding 8,
   scale 1.05, then NMS at IoU 0.4 keeping scores > 0.3.
2. **Tracking**: boxes with < 15% MOG2 foreground are dropped (this removes the parked van); the rest are
   linked frame by frame with the Hungarian algorithm on ``(1 - IoU) + Bhattacharyya distance`` of HSV 16x8
   histograms, gated at IoU >= 0.45 and distance <= 0.4, a track surviving up to 2 missed frames. Tracks
   whose centre never moves 10 px from its start, or with fewer than 5 boxes, are dropped. The result is
   committed as ``resources/pets09_s2l1_tracks.csv`` (``frame,track,x,y,w,h``, frame 0-based, track >= 1).
3. **Build** (:func:`build_pets09`, seconds): crop every box from the decoded video and write

   * ``train/<track:04d>/<frame:06d>.jpg`` -- unlabeled SSL crops, one folder per tracklet (a "bag" in the
     SYSU-30k sense), holding only *train* tracklets;
   * ``market/`` -- a Market-1501 layout for retrieval evaluation;
   * ``manifest.json`` -- counts, hashes and the protocol parameters.

Retrieval protocol. Tracklets are split, never boxes, so that no test box is ever seen in SSL training.
Tracklets with at least ``min_test_len`` (25) boxes, sorted by id (ids follow the first frame, so this is time
order), are test tracklets when their position in that list is ``test_offset`` modulo ``test_every`` (every
2nd, starting at the 1st, so the test tracklets are spread over the whole video); all other tracklets with at
least ``min_train_len`` (5) boxes are train tracklets. Each tracklet's boxes, in time order, are split into
halves: the first ``ceil(n / 2)`` boxes are "camera 1", the rest "camera 2". There is one real camera; the two
"cameras" are time windows, so the Market rule that drops gallery items with the query's pid *and* camid
removes the near-duplicate neighbouring frames. Queries are ``queries_per_tracklet`` (8) evenly spaced
camera-1 boxes of each test tracklet; the gallery (``bounding_box_test/``) is every other box of every test
tracklet. Train tracklets are mirrored in ``bounding_box_train/`` with the same naming.

Caveat: tracklet ids are pseudo-identities. One person can own several tracklets (and a tracklet can switch
person where people cross), so a correct match to another tracklet of the same person counts as wrong:
rank-1 and mAP on this split undercount true performance.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from scipy.optimize import linear_sum_assignment

VIDEO_SHA256 = "45cddc9490be69345cbdab64ca583be65987e864ca408038e648db99e10516cf"
VIDEO_MEMBER = "./usr/share/doc/opencv-doc/examples/data/vtest.avi"
SYSTEM_VIDEO = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")
FETCH_COMMAND = (
    "apt-get update  # only on a fresh machine, as root\n"
    "mkdir -p data && cd data && apt-get download opencv-doc\n"
    f"dpkg-deb --fsys-tarfile opencv-doc_*.deb | tar -xO {VIDEO_MEMBER} > vtest.avi\n"
    f'rm opencv-doc_*.deb && echo "{VIDEO_SHA256}  vtest.avi" | sha256sum -c && cd ..'
)
TRACKS_RESOURCE = "resources/pets09_s2l1_tracks.csv"
CSV_HEADER = ("frame", "track", "x", "y", "w", "h")
MANIFEST_VERSION = 1

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
    """One box of one tracklet: a row ``frame,track,x,y,w,h`` of the tracks CSV."""

    frame: int
    track: int
    x: int
    y: int
    w: int
    h: int

    @property
    def box(self) -> Box:
        return (self.x, self.y, self.w, self.h)


# ---------------------------------------------------------------------------------------------------------
# Finding and fetching the video
# ---------------------------------------------------------------------------------------------------------


def video_candidates(explicit: str | Path | None = None) -> list[Path]:
    """The paths :func:`find_video` tries, in order."""
    paths = [] if explicit is None else [Path(explicit)]
    paths.append(Path("data") / "vtest.avi")
    if os.environ.get("REID_SSL_DATA"):
        paths.append(Path(os.environ["REID_SSL_DATA"]) / "vtest.avi")
    paths.append(SYSTEM_VIDEO)
    return paths


def find_video(explicit: str | Path | None = None) -> Path:
    """Locate ``vtest.avi``.

    Tries ``explicit``, then ``data/vtest.avi`` (relative to the working directory), then
    ``$REID_SSL_DATA/vtest.avi`` when that variable is set, then the path where ``opencv-doc`` installs it.
    An explicit path that does not exist is an error, not a reason to fall back to another file.

    Raises:
        FileNotFoundError: no candidate exists; the message says how to get the file.
    """
    if explicit is not None and not Path(explicit).is_file():
        raise FileNotFoundError(f"PETS09 video not found at the given path {explicit}.")
    candidates = video_candidates(explicit)
    for path in candidates:
        if path.is_file():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(
        f"PETS09 video vtest.avi not found (tried {tried}). It ships in Debian's opencv-doc package; "
        "reid_ssl.pets09.fetch_video('data') extracts it to data/vtest.avi, as do these shell lines run from "
        f"the repository root:\n{FETCH_COMMAND}"
    )


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which(cmd[0]) is None:
        raise RuntimeError(f"`{cmd[0]}` is not available: fetching the PETS09 video needs Debian/Ubuntu tools.")
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def _extract_member(deb: Path, member: str, dest: Path) -> None:
    """Stream ``dpkg-deb --fsys-tarfile`` into Python's tar reader and copy one member to ``dest``."""
    if shutil.which("dpkg-deb") is None:
        raise RuntimeError("`dpkg-deb` is not available: fetching the PETS09 video needs Debian/Ubuntu tools.")
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    found = False
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for info in tar:
                if info.name == member and info.isfile():
                    src = tar.extractfile(info)
                    assert src is not None
                    with open(dest, "wb") as out:
                        shutil.copyfileobj(src, out)
                    found = True
                    break
    except tarfile.TarError as err:
        raise RuntimeError(f"`dpkg-deb --fsys-tarfile {deb.name}` gave no readable tar stream: {err}") from err
    finally:
        proc.stdout.close()
        proc.kill()
        proc.wait()
    if not found:
        raise RuntimeError(f"{deb.name} has no member {member}")


def fetch_video(dest: Path) -> Path:
    """Download ``opencv-doc`` with apt-get, extract ``vtest.avi`` to ``dest`` and check its sha256.

    Runs ``apt-get download`` in a temporary directory (so it works as a normal user), retrying after
    ``apt-get update`` only when the first try fails and we are root. The file is written atomically.

    Args:
        dest: the file to write, or an existing directory to write ``vtest.avi`` into.

    Returns:
        The path written (or already present with the right hash).
    """
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / "vtest.avi"
    if dest.is_file() and sha256_file(dest) == VIDEO_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="reid_ssl-opencv-doc-") as tmp_dir:
        tmp = Path(tmp_dir)
        res = _run(["apt-get", "download", "opencv-doc"], tmp)
        if res.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
            _run(["apt-get", "update"], tmp)
            res = _run(["apt-get", "download", "opencv-doc"], tmp)
        debs = sorted(tmp.glob("opencv-doc_*.deb"))
        if res.returncode != 0 or not debs:
            raise RuntimeError(
                f"`apt-get download opencv-doc` failed (exit {res.returncode}): {res.stderr.strip()[-500:]}\n"
                "Run `apt-get update` as root first on a fresh machine."
            )
        part = tmp / "vtest.avi"
        _extract_member(debs[0], VIDEO_MEMBER, part)
        digest = sha256_file(part)
        if digest != VIDEO_SHA256:
            raise RuntimeError(f"vtest.avi from {debs[0].name} has sha256 {digest}, expected {VIDEO_SHA256}")
        staged = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        try:
            shutil.copyfile(part, staged)
            os.replace(staged, dest)
        finally:
            staged.unlink(missing_ok=True)
    return dest


def read_frames(video: Path) -> Iterator[np.ndarray]:
    """Yield the BGR frames of a video in order."""
    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise OSError(f"OpenCV cannot open video {video}")
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                return
            yield frame
    finally:
        cap.release()


# ---------------------------------------------------------------------------------------------------------
# Boxes, histograms, detection
# ---------------------------------------------------------------------------------------------------------


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two ``(x, y, w, h)`` boxes."""
    return float(iou_matrix(np.asarray([a], float), np.asarray([b], float))[0, 0])


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU.

    Args:
        a: (N, 4) boxes ``x, y, w, h``.
        b: (M, 4) boxes.

    Returns:
        (N, M) IoU in [0, 1].
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ax1, ay1 = a[:, 0:1], a[:, 1:2]
    ax2, ay2 = ax1 + a[:, 2:3], ay1 + a[:, 3:4]
    bx1, by1 = b[:, 0], b[:, 1]
    bx2, by2 = bx1 + b[:, 2], by1 + b[:, 3]
    iw = np.clip(np.minimum(ax2, bx2) - np.maximum(ax1, bx1), 0, None)
    ih = np.clip(np.minimum(ay2, by2) - np.maximum(ay1, by1), 0, None)
    inter = iw * ih
    union = a[:, 2:3] * a[:, 3:4] + b[:, 2] * b[:, 3] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = 0.4, score_threshold: float = 0.3) -> list[int]:
    """Greedy non-maximum suppression.

    Args:
        boxes: (N, 4) boxes ``x, y, w, h``.
        scores: (N,) detector scores.

    Returns:
        Indices of the kept boxes, highest score first: score > ``score_threshold`` and IoU <=
        ``iou_threshold`` with every higher-scoring kept box.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    order = [int(i) for i in np.argsort(-scores, kind="stable") if scores[i] > score_threshold]
    overlaps = iou_matrix(boxes, boxes)
    kept: list[int] = []
    for i in order:
        if all(overlaps[i, j] <= iou_threshold for j in kept):
            kept.append(i)
    return kept


def clip_box(box: Box, width: int, height: int) -> Box | None:
    """Clip ``(x, y, w, h)`` to a ``width`` x ``height`` image; None when nothing is left."""
    x0, y0 = max(0, box[0]), max(0, box[1])
    x1, y1 = min(width, box[0] + box[2]), min(height, box[1] + box[3])
    if x1 <= x0 or y1 <= y0:
        return None
    return (x0, y0, x1 - x0, y1 - y0)


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


def make_hog() -> cv2.HOGDescriptor:
    """OpenCV's default people detector (64x128 window, Dalal-Triggs SVM)."""
    if not hasattr(cv2, "HOGDescriptor"):
        raise RuntimeError(f"OpenCV {cv2.__version__} has no HOGDescriptor: install opencv-python-headless<5")
    hog = cv2.HOGDescriptor()
    hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())
    return hog


def detect_frame(
    hog: cv2.HOGDescriptor,
    frame: np.ndarray,
    upscale: float = 1.5,
    win_stride: int = 8,
    padding: int = 8,
    scale: float = 1.05,
    group_threshold: int = 2,
    nms_threshold: float = 0.4,
    score_threshold: float = 0.3,
) -> list[tuple[Box, float]]:
    """HOG people boxes of one BGR frame, in the frame's native pixels, clipped to it, best score first."""
    height, width = frame.shape[:2]
    big = frame if upscale == 1.0 else cv2.resize(frame, None, fx=upscale, fy=upscale)
    rects, weights = hog.detectMultiScale(
        big,
        winStride=(win_stride, win_stride),
        padding=(padding, padding),
        scale=scale,
        groupThreshold=group_threshold,
    )
    if len(rects) == 0:
        return []
    boxes = np.asarray(rects, dtype=np.float64).reshape(-1, 4) / upscale
    scores = np.asarray(weights, dtype=np.float64).reshape(-1)
    found = []
    for i in nms(boxes, scores, nms_threshold, score_threshold):
        x0, y0 = round(boxes[i, 0]), round(boxes[i, 1])
        x1, y1 = round(boxes[i, 0] + boxes[i, 2]), round(boxes[i, 1] + boxes[i, 3])
        clipped = clip_box((x0, y0, x1 - x0, y1 - y0), width, height)
        if clipped is not None:
            found.append((clipped, float(scores[i])))
    return found


def detect_people(
    video: Path,
    upscale: float = 1.5,
    win_stride: int = 8,
    padding: int = 8,
    scale: float = 1.05,
    group_threshold: int = 2,
    nms_threshold: float = 0.4,
    score_threshold: float = 0.3,
    progress: bool = False,
) -> list[Detection]:
    """Run the HOG people detector on every frame of ``video`` (about 0.1-0.5 s per frame on 2 cores).

    Args:
        upscale: frames are resized by this factor first, because PETS09 people are shorter than HOG's
            128-px window; boxes are mapped back to native pixels.
        group_threshold: OpenCV's own rectangle grouping (minimum neighbours) before NMS.
        progress: show a tqdm bar.
    """
    from tqdm import tqdm

    hog = make_hog()
    frames: Iterable[np.ndarray] = read_frames(video)
    if progress:
        cap = cv2.VideoCapture(str(video))
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None
        cap.release()
        frames = tqdm(frames, total=total, desc="HOG", unit="frame")
    detections = []
    for t, frame in enumerate(frames):
        for (x, y, w, h), s in detect_frame(
            hog, frame, upscale, win_stride, padding, scale, group_threshold, nms_threshold, score_threshold
        ):
            detections.append(Detection(t, x, y, w, h, s))
    return detections


# ---------------------------------------------------------------------------------------------------------
# Tracking
# ---------------------------------------------------------------------------------------------------------


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
            raise ValueError(f"detections reach frame {last} but the video ended after frame {t}")

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


# ---------------------------------------------------------------------------------------------------------
# The tracks CSV
# ---------------------------------------------------------------------------------------------------------


def tracks_to_csv(tracks: Iterable[TrackBox]) -> str:
    """Canonical CSV text (header, rows sorted by frame then track, ``\\n`` line ends)."""
    rows = sorted(tracks, key=lambda b: (b.frame, b.track))
    lines = [",".join(CSV_HEADER)] + [f"{b.frame},{b.track},{b.x},{b.y},{b.w},{b.h}" for b in rows]
    return "\n".join(lines) + "\n"


def tracks_sha256(tracks: Iterable[TrackBox]) -> str:
    """sha256 of :func:`tracks_to_csv`; equals the file hash of a canonically written CSV."""
    return hashlib.sha256(tracks_to_csv(tracks).encode()).hexdigest()


def save_tracks(tracks: Iterable[TrackBox], path: Path) -> None:
    """Write the canonical CSV atomically."""
    path = Path(path)
    staged = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    staged.write_text(tracks_to_csv(tracks), newline="")
    os.replace(staged, path)


def parse_tracks(text: str, source: str = "<string>") -> list[TrackBox]:
    """Parse and validate tracks CSV text.

    Raises:
        ValueError: naming ``source`` and the 1-based line of the first bad row (wrong header, not six
            integers, negative frame or position, track id < 1, empty box, or a repeated ``frame,track``).
    """
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or tuple(h.strip() for h in header) != CSV_HEADER:
        raise ValueError(f"{source}:1: expected header {','.join(CSV_HEADER)}, got {header}")
    tracks: list[TrackBox] = []
    seen: set[tuple[int, int]] = set()
    for row in reader:
        line = reader.line_num
        if not row or all(not c.strip() for c in row):
            continue
        try:
            values = [int(c) for c in row]
        except ValueError:
            raise ValueError(f"{source}:{line}: expected six integers, got {row}") from None
        if len(values) != 6:
            raise ValueError(f"{source}:{line}: expected six integers, got {len(values)} fields")
        b = TrackBox(*values)
        if b.frame < 0 or b.track < 1 or b.x < 0 or b.y < 0 or b.w < 1 or b.h < 1:
            raise ValueError(f"{source}:{line}: need frame >= 0, track >= 1, x, y >= 0 and w, h >= 1, got {row}")
        if (b.frame, b.track) in seen:
            raise ValueError(f"{source}:{line}: track {b.track} has a second box in frame {b.frame}")
        seen.add((b.frame, b.track))
        tracks.append(b)
    return tracks


def load_tracks(path: str | Path | None = None) -> list[TrackBox]:
    """Read a tracks CSV; by default the one packaged with reid_ssl (``resources/pets09_s2l1_tracks.csv``)."""
    if path is None:
        ref = resources.files("reid_ssl").joinpath(TRACKS_RESOURCE)
        return parse_tracks(ref.read_text(), f"reid_ssl/{TRACKS_RESOURCE}")
    return parse_tracks(Path(path).read_text(), str(path))


# ---------------------------------------------------------------------------------------------------------
# Retrieval split and build
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitItem:
    """One crop of the split: where it goes and what it is."""

    box: TrackBox
    subset: str  # "train", "query" or "gallery"
    camid: int  # 1 = first half of the tracklet in time, 2 = second half


def group_tracks(tracks: Iterable[TrackBox]) -> dict[int, list[TrackBox]]:
    """Boxes of each track id, in frame order."""
    groups: dict[int, list[TrackBox]] = {}
    for b in sorted(tracks, key=lambda b: (b.track, b.frame)):
        groups.setdefault(b.track, []).append(b)
    return groups


def split_tracklets(
    tracks: Iterable[TrackBox],
    min_train_len: int = 5,
    min_test_len: int = 25,
    test_every: int = 2,
    test_offset: int = 0,
    queries_per_tracklet: int = 8,
) -> list[SplitItem]:
    """Assign every box to train, query or gallery (the protocol of the module docstring).

    Returns:
        The split, sorted by (track, frame). Boxes of train tracklets shorter than ``min_train_len`` are
        left out.
    """
    groups = group_tracks(tracks)
    long_ids = [k for k in sorted(groups) if len(groups[k]) >= min_test_len]
    test_ids = {k for i, k in enumerate(long_ids) if i % test_every == test_offset % test_every}
    items = []
    for k, boxes in groups.items():
        n = len(boxes)
        first_half = math.ceil(n / 2)
        if k not in test_ids:
            if n >= min_train_len:
                items += [SplitItem(b, "train", 1 if i < first_half else 2) for i, b in enumerate(boxes)]
            continue
        q = min(queries_per_tracklet, first_half)
        query_pos = {int((j + 0.5) * first_half / q) for j in range(q)}
        for i, b in enumerate(boxes):
            subset = "query" if i in query_pos else "gallery"
            items.append(SplitItem(b, subset, 1 if i < first_half else 2))
    return items


def market_name(box: TrackBox, camid: int) -> str:
    """Market-1501 file name ``PPPP_cCs1_FFFFFF_00.jpg`` (pid = track id, frame = video frame)."""
    return f"{box.track:04d}_c{camid}s1_{box.frame:06d}_00.jpg"


_MARKET_DIRS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}


def _manifest_key(manifest: dict[str, Any]) -> tuple[Any, ...]:
    return (manifest.get("version"), manifest.get("tracks_sha256"), manifest.get("video_sha256"),
            manifest.get("protocol"))  # fmt: skip


def _read_manifest(out: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def build_pets09(
    video: Path,
    out: Path,
    tracks: Sequence[TrackBox] | None = None,
    min_train_len: int = 5,
    min_test_len: int = 25,
    test_every: int = 2,
    test_offset: int = 0,
    queries_per_tracklet: int = 8,
    jpeg_quality: int = 95,
    check_video: bool | None = None,
) -> dict[str, Any]:
    """Crop every tracked box and write the SSL bags, the Market-style split and a manifest.

    Builds in ``<out>.tmp-XXXX`` and renames it to ``out`` at the end. When ``out/manifest.json`` already
    records the same tracks, video and protocol, nothing is redone. Crops are native resolution (box
    clipped to the frame), JPEG quality ``jpeg_quality``; the train crops in ``market/bounding_box_train``
    are hard links to those in ``train/``.

    Args:
        video: ``vtest.avi`` (see :func:`find_video`).
        out: the output folder.
        tracks: defaults to the packaged tracks (:func:`load_tracks`).
        check_video: require the video's sha256 to be :data:`VIDEO_SHA256`; default: when ``tracks`` is None.

    Returns:
        The manifest: counts, ``tracks_sha256``, ``video_sha256``, ``protocol`` and the test track ids.
    """
    video, out = Path(video), Path(out)
    if check_video is None:
        check_video = tracks is None
    tracks = load_tracks() if tracks is None else list(tracks)
    video_sha = sha256_file(video)
    if check_video and video_sha != VIDEO_SHA256:
        raise ValueError(f"{video} has sha256 {video_sha}, not PETS09 vtest.avi's {VIDEO_SHA256}")
    protocol = {
        "min_train_len": min_train_len,
        "min_test_len": min_test_len,
        "test_every": test_every,
        "test_offset": test_offset,
        "queries_per_tracklet": queries_per_tracklet,
        "jpeg_quality": jpeg_quality,
        "camera_rule": "c1 = first ceil(n/2) boxes of a tracklet in time, c2 = the rest",
    }
    manifest: dict[str, Any] = {
        "version": MANIFEST_VERSION,
        "dataset": "PETS09-S2L1 (vtest.avi) tracklets",
        "tracks_sha256": tracks_sha256(tracks),
        "video_sha256": video_sha,
        "protocol": protocol,
    }
    existing = _read_manifest(out)
    if existing is not None and _manifest_key(existing) == _manifest_key(manifest):
        return existing

    items = split_tracklets(tracks, min_train_len, min_test_len, test_every, test_offset, queries_per_tracklet)
    by_frame: dict[int, list[SplitItem]] = {}
    for item in items:
        by_frame.setdefault(item.box.frame, []).append(item)
    last = max(by_frame, default=-1)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the data set is not
        for sub in ["train", *(f"market/{d}" for d in _MARKET_DIRS.values())]:
            (tmp / sub).mkdir(parents=True)
        params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]
        n_frames, size = 0, (0, 0)
        for t, frame in enumerate(read_frames(video)):
            n_frames, size = t + 1, (frame.shape[1], frame.shape[0])
            if t > last:
                continue  # keep decoding to count the frames: cheap, and recorded in the manifest
            for item in by_frame.get(t, []):
                box = clip_box(item.box.box, frame.shape[1], frame.shape[0])
                if box is None:
                    raise ValueError(f"track {item.box.track} frame {t}: box {item.box.box} is outside the frame")
                x, y, w, h = box
                crop = frame[y : y + h, x : x + w]
                market = tmp / "market" / _MARKET_DIRS[item.subset] / market_name(item.box, item.camid)
                if item.subset == "train":
                    bag = tmp / "train" / f"{item.box.track:04d}"
                    bag.mkdir(exist_ok=True)
                    path = bag / f"{t:06d}.jpg"
                    if not cv2.imwrite(str(path), crop, params):
                        raise OSError(f"cannot write {path}")
                    _link_or_copy(path, market)
                elif not cv2.imwrite(str(market), crop, params):
                    raise OSError(f"cannot write {market}")
        if n_frames <= last:
            raise ValueError(f"tracks reach frame {last} but {video} has {n_frames} frames")

        def ids(subset: str) -> list[int]:
            return sorted({i.box.track for i in items if i.subset == subset})

        counts = {s: sum(i.subset == s for i in items) for s in ("train", "query", "gallery")}
        manifest.update(
            frames=n_frames,
            frame_size=list(size),
            counts={
                "tracks": len(group_tracks(tracks)),
                "boxes": len(tracks),
                "train_tracklets": len(ids("train")),
                "train_crops": counts["train"],
                "test_tracklets": len(ids("query")),
                "query": counts["query"],
                "gallery": counts["gallery"],
            },
            train_tracks=ids("train"),
            test_tracks=ids("query"),
        )
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# ---------------------------------------------------------------------------------------------------------
# Colour-histogram baseline
# ---------------------------------------------------------------------------------------------------------

_MARKET_RE = re.compile(r"^(-?\d+)_c(\d+)")


def stripe_histogram_feature(image: np.ndarray, stripes: int = 3, bins: tuple[int, int] = (16, 8)) -> np.ndarray:
    """Hellinger embedding of per-stripe HSV histograms of a BGR crop.

    The crop is cut into ``stripes`` horizontal bands; each band's hue x saturation histogram is
    L1-normalised, square-rooted and the bands are concatenated and divided by ``sqrt(stripes)``. The result
    has unit L2 norm and ``f_a @ f_b`` is the mean Bhattacharyya coefficient over bands, so ``1 - f_a @ f_b``
    ranks like the mean Bhattacharyya distance.
    """
    edges = np.linspace(0, image.shape[0], stripes + 1).round().astype(int)
    parts = [np.sqrt(hsv_histogram(image[a:b], bins)) for a, b in itertools.pairwise(edges)]
    return np.concatenate(parts) / math.sqrt(stripes)


def _rank_metrics(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 10,
) -> tuple[np.ndarray, float, int]:
    """CMC and mAP under the Market-1501 protocol.

    For each query, gallery items with the query's pid *and* camid are removed; queries left with no
    correct match are skipped.

    Args:
        distmat: (Q, G) distances, smaller = more similar.

    Returns:
        ``(cmc, mAP, num_valid_queries)``; ``cmc[k - 1]`` is the rank-k accuracy, shape (max_rank,).
    """
    cmc_sum = np.zeros(max_rank)
    aps = []
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        keep = ~((g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i]))
        matches = (g_pids[order] == q_pids[i])[keep]
        if not matches.any():
            continue
        first = int(np.argmax(matches))
        if first < max_rank:
            cmc_sum[first:] += 1
        hits = np.cumsum(matches)
        precision_at_hits = hits[matches] / (np.flatnonzero(matches) + 1)
        aps.append(float(precision_at_hits.mean()))
    if not aps:
        raise ValueError("no query has a correct match in the gallery")
    return cmc_sum / len(aps), float(np.mean(aps)), len(aps)


def _read_market_dir(folder: Path, stripes: int, bins: tuple[int, int]) -> tuple[np.ndarray, ...]:
    feats, pids, camids = [], [], []
    for path in sorted(folder.glob("*.jpg")):
        m = _MARKET_RE.match(path.name)
        if m is None:
            raise ValueError(f"{path}: not a Market-1501 name (PPPP_cC...)")
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise OSError(f"cannot read {path}")
        feats.append(stripe_histogram_feature(image, stripes, bins))
        pids.append(int(m.group(1)))
        camids.append(int(m.group(2)))
    if not feats:
        raise FileNotFoundError(f"no .jpg images in {folder}")
    return np.stack(feats), np.asarray(pids), np.asarray(camids)


def histogram_baseline(market_root: Path, stripes: int = 3, bins: tuple[int, int] = (16, 8)) -> dict[str, Any]:
    """Colour-histogram re-ID baseline on a Market-1501-style folder (``query/``, ``bounding_box_test/``).

    Features: :func:`stripe_histogram_feature`; distance ``1 - f_q @ f_g``; metrics: :func:`_rank_metrics`.

    Returns:
        ``rank1``, ``rank5``, ``rank10``, ``mAP`` (fractions), ``num_query``, ``num_valid_query``,
        ``num_gallery``.
    """
    market_root = Path(market_root)
    qf, q_pids, q_cams = _read_market_dir(market_root / "query", stripes, bins)
    gf, g_pids, g_cams = _read_market_dir(market_root / "bounding_box_test", stripes, bins)
    distmat = 1.0 - qf @ gf.T
    cmc, mean_ap, n_valid = _rank_metrics(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=10)
    return {
        "rank1": float(cmc[0]),
        "rank5": float(cmc[4]),
        "rank10": float(cmc[9]),
        "mAP": mean_ap,
        "num_query": len(q_pids),
        "num_valid_query": n_valid,
        "num_gallery": len(g_pids),
    }
