"""The two-view augmentation of BYOL and the dataset that yields view pairs for self-supervised training.

View A and view B differ in blur and solarization (docs/method.md, "Views"). With ``data.positives=bag`` the
second view comes from another image of the same bag (tracklet), the one place labels-free grouping enters.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import Dataset
from torchvision import transforms as T

from reid_ssl.checkpoint import IMAGENET_MEAN, IMAGENET_STD
from reid_ssl.data.image_list import ImageList
from reid_ssl.errors import ImageError, InputError
from reid_ssl.images import open_rgb

if TYPE_CHECKING:
    from reid_ssl.config import AugmentConfig, DataConfig


class RandomGaussianBlur:
    """PIL Gaussian blur with radius sigma ~ U[lo, hi], applied with probability ``p``."""

    def __init__(self, p: float, sigma: tuple[float, float]) -> None:
        self.p, self.sigma = p, sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class ToNormalizedTensor:
    """``T.ToTensor()`` then ``T.Normalize(mean, std)`` in one step, with the same float32 results bit for bit.

    The same operations in the same order (uint8 -> float32, / 255, - mean, / std) without the intermediate copy
    and the per-call checks of the two separate transforms; on small crops those checks cost more than the math.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if img.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {img.mode!r}")
        x = torch.from_numpy(np.array(img, np.uint8)).permute(2, 0, 1)
        return x.to(torch.float32, memory_format=torch.contiguous_format).div_(255).sub_(self.mean).div_(self.std)


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
            ToNormalizedTensor(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class TwoViewDataset(Dataset):
    """Yields ``(view_a, view_b, bad)``; ``bad`` holds one line per file that was replaced ('' when none).

    An unreadable image is replaced by another random item, so batches keep their size, and reported to
    the training loop, which counts it (``data.bad_images="skip"``) or stops (``"fail"``). Bags are kept as
    arrays (:meth:`ImageList.bag_members`), so a 30M-image source adds no Python object per image, and forked
    loader workers share them without copying.

    ``cache_bytes``: when the decoded images of a file source fit in this budget (estimated from the first 64),
    they are decoded once here, before the loader's workers fork, and every epoch reuses them instead of
    decoding each file again. The views are the same (decoding draws no random numbers, and the views never
    modify their input image in place); an unreadable file is not cached and fails at its turn as before.
    """

    def __init__(
        self,
        items: ImageList,
        view_a: T.Compose,
        view_b: T.Compose,
        bag_positives: bool,
        array: np.ndarray | None = None,
        cache_bytes: int = 0,
    ) -> None:
        self.items, self.view_a, self.view_b, self.array = items, view_a, view_b, array
        ids, self.offsets, self.order = items.bag_members()
        self.bag_of = np.full(len(items), -1, np.int64)  # each image's row in the CSR arrays, -1 without a bag
        self.bag_of[self.order] = np.repeat(np.arange(len(ids)), np.diff(self.offsets))
        if bag_positives and not len(ids):
            raise InputError(
                "data.positives='bag' needs a source with bags (folder or list with sub-folders, sysu30k, pets09, "
                "video); images directly in data.root are in no bag: use data.positives=augment"
            )
        self.bag_positives = bag_positives
        self.decoded: dict[int, Image.Image] = self._decode_all(cache_bytes) if cache_bytes else {}

    def _decode_all(self, budget: int) -> dict[int, Image.Image]:
        """Every readable file decoded, if the estimate from the first 64 fits ``budget`` bytes; else nothing."""
        if not len(self.items) or self.items.in_memory:
            return {}
        decoded: dict[int, Image.Image] = {}
        used = 0
        for i in range(len(self.items)):
            path = self.items.path(i)
            assert path is not None
            try:
                decoded[i] = open_rgb(path)
            except ImageError:
                continue
            used += decoded[i].width * decoded[i].height * 4  # PIL keeps RGB as 4 bytes per pixel
            if (i + 1 == min(64, len(self.items)) and used / (i + 1) * len(self.items) > budget) or used > budget:
                return {}
        return decoded

    def __len__(self) -> int:
        return len(self.items)

    def _open(self, i: int) -> Image.Image:
        cached = self.decoded.get(i)
        if cached is not None:
            return cached
        if self.items.in_memory:
            assert self.array is not None, "in-memory items need the dataset's array"
            return Image.fromarray(self.array[i]).convert("RGB")
        path = self.items.path(i)
        assert path is not None
        return open_rgb(path)

    def _partner(self, i: int) -> int:
        b = self.bag_of[i] if self.bag_positives else -1
        if b < 0:
            return i
        return int(self.order[random.randrange(self.offsets[b], self.offsets[b + 1])])

    def __getitem__(self, key: int | tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor, str]:
        """The views of image ``key``; a ``(seed, epoch, index)`` key (:class:`~reid_ssl.data.sampler.SeededSamples`,
        in loader workers) first seeds Python's and torch's random streams from that triple, so the views are
        a function of it alone. An ``int`` key draws from the streams as they are (in-process loading, whose
        streams the checkpoint restores)."""
        if isinstance(key, tuple):
            seed_sample(*key)
            i = key[2]
        else:
            i = key
        reasons: list[str] = []
        for _ in range(10):
            j = self._partner(i)
            try:
                first = self._open(i)
                second = first if j == i else self._open(j)
                return self.view_a(first), self.view_b(second), "\n".join(reasons)
            except ImageError as e:
                reasons.append(str(e))
                i = random.randrange(len(self.items))
        raise ImageError(f"10 unreadable images in a row, last: {reasons[-1]}")


def seed_sample(seed: int, epoch: int, index: int) -> None:
    """Seed this process's Python and torch random streams from (run seed, epoch, image index)."""
    state = int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0])
    random.seed(state)
    # the CPU generator alone: torch.manual_seed would also queue a CUDA seeding (with a stack trace) in a
    # process without CUDA, e.g. a loader worker of a CPU run, for every sample; the views use the CPU one only
    torch.default_generator.manual_seed(state)


# Decoded training images are kept in memory when all of them fit in this many bytes (PETS09's crops: ~50 MB).
DECODE_CACHE_BYTES = 256 * 2**20


def view_pair(data: DataConfig, aug: AugmentConfig) -> tuple[T.Compose, T.Compose]:
    """The view-A and view-B pipelines at the training size ``data.height`` x ``data.width``."""
    view_a = view_transform(aug, data.height, data.width, aug.blur_a, aug.solarize_a)
    view_b = view_transform(aug, data.height, data.width, aug.blur_b, aug.solarize_b)
    return view_a, view_b


def two_view_dataset(data: DataConfig, aug: AugmentConfig, items: ImageList | None = None) -> TwoViewDataset:
    """Items of the configured source wrapped with the view-A / view-B pipelines."""
    from reid_ssl.data.datasets import build_source, resolve_positives, source_array

    items = items if items is not None else build_source(data)
    view_a, view_b = view_pair(data, aug)
    array = source_array(data)
    bags = resolve_positives(data) == "bag"
    return TwoViewDataset(items, view_a, view_b, bag_positives=bags, array=array, cache_bytes=DECODE_CACHE_BYTES)
