"""Subcommands. Each module exposes ``register(subparsers)`` and keeps heavy imports inside its handlers.

A handler takes the parsed ``argparse.Namespace`` and returns an exit code; it is stored with
``parser.set_defaults(handler=...)``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from reid_ssl.commands import app as app_cmd
from reid_ssl.commands import eval as eval_cmd
from reid_ssl.commands import index as index_cmd
from reid_ssl.commands import train

Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]

COMMANDS: list[Register] = [train.register, eval_cmd.register, index_cmd.register, app_cmd.register]
