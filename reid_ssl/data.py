"""Unlabeled image sources and the two-view augmentation for self-supervised training.

Every source returns a list of :class:`SSLItem` (path, bag). The bag is a grouping by time (a PETS09
tracklet, a SYSU-30k folder, a sub-folder of an image folder), never an identity label; it is used only
when ``data.positives="bag"`` draws the second view from another image of the same bag. Sources whose
folders ARE labels (ImageNet classes, Market-1501 pids) give no bags, so labels never reach the SSL step.
"""

from __future__ import annotations

import functools
import json
import logging
import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import Dataset, Sampler
from torchvision import transforms as T

from reid_ssl.checkpoint import IMAGENET_MEAN, IMAGENET_STD
from reid_ssl.config import AugmentConfig, DataConfig
from reid_ssl.images import ImageError, is_image_name, list_images, open_rgb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SSLItem:
    path: Path | None  # None: the image is row ``index`` of an in-memory array (Fashion-MNIST)
    bag: int = -1  # -1: no bag known
    index: int = -1


class LayoutError(FileNotFoundError):
    """A dataset root that does not have the expected layout."""


# ---------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------


def _expect_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        parent = path.parent
        found = sorted(p.name for p in parent.iterdir())[:10] if parent.is_dir() else []
        hint = f"; {parent} holds {found}" if parent.is_dir() else f"; {parent} does not exist either"
        raise LayoutError(f"expected {what} at {path}{hint}")
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
    """A text file of image paths (one per line, relative to ``root`` unless absolute); parent folders are bags."""
    if not list_file.is_file():
        raise FileNotFoundError(f"list file not found: {list_file}")
    paths = []
    for n, line in enumerate(list_file.read_text().splitlines(), 1):
        line = line.strip().split()[0] if line.strip() else ""
        if not line or line.startswith("#"):
            continue
        if not is_image_name(line):
            raise ValueError(f"{list_file}:{n}: {line!r} is not an image file name")
        paths.append(root / line)
    return _bagged_by_parent(paths, root)


def imagenet_source(root: Path) -> list[SSLItem]:
    """ImageNet ``train/<wnid>/*.JPEG`` (``root`` may be the dataset root or its ``train`` folder); no bags."""
    train = root / "train" if (root / "train").is_dir() else root
    classes = [d for d in sorted(_expect_dir(train, "ImageNet train/<wnid>/ folders").iterdir()) if d.is_dir()]
    if not classes:
        raise LayoutError(f"expected class folders train/<wnid>/ under {train}, found none")
    return [SSLItem(p) for d in classes for p in sorted(d.iterdir()) if is_image_name(p.name)]


def sysu30k_source(root: Path, list_file: Path | None = None) -> list[SSLItem]:
    """SYSU-30k train set: ``sysu_train_set_all/<10-digit folder>/*.jpg`` (method.md §3.2).

    Uses ``meta/train.txt`` when present (paths relative to ``sysu_train_set_all/`` or to ``root``), else
    scans the folders. Folders are the bags. ``bag_level_label.json``, when present, is validated and
    its bag count logged; its labels are never used (the reference does not use them either, §3.6).
    """
    train = _expect_dir(root / "sysu_train_set_all", "SYSU-30k sysu_train_set_all/")
    list_file = list_file or (root / "meta" / "train.txt")
    if list_file.is_file():
        lines = [ln.strip() for ln in list_file.read_text().splitlines() if ln.strip()]
        paths = [(train / ln) if (train / ln).exists() or not (root / ln).exists() else (root / ln) for ln in lines]
    else:
        paths = list_images(train)
    bag_file = root / "bag_level_label.json"
    if bag_file.is_file():
        try:
            records = json.loads(bag_file.read_text())
            n_bags = sum(1 for r in records if {"BagLabel", "BagID", "BagImages"} <= set(r))
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{bag_file} is not a SYSU-30k bag label file: {e}") from None
        log.info("SYSU-30k: %d bag records in %s (labels unused)", n_bags, bag_file.name)
    return _bagged_by_parent(paths, train)


_TRAIN_DIRS = {
    "market1501": (
        "Market-1501-v15.09.15/bounding_box_train",
        "market1501/bounding_box_train",
        "bounding_box_train",
    ),
    "dukemtmcreid": (
        "DukeMTMC-reID/bounding_box_train",
        "dukemtmc-reid/DukeMTMC-reID/bounding_box_train",
        "bounding_box_train",
    ),
    "msmt17": (
        "MSMT17_V1/train",
        "MSMT17_V2/mask_train_v2",
        "msmt17/MSMT17_V1/train",
        "msmt17/MSMT17_V2/mask_train_v2",
        "train",
    ),
}


def reid_train_source(name: str, root: Path) -> list[SSLItem]:
    """The train images of a labeled re-ID set, WITHOUT their identities (no bags)."""
    for rel in _TRAIN_DIRS[name]:
        if (root / rel).is_dir():
            return [SSLItem(p) for p in list_images(root / rel)]
    raise LayoutError(
        f"{name}: expected one of {list(_TRAIN_DIRS[name])} under {root}; found "
        f"{sorted(p.name for p in root.iterdir())[:10] if root.is_dir() else 'no such folder'}"
    )


def pets09_source(root: Path) -> list[SSLItem]:
    """PETS09-S2L1 tracklet crops written by ``reid_ssl prepare pets09``: ``train/<track>/<frame>.jpg``."""
    train = root / "train"
    if not train.is_dir():
        raise LayoutError(
            f"PETS09 crops not found at {train}; build them with: reid_ssl prepare pets09 --fetch --out {root}"
        )
    return folder_source(train)


@functools.lru_cache(maxsize=2)
def fashion_mnist_images(root: str) -> np.ndarray:
    """The 60,000 Fashion-MNIST training images (N, 28, 28) uint8; their labels are never returned."""
    from reid_ssl.classify import FASHION_MNIST_ROOT, load_fashion_mnist

    return load_fashion_mnist(root if root not in ("", ".") else FASHION_MNIST_ROOT, "train")[0]


def fashion_mnist_source(root: Path) -> list[SSLItem]:
    """Fashion-MNIST training images as in-memory items (``root``: the folder of the idx files); no bags."""
    return [SSLItem(None, -1, i) for i in range(len(fashion_mnist_images(str(root))))]


def build_source(cfg: DataConfig) -> list[SSLItem]:
    """The items of ``cfg.source``; files that are empty or not named like images are dropped (and counted)."""
    root = Path(cfg.root)
    if cfg.source == "folder":
        items = folder_source(root)
    elif cfg.source == "list":
        items = list_source(root, Path(cfg.list_file))
    elif cfg.source == "imagenet":
        items = imagenet_source(root)
    elif cfg.source == "sysu30k":
        items = sysu30k_source(root, Path(cfg.list_file) if cfg.list_file else None)
    elif cfg.source == "pets09":
        items = pets09_source(root)
    elif cfg.source == "fashion_mnist":
        items = fashion_mnist_source(root)
    elif cfg.source in _TRAIN_DIRS:
        items = reid_train_source(cfg.source, root)
    else:
        raise KeyError(f"unknown data source {cfg.source!r}")
    if cfg.max_images and len(items) > cfg.max_images:
        keep = sorted(random.Random(0).sample(range(len(items)), cfg.max_images))
        items = [items[i] for i in keep]
    if not items:
        raise ValueError(f"no images found for data.source={cfg.source!r} under {root}")
    return items


# ---------------------------------------------------------------------------------------------------------
# Two-view augmentation (method.md §2.7)
# ---------------------------------------------------------------------------------------------------------


class RandomGaussianBlur:
    """PIL Gaussian blur with radius sigma ~ U[lo, hi], applied with probability ``p``."""

    def __init__(self, p: float, sigma: tuple[float, float]) -> None:
        self.p, self.sigma = p, sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class RandomSolarize:
    """Invert pixels >= 128 with probability ``p``."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img, 128) if random.random() < self.p else img


def view_transform(aug: AugmentConfig, height: int, width: int, blur: float, solarize: float) -> T.Compose:
    """One BYOL view: crop, flip, colour jitter, grey, blur, solarize, tensor, ImageNet normalisation.

    The crop's aspect-ratio range is taken relative to the output aspect (W/H), so pedestrian crops stay
    upright; the blur radius scales with the output height (the reference's U[0.1, 2.0] at 224 px).
    """
    aspect = width / height
    ratio = (aug.crop_ratio[0] * aspect, aug.crop_ratio[1] * aspect)
    sigma_scale = height / 224
    return T.Compose(
        [
            T.RandomResizedCrop(
                (height, width), scale=aug.crop_scale, ratio=ratio, interpolation=T.InterpolationMode.BICUBIC
            ),
            T.RandomHorizontalFlip(aug.flip),
            T.RandomApply([T.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue)], p=aug.jitter_prob),
            T.RandomGrayscale(aug.grayscale),
            RandomGaussianBlur(blur, (0.1 * sigma_scale, 2.0 * sigma_scale)),
            RandomSolarize(solarize),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class TwoViewDataset(Dataset):
    """Yields ``(view_a, view_b, bad)``; ``bad`` holds one line per file that was replaced ('' when none).

    An unreadable image is replaced by another random item, so batches keep their size, and reported to
    the training loop, which counts it (``data.bad_images="skip"``) or stops (``"fail"``).
    """

    def __init__(
        self,
        items: list[SSLItem],
        view_a: T.Compose,
        view_b: T.Compose,
        bag_positives: bool,
        array: np.ndarray | None = None,
    ) -> None:
        self.items, self.view_a, self.view_b, self.array = items, view_a, view_b, array
        self.bags: dict[int, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            if item.bag >= 0:
                self.bags[item.bag].append(i)
        if bag_positives and not self.bags:
            raise ValueError("data.positives='bag' needs a source with bags (folder, list, sysu30k, pets09)")
        self.bag_positives = bag_positives

    def __len__(self) -> int:
        return len(self.items)

    def _open(self, item: SSLItem) -> Image.Image:
        if item.path is None:
            assert self.array is not None, "in-memory items need the dataset's array"
            return Image.fromarray(self.array[item.index]).convert("RGB")
        return open_rgb(item.path)

    def _partner(self, i: int) -> int:
        bag = self.bags.get(self.items[i].bag) if self.bag_positives else None
        return random.choice(bag) if bag else i

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        reasons = []
        for _ in range(10):
            j = self._partner(i)
            try:
                first = self._open(self.items[i])
                second = first if j == i else self._open(self.items[j])
                return self.view_a(first), self.view_b(second), "\n".join(reasons)
            except ImageError as e:
                reasons.append(str(e))
                i = random.randrange(len(self.items))
        raise ImageError(f"10 unreadable images in a row, last: {reasons[-1]}")


def two_view_dataset(data: DataConfig, aug: AugmentConfig, items: list[SSLItem] | None = None) -> TwoViewDataset:
    """Items of the configured source wrapped with the view-A / view-B pipelines."""
    items = items if items is not None else build_source(data)
    view_a = view_transform(aug, data.height, data.width, aug.blur_a, aug.solarize_a)
    view_b = view_transform(aug, data.height, data.width, aug.blur_b, aug.solarize_b)
    array = fashion_mnist_images(data.root) if data.source == "fashion_mnist" else None
    return TwoViewDataset(items, view_a, view_b, bag_positives=data.positives == "bag", array=array)


# ---------------------------------------------------------------------------------------------------------
# Deterministic, resumable, shardable sampling
# ---------------------------------------------------------------------------------------------------------


class EpochSampler(Sampler[int]):
    """A permutation fixed by (seed, epoch), split across ranks, trimmed to whole batches, resumable.

    Rank ``r`` of ``w`` takes every w-th index of the permutation starting at ``r``; ``start`` skips the
    first samples of this rank's share (resume in the middle of an epoch).
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world_size
        self.epoch, self.start = 0, 0
        if self.batches_per_epoch() < 1:
            raise ValueError(f"{n} images are fewer than one batch of {batch_size} x {world_size} process(es)")

    def batches_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch * self.batch_size

    def __iter__(self) -> Iterator[int]:
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        share = perm[self.rank :: self.world][: self.batches_per_epoch() * self.batch_size]
        return iter(share[self.start :].tolist())

    def __len__(self) -> int:
        return self.batches_per_epoch() * self.batch_size - self.start
