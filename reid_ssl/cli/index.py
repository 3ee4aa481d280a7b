"""`reid_ssl index build|add|remove|search|info|calibrate`: the persistent FAISS gallery (reid_ssl/index/).

`index build` runs under torchrun too: each rank embeds a shard of the gallery (gloo on CPU, NCCL on GPU)
and rank 0 merges the shards into one index::

    torchrun --nproc_per_node 2 -m reid_ssl.cli index build --checkpoint C --images DIR --out IDX

Camera ids are 0-based everywhere (file name c1 = camid 0). Paths whose bytes are not UTF-8 are indexed as they
are and printed with \\xNN escapes (``--json`` keeps Python's surrogate escapes, which round-trip exactly).
"""

from __future__ import annotations

import argparse

from reid_ssl.cli import index_build, index_search, index_update
from reid_ssl.cli.common import add_parser
from reid_ssl.cli.index_search import MAX_K, shortfall_hint

__all__ = ["MAX_K", "register", "shortfall_hint"]


DESCRIPTION = """\
A persistent FAISS gallery index of person crops: build it from a folder or data set, add and remove images
(ids never change), search it with query crops, calibrate its "no match" threshold, describe it.
Camera ids are 0-based everywhere (file name c1 = camid 0). Paths whose bytes are not UTF-8 are indexed as they
are and printed with \\xNN escapes (--json keeps Python's surrogate escapes, which round-trip exactly).
`reid_ssl index <action> --help` explains each action."""

EPILOG = """\
examples:
  reid_ssl index build --checkpoint runs/pets09_r18/checkpoint.pt --images pets09 --out runs/pets09_r18/gallery
  reid_ssl index search --query crop.jpg -k 5
  reid_ssl index add new_crops/
  reid_ssl index info"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``index`` and its actions to the top-level parser (one module per group of actions)."""
    p = add_parser(
        subparsers, "index", "build, update and search a persistent FAISS gallery index", DESCRIPTION, EPILOG
    )
    sub = p.add_subparsers(dest="index_command", metavar="<action>", required=True)
    index_build.register(sub)
    index_update.register(sub)
    index_search.register(sub)
