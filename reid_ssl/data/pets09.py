"""PETS 2009 S2.L1 (``vtest.avi``): person tracklets for SSL pretraining and retrieval splits.

The video ships inside Debian's ``opencv-doc`` package (795 frames, 768x576, 10 fps, one static camera, about
20 people). No identity ground truth exists. Its person tracks were made once and are committed as
``resources/pets09_s2l1_tracks.csv`` (``frame,track,x,y,w,h``, frame 0-based, track >= 1), so every machine
builds the same data set; datasets/README.md says how they were made (HOG people detector on frames upscaled
1.5x, a MOG2 foreground filter that removes a parked van, Hungarian linking on IoU and colour histograms).
``reid_ssl prepare video vtest.avi`` builds tracklets afresh with today's pipeline instead.

:func:`build_pets09` (seconds) crops the committed boxes through the video pipeline's publish step: training
bags, and test and validation retrieval splits of pseudo-identities (:mod:`reid_ssl.data.video.split` gives the
protocol and its caveat: tracklet ids undercount true matches).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from reid_ssl.data.video.split import SplitProtocol
from reid_ssl.data.video.track import TrackBox
from reid_ssl.errors import AlreadyExistsError, DatasetLayoutError, DependencyError, InputError, MissingFileError
from reid_ssl.fileio import require_file, sha256_file

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
MANIFEST_VERSION = 2  # 2: bags train/vtest-<track>/, validation split market_val/ (the video pipeline's layout)

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
    if explicit is not None:
        require_file(explicit, "PETS09 video", " (the --video path given; no other file is tried)")
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
            raise DatasetLayoutError(
                f"{source}:{line}: need frame >= 0, track >= 1, x, y >= 0 and w, h >= 1, got {row}"
            )
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
# Build: one caller of the video pipeline's publish step
# ---------------------------------------------------------------------------------------------------------


def build_pets09(
    video: Path,
    out: Path,
    tracks: Sequence[TrackBox] | None = None,
    protocol: SplitProtocol | None = None,
    jpeg_quality: int = 95,
    check_video: bool | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Crop the tracked boxes into training bags and the test / validation retrieval splits, with a manifest.

    The committed tracks go through the same publish step as ``reid_ssl prepare video``
    (:func:`reid_ssl.data.video.prepare.publish`): bags ``train/vtest-<track:05d>/<frame:06d>.jpg``, Market
    layouts ``market/`` (test) and ``market_val/`` (validation), ``tracks.csv``, ``contact_vtest.png``,
    ``manifest.json`` written last. When ``out/manifest.json`` already records the same tracks, video and
    protocol, nothing is redone.

    Args:
        video: ``vtest.avi`` (see :func:`find_video`).
        out: the output folder.
        tracks: defaults to the packaged tracks (:func:`load_tracks`).
        protocol: the split (default: :class:`~reid_ssl.data.video.split.SplitProtocol`'s defaults).
        check_video: require the video's sha256 to be :data:`VIDEO_SHA256`; default: when ``tracks`` is None.
        overwrite: replace a dataset of another kind, or write into a folder of other files, that ``out``
            holds (an earlier PETS09 build is always rebuilt: it is made again from the video).

    Returns:
        The manifest: counts, split counts, ``tracks_sha256``, ``video_sha256`` and the options.

    Raises:
        InputError: another video than PETS09's; DatasetLayoutError: tracks beyond the video's end.
        AlreadyExistsError: ``out`` holds another prepared dataset (``reid_ssl prepare video``'s), or files
            that no prepare wrote, and not ``overwrite``.
    """
    from reid_ssl.data.video.frames import FrameSource
    from reid_ssl.data.video.prepare import TrackedInput, VideoOptions, check_video_output, publish

    video, out = Path(video), Path(out)
    check_video_output(out, overwrite)
    if check_video is None:
        check_video = tracks is None
    tracks = load_tracks() if tracks is None else list(tracks)
    video_sha = sha256_file(video)
    if check_video and video_sha != VIDEO_SHA256:
        raise InputError(f"{video} has sha256 {video_sha}, not PETS09 vtest.avi's {VIDEO_SHA256}")
    opt = VideoOptions(split=True, protocol=protocol or SplitProtocol(), jpeg_quality=jpeg_quality)
    extra = {
        "dataset": "PETS09-S2L1 (vtest.avi) tracklets",
        "tracks_sha256": tracks_sha256(tracks),
        "video_sha256": video_sha,
    }
    key = json.dumps([MANIFEST_VERSION, extra, opt.protocol.as_dict(), jpeg_quality], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()
    try:
        existing = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        existing = None
    if isinstance(existing, dict) and existing.get("digest") == digest:
        return existing
    if isinstance(existing, dict) and existing.get("dataset") != extra["dataset"] and not overwrite:
        raise AlreadyExistsError(
            f"{out} already holds another prepared dataset ({existing.get('dataset') or 'prepare video'}); "
            "choose another --out, or pass --overwrite to replace it"
        )
    source = FrameSource(video)
    last = max((b.frame for b in tracks), default=-1)
    frames = sum(1 for _ in source.frames(source.select()))
    if last >= frames:
        raise DatasetLayoutError(f"tracks reach frame {last} but {video} has {frames} frames")
    return publish(
        [TrackedInput(video, "vtest", 0, source, tracks)], out, opt, digest, extra={**extra, "frames": frames}
    )
