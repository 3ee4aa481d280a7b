"""Plots of benchmark results: mean ± spread curves (one axis per panel) and horizontal bars."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Curve:
    """One line of a plot: mean per epoch with a ± spread band and, optionally, one marked epoch."""

    label: str
    epochs: list[int]
    mean: list[float | None]
    spread: list[float | None]
    mark: int | None = None
    style: str = "-"


@dataclass
class Floor:
    """A horizontal reference level with an optional ± spread band (e.g. raw pixels, the untrained network)."""

    label: str
    value: float
    spread: float = 0.0
    style: str = "--"


@dataclass
class Panel:
    """One axis: its curves, y label, x label and optional horizontal reference lines."""

    ylabel: str
    curves: list[Curve]
    hline: float | None = None
    hline_label: str = ""
    title: str = ""
    xlabel: str = "epoch"
    floors: list[Floor] = field(default_factory=list)


def plot_panels(path: str | Path, panels: Sequence[Panel], suptitle: str = "") -> Path:
    """Mean ± spread curves (shaded band), one axis per panel; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes[0], panels, strict=True):
        for i, c in enumerate(panel.curves):
            color = colors[i % len(colors)]
            x = np.asarray(c.epochs, dtype=float)
            m = np.asarray([np.nan if v is None else v for v in c.mean], dtype=float)
            s = np.asarray([0.0 if v is None else v for v in c.spread], dtype=float)
            ax.plot(x, m, c.style, color=color, marker="o", ms=3, lw=1.5, label=c.label)
            ax.fill_between(x, m - s, m + s, color=color, alpha=0.18, lw=0)
            if c.mark is not None and c.mark in c.epochs:
                j = c.epochs.index(c.mark)
                ax.plot([x[j]], [m[j]], marker="*", ms=14, color=color, mec="black", mew=0.6, ls="none")
        if panel.hline is not None:
            ax.axhline(panel.hline, color="gray", ls="--", lw=1, label=panel.hline_label or None)
        for j, f in enumerate(panel.floors):
            shade = ("black", "dimgray", "darkgray")[j % 3]
            ax.axhline(f.value, color=shade, ls=f.style, lw=1.2, label=f.label)
            if f.spread:
                ax.axhspan(f.value - f.spread, f.value + f.spread, color=shade, alpha=0.12, lw=0)
        ax.set_xlabel(panel.xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(panel.ylabel)
        if panel.title:
            ax.set_title(panel.title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return _save(fig, path)


def plot_bars(
    path: str | Path,
    labels: Sequence[str],
    means: Sequence[float | None],
    errors: Sequence[float | None],
    xlabel: str,
    title: str = "",
    reference: float | None = None,
) -> Path:
    """Horizontal bars with error bars (e.g. an ablation's final metric per variant)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(labels) + 1.4))
    y = np.arange(len(labels))
    m = np.asarray([np.nan if v is None else v for v in means], dtype=float)
    e = np.asarray([0.0 if v is None else v for v in errors], dtype=float)
    ax.barh(y, m, xerr=e, color="#4c72b0", alpha=0.85, capsize=3)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    if reference is not None:
        ax.axvline(reference, color="gray", ls="--", lw=1)
    finite = m[np.isfinite(m)]
    if len(finite):
        lo, hi = float(finite.min() - e.max()), float(finite.max() + e.max())
        pad = max(0.02, 0.15 * (hi - lo))
        ax.set_xlim(max(0.0, lo - pad), hi + pad)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    """Lay out, write the PNG (creating its folder) and close ``fig``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
