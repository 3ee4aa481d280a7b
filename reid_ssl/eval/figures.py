"""Figures of an evaluation: the CMC curve and ranked-result strips."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

CORRECT, WRONG, QUERY = (40, 170, 60), (210, 40, 40), (60, 90, 200)


def plot_cmc(curves: dict[str, np.ndarray], path: str | Path, title: str = "CMC") -> Path:
    """CMC curve(s) as a PNG: x = rank (1..len), y = matching rate in %."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=110)
    for label, cmc in curves.items():
        cmc = np.asarray(cmc, dtype=float)
        ranks = np.arange(1, len(cmc) + 1)
        ax.plot(
            ranks,
            100 * cmc,
            marker="o" if len(cmc) <= 20 else None,
            markersize=3,
            clip_on=False,
            label=f"{label} (rank-1 {100 * cmc[0]:.1f}%)",
        )
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_ylim(0, 101)
    ax.set_xlim(1, max(2, max(len(c) for c in curves.values())))
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _tile(path: str, size: tuple[int, int], colour: tuple[int, int, int], border: int = 4) -> Any:
    from PIL import Image, ImageOps

    from reid_ssl.images import ImageError, open_rgb

    w, h = size
    try:
        img = open_rgb(path).resize((w - 2 * border, h - 2 * border))
    except ImageError:
        img = Image.new("RGB", (w - 2 * border, h - 2 * border), (128, 128, 128))
    return ImageOps.expand(img, border=border, fill=colour)


def ranked_strip(
    query: tuple[str, int, int],
    ranked: Sequence[tuple[str, int, int]],
    path: str | Path,
    size: tuple[int, int] = (64, 128),
) -> Path:
    """One PNG row: the query (blue frame), a gap, then its ranked gallery items, green = same pid (a true
    match), red = wrong. Each tile is labelled with its rank and pid."""
    from PIL import Image, ImageDraw

    w, h = size
    gap, label_h = 12, 14
    canvas = Image.new("RGB", (w * (len(ranked) + 1) + gap, h + label_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    canvas.paste(_tile(query[0], size, QUERY), (0, 0))
    draw.text((2, h + 1), f"q {query[1]}", fill=(0, 0, 0))
    for r, (img, pid, _) in enumerate(ranked, 1):
        x = w * r + gap
        canvas.paste(_tile(img, size, CORRECT if pid == query[1] else WRONG), (x, 0))
        draw.text((x + 2, h + 1), f"{r}: {pid}", fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
