"""Deterministic, resumable, shardable sampling of training images."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from reid_ssl.errors import InputError


class EpochSampler(Sampler[int]):
    """A permutation fixed by (seed, epoch), split across ranks, trimmed to whole batches, resumable.

    Rank ``r`` of ``w`` takes every w-th index of the permutation starting at ``r``; ``start`` skips the
    first samples of this rank's share (resume in the middle of an epoch).
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world_size
        self.epoch, self.start = 0, 0
        if self.batches_per_epoch() < 1:
            raise InputError(
                f"{n} images are fewer than one batch of {batch_size} x {world_size} process(es); "
                "lower train.batch_size"
            )

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


# The key a loader worker receives for one sample: (run seed, epoch, image index).
SampleKey = tuple[int, int, int]


class SeededSamples(Sampler[SampleKey]):
    """:class:`EpochSampler`'s indices as ``(seed, epoch, index)`` keys, for loader workers.

    :class:`~reid_ssl.data.augment.TwoViewDataset` seeds its random streams from such a key, so a sample's views
    depend on the run's seed, the epoch and the image alone: not on the number of workers, on which worker
    takes the sample, on what that worker drew before (workers stay alive across epochs), or on where a
    resumed run restarted.
    """

    def __init__(self, epochs: EpochSampler) -> None:
        self.epochs = epochs

    def __iter__(self) -> Iterator[SampleKey]:
        seed, epoch = self.epochs.seed, self.epochs.epoch  # fixed with the order, as the iterator starts
        return ((seed, epoch, i) for i in self.epochs)

    def __len__(self) -> int:
        return len(self.epochs)
