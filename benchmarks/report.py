"""Result files: the header every JSON starts with (name, date, exact command, machine), where files go,
and the Markdown tables printed for docs/results.md. JSON is written by :func:`reid_ssl.fileio.write_json`
(strict JSON: NumPy values unwrapped, NaN as null), the project's one converter."""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.machine import REPO, machine_info
from reid_ssl.fileio import write_json

RESULTS_DIR = REPO / "benchmarks" / "results"


def command_line() -> str:
    """The command that is running, as typed from the repository root: ``python -m benchmarks.bench_x ...``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        head = f"python -m {spec.name.removesuffix('.__main__')}"
    else:
        script = Path(sys.argv[0]).resolve()
        head = f"python {script.relative_to(REPO).as_posix() if script.is_relative_to(REPO) else script}"
    return " ".join([head, *sys.argv[1:]])


def header(benchmark: str, smoke: bool, **machine_extra: Any) -> dict[str, Any]:
    """The fields every result file starts with: name, date, exact command, smoke flag, machine."""
    return {
        "benchmark": benchmark,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command_line(),
        "smoke": smoke,
        "machine": machine_info(**machine_extra),
    }


def finish(result: dict[str, Any], started: float) -> dict[str, Any]:
    """Stamp a result with its total seconds and the load average at the end (a busy machine skews timings)."""
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def default_out(name: str) -> Path:
    """``benchmarks/results/<name>.json``."""
    return RESULTS_DIR / f"{name}.json"


def out_path(requested: str | Path | None, smoke: bool, name: str) -> Path | None:
    """Where a result file goes: ``--out``, else :func:`default_out` (``name``); nowhere for a smoke run
    without ``--out`` (smoke results never replace the real ones)."""
    if requested:
        return Path(requested)
    return None if smoke else default_out(name)


def write_result(result: dict[str, Any], requested: str | Path | None, smoke: bool, name: str) -> Path | None:
    """Write ``result`` to :func:`out_path` (if any) and say so; returns the path."""
    out = out_path(requested, smoke, name)
    if out:
        print(f"wrote {write_json(out, result)}")
    return out


def png_path(out: str | Path, suffix: str = "") -> Path:
    """The PNG written next to a result file: ``<stem>[_<suffix>].png``."""
    out = Path(out)
    return out.with_name(f"{out.stem}{'_' + suffix if suffix else ''}.png")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as a Markdown table (floats with 4 significant digits, None as "—"), for the results page."""

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "—"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
