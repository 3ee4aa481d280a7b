"""The README's first command, timed as a new user meets it: ``make demo`` in a fresh clone of this repository.

Clones the committed HEAD into a temporary folder (nothing of this working tree's ``.venv``, ``data`` or
``runs`` comes along), runs ``make demo`` there, and records its wall time, the training summary it prints
(steps, images/s, seconds) and the test rank-1 / mAP of ``reid_ssl eval``. pip's cache is whatever this
machine has (recorded as such: a cold cache adds the download time).

    python -m benchmarks.bench_demo          # ~6-8 min on 2 cores
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.machine import REPO
from benchmarks.report import default_out, finish, header
from reid_ssl.fileio import write_json

# What `make demo` prints and this script reads: "images/s  91.8971", "seconds  219.3757", "rank1  45.11%", ...
PATTERNS = {
    "train_steps": r"^\s*steps\s+(\d+)",
    "train_images_per_second": r"^\s*images/s\s+([\d.]+)",
    "train_seconds": r"^\s*seconds\s+([\d.]+)",
    "test_rank1_percent": r"^\s*rank1\s+([\d.]+)%",
    "test_mAP_percent": r"^\s*mAP\s+([\d.]+)%",
}


def parse_demo_output(text: str) -> dict[str, float | None]:
    """The first match of each of :data:`PATTERNS` in ``make demo``'s output (None where absent)."""
    found: dict[str, float | None] = {}
    for key, pattern in PATTERNS.items():
        m = re.search(pattern, text, re.MULTILINE)
        found[key] = float(m.group(1)) if m else None
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="JSON (default benchmarks/results/demo.json)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="reid_ssl_demo_") as tmp:
        clone = Path(tmp) / "repo"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        t = time.perf_counter()
        done = subprocess.run(["make", "demo"], cwd=clone, capture_output=True, text=True)
        wall = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"make demo failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    result: dict[str, Any] = header("demo", False)
    result.update(commit=commit, pip_cache="as this machine has it", make_demo_seconds=round(wall, 1))
    result.update(parse_demo_output(done.stdout))
    write_json(Path(args.out) if args.out else default_out("demo"), finish(result, started))
    print({k: result[k] for k in ("make_demo_seconds", *PATTERNS)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
