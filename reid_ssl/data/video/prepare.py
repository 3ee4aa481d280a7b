"""``reid_ssl prepare video``: any footage -> tracklet bags for self-supervised training.

Per input (a video file or a folder of frames; one input = one camera): detect people (resumable), track them
with ByteTrack, cut the tracks where they are uncertain (:mod:`reid_ssl.data.video.track`). Then, over all
inputs: number the tracklets, optionally split them into train / validation / test retrieval sets of
pseudo-identities (:mod:`reid_ssl.data.video.split`), cut the crops and publish::

    OUT/train/<camera>-<tracklet:05d>/<frame:06d>.jpg   one folder ("bag") per training tracklet, native crops
    OUT/market/, OUT/market_val/                         Market-1501 layouts of the test / validation tracklets
    OUT/tracks.csv                                       input, camera, camid, frame, time, box, score, track
    OUT/contact_<camera>.png                             one row per tracklet, to eyeball purity
    OUT/manifest.json                                    counts, options, inputs; written last

``data.source=video data.root=OUT`` trains on the bags (``data.positives=bag`` works), ``--dataset video
--root OUT`` evaluates on the test split. Detections are logged in ``OUT/.work/`` as they are made, so a killed run
redoes at most one block of frames, and they are kept after publishing: running again with other tracking or
split options reuses them instead of detecting again (delete ``.work/`` to reclaim the space). Nothing is
published before everything is written.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from reid_ssl.data.video.detect import build_detector
from reid_ssl.data.video.detections import DetectionLog, detect_all
from reid_ssl.data.video.frames import FrameSource
from reid_ssl.data.video.sheets import CropJobs, contact_sheet, write_crops
from reid_ssl.data.video.split import SplitProtocol, split_counts, split_tracklets
from reid_ssl.data.video.track import TrackBox, TrackerOptions, bytetrack, cut_uncertain, track_stats
from reid_ssl.errors import AlreadyExistsError, InputError, VideoError
from reid_ssl.fileio import atomic_write_bytes, check_output_folder, display, write_json

FORMAT = "reid_ssl.video-bags"
WORK = ".work"


@dataclass(frozen=True)
class VideoOptions:
    """How ``prepare video`` reads, detects, tracks and splits (see the CLI's help for each)."""

    fps: float | None = None  # process about this many frames per second (None: every frame)
    start_s: float = 0.0
    end_s: float | None = None
    source_fps: float | None = None  # frame rate of frame folders
    min_height: int = 48  # pixels; smaller people are too blurred to teach anything
    detector: str = "hog"
    weights: str | None = None
    min_score: float | None = None
    tracker: TrackerOptions = field(default_factory=TrackerOptions)
    split: bool = False
    protocol: SplitProtocol = field(default_factory=SplitProtocol)
    jpeg_quality: int = 95


@dataclass
class TrackedInput:
    """One input (one camera) and its tracklets."""

    path: Path
    camera: str
    camid: int
    source: FrameSource
    tracks: list[TrackBox] = field(default_factory=list)


def camera_names(inputs: list[Path], given: list[str] | None) -> list[str]:
    """One safe, unique camera name per input: ``given`` (one per input), else the file or folder name."""
    if given and len(given) != len(inputs):
        raise InputError(
            f"--camera was given {len(given)} times for {len(inputs)} inputs; give it once per input or not at all"
        )
    names = []
    for i, raw in enumerate(given or [p.stem for p in inputs]):
        name = re.sub(r"[^A-Za-z0-9_]+", "_", display(raw)).strip("_") or f"cam{i}"
        names.append(name if name not in names else f"{name}_{i}")
    return names


def prepare_video(
    inputs: list[str | Path],
    out: str | Path,
    cameras: list[str] | None = None,
    options: VideoOptions | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Turn footage into tracklet bags (module docstring); returns the manifest.

    Raises:
        VideoError: an input cannot be read, or no tracklet was found in any input.
        AlreadyExistsError: ``out`` holds a different published output (pass ``overwrite``).
        InputError: inconsistent options. OSError: the disk refused a write (nothing is published).
    """
    opt = options or VideoOptions()
    out = Path(out)
    paths = [Path(p) for p in inputs]
    if len({p.resolve() for p in paths}) != len(paths):
        raise InputError("the same input is given twice")
    items = [
        TrackedInput(p, c, i, FrameSource(p, opt.source_fps))
        for i, (p, c) in enumerate(zip(paths, camera_names(paths, cameras), strict=True))
    ]
    digest = _digest(items, opt)
    _check_target(out, digest, overwrite)
    detector = build_detector(opt.detector, weights=opt.weights, min_score=opt.min_score)
    t0 = time.perf_counter()
    for item in items:
        selection = item.source.select(opt.fps, opt.start_s, opt.end_s)
        log = DetectionLog(out / WORK / _input_key(item, opt), _input_key(item, opt))
        if log.complete:
            detections = log.read()
            if log.state.get("decoded") is not None:  # the reused pass had found the video truncated
                item.source.stopped_early(int(log.state["decoded"]))
        else:
            with tqdm(
                total=selection.count or None,
                initial=log.state["frames"],
                desc=f"detect {item.camera}",
                unit="frame",
                disable=not progress,
            ) as bar:
                detections = detect_all(
                    item.source, selection, detector, log, opt.min_height, on_frame=lambda _: bar.update(1)
                )
        by_frame: dict[int, list[Any]] = {}
        for d in detections:
            by_frame.setdefault(d.frame, []).append(d)
        frames = (
            (f, by_frame.get(f, []))
            for f in range(selection.start, min(selection.end, log.state["done_until"] + 1), selection.step)
        )
        raw = bytetrack(frames, item.source.fps / selection.step, opt.tracker)
        item.tracks = cut_uncertain(raw, selection.step, opt.tracker)
    seconds = {"detect_track": round(time.perf_counter() - t0, 2)}
    if not any(item.tracks for item in items):
        raise VideoError(
            f"no person tracklet found in {', '.join(str(p) for p in paths)} (detector {opt.detector}, boxes of at "
            f"least {opt.min_height} px, tracklets of at least {opt.tracker.min_length} boxes): check the footage, "
            "or try --min-height, --fps, or another --detector"
        )
    return publish(items, out, opt, digest, seconds, progress=progress)


def _digest(items: list[TrackedInput], opt: VideoOptions) -> str:
    blob = json.dumps({"inputs": [_input_key(i, opt) for i in items], "options": _options_dict(opt)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _options_dict(opt: VideoOptions) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(opt), default=str))


def _input_key(item: TrackedInput, opt: VideoOptions) -> str:
    """Identity of an input and of everything that decides its detections (a changed file starts afresh)."""
    st = item.path.stat()
    what = [str(item.path.resolve()), st.st_size, st.st_mtime_ns, opt.fps, opt.start_s, opt.end_s, opt.source_fps]
    what += [opt.min_height, opt.detector, opt.weights, opt.min_score]
    return hashlib.sha1(json.dumps(what, default=str).encode()).hexdigest()[:16]


def is_video_output(out: Path) -> bool:
    """Whether ``out`` holds this pipeline's output: published (its manifest) or unfinished (its ``.work/``)."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return (out / WORK).is_dir()
    if not isinstance(manifest, dict):
        return False  # PETS09 builds from before the shared publish step record only their dataset
    return manifest.get("format") == FORMAT or str(manifest.get("dataset", "")).startswith("PETS09")


def check_video_output(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` holding anything but this pipeline's own output, unless ``overwrite`` (one rule with
    every command: :func:`~reid_ssl.fileio.check_output_folder`).

    Raises:
        AlreadyExistsError: a non-empty folder of someone else's (photos, an index, shards...); InputError: a file.
    """
    check_output_folder(out, overwrite, is_video_output, "a prepared video dataset (manifest.json or .work/)")


def _check_target(out: Path, digest: str, overwrite: bool) -> None:
    check_video_output(out, overwrite)
    manifest = out / "manifest.json"
    if not manifest.is_file() or overwrite:
        return
    try:
        old = json.loads(manifest.read_text())
    except (OSError, ValueError):
        old = {}
    if old.get("digest") != digest:
        raise AlreadyExistsError(
            f"{out} already holds a prepared dataset from other inputs or options; pass --overwrite to replace it, "
            "or choose another --out"
        )


def publish(
    items: list[TrackedInput],
    out: Path,
    opt: VideoOptions,
    digest: str,
    seconds: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Number the tracklets, split, write crops, tracks.csv, contact sheets and the manifest (plus ``extra``) in a
    build folder; then move them into ``out``, the manifest last. Every caller's tracks end here (PETS09's
    committed ones included). Folders this call created are removed again if it fails.

    Raises:
        OSError: a write failed (the message names the file); what ``out`` published before is untouched unless
            the failure came while moving the new output in, in which case ``out`` has no manifest.
    """
    seconds = dict(seconds or {})
    created = [p for p in (out, out / WORK) if not p.exists()]
    build = out / WORK / f"build-{uuid.uuid4().hex[:8]}"
    try:
        tracks, bags, rows = _assign(items, opt)
        jobs: dict[int, CropJobs] = {i.camid: {} for i in items}
        for camid, bag, track, market in bags:
            paths = [build / "train" / bag / f"{track.frame:06d}.jpg"] if bag else []
            paths += [build / market] if market else []
            if paths:
                jobs[camid].setdefault(track.frame, []).append((track.box, paths))
        t0 = time.perf_counter()
        for item in tqdm(items, desc="crops", disable=not progress or len(items) == 1):
            write_crops(
                item.source, item.source.select(opt.fps, opt.start_s, opt.end_s), jobs[item.camid], opt.jpeg_quality
            )
        seconds["crops"] = round(time.perf_counter() - t0, 2)
        _write_tracks_csv(build / "tracks.csv", rows)
        for item in items:
            bag_dirs = sorted(p for p in (build / "train").glob(f"{item.camera}-*") if p.is_dir())
            if bag_dirs:
                contact_sheet(
                    [(d.name, sorted(d.glob("*.jpg"))) for d in bag_dirs], build / f"contact_{item.camera}.png"
                )
        manifest = {**_manifest(items, tracks, opt, digest, seconds), **(extra or {})}
        new = sorted(build.iterdir())
        (out / "manifest.json").unlink(missing_ok=True)  # from here until the end, the output reads as unfinished
        for entry in new:
            _replace(entry, out / entry.name)
        for old in [*(out / n for n in ("train", "market", "market_val")), *out.glob("contact_*.png")]:
            if old.exists() and old.name not in {e.name for e in new}:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        write_json(out / "manifest.json", manifest)
        return manifest
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: nothing of anyone else's is removed
        raise
    finally:
        shutil.rmtree(build, ignore_errors=True)


def _assign(
    items: list[TrackedInput], opt: VideoOptions
) -> tuple[list[TrackBox], list[tuple[int, str, TrackBox, str]], list[dict[str, Any]]]:
    """Global tracklet ids (1.. over all inputs), their bags and Market paths, and the tracks.csv rows."""
    tracks: list[TrackBox] = []
    origin: dict[int, TrackedInput] = {}
    for item in items:
        offset = max((t.track for t in tracks), default=0)
        for t in item.tracks:
            tracks.append(dataclasses.replace(t, track=t.track + offset))
            origin[t.track + offset] = item
    split = {(s.box.frame, s.box.track): s for s in split_tracklets(tracks, opt.protocol)} if opt.split else {}
    bags, rows = [], []
    for t in sorted(tracks, key=lambda t: (t.track, t.frame)):
        item = origin[t.track]
        s = split.get((t.frame, t.track))
        in_train = not opt.split or (s is not None and s.subset == "train")
        bag = f"{item.camera}-{t.track:05d}" if in_train else ""
        market = s.market_path if s is not None else ""
        if not bag and not market:
            continue  # a short tracklet the split leaves out
        bags.append((item.camid, bag, t, market))
        rows.append({
            "input": str(item.path), "camera": item.camera, "camid": item.camid, "frame": t.frame,
            "time_s": round(t.frame / item.source.fps, 3), "track": t.track, "x": t.x, "y": t.y, "w": t.w, "h": t.h,
            "score": round(t.score, 4), "bag": bag, "market": market,
        })  # fmt: skip
    return tracks, bags, rows


def _write_tracks_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode("utf-8", "surrogateescape"))


def _manifest(
    items: list[TrackedInput], tracks: list[TrackBox], opt: VideoOptions, digest: str, seconds: dict[str, float]
) -> dict[str, Any]:
    split = split_counts(split_tracklets(tracks, opt.protocol)) if opt.split else None
    return {
        "format": FORMAT,
        "digest": digest,
        "inputs": [
            {
                "path": str(i.path),
                "camera": i.camera,
                "camid": i.camid,
                "fps": i.source.fps,
                **track_stats(i.tracks),
                **_truncation(i.source),
            }
            for i in items
        ],
        "counts": track_stats(tracks),
        "split": split,
        "options": _options_dict(opt),
        "seconds": seconds,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _truncation(source: FrameSource) -> dict[str, int]:
    """``frames_decoded`` and ``frames_in_header`` of a video whose decoding stopped early; else nothing."""
    if source.decoded is None:
        return {}
    return {"frames_decoded": source.decoded, "frames_in_header": source.frame_count}


def _replace(src: Path, dst: Path) -> None:
    """Move ``src`` over ``dst`` (a file or a folder); the old ``dst`` is removed only after the move."""
    trash = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:6]}") if dst.exists() else None
    if trash is not None:
        dst.rename(trash)
    src.rename(dst)
    if trash is not None:
        shutil.rmtree(trash) if trash.is_dir() else trash.unlink()
