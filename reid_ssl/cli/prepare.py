"""``reid_ssl prepare``: build training data: ``pets09`` (the bundled PETS09 tracks) or ``video`` (your footage)."""

from __future__ import annotations

import argparse
from pathlib import Path

from reid_ssl.cli.common import add_parser, non_negative_float, positive_float, positive_int, print_json, print_table, wrap
from reid_ssl.console import setup_logging, show_progress

DESCRIPTION = """\
pets09: find vtest.avi (or fetch it from Debian's opencv-doc package with --fetch), crop the committed person
  tracks into training bags (train/<tracklet>/), a test split (market/) and a validation split (market_val/).
video: any video OpenCV decodes, or a folder of frames, into the same layout: people detected, tracked with
  ByteTrack, tracklets cut where they are uncertain (crossings, gaps), crops at native resolution, tracks.csv,
  one contact sheet per camera. Several inputs = several cameras. Resumable: a killed run continues where it
  stopped. Train on the result with data.source=video data.root=OUT."""

EPILOG = """\
examples:
  reid_ssl prepare pets09 --fetch
  reid_ssl prepare video lobby.mp4 street.mp4 --camera lobby street --fps 5 --out data/mycams --split
  reid_ssl prepare video frames/ --source-fps 12 --start 60 --end 600 --out data/clip
  reid_ssl prepare video cam.mp4 --detector fasterrcnn --weights fasterrcnn_resnet50_fpn_coco-258fb6c6.pth --out data/cam
  reid_ssl train data.source=video data.root=data/mycams data.positives=bag train.out_dir=runs/mycams"""


def register(sub: argparse._SubParsersAction) -> None:
    from reid_ssl.data.video.detect import DETECTORS

    prep = add_parser(sub, "prepare", "build training data: pets09 (bundled tracks) or video (your footage)", DESCRIPTION, EPILOG)
    what = prep.add_subparsers(dest="dataset", metavar="<dataset>", required=True)
    p = what.add_parser("pets09", help="PETS09-S2L1 from Debian's opencv-doc package", description=wrap(DESCRIPTION.split("\nvideo:")[0]))
    p.add_argument("--video", help="path to vtest.avi (default: data/vtest.avi, then the opencv-doc path)")
    p.add_argument("--fetch", action="store_true", help="download vtest.avi from the Debian package if missing")
    p.add_argument("--out", default="data/pets09", help="output folder (default data/pets09)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(handler=run_pets09)

    v = what.add_parser("video", help="your videos or frame folders -> tracklet bags", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("inputs", nargs="+", metavar="VIDEO_OR_FRAME_FOLDER", help="one per camera")
    v.add_argument("--out", required=True, help="output folder")
    v.add_argument("--camera", nargs="+", help="camera names, one per input (default: the file names)")
    v.add_argument("--fps", type=positive_float, help="frames per second to process (default: every frame)")
    v.add_argument("--source-fps", type=positive_float, help="frame rate of frame folders (default 25)")
    v.add_argument("--start", type=non_negative_float, default=0.0, help="seconds into each input to start")
    v.add_argument("--end", type=positive_float, help="seconds into each input to stop (default: the end)")
    v.add_argument("--min-height", type=positive_int, default=48, help="ignore people shorter than this, pixels (48)")
    v.add_argument("--detector", default="hog", choices=DETECTORS.names(), help=f"person detector (default hog):\n{DETECTORS.describe()}")
    v.add_argument("--weights", help="the detector's weights file (torchvision detectors); nothing is downloaded")
    v.add_argument("--min-score", type=float, help="detector score in (0, 1) to keep a box (default: the detector's)")
    v.add_argument("--split", action="store_true", help="also write test (market/) and validation (market_val/) splits of pseudo-identities")
    v.add_argument("--overwrite", action="store_true", help="replace an output prepared from other inputs or options")
    v.add_argument("--json", action="store_true", help="print the manifest as JSON")
    v.set_defaults(handler=run_video)


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
    manifest = pets09.build_pets09(video, Path(args.out))
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
    _report(manifest, f"tracklet bags ready in {args.out} (train with data.source=video data.root={args.out})", args.json)
    return 0


def _report(manifest: dict, title: str, as_json: bool) -> None:
    if as_json:
        print_json(manifest)
        return
    counts = manifest.get("counts", {})
    rows = [("tracklets", counts.get("tracks")), ("crops", counts.get("boxes")), ("longest tracklet", counts.get("longest"))]
    rows += [(f"split {k}", v) for k, v in (manifest.get("split") or {}).items()]
    rows += [(f"camera {i['camera']}", f"{i['tracks']} tracklets, {i['boxes']} crops, {i['path']}") for i in manifest.get("inputs", [])]
    rows += [(f"seconds {k}", v) for k, v in manifest.get("seconds", {}).items()]
    print_table(rows, title)
