"""The ``reid_ssl`` command line: one module per command (``reid_ssl/cli/<command>.py``).

Each command module exposes ``register(subparsers)``; its handler takes the parsed ``argparse.Namespace``
and returns an exit code. Heavy libraries are imported inside handlers, so ``reid_ssl --help`` is instant.
"""

from reid_ssl.cli.main import entry, main

__all__ = ["entry", "main"]
