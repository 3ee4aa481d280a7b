"""The equal-time backbone benchmark's pilot: a steady rate that leaves out start-up and the first steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.bench_backbones import steady_rate


def _metrics(tmp_path: Path, times: dict[int, float]) -> Path:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0, "time": t}) + "\n" for s, t in times.items()))
    return path


def test_steady_rate_uses_only_the_window(tmp_path: Path) -> None:
    # a slow start (step 10 after 60 s of start-up), then 30 steps of 64 images in 20 s
    path = _metrics(tmp_path, {10: 1060.0, 20: 1066.0, 30: 1073.0, 40: 1080.0})
    assert steady_rate(path, 10, 40, batch=64) == pytest.approx(30 * 64 / 20.0)


def test_steady_rate_names_a_missing_step(tmp_path: Path) -> None:
    path = _metrics(tmp_path, {10: 1.0, 20: 2.0})
    with pytest.raises(RuntimeError, match="steps 10 and 40"):
        steady_rate(path, 10, 40, batch=64)


def test_summary_reads_only_this_pilots_runs_next_to_pilot_rows() -> None:
    """Pilot rows carry no seed; runs and trained scores of an earlier pilot method are left out."""
    from benchmarks.bench_backbones import PILOT_METHOD, summarise

    this = {"budget": 120.0, "pilot": PILOT_METHOD}
    rows = [
        {"kind": "pilot", "backbone": "resnet18", "method": PILOT_METHOD, "img_per_s": 60.0},
        {"kind": "train", "backbone": "resnet18", "seed": 0, "steps": 100, "seconds": 118.0, **this},
        {"kind": "train", "backbone": "resnet18", "seed": 0, "steps": 90, "seconds": 75.0, "budget": 120.0},
        {
            "kind": "score",
            "backbone": "resnet18",
            "seed": 0,
            "split": "pets09",
            "model": "trained",
            "rank1": 0.5,
            "mAP": 0.4,
            **this,
        },
        {
            "kind": "score",
            "backbone": "resnet18",
            "seed": 0,
            "split": "pets09",
            "model": "trained",
            "rank1": 0.1,
            "mAP": 0.1,
            "budget": 120.0,
        },
        {
            "kind": "score",
            "backbone": "resnet18",
            "seed": 0,
            "split": "pets09",
            "model": "untrained",
            "rank1": 0.3,
            "mAP": 0.2,
        },
    ]
    table = {r["model"]: r for r in summarise(rows, ["resnet18"], 120.0, [0])}
    assert table["trained"]["rank1"] == 0.5 and table["trained"]["images"] == 6400
    assert table["trained"]["train_s"] == 118.0 and table["untrained"]["rank1"] == 0.3
