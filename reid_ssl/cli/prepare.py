"""``reid_ssl prepare``: build training data: ``pets09`` (the bundled PETS09 tracks), ``video`` (your footage), or
``shards`` (any training source packed into tar shards for streaming)."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from reid_ssl.cli.common import (
    add_json_option,
    add_parser,
    non_negative_float,
    open_unit_float,
    positive_float,
    positive_int,
    print_json,
    print_table,
    wrap,
)
from reid_ssl.console import setup_logging, show_progress
from reid_ssl.index.sidecar import display_path

DESCRIPTION = """\
pets09: find vtest.avi (or fetch it from Debian's opencv-doc package with --fetch), crop the committed person
  tracks into training bags (train/<tracklet>/), a test split (market/) and a validation split (market_val/).
video: any video OpenCV decodes, or a folder of frames, into the same layout: people detected, tracked with
  ByteTrack, tracklets cut where they are uncertain (crossings, gaps), crops at native resolution, tracks.csv,
  one contact sheet per camera. Several inputs = several cameras. Resumable: a killed run continues where it
  stopped. Train on the result with data.source=video data.root=OUT.
shards: pack any training source (folder, list, imagenet, sysu30k, pets09, video, ...) into WebDataset tar
  shards with each image's bag, and a manifest; train with data.source=shards data.root=OUT on any number of
  processes and nodes."""

SHARDS_DESCRIPTION = (
    "Pack any training source into WebDataset tar shards: each image's original bytes with its bag (tracklet) id, "
    "a bag never split across shards, and manifest.json (counts, bags, sha256 of every shard) written last. "
    "Train with data.source=shards data.root=OUT: the shards are split across processes, nodes and loader "
    "workers, every image is trained on once per epoch, and a killed run resumes without re-reading what it "
    "trained on. Unreadable images are listed in the manifest and left out."
)

PETS09_EXAMPLES = """\
  reid_ssl prepare pets09 --fetch
  reid_ssl prepare pets09 --video ~/Downloads/vtest.avi --out data/pets09"""

VIDEO_EXAMPLES = """\
  reid_ssl prepare video lobby.mp4 street.mp4 --camera lobby street --fps 5 --out data/mycams --split
  reid_ssl prepare video frames/ --source-fps 12 --start 60 --end 600 --out data/clip
  reid_ssl prepare video cam.mp4 --out data/cam \\
      --detector fasterrcnn --weights fasterrcnn_resnet50_fpn_coco-258fb6c6.pth
  reid_ssl train data.source=video data.root=data/mycams data.positives=bag train.out_dir=runs/mycams"""

SHARDS_EXAMPLES = """\
  reid_ssl prepare shards sysu30k --root /data/SYSU-30k --out /data/sysu30k-shards
  reid_ssl prepare shards video --root data/mycams --out data/mycams-shards --samples-per-shard 500
  reid_ssl train data.source=shards data.root=/data/sysu30k-shards"""

EPILOG = "examples:\n" + "\n".join([PETS09_EXAMPLES, VIDEO_EXAMPLES, SHARDS_EXAMPLES])


def register(sub: argparse._SubParsersAction) -> None:
    from reid_ssl.data.video.detect import DETECTORS

    prep = add_parser(
        sub,
        "prepare",
        "build training data: pets09 (bundled tracks), video (your footage), shards (streaming)",
        DESCRIPTION,
        EPILOG,
    )
    what = prep.add_subparsers(dest="dataset", metavar="<dataset>", required=True)
    p = add_parser(
        what,
        "pets09",
        "PETS09-S2L1 from Debian's opencv-doc package",
        _sentence(DESCRIPTION.split("\nvideo:")[0].removeprefix("pets09: ")),
        "examples:\n" + PETS09_EXAMPLES,
    )
    p.add_argument("--video", help="path to vtest.avi (default: data/vtest.avi, then the opencv-doc path)")
    p.add_argument("--fetch", action="store_true", help="download vtest.avi from the Debian package if missing")
    p.add_argument("--out", default="data/pets09", help="output folder (default data/pets09)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace another prepared dataset in --out (e.g. prepare video's)"
    )
    add_json_option(p, "the manifest")
    p.set_defaults(handler=run_pets09)

    video_text = DESCRIPTION.split("\nvideo: ")[1].split("\nshards:")[0]
    v = add_parser(
        what,
        "video",
        "your videos or frame folders -> tracklet bags",
        _sentence(video_text)
        + "\n\ndetectors (--detector):\n"
        + "\n".join(textwrap.fill(line, 100, subsequent_indent="    ") for line in DETECTORS.describe().splitlines()),
        "examples:\n" + VIDEO_EXAMPLES,
    )
    v.add_argument("inputs", nargs="+", metavar="VIDEO_OR_FRAME_FOLDER", help="one per camera")
    v.add_argument(
        "--out", required=True, help="output folder: new, empty, or an earlier prepare video output (resumed)"
    )
    v.add_argument("--camera", nargs="+", help="camera names, one per input (default: the file names)")
    v.add_argument("--fps", type=positive_float, help="frames per second to process (default: every frame)")
    v.add_argument(
        "--source-fps",
        type=positive_float,
        help="frame rate of frame folders (default 25) or of a video that reports none; a video's own rate is kept",
    )
    v.add_argument("--start", type=non_negative_float, default=0.0, help="seconds into each input to start")
    v.add_argument("--end", type=positive_float, help="seconds into each input to stop (default: the end)")
    v.add_argument("--min-height", type=positive_int, default=48, help="ignore people shorter than this, pixels (48)")
    v.add_argument(
        "--detector",
        default="hog",
        choices=DETECTORS.names(),
        help="the person detector (default hog; each is described above)",
    )
    v.add_argument("--weights", help="the detector's weights file (torchvision detectors); nothing is downloaded")
    v.add_argument(
        "--min-score", type=open_unit_float, help="detector score in (0, 1) to keep a box (default: the detector's)"
    )
    v.add_argument(
        "--split",
        action="store_true",
        help="also write test (market/) and validation (market_val/) splits of pseudo-identities",
    )
    v.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an output prepared from other inputs or options, or write into a folder of other files",
    )
    add_json_option(v, "the manifest")
    v.set_defaults(handler=run_video)

    from reid_ssl.data.datasets import DATASETS, SSL_SOURCES

    sources = [n for n in SSL_SOURCES() if not DATASETS[n].stream]
    s = add_parser(
        what,
        "shards",
        "any training source -> WebDataset tar shards for streamed, multi-node training",
        wrap(SHARDS_DESCRIPTION),
        "examples:\n" + SHARDS_EXAMPLES,
    )
    s.add_argument("source", choices=sources, metavar="SOURCE", help="the training source: " + ", ".join(sources))
    s.add_argument("--root", help="the source's folder (default: its usual place under data/)")
    s.add_argument("--list-file", default="", help="for SOURCE list (and optional for sysu30k): the image list")
    s.add_argument("--out", required=True, help="the shard folder to write")
    s.add_argument(
        "--samples-per-shard", type=positive_int, default=2000,
        help="images per shard (default 2000); a bag is never split, so shards end at the next bag boundary",
    )  # fmt: skip
    s.add_argument(
        "--overwrite", action="store_true", help="replace shards (or any other files) already in --out, as a whole"
    )
    s.add_argument(
        "--no-verify",
        action="store_true",
        help="copy each image's bytes without decoding it (faster for a corpus known to be clean); by default every "
        "image is decoded while packing and truncated or corrupt ones are left out and listed in the manifest",
    )
    add_json_option(s, "the manifest")
    s.set_defaults(handler=run_shards)


def _sentence(text: str) -> str:
    """A description's paragraph, capitalised and filled to 100 columns."""
    text = " ".join(text.split())
    return wrap(text[:1].upper() + text[1:])


def run_pets09(args: argparse.Namespace) -> int:
    setup_logging(json=args.json)
    from reid_ssl.data import pets09
    from reid_ssl.errors import MissingFileError

    try:
        video = pets09.find_video(args.video)
    except MissingFileError:
        if not args.fetch:
            raise
        video = pets09.fetch_video(Path("data/vtest.avi") if args.video is None else Path(args.video))
    manifest = pets09.build_pets09(video, Path(args.out), overwrite=args.overwrite)
    _report(manifest, f"PETS09 data ready in {args.out}", args.json)
    return 0


def run_video(args: argparse.Namespace) -> int:
    setup_logging(json=args.json)
    from reid_ssl.data.video.prepare import VideoOptions, prepare_video

    options = VideoOptions(
        fps=args.fps,
        start_s=args.start,
        end_s=args.end,
        source_fps=args.source_fps,
        min_height=args.min_height,
        detector=args.detector,
        weights=args.weights,
        min_score=args.min_score,
        split=args.split,
    )
    progress = show_progress(json=args.json)
    manifest = prepare_video(args.inputs, args.out, args.camera, options, overwrite=args.overwrite, progress=progress)
    from reid_ssl.eval.reid import MIN_QUERY_IDENTITIES  # the bound eval warns at, one home

    split = manifest.get("split") or {}
    small = {
        k: v
        for k in ("test_tracklets", "val_tracklets")
        if (v := split.get(k, MIN_QUERY_IDENTITIES)) < MIN_QUERY_IDENTITIES
    }
    if small:
        empty = [k.split("_")[0] for k, v in small.items() if v == 0]
        effect = (
            f"the {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty: `reid_ssl eval --dataset "
            f"video{'-val' if empty == ['val'] else ''}` has nothing to query"
            if empty
            else "splits this small give rank-1/mAP that say little (with one identity every ranking scores 100%)"
        )
        counts = manifest.get("counts", {})
        print(
            f"WARNING: {', '.join(f'{k} {v}' for k, v in small.items())}: the footage gave {counts.get('tracks', 0)} "
            f"tracklet(s); {effect}. Use longer footage or more cameras",
            file=sys.stderr,
        )
    _report(
        manifest, f"tracklet bags ready in {args.out} (train with data.source=video data.root={args.out})", args.json
    )
    return 0


def run_shards(args: argparse.Namespace) -> int:
    setup_logging(json=args.json)
    from tqdm import tqdm

    from reid_ssl.config import DataConfig
    from reid_ssl.data.datasets import build_source, default_root, source_array
    from reid_ssl.data.shards import write_shards

    root = args.root or default_root(args.source)
    data = DataConfig(source=args.source, root=root, list_file=args.list_file)
    items = build_source(data)
    source = {"source": args.source, "root": str(Path(root).resolve()), "list_file": args.list_file}
    with tqdm(total=len(items), unit="img", desc="shards", disable=not show_progress(json=args.json)) as bar:
        manifest = write_shards(
            items, args.out, array=source_array(data), samples_per_shard=args.samples_per_shard,
            source=source, overwrite=args.overwrite, verify=not args.no_verify, progress=bar.update,
        )  # fmt: skip
    if args.json:
        print_json(manifest)
        return 0
    rows = [("images", manifest["samples"]), ("bags", manifest["bags"]), ("shards", len(manifest["shards"]))]
    rows += [("unreadable (skipped)", manifest["num_unreadable"]), ("seconds", manifest["seconds"])]
    print_table(rows, f"shards ready in {args.out} (train with data.source=shards data.root={args.out})")
    for line in manifest["unreadable"][:10]:
        print(f"  skipped: {display_path(line)}", file=sys.stderr)
    return 0


def _report(manifest: dict, title: str, as_json: bool) -> None:
    if as_json:
        print_json(manifest)
        return
    counts = manifest.get("counts", {})
    rows = [
        ("tracklets", counts.get("tracks")),
        ("crops", counts.get("boxes")),
        ("longest tracklet", counts.get("longest")),
    ]
    rows += [(f"split {k}", v) for k, v in (manifest.get("split") or {}).items()]
    rows += [
        (f"camera {i['camera']}", f"{i['tracks']} tracklets, {i['boxes']} crops, {i['path']}")
        for i in manifest.get("inputs", [])
    ]
    rows += [(f"seconds {k}", v) for k, v in manifest.get("seconds", {}).items()]
    print_table(rows, title)
