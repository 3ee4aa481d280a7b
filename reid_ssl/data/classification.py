"""Labelled image sets for the classification protocols (kNN, linear probe) and for Fashion-MNIST SSL.

* Fashion-MNIST from its IDX files (Debian ``dataset-fashion-mnist``: ``/usr/share/datasets/fashion-mnist/``).
* Any ImageNet-layout folder: ``<root>/train/<class>/*`` and ``<root>/val/<class>/*``.

Labels are returned only to the evaluation protocols, never to the SSL step.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import DTypeLike
from PIL import Image

from reid_ssl.errors import DatasetLayoutError, InputError, MissingFileError
from reid_ssl.fileio import require_file
from reid_ssl.images import list_images

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_IDX_DTYPES: dict[int, DTypeLike] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (MNIST format, optionally gzipped) as an array of its declared shape and dtype.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an IDX file, or truncated.
    """
    path = Path(path)
    require_file(path, "IDX file")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DatasetLayoutError(f"{path}: cannot read ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetLayoutError(f"{path}: not an IDX file (bad magic number)")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise DatasetLayoutError(f"{path}: {len(data)} bytes, the header promises {expected} (truncated?)")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def load_fashion_mnist(root: str | Path = FASHION_MNIST_ROOT, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images (N, 28, 28) uint8 and labels (N,) int64; ``split`` is ``"train"`` or ``"test"``."""
    if split not in ("train", "test"):
        raise InputError(f"split must be 'train' or 'test', got {split!r}")
    root, prefix = Path(root), "train" if split == "train" else "t10k"
    if not root.is_dir():
        raise MissingFileError(
            f"Fashion-MNIST folder not found: {root} (Debian: apt-get install dataset-fashion-mnist)"
        )
    images = read_idx(_idx_path(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_idx_path(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise DatasetLayoutError(f"{root}: {split} images {images.shape} and labels {labels.shape} do not match")
    return images, labels


def _idx_path(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise MissingFileError(f"expected {stem}.gz (or {stem}) in {root}")


def load_image_folder(root: str | Path, split: str) -> tuple[list[Path], np.ndarray, list[str]]:
    """ImageNet layout ``<root>/<split>/<class>/*``: image paths, labels (class index) and class names.

    Raises:
        FileNotFoundError: no ``<root>/<split>/`` folder or no class folder with images in it.
    """
    folder = Path(root) / split
    if not folder.is_dir():
        raise DatasetLayoutError(
            f"expected class folders in {folder} (ImageNet layout <root>/{split}/<class>/*); {folder} does not exist"
        )
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths: list[Path] = []
    labels: list[int] = []
    for i, name in enumerate(classes):
        files = list_images(folder / name)
        paths += files
        labels += [i] * len(files)
    if not paths:
        raise DatasetLayoutError(
            f"no images in class folders under {folder} (found: "
            f"{', '.join(sorted(p.name for p in folder.iterdir())[:8]) or 'nothing'})"
        )
    return paths, np.asarray(labels, dtype=np.int64), classes


def per_class_subset(labels: np.ndarray, limit: int | None, seed: int = 0) -> np.ndarray:
    """Indices of at most ``limit`` examples per class, chosen at random with ``seed`` (all when None)."""
    if limit is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:limit] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep))


@dataclass
class LabeledSet:
    """Images (paths or PIL images) and their class indices, one split of a classification dataset."""

    images: Sequence[Any]
    labels: np.ndarray  # (N,) int64 in [0, len(classes))
    classes: list[str]


def fashion_mnist_split(root: Path, split: str) -> LabeledSet:
    """Fashion-MNIST ``train`` or ``test`` as grey PIL images with labels."""
    images, labels = load_fashion_mnist(root, split)
    return LabeledSet([Image.fromarray(im, mode="L") for im in images], labels, list(FASHION_MNIST_CLASSES))


def image_folder_split(root: Path, split: str) -> LabeledSet:
    """ImageNet layout: ``train`` reads ``<root>/train/``, ``test`` reads ``<root>/val/``."""
    paths, labels, classes = load_image_folder(root, "train" if split == "train" else "val")
    return LabeledSet(paths, labels, classes)


def subset(data: LabeledSet, limit: int | None, seed: int = 0) -> LabeledSet:
    """At most ``limit`` examples per class (random, ``seed``); all when ``limit`` is None."""
    keep = per_class_subset(data.labels, limit, seed)
    return LabeledSet([data.images[i] for i in keep], data.labels[keep], data.classes)
