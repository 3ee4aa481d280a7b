"""The pre-registered decision rule of the learning-efficiency experiment (docs/results.md, section 8)."""

from __future__ import annotations

from typing import Any

from benchmarks.bench_learning_efficiency import verdict

STEPS = [0, 100, 200, 300, 400, 500, 600]


def runs(curves: dict[int, list[float]]) -> list[dict[str, Any]]:
    return [{"seed": seed, "steps": STEPS, "metrics": {"mAP": values}} for seed, values in curves.items()]


REF = runs({0: [0.30, 0.20, 0.22, 0.23, 0.24, 0.25, 0.25], 1: [0.28, 0.21, 0.22, 0.24, 0.25, 0.25, 0.26]})


def test_a_faster_higher_curve_holds():
    t = runs({0: [0.30, 0.27, 0.29, 0.31, 0.32, 0.33, 0.34], 1: [0.28, 0.26, 0.28, 0.30, 0.31, 0.32, 0.33]})
    v = verdict(t, REF, "mAP", bound=400, raw=0.27, planned=2)
    assert v["verdict"] == "holds" and v["R1_first_step_reaching_reference_final"] == 100
    assert v["R1"] and v["R2"] and v["R3"] and v["passes_raw_pixels"]


def test_the_untrained_start_does_not_pass_the_raw_pixel_floor():
    # every trained point is below raw pixels (0.27); only step 0, the untrained network, is above
    t = runs({0: [0.30, 0.24, 0.25, 0.26, 0.26, 0.26, 0.265], 1: [0.28, 0.24, 0.25, 0.26, 0.26, 0.26, 0.265]})
    v = verdict(t, REF, "mAP", bound=400, raw=0.27, planned=2)
    assert not v["passes_raw_pixels"] and v["verdict"] == "no semantic learning yet"


def test_reaching_the_reference_late_fails_r1_and_a_lost_seed_fails_r2():
    t = runs({0: [0.30, 0.20, 0.21, 0.22, 0.23, 0.24, 0.28], 1: [0.28, 0.20, 0.21, 0.22, 0.23, 0.24, 0.25]})
    v = verdict(t, REF, "mAP", bound=400, raw=0.2, planned=2)
    assert v["R1_first_step_reaching_reference_final"] == 600 and not v["R1"]
    assert not v["R2"] and v["R2_final_difference_per_seed"][1] < 0
    assert v["verdict"] == "does not hold"


def test_fewer_seeds_than_planned_reads_incomplete():
    t = runs({0: [0.30, 0.27, 0.29, 0.31, 0.32, 0.33, 0.34]})
    v = verdict(t, REF, "mAP", bound=400, raw=0.27, planned=3)
    assert v["seeds"] == [0] and v["verdict"] == "incomplete: 1 of 3 seeds (so far: holds)"
