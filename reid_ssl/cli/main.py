"""``reid_ssl``: the parser, and how a command's outcome becomes an exit code.

Exit codes: 0 success; 2 bad usage or bad input (:class:`~reid_ssl.errors.ReidSslError`: one line saying what
is wrong and how to fix it); 1 anything else (an environment problem such as a full disk, or a bug in
reid_ssl, reported as one line with the hint ``REID_SSL_DEBUG=1``, which shows the traceback of every error).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from reid_ssl import __version__
from reid_ssl.cli import app, eval, export, finetune, index, k_rule, prepare, train
from reid_ssl.errors import ReidSslError, one_line

COMMANDS = (prepare, train, k_rule, eval, finetune, export, index, app)

DESCRIPTION = """\
Self-supervised person re-identification (truncated triplet loss, Wang et al., ICCV 2021).

Typical flow:
  reid_ssl prepare pets09 --fetch      # real pedestrian crops from the PETS09-S2L1 video
  reid_ssl prepare video FOOTAGE.mp4 --out data/mycam   # or tracklets from your own video
  reid_ssl train                       # pretrain with the default config (configs/pets09_r18_cpu.yaml)
  reid_ssl eval --checkpoint runs/pets09_r18/checkpoint.pt --dataset pets09
  reid_ssl index build --checkpoint runs/pets09_r18/checkpoint.pt --images pets09 --out runs/pets09_r18/gallery
  reid_ssl app                         # search the gallery in a browser

Every command that prints results accepts --json. `reid_ssl <command> --help` explains each one.
Set REID_SSL_DEBUG=1 to see the traceback of any error.
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the message and where help is), not a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="reid_ssl", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"reid_ssl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; returns the exit code (0 ok, 1 failed, 2 bad usage or input)."""
    for stream in (sys.stdout, sys.stderr):  # file names that are not UTF-8 print as their own bytes
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # usage errors, --help and --version exit here (SystemExit)
    # `key=value` overrides may come after options (`train --json optim.lr=0.1`): argparse leaves those over.
    if extra and isinstance(getattr(args, "overrides", None), list) and all("=" in e for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    return _run(args)


# OSErrors that mean a path given on the command line is wrong (a file where a folder is needed, an existing
# file, a missing folder): user input, exit code 2, like ReidSslError.
PATH_ERRORS = (FileExistsError, IsADirectoryError, NotADirectoryError, FileNotFoundError)


def _run(args: argparse.Namespace) -> int:
    """The handler's exit code, with every exception turned into one line and an exit code (see the module)."""
    debug = bool(os.environ.get("REID_SSL_DEBUG"))
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("reid_ssl: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        if isinstance(e, ReidSslError):  # bad input: a path, a layout, a value; the message says how to fix it
            print(f"reid_ssl {args.command}: error: {one_line(e)}", file=sys.stderr)
            return e.exit_code
        if isinstance(e, PATH_ERRORS):  # a path the user gave is of the wrong kind or missing: bad input
            print(f"reid_ssl {args.command}: error: {one_line(e)} (check the path given)", file=sys.stderr)
            return 2
        if isinstance(e, OSError):  # the environment refused: full disk, permissions, a device
            print(f"reid_ssl {args.command}: error: {one_line(e)}", file=sys.stderr)
            return 1
        print(  # a bug: one clear line instead of a traceback wall
            f"reid_ssl {args.command}: internal error ({type(e).__name__}: {one_line(e)}); this is a bug in "
            "reid_ssl or a library it uses: set REID_SSL_DEBUG=1 for the traceback and report it",
            file=sys.stderr,
        )
        return 1


def entry() -> None:
    sys.exit(main())
