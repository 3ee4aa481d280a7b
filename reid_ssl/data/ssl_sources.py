"""Unlabeled image sources for self-supervised training (registered in :mod:`reid_ssl.data.datasets`).

Every source returns an :class:`~reid_ssl.data.image_list.ImageList` (paths and bags as arrays: a 30M-image
corpus costs about 45 bytes per image, shared by every DataLoader worker). The
bag is a grouping by time (a tracklet, a SYSU-30k folder, a sub-folder of an image folder), never an identity
label; it is used only when ``data.positives="bag"`` draws the second view from another image of the same bag,
and to estimate the number of identities for ``loss.k=auto``. Sources whose folders ARE labels (ImageNet
classes, Market-1501 pids) give no bags, so labels never reach the SSL step.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reid_ssl.data.image_list import ImageList, SSLItem, read_image_list, scan_folder
from reid_ssl.errors import DatasetLayoutError
from reid_ssl.images import is_junk_name

log = logging.getLogger(__name__)

__all__ = ["BagStats", "ImageList", "SSLItem", "bag_stats", "folder_source", "list_source"]


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


def bag_stats(items: ImageList) -> BagStats:
    """:class:`BagStats` of an image list (vectorised: file stems parsed as frame numbers in numpy)."""
    has = items.bags >= 0
    n_bags = len(np.unique(items.bags[has]))
    if items.in_memory or not has.any():
        return BagStats(n_bags, 0)
    frames = _stem_numbers(items)
    if frames is None:
        return BagStats(n_bags, 0)
    bags, frames = items.bags[has], frames[has]
    ids = np.unique(bags, return_inverse=True)[1]
    lo = np.full(ids.max() + 1, np.iinfo(np.int64).max)
    hi = np.full(ids.max() + 1, -1, np.int64)
    np.minimum.at(lo, ids, frames)
    np.maximum.at(hi, ids, frames)
    events = np.concatenate([np.stack([lo, np.ones_like(lo)], 1), np.stack([hi + 1, -np.ones_like(hi)], 1)])
    events = events[np.lexsort((events[:, 1], events[:, 0]))]  # at one frame, ends before starts
    return BagStats(n_bags, int(np.cumsum(events[:, 1]).max()))


def _stem_numbers(items: ImageList) -> np.ndarray | None:
    """Each file's stem (name without folder and extension) as an integer, or None if one is not all digits."""
    buf = items.blob
    stem_start = _last_before(np.flatnonzero(buf == 47), items.starts, items.ends, items.starts - 1) + 1
    stem_end = _last_before(np.flatnonzero(buf == 46), stem_start, items.ends, items.ends)
    length = stem_end - stem_start
    if (length < 1).any() or (length > 15).any():
        return None
    width = int(length.max())
    cols = np.arange(width)
    digits = buf[np.minimum(stem_start[:, None] + cols, len(buf) - 1)].astype(np.int64) - 48
    valid = cols[None, :] < length[:, None]
    if ((digits < 0) | (digits > 9))[valid].any():
        return None
    power = 10 ** np.maximum(length[:, None] - 1 - cols, 0)
    return (np.where(valid, digits, 0) * np.where(valid, power, 0)).sum(axis=1)


def _last_before(marks: np.ndarray, lo: np.ndarray, hi: np.ndarray, default: np.ndarray) -> np.ndarray:
    """Per row, the last position in ``marks`` within [lo, hi), else ``default``."""
    if not len(marks):
        return default
    k = np.searchsorted(marks, hi) - 1
    pos = marks[np.maximum(k, 0)]
    return np.where((k >= 0) & (pos >= lo), pos, default)


def _expect_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        parent = path.parent
        found = sorted(p.name for p in parent.iterdir())[:10] if parent.is_dir() else []
        hint = f"; {parent} holds {found}" if parent.is_dir() else f"; {parent} does not exist either"
        raise DatasetLayoutError(f"expected {what} at {path}{hint}")
    return path


def folder_source(root: Path) -> ImageList:
    """Any folder of images, recursive; each sub-folder holding images is a bag (e.g. one folder per tracklet),
    images directly in ``root`` are in none (a flat folder has no bags)."""
    return scan_folder(_expect_dir(root, "an image folder"))


def list_source(root: Path, list_file: Path) -> ImageList:
    """A text file of image paths (one per line, relative to ``root`` unless absolute; further columns such as
    labels are ignored); each entry's folder is its bag (an entry without a folder is in none). Lists from other
    systems (BOM, CRLF, Latin-1 names, Windows separators) are read as
    :func:`reid_ssl.data.image_list.read_image_list` describes.

    Raises:
        MissingFileError: no list file; DatasetLayoutError: a line that is not an image name (file and line named).
    """
    return read_image_list(list_file, root)


def imagenet_source(root: Path) -> ImageList:
    """ImageNet ``train/<wnid>/*.JPEG`` (``root`` may be the dataset root or its ``train`` folder); no bags."""
    train = root / "train" if (root / "train").is_dir() else root
    folders = sorted(_expect_dir(train, "ImageNet train/<wnid>/ folders").iterdir())
    if not any(d.is_dir() and not is_junk_name(d.name) for d in folders):
        raise DatasetLayoutError(f"expected class folders train/<wnid>/ under {train}, found none")
    return scan_folder(train, bags=False)


def sysu30k_source(root: Path, list_file: Path | None = None) -> ImageList:
    """SYSU-30k train set: ``sysu_train_set_all/<10-digit folder>/*.jpg`` (datasets/README.md).

    Uses ``meta/train.txt`` when present (paths relative to ``sysu_train_set_all/`` or to ``root``: the first
    entry decides, one ``stat`` in all), else scans the folders. Folders are the bags.
    ``bag_level_label.json``, when present, is validated and its bag count logged; its labels are never used
    (the reference does not use them either).
    """
    train = _expect_dir(root / "sysu_train_set_all", "SYSU-30k sysu_train_set_all/")
    list_file = list_file or (root / "meta" / "train.txt")
    if list_file.is_file():
        items = read_image_list(list_file, train)
        first = items.path(0) if len(items) else None  # never None for a list file (not in memory)
        if (
            first is not None
            and not first.exists()
            and (root / os.fsdecode(items.blob[items.starts[0] : items.ends[0]].tobytes())).exists()
        ):
            items.root = root
    else:
        items = scan_folder(train)
    bag_file = root / "bag_level_label.json"
    if bag_file.is_file():
        try:
            records = json.loads(bag_file.read_text())
            n_bags = sum(1 for r in records if {"BagLabel", "BagID", "BagImages"} <= set(r))
        except (json.JSONDecodeError, TypeError) as e:
            raise DatasetLayoutError(f"{bag_file} is not a SYSU-30k bag label file: {e}") from None
        log.info("SYSU-30k: %d bag records in %s (labels unused)", n_bags, bag_file.name)
    return items


def reid_train_source(name: str, root: Path, train_dirs: Sequence[str]) -> ImageList:
    """The train images of a labeled re-ID set, WITHOUT their identities (no bags).

    Args:
        train_dirs: where the train folder may be, relative to ``root`` (the first that exists is read).
    """
    for rel in train_dirs:
        if (root / rel).is_dir():
            return scan_folder(root / rel, bags=False)
    raise DatasetLayoutError(
        f"{name}: expected one of {list(train_dirs)} under {root}; found "
        f"{sorted(p.name for p in root.iterdir())[:10] if root.is_dir() else 'no such folder'}"
    )


def bags_source(root: Path, how: str) -> ImageList:
    """Tracklet bags written by ``reid_ssl prepare`` (pets09, video): ``<root>/train/<bag>/<frame>.jpg``.

    Args:
        how: the command that builds them, for the error message.
    """
    train = root / "train"
    if not train.is_dir():
        raise DatasetLayoutError(f"tracklet bags not found at {train}; build them with: {how}")
    return scan_folder(train)


@functools.lru_cache(maxsize=2)
def fashion_mnist_images(root: str | Path) -> np.ndarray:
    """The 60,000 Fashion-MNIST training images (N, 28, 28) uint8; their labels are never returned."""
    from reid_ssl.data.classification import FASHION_MNIST_ROOT, load_fashion_mnist

    return load_fashion_mnist(root if str(root) not in ("", ".") else FASHION_MNIST_ROOT, "train")[0]


def fashion_mnist_source(root: Path) -> ImageList:
    """Fashion-MNIST training images as rows of an in-memory array (``root``: the folder of the idx files)."""
    return ImageList.in_memory_rows(len(fashion_mnist_images(root)))
