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

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.presets import with_overrides
from reid_ssl.config import Config


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ceiling_rate(cfg: Config, steps: int, warmup: int) -> dict[str, Any]:
    """Synthetic training steps of ``cfg``'s model (module docstring): img/s over ``steps`` after ``warmup``."""
    from reid_ssl.embedder import resolve_device
    from reid_ssl.optim import build_optimizer
    from reid_ssl.train.state import autocast_context, build_model, seed_everything

    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    model = build_model(cfg).to(device)
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    modules = [m for m in (model.backbone, model.projector, model.predictor) if m]
    optimizer = build_optimizer(
        cfg.optim.name, modules, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.trust_coefficient
    )
    scaler = torch.amp.GradScaler(device.type) if cfg.train.amp == "fp16" else None
    run = torch.compile(model) if cfg.train.compile else model
    shape = (cfg.train.batch_size, 3, cfg.data.height, cfg.data.width)
    v1, v2 = (torch.randn(shape, device=device).contiguous(memory_format=fmt) for _ in range(2))
    model.train()
    t_first = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
            first_s = t0 - t_first
        with autocast_context(cfg.train.amp, device):
            p1, p2, z1, z2 = run(v1, v2)
        loss = (p1.float() * z2.float()).mean() + (p2.float() * z1.float()).mean()  # a stand-in: no real loss
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
    _sync(device)
    seconds = time.perf_counter() - t0
    return {"img_per_s": steps * shape[0] / seconds, "steps": steps, "warmup_s": first_s, "device": str(device)}


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
