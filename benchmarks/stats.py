"""Statistics over seeds and steps: mean ± spread (the sample std), per-epoch curves, first epoch reaching a
threshold, steady-state throughput."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def mean_spread(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Mean, sample std (ddof=1; 0 for one value), min and max of the finite values, and their count.

    The "spread" reported everywhere is this sample standard deviation over seeds.
    """
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if len(x) == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    std = float(x.std(ddof=1)) if len(x) > 1 else 0.0
    return {"mean": float(x.mean()), "std": std, "min": float(x.min()), "max": float(x.max()), "n": len(x)}


def curve_summary(epochs: Sequence[int], curves: Sequence[Sequence[float]]) -> dict[str, list[Any]]:
    """Per-epoch mean ± spread of several runs' curves (each as long as ``epochs``)."""
    per_epoch = [mean_spread([c[i] for c in curves if i < len(c)]) for i in range(len(epochs))]
    return {"epochs": list(epochs), **{k: [p[k] for p in per_epoch] for k in ("mean", "std", "min", "max")}}


def first_epoch_reaching(epochs: Sequence[int], values: Sequence[float | None], threshold: float) -> int | None:
    """The first training epoch (>= 1) whose value is >= ``threshold``, or None when the curve never gets there.

    Epoch 0 is the untrained network: a method does not "reach" an accuracy by not training.
    """
    for e, v in zip(epochs, values, strict=True):
        if e >= 1 and v is not None and v >= threshold:
            return int(e)
    return None


def best_trained(epochs: Sequence[int], values: Sequence[float]) -> float:
    """The best value at a training epoch (or step) >= 1: as in :func:`first_epoch_reaching`, epoch 0 is the
    untrained network, so a curve does not pass a floor through its starting point."""
    return max(v for e, v in zip(epochs, values, strict=True) if e >= 1)


def steady_rate(step_end: Sequence[float], batch: int, warmup: int) -> float | None:
    """Images per second between the end of step ``warmup`` and the last step (None if too few steps)."""
    if len(step_end) < warmup + 2:
        return None
    return (len(step_end) - 1 - warmup) * batch / (step_end[-1] - step_end[warmup])
