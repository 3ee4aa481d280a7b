"""Unlabeled image sources for self-supervised training (registered in :mod:`reid_ssl.data.datasets`).

Every source returns a list of :class:`SSLItem` (path, bag). The bag is a grouping by time (a PETS09
tracklet, a SYSU-30k folder, a sub-folder of an image folder), never an identity label; it is used only
when ``data.positives="bag"`` draws the second view from another image of the same bag. Sources whose
folders ARE labels (ImageNet classes, Market-1501 pids) give no bags, so labels never reach the SSL step.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reid_ssl.errors import DatasetLayoutError
from reid_ssl.fileio import display, list_path, read_list_file
from reid_ssl.images import is_image_name, is_junk_name, list_images

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SSLItem:
    """One training image: a file, or row ``index`` of an in-memory array (Fashion-MNIST); its bag or -1."""

    path: Path | None
    bag: int = -1
    index: int = -1


# ---------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BagStats:
    """What the bags (tracklets) of a source say about how many people it shows.

    Attributes:
        bags: number of bags: an upper bound on identities when every bag is one person.
        max_cooccurring: the most bags whose frame spans overlap at one frame (file stems read as frame
            numbers, one timeline): a person is in one place at a time, so at least this many different
            identities exist; 0 when the file names are not frame numbers.
    """

    bags: int
    max_cooccurring: int


def bag_stats(items: Sequence[SSLItem]) -> BagStats:
    """:class:`BagStats` of a list of items (bags from :func:`folder_source` and the like)."""
    spans: dict[int, list[int]] = {}
    numeric = True
    for it in items:
        if it.bag < 0:
            continue
        frame = it.path.stem if it.path is not None else ""
        if not frame.isdigit():
            numeric = False
            spans.setdefault(it.bag, [])
            continue
        lo_hi = spans.setdefault(it.bag, [int(frame), int(frame)])
        if lo_hi:
            lo_hi[0], lo_hi[1] = min(lo_hi[0], int(frame)), max(lo_hi[1], int(frame))
    if not numeric or not spans:
        return BagStats(len(spans), 0)
    events = sorted([(lo, 1) for lo, _ in spans.values()] + [(hi + 1, -1) for _, hi in spans.values()])
    best = current = 0
    for _, delta in events:
        current += delta
        best = max(best, current)
    return BagStats(len(spans), best)


def _expect_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        parent = path.parent
        found = sorted(p.name for p in parent.iterdir())[:10] if parent.is_dir() else []
        hint = f"; {parent} holds {found}" if parent.is_dir() else f"; {parent} does not exist either"
        raise DatasetLayoutError(f"expected {what} at {path}{hint}")
    return path


def _bagged_by_parent(paths: list[Path], root: Path) -> list[SSLItem]:
    bags: dict[Path, int] = {}
    items = []
    for p in paths:
        bag = bags.setdefault(p.parent.relative_to(root) if p.is_relative_to(root) else p.parent, len(bags))
        items.append(SSLItem(p, bag))
    return items


def folder_source(root: Path) -> list[SSLItem]:
    """Any folder of images, recursive; sub-folders are bags (e.g. one folder per tracklet)."""
    return _bagged_by_parent(list_images(_expect_dir(root, "an image folder")), root)


def list_source(root: Path, list_file: Path) -> list[SSLItem]:
    """A text file of image paths (one per line, relative to ``root`` unless absolute; extra columns such as
    labels are ignored); parent folders are bags. Lists from other systems are read as
    :func:`reid_ssl.fileio.read_list_file` describes.

    Raises:
        MissingFileError: no list file; DatasetLayoutError: a line that is not an image name (file and line named).
    """
    paths = []
    for n, line in read_list_file(list_file):
        entry = line.split()[0]
        if not is_image_name(entry):
            raise DatasetLayoutError(f"{list_file}:{n}: {display(entry)!r} is not an image file name")
        paths.append(list_path(root, entry))
    return _bagged_by_parent(paths, root)


def imagenet_source(root: Path) -> list[SSLItem]:
    """ImageNet ``train/<wnid>/*.JPEG`` (``root`` may be the dataset root or its ``train`` folder); no bags."""
    train = root / "train" if (root / "train").is_dir() else root
    folders = sorted(_expect_dir(train, "ImageNet train/<wnid>/ folders").iterdir())
    classes = [d for d in folders if d.is_dir() and not is_junk_name(d.name)]
    if not classes:
        raise DatasetLayoutError(f"expected class folders train/<wnid>/ under {train}, found none")
    return [SSLItem(p) for d in classes for p in list_images(d, recursive=False)]


def sysu30k_source(root: Path, list_file: Path | None = None) -> list[SSLItem]:
    """SYSU-30k train set: ``sysu_train_set_all/<10-digit folder>/*.jpg`` (docs/datasets.md).

    Uses ``meta/train.txt`` when present (paths relative to ``sysu_train_set_all/`` or to ``root``), else
    scans the folders. Folders are the bags. ``bag_level_label.json``, when present, is validated and
    its bag count logged; its labels are never used (the reference does not use them either).
    """
    train = _expect_dir(root / "sysu_train_set_all", "SYSU-30k sysu_train_set_all/")
    list_file = list_file or (root / "meta" / "train.txt")
    if list_file.is_file():
        lines = [line.split()[0] for _, line in read_list_file(list_file)]
        paths = [(train / ln) if (train / ln).exists() or not (root / ln).exists() else (root / ln) for ln in lines]
    else:
        paths = list_images(train)
    bag_file = root / "bag_level_label.json"
    if bag_file.is_file():
        try:
            records = json.loads(bag_file.read_text())
            n_bags = sum(1 for r in records if {"BagLabel", "BagID", "BagImages"} <= set(r))
        except (json.JSONDecodeError, TypeError) as e:
            raise DatasetLayoutError(f"{bag_file} is not a SYSU-30k bag label file: {e}") from None
        log.info("SYSU-30k: %d bag records in %s (labels unused)", n_bags, bag_file.name)
    return _bagged_by_parent(paths, train)


def reid_train_source(name: str, root: Path, train_dirs: Sequence[str]) -> list[SSLItem]:
    """The train images of a labeled re-ID set, WITHOUT their identities (no bags).

    Args:
        train_dirs: where the train folder may be, relative to ``root`` (the first that exists is read).
    """
    for rel in train_dirs:
        if (root / rel).is_dir():
            return [SSLItem(p) for p in list_images(root / rel)]
    raise DatasetLayoutError(
        f"{name}: expected one of {list(train_dirs)} under {root}; found "
        f"{sorted(p.name for p in root.iterdir())[:10] if root.is_dir() else 'no such folder'}"
    )


def bags_source(root: Path, how: str) -> list[SSLItem]:
    """Tracklet bags written by ``reid_ssl prepare`` (pets09, video): ``<root>/train/<bag>/<frame>.jpg``.

    Args:
        how: the command that builds them, for the error message.
    """
    train = root / "train"
    if not train.is_dir():
        raise DatasetLayoutError(f"tracklet bags not found at {train}; build them with: {how}")
    return folder_source(train)


@functools.lru_cache(maxsize=2)
def fashion_mnist_images(root: str | Path) -> np.ndarray:
    """The 60,000 Fashion-MNIST training images (N, 28, 28) uint8; their labels are never returned."""
    from reid_ssl.data.classification import FASHION_MNIST_ROOT, load_fashion_mnist

    return load_fashion_mnist(root if str(root) not in ("", ".") else FASHION_MNIST_ROOT, "train")[0]


def fashion_mnist_source(root: Path) -> list[SSLItem]:
    """Fashion-MNIST training images as in-memory items (``root``: the folder of the idx files); no bags."""
    return [SSLItem(None, -1, i) for i in range(len(fashion_mnist_images(root)))]


