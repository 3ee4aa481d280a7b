"""`reid_ssl app`: serve the gallery search app (reid_ssl/app/) over an index.

Binds 127.0.0.1 by default. Serving on any other address needs a login: ``--auth-file FILE`` (lines of
``user:password``) or the environment variable ``REID_SSL_APP_AUTH=user:password[,user2:password2]``;
without one the command refuses to start (``--insecure-no-auth`` overrides, with a warning). There is never
a share link and never telemetry.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reid_ssl.app.uploads import DEFAULT_UPLOAD_MB
from reid_ssl.cli.common import DEFAULT_INDEX, add_device_option, add_index_option, add_parser, positive_int
from reid_ssl.errors import InputError, MissingFileError

DESCRIPTION = """\
Serve the gallery search app (search with a person crop, add images or a zip of crops to the gallery, detect
people in a whole frame) over an index built by `reid_ssl index build`.
Binds 127.0.0.1 by default. Serving on any other address needs a login: --auth-file FILE (lines of
user:password) or the environment variable REID_SSL_APP_AUTH=user:password[,user2:password2]; without one
the command refuses to start (--insecure-no-auth overrides, with a warning). There is never a share link and
never telemetry. Every uploaded file, and every image in a zip, is at most --max-upload-mb."""

EPILOG = """\
examples:
  reid_ssl app
  reid_ssl app --index runs/vtest/gallery --port 8080 --max-upload-mb 20
  REID_SSL_APP_AUTH=alice:s3cret reid_ssl app --host 0.0.0.0"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_parser(subparsers, "app", "serve the gallery search app in the browser", DESCRIPTION, EPILOG)
    add_index_option(p)
    p.add_argument("--checkpoint", help="default: the checkpoint that built the index")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port_number, default=7860, help="TCP port, 1..65535 (default 7860)")
    p.add_argument("--auth-file", help="file with one user:password per line (required off loopback)")
    p.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve a non-loopback address without a login (anyone who can reach it can add images)",
    )
    add_device_option(p)
    p.add_argument(
        "--max-upload-mb",
        type=positive_int,
        default=DEFAULT_UPLOAD_MB,
        help=f"the largest file, in MB, that one upload may send and the largest image (a query, a frame, a gallery "
        f"image or a member of a zip) the app takes (default {DEFAULT_UPLOAD_MB}); the web server refuses larger "
        "uploads with HTTP 413",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="CPU threads per query (default 1: one crop at a time is fastest single-threaded; 2 "
        "OpenMP threads made it 50x slower on a busy 2-core machine)",
    )
    p.set_defaults(handler=run)


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1..65535."""
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 1..65535, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    from reid_ssl.app.serve import check_exposure, resolve_auth

    auth, warnings = resolve_auth(args.auth_file)
    warnings += check_exposure(args.host, auth, args.insecure_no_auth)
    index_dir = Path(args.index)
    if not (index_dir / "CURRENT").is_file():
        hint = (
            f"reid_ssl index build --checkpoint runs/pets09_r18/checkpoint.pt --images pets09 --out {args.index}"
            if args.index == DEFAULT_INDEX
            else f"reid_ssl index build ... --out {args.index}"
        )
        raise MissingFileError(f"no gallery index at {index_dir}; build it first: {hint}")

    _check_port_free(args.host, args.port)
    import torch

    from reid_ssl.app.serve import launch
    from reid_ssl.app.ui import open_demo
    from reid_ssl.app.uploads import UploadLimits

    torch.set_num_threads(args.threads)
    limits = UploadLimits(max_upload_mb=args.max_upload_mb)
    demo = open_demo(index_dir, args.checkpoint, device=args.device, limits=limits)
    index = demo.reid_app.index
    for w in warnings:
        print(w, file=sys.stderr)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"reid_ssl app: serving {index.ntotal} gallery images from {index_dir} on http://{host}:{args.port} "
        f"(login {'on' if auth else 'off'}); Ctrl-C stops it",
        file=sys.stderr,
    )
    launch(demo, args.host, args.port, auth=auth, limits=limits, quiet=True)
    return 0


def _check_port_free(host: str, port: int) -> None:
    """Refuse before anything loads when ``host:port`` is taken (Gradio's own message names its internals).

    Raises:
        InputError: the address is in use; the message names ``--port``.
    """
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as e:
            raise InputError(
                f"cannot listen on {host}:{port} ({e.strerror or e}): another program uses it; choose a free one "
                "with --port"
            ) from None
