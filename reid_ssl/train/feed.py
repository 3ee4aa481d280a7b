"""How training batches reach the step: from files (map-style, sampled) or streamed from tar shards.

Both feeds give the loop the same things: the number of images, the bag statistics (for ``loss.k=auto``),
the micro-batches of an epoch, how many optimizer steps the epoch takes, and the state a checkpoint needs to
resume in the middle of an epoch.

* :class:`FileFeed` (every source but ``shards``): a permutation per (seed, epoch) split across ranks and
  trimmed to whole batches (:class:`~reid_ssl.data.sampler.EpochSampler`); every rank takes the same number of
  batches; the resume state is the number of micro-batches done.
* :class:`ShardFeed` (``data.source=shards``): shards split across ranks and DataLoader workers
  (:class:`~reid_ssl.data.shards.ShardStream`); workers collate small chunks, the main process regroups them
  into batches of ``train.batch_size`` and merges a tail smaller than half a batch into the last batch, so
  every sample is trained exactly once per epoch. Ranks can get different numbers of batches (shards differ
  in size): the epoch runs under DDP's ``Join`` and takes as many optimizer steps as the busiest rank. The
  resume state is, per shard, how many samples of its shuffled order were trained on; every rank can compute
  every rank's share from the manifest, so checkpoints inside an epoch are taken only while all ranks train.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from reid_ssl.config import Config
from reid_ssl.data.augment import TwoViewDataset, two_view_dataset, view_pair
from reid_ssl.data.sampler import EpochSampler, SeededSamples
from reid_ssl.data.shards import ShardStream
from reid_ssl.data.ssl_sources import BagStats, bag_stats
from reid_ssl.distributed import Dist
from reid_ssl.errors import InputError

# (view A, view B, one line per replaced unreadable image, the images' positions in the source list)
log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, list[str], np.ndarray]
# What a shard-reading worker hands over: the Batch fields as collated tensors plus shard and position
Chunk = tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor, torch.Tensor, torch.Tensor]

# Loader workers run at this much lower CPU priority (``os.nice``) than the training process: when every core
# is busy (2 workers and 2 torch threads on 2 cores), a worker that takes a core from a torch thread stalls the
# others at their next barrier; at a lower priority it runs in the gaps. Scheduling only: batches are the same.
LOADER_WORKER_NICE = 10
# Samples a shard-reading worker collates before handing them to the main process.
SHARD_CHUNK = 16


def lower_worker_priority(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: :data:`LOADER_WORKER_NICE` (not permitted on some systems: a no-op)."""
    if LOADER_WORKER_NICE:
        with contextlib.suppress(OSError):
            os.nice(LOADER_WORKER_NICE)


def view_loader(
    dataset: TwoViewDataset, sampler: EpochSampler, workers: int, pin_memory: bool = False,
    generator: torch.Generator | None = None,
) -> DataLoader:  # fmt: skip
    """The training DataLoader over ``dataset`` in ``sampler``'s order, batches of ``sampler.batch_size``.

    In-process (``workers`` 0) the views draw from the global random streams; with workers every sample is
    seeded from its (seed, epoch, index) key (:class:`~reid_ssl.data.sampler.SeededSamples`) and the workers
    stay alive across epochs, at a lower CPU priority (:func:`lower_worker_priority`). The trainer's feed,
    the reference loop and the benchmarks that time the loader all build it here.
    """
    return DataLoader(
        dataset,
        batch_size=sampler.batch_size,
        sampler=SeededSamples(sampler) if workers else sampler,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        generator=generator,
        worker_init_fn=lower_worker_priority,
    )


class Feed(Protocol):
    """What the training loop needs from its data."""

    images: int
    stats: BagStats
    uneven: bool  # ranks may take different numbers of micro-batches in an epoch

    def smallest_batch(self, n: int) -> None:
        """Batches never hold fewer than ``n`` images (the loss's deputy window needs ``k_hi + 1`` negatives)."""
        ...

    def micro_batches(self, epoch: int) -> int:
        """Micro-batches of the busiest rank in a full ``epoch`` (what the step count is planned on)."""
        ...

    def start(self, epoch: int, state: dict[str, Any]) -> tuple[int, int]:
        """Begin ``epoch`` where ``state`` (from :meth:`state`) left it; returns (this rank's micro-batches
        still to come, the fewest any rank still has)."""
        ...

    def __iter__(self) -> Iterator[Batch]: ...

    def state(self, micro_done: int) -> dict[str, Any]:
        """The resume state after ``micro_done`` micro-batches of the current epoch (a collective for shards:
        every rank calls it at the same step)."""
        ...


class FileFeed:
    """Map-style: :class:`~reid_ssl.data.augment.TwoViewDataset` + :class:`EpochSampler` + a DataLoader."""

    uneven = False

    def __init__(self, cfg: Config, d: Dist, device: torch.device) -> None:
        self.dataset = two_view_dataset(cfg.data, cfg.augment)
        self.images, self.stats = len(self.dataset), bag_stats(self.dataset.items)
        self.positives = "bag" if self.dataset.bag_positives else "augment"
        self.sampler = EpochSampler(len(self.dataset), cfg.train.batch_size, cfg.train.seed, d.rank, d.world_size)
        # In-process (num_workers=0) the views draw from the global random streams, which the checkpoint
        # restores. Workers get (seed, epoch, index) keys and seed every sample from its key, so the views are
        # the same whatever the number of workers and wherever a resumed run restarts; the workers then stay
        # alive across epochs (restarted every epoch, the GPU check's loop reached 0.44 of its ceiling with
        # 16-step epochs against 0.68 inside one long epoch: docs/results.md section 12). A private generator
        # keeps epoch starts from drawing from the global streams; no view depends on its state.
        self.batch = cfg.train.batch_size
        workers, pin = cfg.data.num_workers, device.type == "cuda"
        self.loader = view_loader(self.dataset, self.sampler, workers, pin, torch.Generator())

    def smallest_batch(self, n: int) -> None:
        pass  # every batch is full (drop_last)

    def micro_batches(self, epoch: int) -> int:
        return self.sampler.batches_per_epoch()

    def start(self, epoch: int, state: dict[str, Any]) -> tuple[int, int]:
        done = int(state.get("batch_in_epoch", 0))
        self.sampler.set_epoch(epoch, done)
        left = self.sampler.batches_per_epoch() - done
        return left, left

    def __iter__(self) -> Iterator[Batch]:
        order = np.fromiter(iter(self.sampler), np.int64)  # the indices the loader's batches hold, in order
        for k, (v1, v2, bad) in enumerate(self.loader):
            yield v1, v2, bad, order[k * self.batch : (k + 1) * self.batch]

    def state(self, micro_done: int) -> dict[str, Any]:
        return {"batch_in_epoch": micro_done}


class ShardFeed:
    """Streamed: :class:`ShardStream` read by DataLoader workers in chunks, regrouped into batches here."""

    uneven = True

    def __init__(self, cfg: Config, d: Dist, device: torch.device) -> None:
        if cfg.data.max_images:
            raise InputError("data.max_images does not apply to data.source=shards; write a smaller shard set instead")
        if cfg.loss.gather_negatives and d.world_size > 1:
            raise InputError(
                "loss.gather_negatives needs the same batch size on every process at every step; shard streams give "
                "processes different numbers of batches. Turn it off, or train from files"
            )
        from reid_ssl.data.datasets import resolve_positives, resolve_root

        view_a, view_b = view_pair(cfg.data, cfg.augment)
        root = resolve_root(cfg.data.source, cfg.data.root)
        self.stream = ShardStream(root, view_a, view_b, seed=cfg.train.seed, rank=d.rank, world_size=d.world_size)
        manifest = self.stream.manifest
        self.positives = resolve_positives(cfg.data, (manifest.get("source") or {}).get("source"))
        self.stream.bag_positives = self.positives == "bag"
        stats = manifest.get("bag_stats") or {}
        self.images = self.stream.num_samples
        self.stats = BagStats(int(stats.get("bags", manifest.get("bags", 0))), int(stats.get("max_cooccurring", 0)))
        if self.positives == "bag" and not self.stats.bags:
            raise InputError(f"data.positives='bag': the shards in {root} carry no bags")
        self.d, self.batch = d, cfg.train.batch_size
        self.tail = min(self.batch, max(self.batch // 2, 2))  # a smaller tail joins the last batch
        self.rng, self.seed = torch.Generator(), cfg.train.seed
        self.loader = DataLoader(
            self.stream,
            batch_size=SHARD_CHUNK,
            num_workers=cfg.data.num_workers,
            pin_memory=device.type == "cuda",
            generator=self.rng,
            worker_init_fn=lower_worker_priority,
        )
        self.consumed: dict[int, int] = {}
        shares = self.stream.samples_per_rank(0, {})
        if min(shares) < self.batch:
            raise InputError(
                f"{root}: {len(manifest['shards'])} shards give a process only {min(shares)} images, fewer "
                f"than one batch of {self.batch}; write more, smaller shards (--samples-per-shard) "
                "or use fewer processes"
            )

    def smallest_batch(self, n: int) -> None:
        self.tail = min(self.batch, max(self.tail, n))

    def _batches(self, samples: int) -> int:
        full, rest = divmod(samples, self.batch)
        return full + (1 if rest >= self.tail else 0)

    def micro_batches(self, epoch: int) -> int:
        return max(self._batches(n) for n in self.stream.samples_per_rank(epoch, {}))

    def start(self, epoch: int, state: dict[str, Any]) -> tuple[int, int]:
        self.consumed = {int(k): int(v) for k, v in (state.get("consumed") or {}).items()}
        self.stream.set_epoch(epoch, self.consumed)
        self.rng.manual_seed(self.seed * 100_003 + epoch * 101 + self.d.rank)
        left = [self._batches(n) for n in self.stream.samples_per_rank(epoch, self.consumed)]
        return left[self.d.rank], min(left)

    def __iter__(self) -> Iterator[Batch]:
        """Batches of ``batch_size`` in arrival order; the epoch's tail joins the last batch when small."""
        parts: list[Chunk] = []
        held: list[Chunk] | None = None
        size = 0
        for chunk in self.loader:
            parts.append(chunk)
            size += len(chunk[3])
            while size >= self.batch:
                batch, parts, size = _split(parts, self.batch)
                if held is not None:
                    yield self._emit(held)
                held = batch
        if held is not None and 0 < size < self.tail:
            held, parts, size = held + parts, [], 0
        if held is not None:
            yield self._emit(held)
        if size >= self.tail:
            yield self._emit(parts)
        elif size:  # only after a resume near an epoch's end, or with shards far larger than the rest
            log.warning("process %d: %d images left in epoch %d, fewer than the smallest batch (%d); not trained",
                        self.d.rank, size, self.stream.epoch, self.tail)  # fmt: skip

    def _emit(self, parts: list[Chunk]) -> Batch:
        shards = torch.cat([p[3] for p in parts]).numpy()
        positions = torch.cat([p[4] for p in parts]).numpy()
        for shard in np.unique(shards):
            top = int(positions[shards == shard].max()) + 1
            self.consumed[int(shard)] = max(self.consumed.get(int(shard), 0), top)
        views = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return *views, [s for p in parts for s in p[2]], torch.cat([p[5] for p in parts]).numpy()

    def state(self, micro_done: int) -> dict[str, Any]:
        merged = dict(self.consumed)
        if self.d.world_size > 1 and dist.is_initialized():
            every: list[dict[int, int] | None] = [None] * self.d.world_size
            dist.all_gather_object(every, self.consumed)
            for part in every:
                for shard, n in (part or {}).items():
                    merged[shard] = max(merged.get(shard, 0), n)
        return {"batch_in_epoch": micro_done, "consumed": {str(k): v for k, v in sorted(merged.items())}}


def _split(parts: list[Any], n: int) -> tuple[list[Any], list[Any], int]:
    """The first ``n`` samples of the chunks ``parts`` as one list of chunks, the rest, and the rest's size."""
    head: list[Any] = []
    need = n
    rest = list(parts)
    while need:
        chunk = rest.pop(0)
        size = len(chunk[3])
        if size <= need:
            head.append(chunk)
            need -= size
        else:
            head.append(tuple(_slice(x, 0, need) for x in chunk))
            rest.insert(0, tuple(_slice(x, need, size) for x in chunk))
            need = 0
    return head, rest, sum(len(c[3]) for c in rest)


def _slice(x: Any, lo: int, hi: int) -> Any:
    return x[lo:hi]


def build_feed(cfg: Config, d: Dist, device: torch.device) -> FileFeed | ShardFeed:
    """The feed for ``cfg.data.source``: streamed for sources registered as streams, files otherwise."""
    from reid_ssl.data.datasets import DATASETS

    return ShardFeed(cfg, d, device) if DATASETS[cfg.data.source].stream else FileFeed(cfg, d, device)
