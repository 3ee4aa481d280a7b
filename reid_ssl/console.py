"""What reid_ssl shows on the terminal: one rule for progress bars, one logging set-up.

Progress bars appear when a person is watching: standard error is a terminal, the command was not asked for
``--json`` or ``--quiet``, and this is the main process (rank 0 under ``torchrun``). Library functions take a
``progress: bool`` argument and never decide this themselves; the command line calls :func:`show_progress`.
"""

from __future__ import annotations

import logging
import os
import sys


def plural(n: int, noun: str, plural_form: str = "") -> str:
    """``"1 image"``, ``"3 images"``: ``n`` and the noun in the right number (``plural_form`` when not +s)."""
    return f"{n} {noun if n == 1 else plural_form or noun + 's'}"


def is_main_process() -> bool:
    """True outside ``torchrun`` and on its rank 0."""
    return int(os.environ.get("RANK", "0")) == 0


def show_progress(*, json: bool = False, quiet: bool = False) -> bool:
    """Whether to draw progress bars (see the module docstring)."""
    return not (json or quiet) and sys.stderr.isatty() and is_main_process()


def setup_logging(*, json: bool = False, quiet: bool = False) -> None:
    """INFO lines on standard error, or only warnings under ``--json`` / ``--quiet``."""
    level = logging.WARNING if (json or quiet) else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(message)s")
    logging.getLogger("reid_ssl").setLevel(level)
