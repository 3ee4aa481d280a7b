"""What every command shares: argument types that refuse absurd values, and printing results as a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from reid_ssl.fileio import require_file, to_jsonable
from reid_ssl.index.sidecar import display_path

DEFAULT_RUN = "runs/pets09_r18"
DEFAULT_CHECKPOINT = f"{DEFAULT_RUN}/checkpoint.pt"
DEFAULT_INDEX = f"{DEFAULT_RUN}/gallery"


def wrap(text: str) -> str:
    """Fill a description to 100 columns (the parsers keep line breaks for their examples)."""
    return textwrap.fill(text, width=100)


def add_parser(sub: argparse._SubParsersAction, name: str, help: str, description: str, epilog: str = "") -> Any:
    """A subcommand parser whose description and examples keep their line breaks."""
    return sub.add_parser(
        name, help=help, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_index_option(p: argparse.ArgumentParser) -> None:
    """``--index``: the index folder a command reads or changes."""
    p.add_argument("--index", default=DEFAULT_INDEX, help=f"the index folder (default: {DEFAULT_INDEX})")


def add_device_option(p: argparse.ArgumentParser) -> None:
    """``--device`` for commands that embed images."""
    p.add_argument("--device", default="auto", help="where to embed images: auto (CUDA if present), cpu, cuda, cuda:1")


def add_batch_size_option(p: argparse.ArgumentParser) -> None:
    """``--batch-size`` for commands that embed images."""
    p.add_argument("--batch-size", type=batch_size, default=64, help="images embedded per forward pass (default 64)")


def add_json_option(p: argparse.ArgumentParser, what: str = "the result") -> None:
    """``--json``: print ``what`` as JSON (for scripts) instead of a table."""
    p.add_argument("--json", action="store_true", help=f"print {what} as JSON instead of a table")


def choices_help(names: Iterable[str], default: str | None = None) -> str:
    """``one of: a, b, c (default a)`` for an option whose choices come from a registry."""
    return f"one of: {', '.join(names)}" + (f" (default {default})" if default else "")


# ---------------------------------------------------------------------------------------------------------
# Argument types
# ---------------------------------------------------------------------------------------------------------


def int_in(low: int, high: int) -> Callable[[str], int]:
    """argparse type: an integer in [low, high] (absurd values are refused, not attempted)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer in [{low}, {high}], got {value}")
        return value

    parse.__name__ = f"integer in {low}..{high}"
    return parse


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def open_unit_float(text: str) -> float:
    """argparse type: a number strictly between 0 and 1 (a probability or score threshold; nan and inf refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text}")
    return value


non_negative_int = int_in(0, 2**31 - 1)
batch_size = int_in(1, 4096)
workers = int_in(0, 64)


def existing_checkpoint(path: str) -> Path:
    """The checkpoint file, or :class:`MissingFileError` saying how to make one."""
    hint = " (train one with `reid_ssl train` or pass --checkpoint)" if path == DEFAULT_CHECKPOINT else ""
    return require_file(path, "checkpoint", hint)


# ---------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------


def print_json(result: Mapping[str, Any]) -> None:
    """``result`` as indented JSON on standard output (numpy values, paths and NaN made JSON-safe)."""
    json.dump(to_jsonable(result), sys.stdout, indent=2)
    sys.stdout.write("\n")


def print_table(rows: list[tuple[str, Any]], title: str | None = None) -> None:
    """Two-column key/value table for humans."""
    if title:
        print(title)
    width = max((len(k) for k, _ in rows), default=0)
    for k, v in rows:
        if isinstance(v, float):
            v = f"{v:.4f}"
        print(f"  {k:<{width}}  {v}")


def percent(value: float | None) -> str:
    """``0.4946 -> " 49.46%"``; ``None -> "-"``."""
    return "-" if value is None else f"{100 * value:6.2f}%"


def print_problems(problems: list[tuple[str, str]], label: str = "") -> None:
    """Up to 10 ``(path, reason)`` lines on standard error (paths that are not UTF-8 with \\xNN escapes); a
    reason that starts with its path (an :class:`~reid_ssl.errors.ImageError`'s message) is not printed twice."""
    for path, reason in problems[:10]:
        reason = str(reason).removeprefix(f"{path}: ")
        print(f"  {label}{display_path(path)}: {display_path(reason)}", file=sys.stderr)
