"""Raw client values -> checked Python values: file payloads, numbers, the number of results, the no-match
threshold and the query's camera id.

The app's events run with ``preprocess=False``, so every value arrives as it came over the wire; each one is
parsed and bounded here before it reaches FAISS or SQLite, and a bad one raises
:class:`~reid_ssl.errors.InputError` with a message the user can act on.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from reid_ssl.data.market import parse_market_name
from reid_ssl.errors import InputError

MAX_K = 50
MAX_CAMID = 10**6


def payload(value: Any) -> tuple[str | None, str]:
    """(path, the name the user gave) from a raw gradio FileData dict, a path, or None."""
    if value is None or value == "":
        return None, ""
    if isinstance(value, dict):
        path = value.get("path")
        if path is not None and not isinstance(path, str):
            raise InputError("a file payload's path must be a string")
        name = value.get("orig_name") or (Path(path).name if path else "")
        return path or None, str(name)
    if isinstance(value, (str, Path)):
        return str(value), Path(str(value)).name
    raise InputError(f"expected a file, got {type(value).__name__}")


def number(value: Any, what: str, default: float) -> float:
    """A finite number from a client value (None or "" -> ``default``)."""
    if value is None or value == "":
        return default
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number, got {str(value)[:40]!r}") from None
    if not math.isfinite(x):
        raise InputError(f"{what} must be a finite number, got {x}")
    return x


def results_k(value: Any) -> int:
    """The number of results, a whole number in 1..MAX_K (anything else is refused, never silently changed)."""
    x = number(value, "the number of results (k)", 10)
    if x != round(x) or not 1 <= x <= MAX_K:
        raise InputError(f"the number of results (k) must be a whole number from 1 to {MAX_K}, got {value!r}")
    return int(x)


def no_match_threshold(value: Any, calibrated: float | None) -> float | None:
    """None: the index's calibrated threshold; 0 switches the verdict off; else a similarity in (0, 1]."""
    if value is None or value == "":
        return calibrated
    x = number(value, "the no-match threshold", 0.0)
    if not -1.0 <= x <= 1.0:
        raise InputError(f"the no-match threshold is a cosine similarity in [-1, 1], got {x}")
    return x if x > 0 else None


def query_camid(choice: Any, name: str) -> int | None:
    """The query's 0-based camid: an explicit choice ("2"), else read from a Market-style file name."""
    if choice in (None, "", "auto"):
        meta = parse_market_name(name)
        return None if meta is None else meta.camid
    m = re.fullmatch(r"\s*(?:camid\s*)?(\d{1,7})\s*", str(choice))
    if m is None or int(m.group(1)) > MAX_CAMID:
        raise InputError(f"the query camid must be 'auto' or a camera id such as 0, got {str(choice)[:40]!r}")
    return int(m.group(1))
