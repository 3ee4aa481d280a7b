"""``python -m reid_ssl`` is the ``reid_ssl`` command, as the README says."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import SUBPROCESS_ENV, run_cli_process


def _module(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "reid_ssl", *argv], env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300
    )


def test_python_dash_m_reid_ssl_runs_the_command_line() -> None:
    ours, cli = (
        _module("k-rule", "--negatives", "63", "--classes", "20"),
        run_cli_process("k-rule", "--negatives", "63", "--classes", "20"),
    )
    assert ours.returncode == 0 and ours.stdout == cli.stdout and "smallest k" in ours.stdout
    bad = _module("k-rule", "--negatives", "-1", "--classes", "5")
    assert bad.returncode == 2 and "must be >= 1" in bad.stderr
    assert _module("--version").stdout.startswith("reid_ssl ")
