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
from torch.distributed.algorithms import Join
from tqdm import tqdm

from reid_ssl.checkpoint import BackgroundSaver, preprocess_from_config
from reid_ssl.config import Config, LossConfig, to_dict
from reid_ssl.data.datasets import resolve_root
from reid_ssl.distributed import Dist, gather_rows, init_distributed, shutdown
from reid_ssl.embedder import Embedder
from reid_ssl.errors import CheckpointError, ImageError, InputError, TrainingError
from reid_ssl.losses import loss_from_config, similarity_stats
from reid_ssl.models import SSLModel, update_target
from reid_ssl.optim import build_optimizer, cosine_schedule, warmup_cosine_lr
from reid_ssl.train.feed import FileFeed, ShardFeed, build_feed
from reid_ssl.train.logs import MetricsLog, SampleLog
from reid_ssl.train.state import (
    CHECKPOINT_NAME,
    RunPlan,
    autocast_context,
    check_same_start,
    place_model,
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
    feed: FileFeed | ShardFeed
    model: nn.Module  # what forward() is called on (DDP / compile wrappers included)
    core: SSLModel  # the bare pair (its backbone is what checkpoints store)
    ddp: nn.parallel.DistributedDataParallel | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    criterion: nn.Module
    epoch_steps: list[int]  # optimizer steps of each epoch (shards: those of the busiest process)
    total_steps: int
    warmup_steps: int
    out_dir: Path
    logs: MetricsLog | None
    samples: SampleLog | None = None  # train.sample_log
    loss_cfg: LossConfig | None = None  # the loss section with k: auto resolved
    step: int = 0
    epoch: int = 0
    feed_state: dict[str, Any] = field(default_factory=dict)  # where the current epoch resumes
    history: dict[str, Any] = field(default_factory=lambda: {"monitor": []})
    last_loss: float = math.nan
    seen: int = 0
    t_start: float = field(default_factory=time.perf_counter)
    saver: BackgroundSaver = field(default_factory=BackgroundSaver)  # checkpoints written while training goes on

    def steps_before(self, epoch: int) -> int:
        """Optimizer steps of the epochs before ``epoch`` (capped at the run's total)."""
        return min(sum(self.epoch_steps[:epoch]), self.total_steps)

    def save(self, at_epoch: int, feed_state: dict[str, Any]) -> None:
        """Atomically write ``<out_dir>/checkpoint.pt`` (main process only)."""
        if self.d.main:
            payload = training_checkpoint(
                self.cfg, self.core, self.optimizer, self.scaler, self.step, at_epoch, feed_state, self.history
            )
            payload["world_size"] = self.d.world_size
            self.saver.save(self.out_dir / CHECKPOINT_NAME, payload)


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
        overwrite: start from scratch even if ``out_dir`` holds a checkpoint; with ``resume`` a checkpoint path:
            continue it into an output folder whose other checkpoint is replaced.
        changes: with ``resume``, only these overrides (nested dict) are applied to the stored config.

    Raises:
        CheckpointError: the folder holds a different run (the message lists the differences and the way out).
        ImageError: an unreadable image with ``data.bad_images=fail`` (bad input, exit code 2).
        TrainingError: a diverged loss.
    """
    plan = plan_run(cfg, resume, overwrite, changes)
    run = _build(plan)
    if plan.checkpoint is not None and run.step >= run.total_steps:
        return _summary(run, plan, already_finished=True)
    bar = tqdm(
        total=run.total_steps,
        initial=run.step,
        desc="train",
        unit="step",
        disable=not (progress and run.d.main),
        dynamic_ncols=True,
    )
    try:
        while run.step < run.total_steps:
            _train_epoch(run, bar)
            _end_of_epoch(run, monitor, bar if progress else None)
    finally:  # the last checkpoint on disk (or its error raised) before returning, also after an error
        run.saver.close()
    bar.close()
    return _summary(run, plan)


# ----- Building the run -----------------------------------------------------------------------------------


def _build(plan: RunPlan) -> _Run:
    cfg, resumed = plan.cfg, plan.checkpoint
    # ----- processes, device, seeds --------------------------------------------------------------------
    d, device = init_distributed(cfg.train.device)
    if cfg.train.amp == "fp16" and device.type != "cuda":
        raise InputError("train.amp='fp16' needs a CUDA device; use 'bf16' or 'none' on CPU")
    seed_everything(cfg.train.seed + d.rank)
    out_dir = Path(cfg.train.out_dir)  # created once the data and the model are known to be usable
    check_same_start(d, plan)

    # ----- data and the deputy window ----------------------------------------------------------------
    feed = build_feed(cfg, d, device)
    negatives = cfg.train.batch_size * (d.world_size if cfg.loss.gather_negatives else 1) - 1
    loss_cfg, k_rule = resolve_deputy_window(cfg, feed.stats, negatives)
    feed.smallest_batch(loss_cfg.k_hi + 2)  # an epoch's short last batch still has k_hi negatives per anchor
    micro = feed.micro_batches(0)
    if micro < cfg.train.accumulate:
        raise InputError(
            f"{feed.images} images give {micro} batches of {cfg.train.batch_size} per process and epoch, "
            f"fewer than train.accumulate={cfg.train.accumulate} needs for one optimizer step; "
            "lower train.accumulate or train.batch_size"
        )
    epoch_steps = [max(1, feed.micro_batches(e) // cfg.train.accumulate) for e in range(cfg.train.epochs)]
    total_steps = sum(epoch_steps)
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)

    # ----- model, optimizer --------------------------------------------------------------------------
    core, model, ddp = place_model(cfg, d, device, resumed, plan.source)
    optimizer = build_optimizer(
        cfg.optim.name,
        [m for m in (core.backbone, core.projector, core.predictor) if m],
        cfg.optim.lr,
        cfg.optim.momentum,
        cfg.optim.weight_decay,
        cfg.optim.trust_coefficient,
    )
    scaler = torch.amp.GradScaler(device.type) if cfg.train.amp == "fp16" else None
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    logs = MetricsLog(out_dir, cfg.train.tensorboard) if d.main else None
    run = _Run(
        cfg, d, device, feed, model, core, ddp, optimizer, scaler, loss_from_config(loss_cfg), epoch_steps,
        total_steps, round(cfg.optim.warmup_epochs * epoch_steps[0]), out_dir, logs,
    )  # fmt: skip
    run.loss_cfg = loss_cfg
    run.samples = SampleLog(out_dir, d.rank) if cfg.train.sample_log else None
    if resumed is not None:
        _restore(run, resumed, plan.source)
    run.history["k_rule"], run.history["positives"] = k_rule, feed.positives
    if d.main:
        log.info(
            "data: %d images from %s (%s), positives: %s; %d optimizer steps of %d x %d x %d images; %d negatives"
            "/anchor", feed.images, cfg.data.source, resolve_root(cfg.data.source, cfg.data.root or None),
            feed.positives, total_steps, cfg.train.batch_size, d.world_size, cfg.train.accumulate, negatives,
        )  # fmt: skip
        for note in plan.notes:
            log.info("%s", note)
        if "note" in k_rule:
            log.warning("%s", k_rule["note"])
        if "p_true_negative" in k_rule:
            log.info(
                "Bernoulli rule (k=%s): %d negatives, %d identities (%s): deputy ranks %d..%d, the rank-%d negative "
                "is another identity with probability %.3f",
                k_rule["k"], negatives, k_rule["identities"], k_rule["identities_source"],
                loss_cfg.k_lo, loss_cfg.k_hi, loss_cfg.k_lo, k_rule["p_true_negative"],
            )  # fmt: skip
    return run


def _restore(run: _Run, resumed: dict[str, Any], source: Path | None) -> None:
    """Continue from ``resumed``: optimizer, scaler, step, epoch, where the epoch stopped, history, RNG.

    Raises:
        CheckpointError: the checkpoint was written by a job of another size (the batches and the learning-rate
            schedule depend on the number of processes).
    """
    world = resumed.get("world_size", run.d.world_size)
    if world != run.d.world_size:
        raise CheckpointError(
            f"{source} was written by a job of {world} process(es); this one has {run.d.world_size}. Resume with the "
            f"same number of processes (torchrun --nnodes x --nproc-per-node = {world}), or start a new run from its "
            f"weights: model.init={source} train.out_dir=<new folder>"
        )
    run.optimizer.load_state_dict(resumed["optimizer"])
    if run.scaler is not None and resumed.get("scaler"):
        run.scaler.load_state_dict(resumed["scaler"])
    run.step, run.epoch = resumed["step"], resumed["epoch"]
    run.feed_state = resumed.get("feed") or {"batch_in_epoch": resumed.get("batch_in_epoch", 0)}
    run.history = resumed.get("history", run.history)
    set_rng_state(resumed["rng"])
    if run.d.main:
        log.info("resumed %s at step %d (epoch %d, %s)", source, run.step, run.epoch, run.feed_state)


# ----- Epochs and steps -----------------------------------------------------------------------------------


def _train_epoch(run: _Run, bar: tqdm) -> None:
    """One pass over this process's share of the data (or what is left of it after a resume).

    Streamed shards give processes different numbers of batches: the pass runs under DDP's ``Join`` (a process
    that runs out keeps answering the others' gradient all-reduces) and then every process takes the step
    count of the busiest one.
    """
    left, common = run.feed.start(run.epoch, run.feed_state)
    run.model.train()
    run.optimizer.zero_grad(set_to_none=True)
    join = Join([run.ddp]) if (run.ddp is not None and run.feed.uneven) else nullcontext()
    with join:
        micro = _pass(run, bar, common)
    complete = micro >= left
    if complete:
        run.epoch += 1
        run.feed_state = {}
        if run.d.world_size > 1 and run.feed.uneven:  # everyone continues at the busiest process's step
            run.step = run.steps_before(run.epoch)
    else:  # stopped at train.max_steps inside the epoch: every process is here, so this collective is safe
        run.feed_state = run.feed.state(micro + int(run.feed_state.get("batch_in_epoch", 0)))


def _pass(run: _Run, bar: tqdm, common: int) -> int:
    """Train on the feed's batches until it ends or the run reaches its last step; returns the micro-batches done.

    A checkpoint inside the epoch is written every ``train.checkpoint_every_steps`` while every process is still
    training (``common`` micro-batches), because collecting the shard positions is a collective.
    """
    cfg = run.cfg
    micro, before = 0, int(run.feed_state.get("batch_in_epoch", 0))
    data_s, t_log, t_wait = 0.0, time.perf_counter(), time.perf_counter()
    for v1, v2, bad, images in run.feed:
        data_s += time.perf_counter() - t_wait
        _count_bad_images(run, bad)
        if run.samples is not None:
            run.samples.write(run.epoch, images)
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
                assert run.logs is not None and run.loss_cfg is not None
                wait = data_s / max(time.perf_counter() - t_log, 1e-9)
                k_lo, k_hi = run.loss_cfg.k_lo, run.loss_cfg.k_hi
                run.logs.step(
                    run.step, run.epoch, run.last_loss, lr, momentum, rate, wait, similarity_stats(p1, z2, k_lo, k_hi)
                )
                data_s, t_log = 0.0, time.perf_counter()
        if run.step >= run.total_steps:
            break
        if run.step % cfg.train.checkpoint_every_steps == 0 and micro <= common:
            run.save(run.epoch, run.feed.state(before + micro))
        t_wait = time.perf_counter()
    return micro


def _count_bad_images(run: _Run, bad: list[str]) -> None:
    """Unreadable images the dataset replaced: counted (``data.bad_images=skip``) or fatal (``fail``)."""
    known: list[str] = run.history.setdefault("bad_images", [])
    for reason in (line for text in bad for line in text.splitlines()):
        if run.cfg.data.bad_images == "fail":
            raise ImageError(f"unreadable training image ({reason}); fix or remove it, or set data.bad_images=skip")
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
        run.save(run.epoch, run.feed_state)


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
