"""The pretraining loop, read top to bottom: plan the run, build it, train epochs, report.

One iteration (docs/method.md, "One training step"): two views -> online p1, p2 and target z1, z2 ->
loss(p1, z2) + loss(p2, z1) -> backward (divided by ``accumulate``) -> every ``accumulate`` micro-batches an
optimizer step at the learning rate of that step, then the EMA target update at that step's momentum.
Runs on CPU or CUDA, alone or under ``torchrun`` (DDP: gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from reid_ssl.checkpoint import preprocess_from_config, save_checkpoint
from reid_ssl.config import Config, LossConfig, to_dict
from reid_ssl.data.augment import TwoViewDataset, two_view_dataset
from reid_ssl.data.sampler import EpochSampler
from reid_ssl.distributed import Dist, gather_rows, init_distributed, shutdown
from reid_ssl.embedder import Embedder
from reid_ssl.errors import InputError, TrainingError
from reid_ssl.losses import loss_from_config, similarity_stats
from reid_ssl.models import SSLModel, update_target
from reid_ssl.optim import build_optimizer, cosine_schedule, warmup_cosine_lr
from reid_ssl.train.logs import MetricsLog
from reid_ssl.train.state import (
    CHECKPOINT_NAME,
    RunPlan,
    autocast_context,
    build_model,
    plan_run,
    resolve_deputy_window,
    seed_everything,
    set_rng_state,
    training_checkpoint,
)

log = logging.getLogger(__name__)

# A monitor takes the current embedder and returns metrics (e.g. rank-1 / mAP on a retrieval split).
Monitor = Callable[[Embedder], dict[str, float]]


@dataclass
class _Run:
    """Everything one training run holds while it goes."""

    cfg: Config
    d: Dist
    device: torch.device
    dataset: TwoViewDataset
    sampler: EpochSampler
    loader: DataLoader
    loader_rng: torch.Generator
    model: nn.Module  # what forward() is called on (DDP / compile wrappers included)
    core: SSLModel  # the bare pair (its backbone is what checkpoints store)
    ddp: nn.parallel.DistributedDataParallel | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    criterion: nn.Module
    total_steps: int
    warmup_steps: int
    out_dir: Path
    logs: MetricsLog | None
    loss_cfg: LossConfig | None = None  # the loss section with k: auto resolved
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    history: dict[str, Any] = field(default_factory=lambda: {"monitor": []})
    last_loss: float = math.nan
    seen: int = 0
    t_start: float = field(default_factory=time.perf_counter)

    @property
    def micro_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch()

    def save(self, at_epoch: int, at_batch: int) -> None:
        """Atomically write ``<out_dir>/checkpoint.pt`` (main process only)."""
        if self.d.main:
            payload = training_checkpoint(
                self.cfg, self.core, self.optimizer, self.scaler, self.step, at_epoch, at_batch, self.history
            )
            save_checkpoint(self.out_dir / CHECKPOINT_NAME, payload)


def train(
    cfg: Config,
    resume: bool | str = False,
    monitor: Monitor | None = None,
    progress: bool = True,
    overwrite: bool = False,
    changes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Pretrain with ``cfg``; returns a summary (checkpoint path, steps, final loss, img/s, monitor metrics).

    A folder that already holds a checkpoint is never overwritten silently (:func:`~reid_ssl.train.state.plan_run`):
    the run resumes when the config matches (an interrupted run continues), with the safe changes applied
    (more epochs, logging, monitor), and is refused otherwise.

    Args:
        resume: continue ``<out_dir>/checkpoint.pt`` (True) or the given checkpoint.
        monitor: called on the main process every ``train.eval_every_epochs`` epochs and at the end.
        overwrite: start from scratch even if ``out_dir`` holds a checkpoint.
        changes: with ``resume``, only these overrides (nested dict) are applied to the stored config.

    Raises:
        CheckpointError: the folder holds a different run (the message lists the differences and the way out).
        TrainingError: unreadable images with ``data.bad_images=fail``, or a diverged loss.
    """
    plan = plan_run(cfg, resume, overwrite, changes)
    run = _build(plan)
    if plan.checkpoint is not None and run.step >= run.total_steps:
        return _summary(run, plan, already_finished=True)
    bar = tqdm(total=run.total_steps, initial=run.step, desc="train", unit="step", disable=not (progress and run.d.main), dynamic_ncols=True)
    while run.step < run.total_steps:
        _train_epoch(run, bar)
        _end_of_epoch(run, monitor, bar if progress else None)
    bar.close()
    return _summary(run, plan)


# ---------------------------------------------------------------------------------------------------------
# Building the run
# ---------------------------------------------------------------------------------------------------------


def _build(plan: RunPlan) -> _Run:
    cfg, resumed = plan.cfg, plan.checkpoint
    # ----- processes, device, seeds --------------------------------------------------------------------
    d, device = init_distributed(cfg.train.device)
    if cfg.train.amp == "fp16" and device.type != "cuda":
        raise InputError("train.amp='fp16' needs a CUDA device; use 'bf16' or 'none' on CPU")
    seed_everything(cfg.train.seed + d.rank)
    out_dir = Path(cfg.train.out_dir)
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)

    # ----- data --------------------------------------------------------------------------------------
    dataset = two_view_dataset(cfg.data, cfg.augment)
    sampler = EpochSampler(len(dataset), cfg.train.batch_size, cfg.train.seed, d.rank, d.world_size)
    # The loader's own generator seeds its workers; starting an epoch then never draws from the global RNG,
    # whose state the checkpoint restores (exact resume with num_workers=0).
    loader_rng = torch.Generator()
    loader = DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        generator=loader_rng,
    )
    micro = sampler.batches_per_epoch()
    if micro < cfg.train.accumulate:
        raise InputError(
            f"{len(dataset)} images give {micro} batches of {cfg.train.batch_size} per process and epoch, "
            f"fewer than train.accumulate={cfg.train.accumulate} needs for one optimizer step; "
            "lower train.accumulate or train.batch_size"
        )
    steps_per_epoch = max(1, micro // cfg.train.accumulate)
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)

    # ----- model, loss, optimizer --------------------------------------------------------------------
    negatives = cfg.train.batch_size * (d.world_size if cfg.loss.gather_negatives else 1) - 1
    loss_cfg, k_rule = resolve_deputy_window(cfg, dataset.items, negatives)
    core, model, ddp = _model(cfg, d, device, resumed, plan.source)
    optimizer = build_optimizer(
        cfg.optim.name,
        [m for m in (core.backbone, core.projector, core.predictor) if m],
        cfg.optim.lr,
        cfg.optim.momentum,
        cfg.optim.weight_decay,
        cfg.optim.trust_coefficient,
    )
    scaler = torch.amp.GradScaler(device.type) if cfg.train.amp == "fp16" else None
    logs = MetricsLog(out_dir, cfg.train.tensorboard) if d.main else None
    run = _Run(
        cfg, d, device, dataset, sampler, loader, loader_rng, model, core, ddp, optimizer, scaler,
        loss_from_config(loss_cfg), total_steps, round(cfg.optim.warmup_epochs * steps_per_epoch), out_dir, logs,
    )  # fmt: skip
    run.loss_cfg = loss_cfg
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        if scaler is not None and resumed.get("scaler"):
            scaler.load_state_dict(resumed["scaler"])
        run.step, run.epoch, run.batch_in_epoch = resumed["step"], resumed["epoch"], resumed["batch_in_epoch"]
        run.history = resumed.get("history", run.history)
        set_rng_state(resumed["rng"])
        if d.main:
            log.info("resumed %s at step %d (epoch %d, batch %d)", plan.source, run.step, run.epoch, run.batch_in_epoch)
    run.history["k_rule"] = k_rule
    if d.main:
        log.info(
            "data: %d images from %s (%s); %d optimizer steps of %d x %d x %d images; %d negatives/anchor",
            len(dataset), cfg.data.source, cfg.data.root, total_steps,
            cfg.train.batch_size, d.world_size, cfg.train.accumulate, negatives,
        )  # fmt: skip
        for note in plan.notes:
            log.info("%s", note)
        if "p_true_negative" in k_rule:
            log.info(
                "Bernoulli rule (k=%s): %d negatives, %d identities (%s): deputy ranks %d..%d, the rank-%d negative "
                "is another identity with probability %.3f",
                k_rule["k"], negatives, k_rule["identities"], k_rule["identities_source"],
                loss_cfg.k_lo, loss_cfg.k_hi, loss_cfg.k_lo, k_rule["p_true_negative"],
            )  # fmt: skip
    return run


def _model(
    cfg: Config, d: Dist, device: torch.device, resumed: dict[str, Any] | None, source: Path | None
) -> tuple[SSLModel, nn.Module, nn.parallel.DistributedDataParallel | None]:
    """The online/target pair (restored on resume), moved, wrapped for DDP and compiled as configured."""
    model = build_model(cfg)
    if resumed is not None:
        model.backbone.load_state_dict(resumed["backbone"]["state_dict"])
        model.load_state_dict(resumed["model"], strict=False)
        missing = [k for k in model.state_dict() if not k.startswith("backbone.") and k not in resumed["model"]]
        if missing:
            raise TrainingError(f"{source} does not fit this model: missing {missing[:4]}")
    if d.world_size > 1 and cfg.model.sync_bn:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif d.main:
            log.warning("model.sync_bn: PyTorch's SyncBatchNorm needs CUDA; on CPU each process keeps its own BN")
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    core: SSLModel = model
    wrapped: nn.Module = model
    ddp = None
    if d.world_size > 1:
        wrapped = ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        wrapped = torch.compile(wrapped)
    return core, wrapped, ddp


# ---------------------------------------------------------------------------------------------------------
# Epochs and steps
# ---------------------------------------------------------------------------------------------------------


def _train_epoch(run: _Run, bar: tqdm) -> None:
    """One pass over this process's share of the data (or what is left of it after a resume)."""
    cfg = run.cfg
    run.sampler.set_epoch(run.epoch, run.batch_in_epoch)
    run.loader_rng.manual_seed(cfg.train.seed * 100_003 + run.epoch * 101 + run.d.rank)
    run.model.train()
    run.optimizer.zero_grad(set_to_none=True)
    micro = 0  # micro-batches done in this pass over the loader
    data_s, t_log, t_wait = 0.0, time.perf_counter(), time.perf_counter()
    for v1, v2, bad in run.loader:
        data_s += time.perf_counter() - t_wait
        _count_bad_images(run, bad)
        micro += 1
        last_micro = micro % cfg.train.accumulate == 0
        p1, z2 = _forward_backward(run, v1, v2, sync=last_micro)
        run.seen += v1.shape[0] * run.d.world_size
        if not last_micro:
            continue
        lr, momentum = _optimizer_step(run)
        if run.d.main:
            rate = run.seen / max(time.perf_counter() - run.t_start, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{run.last_loss:.4f}", img_s=f"{rate:.1f}", epoch=run.epoch)
            if run.step % cfg.train.log_every_steps == 0 or run.step == run.total_steps:
                assert run.logs is not None
                wait = data_s / max(time.perf_counter() - t_log, 1e-9)
                k_lo, k_hi = run.loss_cfg.k_lo, run.loss_cfg.k_hi
                run.logs.step(run.step, run.epoch, run.last_loss, lr, momentum, rate, wait, similarity_stats(p1, z2, k_lo, k_hi))
                data_s, t_log = 0.0, time.perf_counter()
        if run.step % cfg.train.checkpoint_every_steps == 0:
            run.save(run.epoch, run.batch_in_epoch + micro)
        if run.step >= run.total_steps:
            break
        t_wait = time.perf_counter()
    run.batch_in_epoch += micro
    if run.batch_in_epoch >= run.micro_per_epoch:
        run.epoch, run.batch_in_epoch = run.epoch + 1, 0


def _count_bad_images(run: _Run, bad: list[str]) -> None:
    """Unreadable images the dataset replaced: counted (``data.bad_images=skip``) or fatal (``fail``)."""
    known: list[str] = run.history.setdefault("bad_images", [])
    for reason in (line for text in bad for line in text.splitlines()):
        if run.cfg.data.bad_images == "fail":
            raise TrainingError(f"unreadable training image ({reason}); set data.bad_images=skip to skip such files")
        if reason not in known:
            known.append(reason)
            if len(known) <= 5 and run.d.main:
                log.warning("skipped an unreadable image: %s", reason)


def _forward_backward(run: _Run, v1: torch.Tensor, v2: torch.Tensor, sync: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Both views through both branches, the loss in both directions, backward. Returns (p1, z2) for the logs."""
    cfg = run.cfg
    v1, v2 = v1.to(run.device, non_blocking=True), v2.to(run.device, non_blocking=True)
    if cfg.train.channels_last:
        v1, v2 = v1.contiguous(memory_format=torch.channels_last), v2.contiguous(memory_format=torch.channels_last)
    with run.ddp.no_sync() if (run.ddp is not None and not sync) else nullcontext():
        with autocast_context(cfg.train.amp, run.device):
            p1, p2, z1, z2 = run.model(v1, v2)
        if cfg.loss.gather_negatives:
            z1, z2 = gather_rows(z1, run.d), gather_rows(z2, run.d)
        loss = run.criterion(p1, z2) + run.criterion(p2, z1)
        if not torch.isfinite(loss):
            raise TrainingError(f"loss is {loss.item()} at step {run.step}; lower optim.lr or use train.amp=none")
        scaled = loss / cfg.train.accumulate
        (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
    run.last_loss = loss.item() if sync else run.last_loss
    return p1, z2


def _optimizer_step(run: _Run) -> tuple[float, float]:
    """The optimizer step at this step's learning rate, then the EMA target update. Returns (lr, momentum)."""
    cfg = run.cfg
    lr = warmup_cosine_lr(run.step, run.total_steps, cfg.optim.lr, run.warmup_steps, cfg.optim.warmup_start_factor)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    momentum = cosine_schedule(run.step, run.total_steps, cfg.optim.ema_start, cfg.optim.ema_end)
    update_target(run.core, momentum)
    run.step += 1
    return lr, momentum


def _end_of_epoch(run: _Run, monitor: Monitor | None, bar: tqdm | None) -> None:
    """The monitor every ``train.eval_every_epochs`` epochs (and at the end), then the epoch checkpoint."""
    cfg, finished = run.cfg, run.step >= run.total_steps
    if run.d.main and monitor is not None and (run.epoch % cfg.train.eval_every_epochs == 0 or finished):
        run.core.eval()
        scores = monitor(Embedder(run.core.backbone, preprocess_from_config(cfg), "training", device=run.device))
        run.history["monitor"].append({"epoch": run.epoch, "step": run.step, **scores})
        assert run.logs is not None
        run.logs.monitor(run.step, run.epoch, scores)
        if bar is not None:
            bar.write(f"epoch {run.epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    every = cfg.train.checkpoint_every_epochs
    if finished or (every and run.epoch % every == 0):
        run.save(run.epoch, run.batch_in_epoch)


def _summary(run: _Run, plan: RunPlan, already_finished: bool = False) -> dict[str, Any]:
    """The run's outcome; writes the loss curve and config.json, and leaves the process group."""
    elapsed = time.perf_counter() - run.t_start
    losses = [r["loss"] for r in (run.logs.records() if run.logs else []) if "loss" in r]
    summary = {
        "checkpoint": str(run.out_dir / CHECKPOINT_NAME),
        "steps": run.step,
        "epochs": run.epoch,
        "loss": run.last_loss if not already_finished else (losses[-1] if losses else None),
        "images_per_second": run.seen / max(elapsed, 1e-9) if not already_finished else None,
        "seconds": elapsed,
        "bad_images": len(run.history.get("bad_images", [])),
        "monitor": run.history["monitor"][-1] if run.history["monitor"] else {},
        "resumed_at_step": plan.checkpoint["step"] if plan.checkpoint is not None else None,
        "already_finished": already_finished,
        "changes_applied": plan.changes,
        "k_rule": run.history.get("k_rule", {}),
    }
    if run.logs is not None:
        run.logs.close(to_dict(run.cfg))
    shutdown(run.d)
    return summary
