"""What every subcommand shares: errors meant for users, printing results as a table or as JSON."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping
from typing import Any

# Exceptions whose message is already a complete user-facing sentence: printed as one line, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, NotADirectoryError, KeyError, ValueError)


class UserError(Exception):
    """Bad input from the user (path, layout, option value): one clear line, exit code 2."""


def one_line(e: BaseException) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    text = " ".join(text.split())
    return text or type(e).__name__


def to_jsonable(obj: Any) -> Any:
    """Numpy scalars/arrays, tuples and paths -> plain JSON types (NaN/inf -> None)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):
        return to_jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def print_json(result: Mapping[str, Any]) -> None:
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


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value
