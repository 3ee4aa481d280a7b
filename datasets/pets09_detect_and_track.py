"""Regenerate ``reid_ssl/resources/pets09_s2l1_tracks.csv`` from PETS09 S2.L1 (slow: HOG on 795 frames).

Usage, from the repository root::

    python datasets/pets09_detect_and_track.py [--video data/vtest.avi] [--out reid_ssl/resources/...csv]
        [--detections /tmp/pets09_detections.csv]

``--detections`` caches the raw HOG boxes (``frame,x,y,w,h,score``): when the file exists it is read instead
of running the detector, which makes it cheap to retune the tracker. The recipe and its parameters are the
defaults of :class:`reid_ssl.data.video.detect.HOGDetector` (frames upscaled 1.5x) and
:func:`reid_ssl.data.video.track.track`; see docs/datasets.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from reid_ssl.data import pets09
from reid_ssl.data.video.detect import HOGDetector
from reid_ssl.data.video.track import Detection, track, track_stats

REPO = Path(__file__).resolve().parents[1]


def detect_video(video: Path, upscale: float) -> list[Detection]:
    """HOG boxes of every frame (about 0.5 s per 768x576 frame on 2 cores)."""
    detector = HOGDetector(upscale=upscale, min_box=(1, 1))
    found = []
    for t, frame in enumerate(tqdm(pets09.read_frames(video), desc="HOG", unit="frame")):
        found += [Detection(t, b.x, b.y, b.w, b.h, b.score) for b in detector(frame)]
    return found


def read_detections(path: Path, detection_cls: type) -> list:
    """Read a raw-detections cache written by :func:`write_detections`."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [
        detection_cls(int(r["frame"]), int(r["x"]), int(r["y"]), int(r["w"]), int(r["h"]), float(r["score"]))
        for r in rows
    ]


def write_detections(path: Path, detections: list) -> None:
    """Write raw detections as ``frame,x,y,w,h,score``."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["frame", "x", "y", "w", "h", "score"])
        for d in detections:
            writer.writerow([d.frame, d.x, d.y, d.w, d.h, f"{d.score:.6f}"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", default=None, help="vtest.avi (default: reid_ssl.data.pets09.find_video lookup)")
    parser.add_argument("--out", type=Path, default=REPO / "reid_ssl" / pets09.TRACKS_RESOURCE)
    parser.add_argument("--detections", type=Path, default=None, help="raw-detections cache (read or written)")
    parser.add_argument("--upscale", type=float, default=1.5)
    args = parser.parse_args(argv)

    video = pets09.find_video(args.video)
    sha = pets09.sha256_file(video)
    if sha != pets09.VIDEO_SHA256:
        print(f"warning: {video} sha256 {sha} differs from the expected {pets09.VIDEO_SHA256}", file=sys.stderr)

    if args.detections is not None and args.detections.is_file():
        detections = read_detections(args.detections, Detection)
        print(f"read {len(detections)} detections from {args.detections}")
    else:
        start = time.perf_counter()
        detections = detect_video(video, args.upscale)
        seconds = time.perf_counter() - start
        per_frame = 1000 * seconds / max(1 + max((d.frame for d in detections), default=-1), 1)
        print(f"detection: {len(detections)} boxes in {seconds:.1f} s ({per_frame:.0f} ms/frame)")
        if args.detections is not None:
            write_detections(args.detections, detections)

    start = time.perf_counter()
    tracks = track(detections, pets09.read_frames(video))
    print(f"tracking: {time.perf_counter() - start:.1f} s")
    pets09.save_tracks(tracks, args.out)
    print(json.dumps(track_stats(tracks), indent=2))
    print(f"wrote {args.out} (sha256 {pets09.tracks_sha256(tracks)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
