"""`reid_ssl` command line: one subcommand per stage; each lives in ``reid_ssl/commands/<stage>.py``.

Heavy libraries (torch, faiss, gradio, torchreid) are imported inside the handlers, so ``reid_ssl --help``
answers instantly. Library functions return data; only the handlers print.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from reid_ssl import __version__
from reid_ssl.commands import COMMANDS
from reid_ssl.commands.common import USER_ERRORS, UserError, one_line

DESCRIPTION = """\
Self-supervised person re-identification (truncated triplet loss, Wang et al., ICCV 2021).

Typical flow:
  reid_ssl prepare pets09 --fetch      # real pedestrian crops from the PETS09-S2L1 video
  reid_ssl train                       # pretrain with the default config (configs/pets09_r18_cpu.yaml)
  reid_ssl eval --checkpoint runs/pets09_r18/checkpoint.pt --dataset pets09
  reid_ssl index build --checkpoint runs/pets09_r18/checkpoint.pt --images pets09 --out runs/pets09_r18/gallery
  reid_ssl app                         # search the gallery in a browser

Every command that prints results accepts --json. `reid_ssl <command> --help` explains each one.
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the message and where help is), not a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="reid_ssl", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"reid_ssl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for register in COMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; returns the exit code (0 ok, 1 failed, 2 bad usage or input)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may come after options (`train --json optim.lr=0.1`): argparse leaves those over.
    if extra and isinstance(getattr(args, "overrides", None), list) and all("=" in e for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("reid_ssl: interrupted", file=sys.stderr)
        return 130
    except (UserError, *USER_ERRORS) as e:  # bad input: a path, a layout, a value
        print(f"reid_ssl {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # one clear line instead of a traceback wall; REID_SSL_DEBUG=1 shows it
        if os.environ.get("REID_SSL_DEBUG"):
            raise
        print(
            f"reid_ssl {args.command}: error: {one_line(e)} (set REID_SSL_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
