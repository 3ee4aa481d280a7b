"""The pretraining loop, read top to bottom: setup, data, model, resume, steps, checkpoints, summary.

One iteration (method.md §1.15): two views -> online p1, p2 and target z1, z2 -> loss(p1, z2) + loss(p2, z1)
-> backward (divided by ``accumulate``) -> every ``accumulate`` micro-batches an optimizer step, the EMA
momentum and learning rate of that step, and the target update. Runs on CPU or CUDA, alone or under
``torchrun`` (DDP: gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from reid_ssl.checkpoint import FORMAT as CHECKPOINT_FORMAT
from reid_ssl.checkpoint import (
    CheckpointError,
    backbone_block,
    load_checkpoint,
    make_preprocess,
    save_checkpoint,
)
from reid_ssl.config import Config, from_dict, to_dict
from reid_ssl.data import EpochSampler, two_view_dataset
from reid_ssl.embedder import Embedder, resolve_device
from reid_ssl.losses import build_loss, prob_rank_k_true_negative, similarity_stats
from reid_ssl.models import SSLModel, update_target
from reid_ssl.optim import build_optimizer, cosine_schedule, warmup_cosine_lr

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"

# A monitor takes the current embedder and returns metrics (e.g. rank-1 / mAP on a retrieval split).
Monitor = Callable[[Embedder], dict[str, float]]


class TrainingError(RuntimeError):
    """Training cannot go on (bad images with ``bad_images="fail"``, a diverged loss...)."""


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


# ---------------------------------------------------------------------------------------------------------
# Setup helpers
# ---------------------------------------------------------------------------------------------------------


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Dist(rank, world, local_rank), device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """RNG states as tensors / plain lists (loadable with weights_only=True)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], npst[1].numpy().astype(np.uint32), *npst[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_model(cfg: Config) -> SSLModel:
    m = cfg.model
    model = SSLModel(
        backbone=m.backbone,
        proj_hidden_dim=m.proj_hidden_dim,
        proj_dim=m.proj_dim,
        pred_hidden_dim=m.pred_hidden_dim,
        predictor=m.predictor,
        target=m.target,
        multires_online=m.multires_online if m.multires else None,
        multires_target=m.multires_target if m.multires else None,
    )
    if m.init:
        load_backbone_init(model, m.init)
    return model


def load_backbone_init(model: SSLModel, path: str) -> None:
    """Initialise online AND target backbone from a reid_ssl checkpoint or a torchvision ResNet state dict.

    Projector and predictor stay freshly initialised, as in the reference SYSU-30k run (method.md §2.9).
    """
    try:
        sd = load_checkpoint(path)["backbone"]["state_dict"]
    except CheckpointError as e:
        sd = _plain_state_dict(path, e)
    missing, unexpected = model.backbone.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"model.init={path}: weights do not fit {model.backbone_name} "
            f"(missing {missing[:4]}, unexpected {unexpected[:4]})"
        )
    if model.target_backbone is not None:
        model.target_backbone.load_state_dict(model.backbone.state_dict())


def _plain_state_dict(path: str, not_ours: CheckpointError) -> dict[str, torch.Tensor]:
    """A torchvision-style ResNet state dict (``fc.*`` dropped), read without unpickling code."""
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing them
            warnings.simplefilter("ignore")
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # quote what was refused, never torch's advice to retry with weights_only=False
        refused = re.search(r"Unsupported global: GLOBAL [\w.]+|Unsupported operand \d+", str(e))
        raise ValueError(
            f"model.init={path}: neither a reid_ssl checkpoint nor a plain state dict that loads safely "
            f"({refused.group(0) if refused else type(e).__name__})"
        ) from None
    if isinstance(raw, dict) and raw.get("format") == CHECKPOINT_FORMAT:
        raise ValueError(f"model.init: {not_ours}")  # a damaged reid_ssl checkpoint: say why it was refused
    sd = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"model.init={path}: not a state dict of tensors")
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in sd.items() if not k.startswith("fc.")}


def gather_negatives(z: torch.Tensor, d: Dist) -> torch.Tensor:
    """This rank's z first, then every other rank's (no gradient through the others)."""
    if d.world_size == 1:
        return z
    parts = [torch.empty_like(z) for _ in range(d.world_size)]
    dist.all_gather(parts, z.detach().contiguous())
    return torch.cat([z] + [p for r, p in enumerate(parts) if r != d.rank])


def autocast_context(amp: str, device: torch.device):  # type: ignore[no-untyped-def]
    if amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------


def training_checkpoint(
    cfg: Config,
    model: SSLModel,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    step: int,
    epoch: int,
    batch_in_epoch: int,
    history: dict[str, Any],
) -> dict[str, Any]:
    return {
        "backbone": backbone_block(cfg.model.backbone, model.backbone.feature_dim, model.backbone.state_dict()),
        "preprocess": make_preprocess(cfg.data.eval_height, cfg.data.eval_width),
        "config": to_dict(cfg),
        "step": step,
        "epoch": epoch,
        "batch_in_epoch": batch_in_epoch,
        # the online backbone is already in "backbone"; store the rest of the pair once
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith("backbone.")},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(),
        "history": history,
    }


def resolve_resume(cfg: Config, resume: bool | str) -> Path | None:
    """``True`` -> ``<out_dir>/checkpoint.pt`` if it exists; a string -> that file (must exist)."""
    if not resume:
        return None
    path = Path(cfg.train.out_dir) / CHECKPOINT_NAME if resume is True else Path(resume)
    if resume is not True and not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    return path if path.is_file() else None


# ---------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------


def train(
    cfg: Config, resume: bool | str = False, monitor: Monitor | None = None, progress: bool = True
) -> dict[str, Any]:
    """Pretrain with ``cfg``; returns a summary (checkpoint path, steps, final loss, img/s, monitor metrics).

    Args:
        resume: continue from ``<out_dir>/checkpoint.pt`` (True) or from the given checkpoint path; the
            config stored in the checkpoint wins over ``cfg`` so the schedule stays the same.
        monitor: called on the main process after each ``train.eval_every_epochs`` epochs.
    """
    resume_path = resolve_resume(cfg, resume)
    resumed = load_checkpoint(resume_path) if resume_path else None
    if resumed is not None:
        cfg = from_dict(resumed["config"])

    # ----- setup: processes, device, seeds -------------------------------------------------------------
    d, device = init_distributed(cfg.train.device)
    if cfg.train.amp == "fp16" and device.type != "cuda":
        raise ValueError("train.amp='fp16' needs a CUDA device; use 'bf16' or 'none' on CPU")
    seed_everything(cfg.train.seed + d.rank)
    out_dir = Path(cfg.train.out_dir)
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)

    # ----- data ----------------------------------------------------------------------------------------
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
    micro_per_epoch = sampler.batches_per_epoch()
    if micro_per_epoch < cfg.train.accumulate:
        raise ValueError(
            f"{len(dataset)} images give {micro_per_epoch} batches of {cfg.train.batch_size} per process and epoch, "
            f"fewer than train.accumulate={cfg.train.accumulate} needs for one optimizer step; "
            "lower train.accumulate or train.batch_size"
        )
    steps_per_epoch = max(1, micro_per_epoch // cfg.train.accumulate)
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)

    # ----- model, loss, optimizer ----------------------------------------------------------------------
    model = build_model(cfg)
    if resumed is not None:
        model.backbone.load_state_dict(resumed["backbone"]["state_dict"])
        model.load_state_dict(resumed["model"], strict=False)
        missing = [k for k in model.state_dict() if not k.startswith("backbone.") and k not in resumed["model"]]
        if missing:
            raise ValueError(f"{resume_path} does not fit this model: missing {missing[:4]}")
    if d.world_size > 1 and cfg.model.sync_bn:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif d.main:
            log.warning("model.sync_bn: PyTorch's SyncBatchNorm needs CUDA; on CPU each process keeps its own BN")
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    core: SSLModel = model
    optimizer = build_optimizer(
        cfg.optim.name,
        [m for m in (core.backbone, core.projector, core.predictor) if m],
        cfg.optim.lr,
        cfg.optim.momentum,
        cfg.optim.weight_decay,
        cfg.optim.trust_coefficient,
    )
    scaler = torch.amp.GradScaler(device.type) if cfg.train.amp == "fp16" else None
    loss_kwargs = {
        "truncated_triplet": dict(k_lo=cfg.loss.k_lo, k_hi=cfg.loss.k_hi, gamma=cfg.loss.gamma, margin=cfg.loss.margin),
        "median_triplet": dict(gamma=cfg.loss.gamma, margin=cfg.loss.margin),
        "byol": {},
        "simclr": dict(temperature=cfg.loss.temperature),
    }[cfg.loss.name]
    criterion = build_loss(cfg.loss.name, **loss_kwargs)
    ddp: nn.parallel.DistributedDataParallel | None = None
    if d.world_size > 1:
        model = ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.train.compile:
        model = torch.compile(model)

    step, epoch, batch_in_epoch = 0, 0, 0
    resumed_at: int | None = None
    history: dict[str, Any] = {"monitor": []}
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        if scaler is not None and resumed.get("scaler"):
            scaler.load_state_dict(resumed["scaler"])
        step, epoch, batch_in_epoch = resumed["step"], resumed["epoch"], resumed["batch_in_epoch"]
        resumed_at = step
        history = resumed.get("history", history)
        set_rng_state(resumed["rng"])
        if d.main:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_path, step, epoch, batch_in_epoch)

    negatives = cfg.train.batch_size * (d.world_size if cfg.loss.gather_negatives else 1) - 1
    if d.main:
        log.info(
            "data: %d images from %s (%s); %d optimizer steps of %d x %d x %d images; %d negatives/anchor",
            len(dataset),
            cfg.data.source,
            cfg.data.root,
            total_steps,
            cfg.train.batch_size,
            d.world_size,
            cfg.train.accumulate,
            negatives,
        )
        if cfg.loss.assumed_identities and cfg.loss.name == "truncated_triplet":
            p = prob_rank_k_true_negative(negatives, cfg.loss.assumed_identities, cfg.loss.k_lo)
            log.info(
                "Bernoulli check: with %d negatives and %d identities, the rank-%d negative is a true "
                "negative with probability %.3f",
                negatives,
                cfg.loss.assumed_identities,
                cfg.loss.k_lo,
                p,
            )

    metrics_file = out_dir / "metrics.jsonl"
    writer = _tensorboard(out_dir) if (d.main and cfg.train.tensorboard) else None
    bad_images: list[str] = history.setdefault("bad_images", [])
    last_loss = math.nan
    seen, t_start = 0, time.perf_counter()
    data_s, t_log = 0.0, t_start  # time spent waiting for batches since the last log record

    def save(at_epoch: int, at_batch: int) -> Path | None:
        if not d.main:
            return None
        return save_checkpoint(
            out_dir / CHECKPOINT_NAME,
            training_checkpoint(cfg, core, optimizer, scaler, step, at_epoch, at_batch, history),
        )

    bar = tqdm(
        total=total_steps,
        initial=step,
        desc="train",
        unit="step",
        disable=not (progress and d.main),
        dynamic_ncols=True,
    )
    # ----- epochs ----------------------------------------------------------------------------------------
    while step < total_steps:
        sampler.set_epoch(epoch, batch_in_epoch)
        loader_rng.manual_seed(cfg.train.seed * 100_003 + epoch * 101 + d.rank)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        micro = 0  # micro-batches done in this pass over the loader
        t_wait = time.perf_counter()
        for v1, v2, bad in loader:
            data_s += time.perf_counter() - t_wait
            # ----- bad images: counted, or fatal -----------------------------------------------------------
            for reason in (line for text in bad for line in text.splitlines()):
                if cfg.data.bad_images == "fail":
                    raise TrainingError(
                        f"unreadable training image ({reason}); set data.bad_images=skip to skip such files"
                    )
                if reason not in bad_images:
                    bad_images.append(reason)
                    if len(bad_images) <= 5 and d.main:
                        log.warning("skipped an unreadable image: %s", reason)

            # ----- forward both views, loss in both directions ---------------------------------------------
            v1, v2 = v1.to(device, non_blocking=True), v2.to(device, non_blocking=True)
            if cfg.train.channels_last:
                v1, v2 = (
                    v1.contiguous(memory_format=torch.channels_last),
                    v2.contiguous(memory_format=torch.channels_last),
                )
            micro += 1
            last_micro = micro % cfg.train.accumulate == 0
            sync = ddp.no_sync() if (ddp is not None and not last_micro) else nullcontext()
            with sync:
                with autocast_context(cfg.train.amp, device):
                    p1, p2, z1, z2 = model(v1, v2)
                if cfg.loss.gather_negatives:
                    z1, z2 = gather_negatives(z1, d), gather_negatives(z2, d)
                loss = criterion(p1, z2) + criterion(p2, z1)
                if not torch.isfinite(loss):
                    raise TrainingError(f"loss is {loss.item()} at step {step}; lower optim.lr or use amp=none")
                scaled = loss / cfg.train.accumulate
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            seen += v1.shape[0] * d.world_size
            if not last_micro:
                continue

            # ----- optimizer step, schedules, EMA target ---------------------------------------------------
            lr = warmup_cosine_lr(step, total_steps, cfg.optim.lr, warmup_steps, cfg.optim.warmup_start_factor)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            momentum = cosine_schedule(step, total_steps, cfg.optim.ema_start, cfg.optim.ema_end)
            update_target(core, momentum)
            step += 1
            last_loss = loss.item()

            # ----- logging and checkpoints -----------------------------------------------------------------
            if d.main:
                rate = seen / max(time.perf_counter() - t_start, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{rate:.1f}", epoch=epoch)
                if step % cfg.train.log_every_steps == 0 or step == total_steps:
                    record = {
                        "step": step,
                        "epoch": epoch,
                        "loss": last_loss,
                        "lr": lr,
                        "ema_momentum": momentum,
                        "img_per_s": rate,
                        "data_wait_frac": data_s / max(time.perf_counter() - t_log, 1e-9),
                        "time": time.time(),
                        **similarity_stats(p1, z2, cfg.loss.k_lo, cfg.loss.k_hi),
                    }
                    _append_jsonl(metrics_file, record)
                    data_s, t_log = 0.0, time.perf_counter()
                    if writer is not None:
                        for k in ("loss", "lr", "ema_momentum", "img_per_s", "pos_cos", "deputy_cos", "target_std"):
                            writer.add_scalar(f"train/{k}", record[k], step)
            if step % cfg.train.checkpoint_every_steps == 0:
                save(epoch, batch_in_epoch + micro)
            if step >= total_steps:
                break
            t_wait = time.perf_counter()

        # ----- end of epoch: checkpoint and monitor --------------------------------------------------------
        batch_in_epoch += micro
        if batch_in_epoch >= micro_per_epoch:
            epoch, batch_in_epoch = epoch + 1, 0
        if d.main and monitor is not None and (epoch % cfg.train.eval_every_epochs == 0 or step >= total_steps):
            core.eval()
            scores = monitor(
                Embedder(
                    core.backbone,
                    make_preprocess(cfg.data.eval_height, cfg.data.eval_width),
                    "training",
                    device=device,
                )
            )
            history["monitor"].append({"epoch": epoch, "step": step, **scores})
            _append_jsonl(metrics_file, {"step": step, "epoch": epoch, **{f"eval_{k}": v for k, v in scores.items()}})
            if writer is not None:
                for k, v in scores.items():
                    writer.add_scalar(f"eval/{k}", v, step)
            if progress:
                bar.write(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        every = cfg.train.checkpoint_every_epochs
        if step >= total_steps or (every and epoch % every == 0):
            save(epoch, batch_in_epoch)

    bar.close()
    if writer is not None:
        writer.close()
    elapsed = time.perf_counter() - t_start
    summary = {
        "checkpoint": str(out_dir / CHECKPOINT_NAME),
        "steps": step,
        "epochs": epoch,
        "loss": last_loss,
        "images_per_second": seen / max(elapsed, 1e-9),
        "seconds": elapsed,
        "bad_images": len(bad_images),
        "monitor": history["monitor"][-1] if history["monitor"] else {},
        "resumed_at_step": resumed_at,
    }
    if d.main:
        plot_loss_curve(metrics_file, out_dir / "loss_curve.png")
        (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return summary


# ---------------------------------------------------------------------------------------------------------
# Logs and plots
# ---------------------------------------------------------------------------------------------------------


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _tensorboard(out_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional at run time
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_file: Path, out_png: Path) -> Path | None:
    """Loss per step (and the monitor's rank-1/mAP per epoch when present) as a PNG."""
    records = read_metrics(metrics_file)
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    if not losses:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in records if "eval_rank1" in r]
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot(*zip(*losses, strict=True), lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    if evals:
        ax2 = axes[0][1]
        for key, label in (("eval_rank1", "rank-1"), ("eval_mAP", "mAP")):
            ax2.plot([r["epoch"] for r in evals], [r.get(key, math.nan) for r in evals], marker="o", label=label)
        ax2.set_xlabel("epoch")
        ax2.set_title("retrieval monitor")
        ax2.legend()
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
