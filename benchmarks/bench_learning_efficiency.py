"""The pre-registered learning-efficiency experiment (docs/results.md, section 8): truncated triplet vs BYOL.

Protocol, fixed before the first run (docs/results.md has the reasons): Fashion-MNIST, all 60,000 training
images, ResNet-18 at 32x32, batch 128, 1,000 steps, scores every 100 steps (linear probe on frozen features,
the primary metric, and kNN; bank: 1,000 training images per class; test: the full 10,000-image test set).
Arms: BYOL, truncated triplet (ranks 2..10), truncated triplet with ``loss.k=auto`` (the Bernoulli rule), and
BYOL at 2x BYOL's learning rate. A learning-rate pilot per arm (seed 100, 200 steps), then seeds 0, 1, 2. Floors:
raw pixels and the untrained network (seeds 0..5). The decision rule (R1 speed, R2 end point, R3 area, the
semantic-learning gate and the step-size control) is :func:`verdict`. PETS09 (phase 2): 840 steps (40 epochs of
its 1,346 crops), mAP.

Every run resumes from its last checkpoint when the command is started again, and finished runs are reused,
so a killed experiment continues where it stopped (``nohup ... &`` and start it again). ``--report`` writes the
JSON and plots from the runs finished so far without training anything.

    python -m benchmarks.bench_learning_efficiency                          # Fashion-MNIST, then PETS09
    python -m benchmarks.bench_learning_efficiency --datasets fashion-mnist --report
    python -m benchmarks.bench_learning_efficiency --smoke                  # seconds (CI)
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import machine, plots, presets, report, runs, stats
from benchmarks.presets import MonitorSpec
from reid_ssl.config import Config
from reid_ssl.fileio import write_json

ARMS = ("byol", "tt", "tt_auto", "byol_2x")
TRIPLETS = ("tt", "tt_auto")
LABELS = {
    "byol": "BYOL",
    "tt": "truncated triplet, ranks 2..10",
    "tt_auto": "truncated triplet, k: auto",
    "byol_2x": "BYOL, 2x learning rate",
}
PILOT_LRS = (0.05, 0.1, 0.2, 0.4)
PILOT_SEED = 100
UNTRAINED_SEEDS = 6


@dataclass(frozen=True)
class Setting:
    """One dataset's protocol (docs/results.md, section 8)."""

    dataset: str
    preset: presets.Preset
    steps: int  # optimizer steps of a main run
    every: int  # steps between scores
    warmup: int  # warm-up steps of a main run
    pilot_steps: int
    pilot_warmup: int
    primary: str
    secondary: str
    identities: int  # loss.identities for k: auto (0: estimated from the tracklets)
    seeds: tuple[int, ...] = (0, 1, 2)
    pilot_lrs: tuple[float, ...] = PILOT_LRS
    untrained_seeds: int = UNTRAINED_SEEDS


def setting(dataset: str, smoke: bool) -> Setting:
    """The protocol of ``dataset``; with ``smoke`` the same code path on tiny sizes (seconds)."""
    if dataset == "fashion-mnist":
        root = presets.FASHION_MNIST_ROOT
        spec = MonitorSpec(dataset, root, bank_per_class=1000, test_per_class=1000)
        p = presets.Preset(dataset, root, (32, 32), "resnet18", 0, 128, 1, 0, spec)
        s = Setting(dataset, p, 1000, 100, 100, 200, 20, "linear_top1", "knn_top1", identities=10)
    elif dataset == "pets09":
        spec = MonitorSpec(dataset, presets.PETS09_ROOT)
        p = presets.Preset(dataset, presets.PETS09_ROOT, (64, 32), "resnet18", 0, 64, 1, 0, spec)
        s = Setting(dataset, p, 840, 105, 35, 140, 35, "mAP", "rank1", identities=0)
    else:
        raise KeyError(f"unknown dataset {dataset!r}; choose one of {list(presets.DATASETS)}")
    if not smoke:
        return s
    size = (16, 16) if s.dataset == "fashion-mnist" else (32, 16)
    tiny = replace(s.preset, subset=96, batch_size=24, heads=(64, 32, 64), size=size)
    if dataset == "fashion-mnist":
        tiny = replace(tiny, monitor=replace(spec, bank_per_class=10, test_per_class=10))
    return replace(s, preset=tiny, steps=4, every=2, warmup=1, pilot_steps=2, pilot_warmup=1, seeds=(0,),
                   pilot_lrs=(0.05, 0.1), untrained_seeds=2)  # fmt: skip


@functools.lru_cache(maxsize=8)
def steps_per_epoch(p: presets.Preset) -> int:
    from reid_ssl.data.datasets import build_source

    return len(build_source(presets.build_config(p, "byol", 0).data)) // p.batch_size


def arm_config(s: Setting, arm: str, lr: float, seed: int, steps: int, warmup: int) -> Config:
    """The resolved config of one run: preset, loss of the arm, learning rate, schedule length, seed."""
    per_epoch = steps_per_epoch(s.preset)
    method = "byol" if arm.startswith("byol") else "truncated_triplet"
    extra = {"tt": ["loss.k=fixed", "loss.k_lo=2", "loss.k_hi=10"], "tt_auto": ["loss.k=auto"]}.get(arm, [])
    if arm == "tt_auto" and s.identities:
        extra.append(f"loss.identities={s.identities}")
    schedule = [
        f"optim.lr={lr}",
        f"optim.warmup_epochs={warmup / per_epoch}",
        f"train.epochs={math.ceil(steps / per_epoch)}",
        f"train.max_steps={steps}",
    ]
    return presets.build_config(s.preset, method, seed, [*extra, *schedule])


def floors(s: Setting, work: Path) -> dict[str, Any]:
    """Raw pixels and the untrained network (``untrained_seeds`` seeds) under the run's monitor; computed once
    and kept in the work folder (``floors-<dataset>-<hash>.json``) for a restarted experiment."""
    from benchmarks.monitors import RawPixels, build_probe_monitor, initial_metrics
    from reid_ssl.checkpoint import make_preprocess
    from reid_ssl.embedder import Embedder

    key = runs.run_key(arm_config(s, "byol", 0.1, 0, s.steps, s.warmup), s.preset.monitor, "floors", False)
    cached = work / f"floors-{s.dataset}-{s.untrained_seeds}-{key[:10]}.json"
    if cached.is_file():
        return json.loads(cached.read_text())

    monitor = build_probe_monitor(s.preset.monitor)
    h, w = s.preset.size
    raw = RawPixels(h, w, grey=s.dataset == "fashion-mnist")
    pixels = monitor(Embedder(raw, make_preprocess(h, w), "raw-pixels", flip=s.dataset == "pets09"))
    untrained = [initial_metrics(arm_config(s, "byol", 0.1, seed, s.steps, s.warmup), s.preset.monitor, monitor)
                 for seed in range(s.untrained_seeds)]  # fmt: skip
    result = {
        "raw_pixels": pixels,
        "untrained": {m: stats.mean_spread([u[m] for u in untrained]) for m in untrained[0]},
        "untrained_per_seed": untrained,
    }
    write_json(cached, result)
    return result


def run_all(tasks: list[dict[str, Any]], jobs: int, report_only: bool) -> list[dict[str, Any] | None]:
    """The scored runs of ``tasks`` (2 single-threaded processes at a time), or with ``report_only`` the finished
    ones (None where a run has not finished)."""
    if report_only:
        return [runs.run_scored(**t, only_finished=True) for t in tasks]
    return runs.run_many(tasks, jobs, fn=runs.run_scored)


def pilot(s: Setting, work: Path, jobs: int, report_only: bool) -> dict[str, Any]:
    """Arms 1-3 at each pilot learning rate (seed 100); each arm keeps the best primary score (ties: lower lr)."""
    grid = [(arm, lr) for arm in ARMS if arm != "byol_2x" for lr in s.pilot_lrs]
    tasks = [
        dict(cfg=arm_config(s, arm, lr, PILOT_SEED, s.pilot_steps, s.pilot_warmup), spec=s.preset.monitor,
             label=f"pilot-{arm}-lr{lr}", every=s.pilot_steps, work=work)
        for arm, lr in grid
    ]  # fmt: skip
    results = run_all(tasks, jobs, report_only)
    table: dict[str, dict[str, float | None]] = {}
    for (arm, lr), r in zip(grid, results, strict=True):
        table.setdefault(arm, {})[str(lr)] = r["metrics"][s.primary][-1] if r else None
    chosen: dict[str, float] = {}
    for arm, scores in table.items():
        done = [(v, -float(lr)) for lr, v in scores.items() if v is not None]
        if len(done) == len(s.pilot_lrs):
            chosen[arm] = -max(done)[1]
    if "byol" in chosen:
        chosen["byol_2x"] = 2 * chosen["byol"]
    return {"steps": s.pilot_steps, "seed": PILOT_SEED, "metric": s.primary, "final": table, "chosen_lr": chosen}


def main_runs(s: Setting, lrs: dict[str, float], work: Path, jobs: int, report_only: bool) -> dict[str, list]:
    """Seeds x arms at the chosen learning rates, seed-major (a cut-short experiment has whole seeds)."""
    order = [(seed, arm) for seed in s.seeds for arm in ARMS if arm in lrs]
    tasks = [
        dict(cfg=arm_config(s, arm, lrs[arm], seed, s.steps, s.warmup), spec=s.preset.monitor, label=arm,
             every=s.every, work=work)
        for seed, arm in order
    ]  # fmt: skip
    by_arm: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS if arm in lrs}
    for (_, arm), r in zip(order, run_all(tasks, jobs, report_only), strict=True):
        if r is not None:
            by_arm[arm].append(r)
    return by_arm


def area(steps: list[int], values: list[float]) -> float:
    """Mean value over the budget: the trapezoid area under the curve divided by its length in steps."""
    return float(np.trapezoid(values, steps) / (steps[-1] - steps[0]))


def verdict(t: list[dict], ref: list[dict], metric: str, bound: int, raw: float, planned: int = 0) -> dict[str, Any]:
    """The pre-registered rule for triplet runs ``t`` against reference runs ``ref`` (paired by seed). With fewer
    paired seeds than the ``planned`` ones, the verdict reads "incomplete" (what the rule says so far follows)."""
    seeds = sorted({r["seed"] for r in t} & {r["seed"] for r in ref})
    if not seeds:
        return {"verdict": "no paired seeds yet"}
    t_by, ref_by = {r["seed"]: r for r in t}, {r["seed"]: r for r in ref}
    steps = t_by[seeds[0]]["steps"]
    t_mean = [float(np.mean([t_by[x]["metrics"][metric][i] for x in seeds])) for i in range(len(steps))]
    ref_final = float(np.mean([ref_by[x]["metrics"][metric][-1] for x in seeds]))
    reach = stats.first_epoch_reaching(steps, t_mean, ref_final)
    end = {x: t_by[x]["metrics"][metric][-1] - ref_by[x]["metrics"][metric][-1] for x in seeds}
    auc = {x: area(steps, t_by[x]["metrics"][metric]) - area(steps, ref_by[x]["metrics"][metric]) for x in seeds}
    r1 = reach is not None and reach <= bound
    r2, r3 = all(d > 0 for d in end.values()), all(d > 0 for d in auc.values())
    semantic = stats.best_trained(steps, t_mean) > raw
    holds = r1 and r2 and r3 and semantic
    text = "holds" if holds else ("no semantic learning yet" if not semantic else "does not hold")
    if len(seeds) < planned:
        text = f"incomplete: {len(seeds)} of {planned} seeds (so far: {text})"
    return {
        "seeds": seeds,
        "R1_first_step_reaching_reference_final": reach,
        "R1_bound": bound,
        "R1": r1,
        "R2_final_difference_per_seed": end,
        "R2": r2,
        "R3_area_difference_per_seed": auc,
        "R3": r3,
        "passes_raw_pixels": semantic,
        "verdict": text,
    }


def summarize(s: Setting, by_arm: dict[str, list[dict]], floor: dict[str, Any]) -> dict[str, Any]:
    """Curves (mean ± spread), finals and areas per arm, and the verdicts of the decision rule."""
    arms: dict[str, Any] = {}
    for arm, rs in by_arm.items():
        if not rs:
            continue
        steps, metrics = rs[0]["steps"], (s.primary, s.secondary)
        curves = {m: stats.curve_summary(steps, [r["metrics"][m] for r in rs]) for m in metrics}
        arms[arm] = {
            "seeds": [r["seed"] for r in rs],
            "lr": rs[0]["lr"],
            "curves": curves,
            "final": {m: stats.mean_spread([r["metrics"][m][-1] for r in rs]) for m in metrics},
            "area": {m: stats.mean_spread([area(steps, r["metrics"][m]) for r in rs]) for m in metrics},
            "passes_raw_pixels": stats.best_trained(steps, curves[s.primary]["mean"]) > floor["raw_pixels"][s.primary],
            "runs": rs,
        }
    bound = (2 * s.steps // 3) // s.every * s.every
    verdicts: dict[str, Any] = {}
    for t in TRIPLETS:
        for ref in ("byol", "byol_2x"):
            for m in (s.primary, s.secondary):
                if t in arms and ref in arms:
                    key = f"{t}_vs_{ref}_{m}"
                    verdicts[key] = verdict(by_arm[t], by_arm[ref], m, bound, floor["raw_pixels"][m], len(s.seeds))
    return {"arms": arms, "verdicts": verdicts}


def plot(s: Setting, summary: dict[str, Any], floor: dict[str, Any], path: Path) -> Path:
    """Mean ± spread per arm over steps, with the raw-pixel and untrained-network floors, for both metrics."""
    panels = []
    for m in (s.primary, s.secondary):
        curves = []
        for arm, e in summary["arms"].items():
            c = e["curves"][m]
            curves.append(plots.Curve(f"{LABELS[arm]} (lr {e['lr']:g})", c["epochs"], c["mean"], c["std"]))
        u = floor["untrained"][m]
        floors_ = [
            plots.Floor("raw pixels", floor["raw_pixels"][m]),
            plots.Floor(f"untrained network ({u['n']} seeds, ±1 std)", u["mean"], u["std"], ":"),
        ]
        seeds = max((len(e["seeds"]) for e in summary["arms"].values()), default=0)
        title = f"{s.dataset}: {m} (bands: ±1 std over {seeds} seeds)"
        panels.append(plots.Panel(m, curves, title=title, xlabel="optimizer step", floors=floors_))
    return plots.plot_panels(path, panels)


def run_dataset(dataset: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    missing = presets.dataset_available(dataset)
    if missing:
        return {"skipped": missing}
    s = setting(dataset, args.smoke)
    print(f"{dataset}: floors", flush=True)
    floor = floors(s, work)
    print(f"{dataset}: learning-rate pilot {list(s.pilot_lrs)}, {s.pilot_steps} steps", flush=True)
    pil = pilot(s, work, args.jobs, args.report)
    print(f"{dataset}: chosen learning rates {pil['chosen_lr']}", flush=True)
    by_arm = main_runs(s, pil["chosen_lr"], work, args.jobs, args.report)
    summary = summarize(s, by_arm, floor)
    png = plot(s, summary, floor, report.png_path(args.out, dataset)) if summary["arms"] else None
    return {"protocol": {**asdict(s), "R1_bound": (2 * s.steps // 3) // s.every * s.every}, "floors": floor,
            "pilot": pil, **summary, "plot": str(png) if png else None}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (CI)")
    ap.add_argument("--out", type=Path, default=report.default_out("learning_efficiency"), help="JSON output")
    ap.add_argument("--datasets", type=presets.parse_list, default=list(presets.DATASETS), help="comma-separated")
    ap.add_argument("--jobs", type=int, help="runs at once, one thread each (default: the cores; smoke: 1)")
    default_work = presets.WORK_DIR.relative_to(machine.REPO)
    ap.add_argument("--work-dir", type=Path, help=f"runs go here (default {default_work})")
    ap.add_argument("--report", action="store_true", help="summarize the finished runs, train nothing")
    args = ap.parse_args(argv)
    args.jobs = args.jobs or (1 if args.smoke else machine.available_cores())
    machine.set_threads(1)  # the floors: one thread, like each training job (2 threads stall on a shared machine)
    result = report.header("learning_efficiency", args.smoke)
    result["settings"] = {"arms": LABELS, "pilot_seed": PILOT_SEED, "jobs": args.jobs, "report_only": args.report}
    runs.run_datasets(result, args, run_dataset, time.perf_counter())
    for dataset, r in result["datasets"].items():
        for key, v in r.get("verdicts", {}).items():
            print(f"{dataset} {key}: {v['verdict']} (R1 {v.get('R1')}, R2 {v.get('R2')}, R3 {v.get('R3')})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
