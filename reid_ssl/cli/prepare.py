"""``reid_ssl prepare``: build training data (PETS09 tracklets from the Debian video)."""

from __future__ import annotations

import argparse
from pathlib import Path

from reid_ssl.cli.common import add_parser, print_json, print_table
from reid_ssl.console import setup_logging

DESCRIPTION = """\
pets09: find vtest.avi (or fetch it from Debian's opencv-doc package with --fetch), crop the committed person
tracks, write unlabeled training crops (train/<tracklet>/) and a Market-1501 layout retrieval split (market/)."""


def register(sub: argparse._SubParsersAction) -> None:
    prep = add_parser(sub, "prepare", "build a dataset: pets09 (real pedestrian crops from PETS09-S2L1)", DESCRIPTION)
    prep.add_argument("dataset", choices=["pets09"])
    prep.add_argument("--video", help="path to vtest.avi (default: data/vtest.avi, then the opencv-doc path)")
    prep.add_argument("--fetch", action="store_true", help="download vtest.avi from the Debian package if missing")
    prep.add_argument("--out", default="data/pets09", help="output folder (default data/pets09)")
    prep.add_argument("--json", action="store_true", help="print the manifest as JSON")
    prep.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
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
    if args.json:
        print_json(manifest)
    else:
        print_table(
            [(k, v) for k, v in manifest.items() if not isinstance(v, (dict, list))], f"PETS09 data ready in {args.out}"
        )
    return 0
