"""Training views: the fast paths (fused to-tensor, decoded-image cache) give the same tensors as the plain code."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from reid_ssl.checkpoint import IMAGENET_MEAN, IMAGENET_STD
from reid_ssl.data.augment import ToNormalizedTensor, TwoViewDataset, view_transform
from reid_ssl.data.image_list import scan_folder
from tests.helpers import write_person_image


def test_to_normalized_tensor_equals_to_tensor_then_normalize():
    reference = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    fused = ToNormalizedTensor(IMAGENET_MEAN, IMAGENET_STD)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(64, 32), (1, 1), (33, 17)]]
    images.append(Image.fromarray(np.stack([np.arange(256, dtype=np.uint8).reshape(16, 16)] * 3, -1)))  # every value
    for im in images:
        a, b = reference(im), fused(im)
        assert a.dtype == b.dtype == torch.float32 and b.is_contiguous() and torch.equal(a, b)
    with pytest.raises(ValueError, match="RGB"):
        fused(images[0].convert("L"))


def _views(ds: TwoViewDataset, seed: int) -> list[tuple[torch.Tensor, torch.Tensor, str]]:
    random.seed(seed)
    torch.manual_seed(seed)
    return [ds[i] for i in range(len(ds))]


@pytest.mark.parametrize("bags", [False, True])
def test_decoded_image_cache_gives_the_same_views_and_the_same_failures(tmp_path, bags):
    from reid_ssl.config import AugmentConfig

    rng = np.random.default_rng(0)
    for i in range(12):
        write_person_image(tmp_path / f"{i // 3:02d}" / f"{i:02d}.jpg", i // 3, rng)
    (tmp_path / "01" / "05.jpg").write_bytes(b"not a jpeg")  # unreadable: not cached, replaced at its turn as before
    items = scan_folder(tmp_path)
    assert str(items.path(5)).endswith("05.jpg")
    aug = AugmentConfig()
    a, b = view_transform(aug, 32, 16, 1.0, 0.0), view_transform(aug, 32, 16, 0.1, 0.2)
    plain = TwoViewDataset(items, a, b, bag_positives=bags)
    cached = TwoViewDataset(items, a, b, bag_positives=bags, cache_bytes=2**20)
    assert len(cached.decoded) == 11 and 5 not in cached.decoded and not plain.decoded
    for seed in (0, 1):
        for x, y in zip(_views(plain, seed), _views(cached, seed), strict=True):
            assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2]
    assert "05.jpg" in _views(cached, 0)[5][2]
    assert not TwoViewDataset(items, a, b, bag_positives=bags, cache_bytes=1000).decoded  # over budget: no cache


def test_a_seeded_key_gives_views_that_depend_on_the_key_alone(tmp_path):
    """(seed, epoch, index) keys (loader workers) fix a sample's views whatever was drawn before; another epoch
    or seed gives other views; the sampler hands out the epoch sampler's indices as such keys."""
    from reid_ssl.config import AugmentConfig
    from reid_ssl.data.sampler import EpochSampler, SeededSamples

    rng = np.random.default_rng(0)
    for i in range(8):
        write_person_image(tmp_path / f"{i // 2:02d}" / f"{i:02d}.jpg", i // 2, rng)
    aug = AugmentConfig()
    ds = TwoViewDataset(scan_folder(tmp_path), view_transform(aug, 32, 16, 1.0, 0.0),
                        view_transform(aug, 32, 16, 0.1, 0.2), bag_positives=True)  # fmt: skip
    first = ds[(7, 1, 3)]
    torch.rand(5), random.random(), ds[(7, 1, 4)]  # other draws in between change nothing
    again = ds[(7, 1, 3)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], ds[(7, 2, 3)][0]) and not torch.equal(first[0], ds[(8, 1, 3)][0])
    epochs = EpochSampler(8, 2, seed=7)
    epochs.set_epoch(3, start_batch=1)
    assert list(SeededSamples(epochs)) == [(7, 3, i) for i in epochs] and len(SeededSamples(epochs)) == 6
    live = iter(SeededSamples(epochs))
    next(live)
    epochs.set_epoch(4)  # a running epoch keeps its number with its order
    assert {key[1] for key in live} == {3}
