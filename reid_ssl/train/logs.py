"""What a run writes besides its checkpoint: ``metrics.jsonl``, ``metrics.csv``, TensorBoard events and the
loss-curve PNG."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any

from reid_ssl.fileio import json_text, write_json


class MetricsLog:
    """``<out_dir>/metrics.jsonl`` (one JSON record per logged step and per monitor run) and TensorBoard events
    (``<out_dir>/tensorboard/``); at the end ``loss_curve.png`` and ``config.json``. Main process only."""

    STEP_SCALARS = ("loss", "lr", "ema_momentum", "img_per_s", "pos_cos", "deputy_cos", "target_std")

    def __init__(self, out_dir: Path, tensorboard: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "metrics.jsonl"
        self.writer = tensorboard_writer(self.out_dir) if tensorboard else None

    def step(
        self,
        step: int,
        epoch: int,
        loss: float,
        lr: float,
        momentum: float,
        img_per_s: float,
        data_wait_frac: float,
        similarity: dict[str, float],
    ) -> dict[str, Any]:
        """One training record: loss, lr, EMA momentum, throughput, loader wait and similarity diagnostics."""
        record = {
            "step": step,
            "epoch": epoch,
            "loss": loss,
            "lr": lr,
            "ema_momentum": momentum,
            "img_per_s": img_per_s,
            "data_wait_frac": data_wait_frac,
            "time": time.time(),
            **similarity,
        }
        append_jsonl(self.path, record)
        if self.writer is not None:
            for k in self.STEP_SCALARS:
                self.writer.add_scalar(f"train/{k}", record[k], step)
        return record

    def monitor(self, step: int, epoch: int, scores: dict[str, float]) -> None:
        """The retrieval monitor's scores, as ``eval_<name>`` fields."""
        append_jsonl(self.path, {"step": step, "epoch": epoch, **{f"eval_{k}": v for k, v in scores.items()}})
        if self.writer is not None:
            for k, v in scores.items():
                self.writer.add_scalar(f"eval/{k}", v, step)

    def records(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def close(self, config: dict[str, Any]) -> None:
        """Flush TensorBoard, draw ``loss_curve.png``, write ``metrics.csv`` and the resolved ``config.json``."""
        if self.writer is not None:
            self.writer.close()
        plot_loss_curve(self.path, self.out_dir / "loss_curve.png")
        write_metrics_csv(self.path, self.out_dir / "metrics.csv")
        write_json(self.out_dir / "config.json", config)


def write_metrics_csv(jsonl: Path, out: Path) -> Path:
    """``metrics.jsonl`` as one CSV table (spreadsheets, pandas): a row per record, a column per field seen in
    any record (training steps and monitor runs), empty where a record has no such field."""
    records = read_metrics(jsonl)
    columns: dict[str, None] = {}
    for r in records:
        columns.update(dict.fromkeys(r))
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), restval="")
        writer.writeheader()
        writer.writerows(records)
    tmp.replace(out)
    return out


class SampleLog:
    """``<out_dir>/samples-rank<r>.csv``: ``epoch,image`` for every image process ``r`` trained on (appended
    across resumes; ``train.sample_log``). Every process writes its own file, nothing else."""

    def __init__(self, out_dir: Path, rank: int) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / f"samples-rank{rank}.csv"
        if not self.path.is_file():
            self.path.write_text("epoch,image\n")

    def write(self, epoch: int, images: Any) -> None:
        with self.path.open("a") as f:
            f.writelines(f"{epoch},{int(i)}\n" for i in images)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line; a non-finite number (a diverged loss) is written as ``null``."""
    with path.open("a") as f:
        f.write(json_text(record, indent=None))


def tensorboard_writer(out_dir: Path) -> Any:
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
    losses = [(r["step"], math.nan if r["loss"] is None else r["loss"]) for r in records if "loss" in r]
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
