"""The benchmarks' one second training loop: a minimal loop on lightly's losses, EMA helper and schedule.

Why it exists: to check our trainer against an independent implementation. ``bench_peer_lightly`` compares
our BYOL / SimCLR training curves with this loop's (same model, data, sampler, optimizer, learning-rate
schedule and seeds; lightly's ``NegativeCosineSimilarity`` / ``NTXentLoss``, ``update_momentum`` and
``cosine_schedule``), and ``bench_throughput`` uses it as the like-for-like speed reference and to measure
the data-loading wait. It deliberately has no logging, checkpoints, resume, DDP or diagnostics: whatever
:func:`reid_ssl.train.loop.train` costs beyond it is overhead. Nothing outside the benchmarks may train
with it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from benchmarks.monitors import Monitor
from reid_ssl.config import Config
from reid_ssl.train.state import autocast_context, build_model, seed_everything


def lightly_loss(name: str, temperature: float) -> Callable[..., torch.Tensor]:
    """lightly's loss for ``name``, scaled to our training loss (the trainer sums both directions).

    * BYOL: ours per direction is ``mean(2 - 2 cos)``, lightly's ``NegativeCosineSimilarity`` is ``-mean(cos)``,
      so ``ours(p1, z2) + ours(p2, z1) = 4 + 2 * (ncs(p1, z2) + ncs(p2, z1))`` (values and gradients equal).
    * SimCLR: ours per direction averages N anchors; lightly's ``NTXentLoss(a, b)`` averages all 2N anchors of
      both views, so ``ours(a, b) + ours(b, a) = 2 * NTXentLoss(a, b)``. The loop passes the two views'
      projections (two forward passes), as lightly's SimCLR example does.

    Returns:
        ``f(p1, p2, z1, z2) -> loss`` (for SimCLR only ``p1``, ``p2`` are used).
    """
    from lightly.loss import NegativeCosineSimilarity, NTXentLoss

    if name == "byol":
        ncs = NegativeCosineSimilarity()
        return lambda p1, p2, z1, z2: 4.0 + 2.0 * (ncs(p1, z2) + ncs(p2, z1))
    if name == "simclr":
        ntx = NTXentLoss(temperature=temperature)
        return lambda p1, p2, z1, z2: 2.0 * ntx(p1, p2)
    raise KeyError(f"lightly has no loss for {name!r} here; the reference loop supports byol and simclr")


def reference_loop(
    cfg: Config, monitor: Monitor | None = None, max_steps: int = 0, on_step: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """A minimal training loop with lightly's loss and EMA helpers and our model, data and optimizer.

    Same seed, model (:func:`reid_ssl.train.build_model`), two-view data and sampler, optimizer and learning
    rate schedule as :func:`reid_ssl.train.train`; the loss is lightly's (:func:`lightly_loss`) and the target
    follows ``lightly.models.utils.update_momentum`` with ``lightly.utils.scheduler.cosine_schedule``. No
    logging, checkpoints or diagnostics. SimCLR (``model.target="shared"``) runs one forward pass per view.

    Returns:
        ``steps``, per-step ``step_end`` / ``data_wait`` seconds (from the loop start), per-epoch ``evals`` and
        ``epoch_loss``, and the final ``embedder``.
    """
    from lightly.models.utils import update_momentum
    from lightly.utils.scheduler import cosine_schedule

    from reid_ssl.checkpoint import make_preprocess
    from reid_ssl.data.augment import two_view_dataset
    from reid_ssl.data.sampler import EpochSampler
    from reid_ssl.embedder import Embedder, resolve_device
    from reid_ssl.optim import build_optimizer, warmup_cosine_lr
    from reid_ssl.train.feed import view_loader

    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    dataset = two_view_dataset(cfg.data, cfg.augment)
    sampler = EpochSampler(len(dataset), cfg.train.batch_size, cfg.train.seed)
    # the trainer's loader (sampling, per-sample seeding with workers): the very same views
    loader = view_loader(dataset, sampler, cfg.data.num_workers, device.type == "cuda")
    steps_per_epoch = sampler.batches_per_epoch()
    total = cfg.train.epochs * steps_per_epoch
    total = min(total, max_steps) if max_steps else total
    warmup = round(cfg.optim.warmup_epochs * steps_per_epoch)
    model = build_model(cfg).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(
        cfg.optim.name,
        [m for m in (model.backbone, model.projector, model.predictor) if m],
        cfg.optim.lr,
        cfg.optim.momentum,
        cfg.optim.weight_decay,
        cfg.optim.trust_coefficient,
    )
    criterion = lightly_loss(cfg.loss.name, cfg.loss.temperature)
    shared = cfg.model.target == "shared"
    preprocess = make_preprocess(cfg.data.eval_height, cfg.data.eval_width)

    step, epoch = 0, 0
    step_end: list[float] = []
    data_wait: list[float] = []
    evals: dict[int, dict[str, float]] = {}
    epoch_loss: dict[int, float] = {}
    t0 = time.perf_counter()
    while step < total:
        sampler.set_epoch(epoch)
        model.train()
        losses = []
        batches = iter(loader)
        while step < total:
            t_wait = time.perf_counter()
            try:
                v1, v2, _ = next(batches)
            except StopIteration:
                break
            data_wait.append(time.perf_counter() - t_wait)
            v1, v2 = v1.to(device, non_blocking=True), v2.to(device, non_blocking=True)
            if cfg.train.channels_last:
                v1 = v1.contiguous(memory_format=torch.channels_last)
                v2 = v2.contiguous(memory_format=torch.channels_last)
            with autocast_context(cfg.train.amp, device):
                if shared:
                    p1, p2 = model.online(v1), model.online(v2)
                    z1 = z2 = p1  # unused by NT-Xent
                else:
                    p1, p2, z1, z2 = model(v1, v2)
            loss = criterion(p1.float(), p2.float(), z1.float(), z2.float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine_lr(step, total, cfg.optim.lr, warmup, cfg.optim.warmup_start_factor)
            optimizer.step()
            if not shared:
                m = cosine_schedule(step, total, cfg.optim.ema_start, cfg.optim.ema_end)
                update_momentum(model.backbone, model.target_backbone, m)
                update_momentum(model.projector, model.target_projector, m)
            step += 1
            losses.append(float(loss.detach()))
            step_end.append(time.perf_counter() - t0)
            if on_step is not None:
                on_step(step)
        epoch += 1
        epoch_loss[epoch] = float(np.mean(losses)) if losses else math.nan
        if monitor is not None and step_end:
            model.eval()
            evals[epoch] = monitor(Embedder(model.backbone, preprocess, "reference", device=device))
    model.eval()
    return {
        "steps": step,
        "step_end": step_end,
        "data_wait": data_wait,
        "evals": evals,
        "epoch_loss": epoch_loss,
        "embedder": Embedder(model.backbone, preprocess, "reference", device=device, flip=False),
    }
