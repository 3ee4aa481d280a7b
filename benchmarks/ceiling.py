"""The training loop against its ceiling, measured in one process.

**Ceiling**: the same model's forward (both views through the online network), target forward, backward and
optimizer step on synthetic tensors of the training batch's shape, with the trainer's precision,
``channels_last`` and ``compile`` settings: what the hardware does when nothing but the network runs.
**Real**: :func:`reid_ssl.train.train` with the same config (data pipeline, loss, EMA, logging, checkpoints,
all as configured; pass ``train.eval_dataset=""`` for "monitor off"). Their ratio is the loop's efficiency:
1.0 would mean the data pipeline, loss, EMA update, logging and checkpoints cost nothing.

Both are steady-state rates: images of the steps after a warm-up divided by their wall time (a timed window of
the real loop should span whole epochs, so per-epoch costs such as loader start-up and checkpoints count).
"""

from __future__ import annotations

import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.presets import with_overrides
from reid_ssl.config import Config


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Stepper:
    """The trainer's model, optimizer and precision settings for timed steps outside :func:`train`."""

    def __init__(self, cfg: Config) -> None:
        from reid_ssl.embedder import resolve_device
        from reid_ssl.models.ssl import update_target
        from reid_ssl.optim import build_optimizer
        from reid_ssl.train.state import autocast_context, build_model, seed_everything

        self.update_target, self.autocast = update_target, autocast_context  # imported once, not in every step
        seed_everything(cfg.train.seed)
        self.cfg, self.device = cfg, resolve_device(cfg.train.device)
        self.model = build_model(cfg).to(self.device)
        self.fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=self.fmt)
        modules = [m for m in (self.model.backbone, self.model.projector, self.model.predictor) if m]
        o = cfg.optim
        self.optimizer = build_optimizer(o.name, modules, o.lr, o.momentum, o.weight_decay, o.trust_coefficient)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.train.amp == "fp16" else None
        self.run = torch.compile(self.model) if cfg.train.compile else self.model
        self.shape = (cfg.train.batch_size, 3, cfg.data.height, cfg.data.width)
        self.model.train()

    def step(self, v1: torch.Tensor, v2: torch.Tensor, criterion: Any = None, ema: bool = False) -> None:
        """One optimizer step on the views; without ``criterion`` a stand-in loss (no real loss), then the EMA
        target update if ``ema``."""
        v1 = v1.to(self.device).contiguous(memory_format=self.fmt)
        v2 = v2.to(self.device).contiguous(memory_format=self.fmt)
        with self.autocast(self.cfg.train.amp, self.device):
            p1, p2, z1, z2 = self.run(v1, v2)
        if criterion is None:
            loss = (p1.float() * z2.float()).mean() + (p2.float() * z1.float()).mean()
        else:
            loss = criterion(p1, z2) + criterion(p2, z1)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        if ema:
            self.update_target(self.model, 0.99)
        loss.item()  # the loop reads the loss every step

    def rate(self, batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]], steps: int, warmup: int,
             criterion: Any = None, ema: bool = False) -> tuple[float, float]:  # fmt: skip
        """img/s over ``steps`` after ``warmup``, batch ``i`` from ``batches(i)``; also the warm-up's seconds."""
        t_first = t0 = time.perf_counter()
        for i in range(warmup + steps):
            if i == warmup:
                _sync(self.device)
                t0 = time.perf_counter()
            self.step(*batches(i), criterion=criterion, ema=ema)
        _sync(self.device)
        return steps * self.shape[0] / (time.perf_counter() - t0), t0 - t_first


def ceiling_rate(cfg: Config, steps: int, warmup: int) -> dict[str, Any]:
    """Synthetic training steps of ``cfg``'s model (module docstring): img/s over ``steps`` after ``warmup``."""
    s = _Stepper(cfg)
    views = [torch.randn(s.shape, device=s.device).contiguous(memory_format=s.fmt) for _ in range(2)]
    rate, first_s = s.rate(lambda i: (views[0], views[1]), steps, warmup)
    return {"img_per_s": rate, "steps": steps, "warmup_s": first_s, "device": str(s.device)}


def breakdown(cfg: Config, steps: int, warmup: int, repeats: int) -> dict[str, Any]:
    """Where the time between the ceiling and the real loop goes: one model, the ingredients added one by one.

    * ``synthetic``: the ceiling (random tensors, a stand-in loss);
    * ``real_batches``: real augmented batches made beforehand (a pool of 8, cycled), the stand-in loss;
    * ``loss_ema``: the same batches, the configured loss (its resolved deputy window) and the EMA update;
    * ``augment``: the same, each batch augmented in the loop from the training source (as the trainer's feed
      does with ``data.num_workers``).

    The variants run in turn, ``repeats`` rounds; each gets the median of its rounds (img/s) and its ratio to
    ``synthetic``. What the real loop adds beyond ``augment`` (logging, checkpoints) is the difference between
    ``augment`` and :func:`real_rate`.
    """
    from reid_ssl.data.augment import two_view_dataset
    from reid_ssl.data.sampler import EpochSampler
    from reid_ssl.data.ssl_sources import bag_stats
    from reid_ssl.losses import loss_from_config
    from reid_ssl.train.feed import view_loader
    from reid_ssl.train.state import resolve_deputy_window

    s = _Stepper(cfg)
    dataset = two_view_dataset(cfg.data, cfg.augment)
    loss_cfg, _ = resolve_deputy_window(cfg, bag_stats(dataset.items), cfg.train.batch_size - 1)
    criterion = loss_from_config(loss_cfg)
    sampler = EpochSampler(len(dataset), cfg.train.batch_size, cfg.train.seed)
    loader = view_loader(dataset, sampler, cfg.data.num_workers)  # the trainer's loader
    pool = [(b[0], b[1]) for _, b in zip(range(8), loader, strict=False)]
    views = [torch.randn(s.shape, device=s.device) for _ in range(2)]

    def epochs() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # the loader's batches, epoch after epoch
        for epoch in itertools.count(1):
            sampler.set_epoch(epoch)
            for batch in loader:
                yield batch[0], batch[1]

    fresh = epochs()
    variants: dict[str, tuple[Callable[[int], tuple[torch.Tensor, torch.Tensor]], Any, bool]] = {
        "synthetic": (lambda i: (views[0], views[1]), None, False),
        "real_batches": (lambda i: pool[i % len(pool)], None, False),
        "loss_ema": (lambda i: pool[i % len(pool)], criterion, True),
        "augment": (lambda i: next(fresh), criterion, True),
    }
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, (batches, crit, ema) in variants.items():
            rates[name].append(s.rate(batches, steps, 2, crit, ema)[0])
    median = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "img_per_s": rates,
        "median_img_per_s": median,
        "ratio_to_synthetic": {k: v / median["synthetic"] for k, v in median.items()},
        "deputy_window": [loss_cfg.k_lo, loss_cfg.k_hi],
        "steps": steps,
        "repeats": repeats,
    }


def real_rate(cfg: Config, warmup: int) -> dict[str, Any]:
    """:func:`reid_ssl.train.train` on ``cfg`` (set ``train.max_steps``): steady img/s after ``warmup`` steps.

    The rate comes from the ``time`` of the logged steps in ``metrics.jsonl`` (every ``train.log_every_steps``,
    as configured), between the first logged step >= ``warmup`` and the last one. ``cpu_s`` splits the CPU
    time of the whole run into this process (model, loss, EMA, logging, checkpoints) and the loader workers
    (decoding and augmentation; they are child processes that exit every epoch).
    """
    from reid_ssl.train.logs import read_metrics
    from reid_ssl.train.loop import train

    with tempfile.TemporaryDirectory(prefix="reid_ssl_real_") as tmp:
        out = Path(tmp)
        cfg = with_overrides(cfg, [f"train.out_dir={out}"])
        before, t0 = os.times(), time.perf_counter()
        summary = train(cfg, progress=False, overwrite=True)
        wall, after = time.perf_counter() - t0, os.times()
        logged = [(r["step"], r["time"]) for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    window = [(s, t) for s, t in logged if s >= warmup]
    if len(window) < 2:
        raise ValueError(f"too few logged steps after step {warmup}: {logged}; raise train.max_steps")
    (s0, t0_), (s1, t1) = window[0], window[-1]
    return {
        "img_per_s": (s1 - s0) * cfg.train.batch_size * cfg.train.accumulate / (t1 - t0_),
        "steps": s1 - s0,
        "wall_s": wall,
        "final_loss": summary["loss"],
        "cpu_s": {
            "main_process": (after.user + after.system) - (before.user + before.system),
            "loader_workers": (after.children_user + after.children_system)
            - (before.children_user + before.children_system),
        },
        "images": summary["steps"] * cfg.train.batch_size * cfg.train.accumulate,
    }


def loop_vs_ceiling(cfg: Config, warmup: int, ceiling_steps: int, repeats: int = 1) -> dict[str, Any]:
    """Ceiling, real, ceiling ... alternating (``repeats`` real runs, each between two ceiling runs): each real
    rate is divided by the mean of the ceiling runs on either side of it."""
    ceilings = [ceiling_rate(cfg, ceiling_steps, warmup=3)]
    reals, ratios = [], []
    for _ in range(repeats):
        reals.append(real_rate(cfg, warmup))
        ceilings.append(ceiling_rate(cfg, ceiling_steps, warmup=3))
        around = (ceilings[-2]["img_per_s"] + ceilings[-1]["img_per_s"]) / 2
        ratios.append(reals[-1]["img_per_s"] / around)
    return {"ratio": ratios, "real": reals, "ceiling": ceilings}
