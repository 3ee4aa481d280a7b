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
halves: the first ``ceil(n / 2)`` boxes are camera ``c1`` (camid 0), the rest ``c2`` (camid 1). There is one real camera; the two
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
import json
import math
import os
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

from reid_ssl.data.market import market_name
from reid_ssl.data.video.detect import clip_box
from reid_ssl.data.video.track import TrackBox
from reid_ssl.errors import DatasetLayoutError, DependencyError, InputError, MissingFileError, VideoError

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
        raise MissingFileError(f"PETS09 video not found at the given path {explicit}.")
    candidates = video_candidates(explicit)
    for path in candidates:
        if path.is_file():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise MissingFileError(
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
        raise DependencyError(f"`{cmd[0]}` is not available: fetching the PETS09 video needs Debian/Ubuntu tools.")
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def _extract_member(deb: Path, member: str, dest: Path) -> None:
    """Stream ``dpkg-deb --fsys-tarfile`` into Python's tar reader and copy one member to ``dest``."""
    if shutil.which("dpkg-deb") is None:
        raise DependencyError("`dpkg-deb` is not available: fetching the PETS09 video needs Debian/Ubuntu tools.")
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
        raise DependencyError(f"`dpkg-deb --fsys-tarfile {deb.name}` gave no readable tar stream: {err}") from err
    finally:
        proc.stdout.close()
        proc.kill()
        proc.wait()
    if not found:
        raise DependencyError(f"{deb.name} has no member {member}")


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
            raise DependencyError(
                f"`apt-get download opencv-doc` failed (exit {res.returncode}): {res.stderr.strip()[-500:]}\n"
                "Run `apt-get update` as root first on a fresh machine."
            )
        part = tmp / "vtest.avi"
        _extract_member(debs[0], VIDEO_MEMBER, part)
        digest = sha256_file(part)
        if digest != VIDEO_SHA256:
            raise DependencyError(f"vtest.avi from {debs[0].name} has sha256 {digest}, expected {VIDEO_SHA256}")
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
        raise VideoError(f"OpenCV cannot open video {video}")
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                return
            yield frame
    finally:
        cap.release()


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
        raise DatasetLayoutError(f"{source}:1: expected header {','.join(CSV_HEADER)}, got {header}")
    tracks: list[TrackBox] = []
    seen: set[tuple[int, int]] = set()
    for row in reader:
        line = reader.line_num
        if not row or all(not c.strip() for c in row):
            continue
        try:
            values = [int(c) for c in row]
        except ValueError:
            raise DatasetLayoutError(f"{source}:{line}: expected six integers, got {row}") from None
        if len(values) != 6:
            raise DatasetLayoutError(f"{source}:{line}: expected six integers, got {len(values)} fields")
        b = TrackBox(*values)
        if b.frame < 0 or b.track < 1 or b.x < 0 or b.y < 0 or b.w < 1 or b.h < 1:
            raise DatasetLayoutError(f"{source}:{line}: need frame >= 0, track >= 1, x, y >= 0 and w, h >= 1, got {row}")
        if (b.frame, b.track) in seen:
            raise DatasetLayoutError(f"{source}:{line}: track {b.track} has a second box in frame {b.frame}")
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
    camid: int  # 0 = first half of the tracklet in time ("c1" in file names), 1 = second half ("c2")


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
                items += [SplitItem(b, "train", 0 if i < first_half else 1) for i, b in enumerate(boxes)]
            continue
        q = min(queries_per_tracklet, first_half)
        query_pos = {int((j + 0.5) * first_half / q) for j in range(q)}
        for i, b in enumerate(boxes):
            subset = "query" if i in query_pos else "gallery"
            items.append(SplitItem(b, subset, 0 if i < first_half else 1))
    return items


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
        raise InputError(f"{video} has sha256 {video_sha}, not PETS09 vtest.avi's {VIDEO_SHA256}")
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
                    raise DatasetLayoutError(f"track {item.box.track} frame {t}: box {item.box.box} is outside the frame")
                x, y, w, h = box
                crop = frame[y : y + h, x : x + w]
                market = tmp / "market" / _MARKET_DIRS[item.subset] / market_name(item.box.track, item.camid, item.box.frame)
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
            raise DatasetLayoutError(f"tracks reach frame {last} but {video} has {n_frames} frames")

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


