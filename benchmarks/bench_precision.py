"""What bf16 autocast does to accuracy on the default recipe: ``train.amp=bf16`` against fp32, paired by seed.

The default CPU recipe (``reid_ssl train`` with no arguments, i.e. the defaults of ``reid_ssl/config.py``) is
trained with ``train.amp=none`` and ``train.amp=bf16`` for each seed; the PETS09 retrieval monitor (rank-1 / mAP,
flip-averaged, at the checkpoint's test size) scores the online backbone before training and every
``train.eval_every_epochs`` on the **validation** split (``pets09-val``: the default is a choice, so it is made on
validation; the test split is not looked at). Reports the final values per seed, their paired differences
(bf16 - fp32), mean ± sample std, and each run's training img/s (the two precisions run side by side, so their
speed ratio is measured under the same load).

    python -m benchmarks.bench_precision                      # seeds 0,1,2: ~30 min on a quiet 2-core machine
    python -m benchmarks.bench_precision --seeds 0,1,2,3 --epochs 35
    python -m benchmarks.bench_precision --smoke
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks import machine, plots, presets, report, runs, stats
from reid_ssl.config import load_config
from reid_ssl.fileio import write_json

PRECISIONS = ("none", "bf16")
METRICS = ("rank1", "mAP")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="2 epochs on 128 crops at 32x16, seconds (CI)")
    ap.add_argument("--out", type=Path, default=report.default_out("precision"), help="JSON output")
    ap.add_argument("--seeds", type=presets.parse_ints, help="comma-separated (default 0,1,2; smoke 0)")
    ap.add_argument("--epochs", type=int, help="default: the recipe's train.epochs (smoke 2)")
    ap.add_argument("--jobs", type=int, help="runs at once, one torch thread each (default: the cores; smoke 1)")
    ap.add_argument("--work-dir", type=Path, help="runs go here (default runs/bench)")
    args = ap.parse_args(argv)
    if presets.dataset_available("pets09"):
        ap.error(presets.dataset_available("pets09"))
    seeds = args.seeds or ([0] if args.smoke else [0, 1, 2])
    jobs = args.jobs or (1 if args.smoke else machine.available_cores())
    machine.set_threads(1 if args.smoke or jobs > 1 else None)
    base = [f"data.root={presets.PETS09_ROOT}", "train.tensorboard=false"]
    if args.smoke:
        base += ["data.max_images=128", "data.height=32", "data.width=16", "data.eval_height=32", "data.eval_width=16"]
        base += ["data.num_workers=0", "train.batch_size=16", "train.eval_every_epochs=1", "model.proj_hidden_dim=64"]
        base += ["model.proj_dim=32", "model.pred_hidden_dim=64"]
    epochs = args.epochs or (2 if args.smoke else None)
    if epochs:
        base.append(f"train.epochs={epochs}")
    spec = presets.MonitorSpec("pets09", presets.PETS09_ROOT, split="pets09-val")
    result = report.header("precision", args.smoke)
    result["settings"] = {
        "seeds": seeds,
        "jobs": jobs,
        "overrides": base,
        "recipe": "reid_ssl/config.py defaults",
        "split": spec.split,
    }
    t = time.perf_counter()
    with runs.work_dir(args.work_dir, args.smoke) as work:
        tasks = [
            dict(cfg=load_config(None, [*base, f"train.amp={amp}", f"train.seed={seed}"]), spec=spec,
                 label=f"default-amp_{amp}", work=work)
            for seed in seeds
            for amp in PRECISIONS
        ]  # fmt: skip
        done = runs.run_many(tasks, jobs)
    by_amp: dict[str, list[dict[str, Any]]] = {a: [] for a in PRECISIONS}
    for task, r in zip(tasks, done, strict=True):
        by_amp[task["cfg"].train.amp].append(r)
    out: dict[str, Any] = {}
    for amp, rs in by_amp.items():
        out[amp] = {
            "final": {m: stats.mean_spread([r["metrics"][m][-1] for r in rs]) for m in METRICS},
            "per_seed": {str(r["seed"]): {m: r["metrics"][m][-1] for m in METRICS} for r in rs},
            "train_images_per_second": [r["train_images_per_second"] for r in rs],
            "curves": {m: stats.curve_summary(rs[0]["epochs"], [r["metrics"][m] for r in rs]) for m in METRICS},
            "runs": rs,
        }
    paired = {
        m: [b["metrics"][m][-1] - f["metrics"][m][-1] for f, b in zip(by_amp["none"], by_amp["bf16"], strict=True)]
        for m in METRICS
    }
    speed = [b["train_images_per_second"] / f["train_images_per_second"]
             for f, b in zip(by_amp["none"], by_amp["bf16"], strict=True)]  # fmt: skip
    result["precisions"] = out
    result["bf16_minus_fp32"] = {m: {"per_seed": v, **stats.mean_spread(v)} for m, v in paired.items()}
    result["bf16_speedup_per_seed"] = speed
    panels = []
    for m in METRICS:
        parts = [(a, c["curves"][m]) for a, c in out.items()]
        curves = [plots.Curve(f"amp={a}", c["epochs"], c["mean"], c["std"]) for a, c in parts]
        panels.append(plots.Panel(m, curves, title=f"PETS09 default recipe: {m} (±1 std over {len(seeds)} seeds)"))
    result["plot"] = str(plots.plot_panels(report.png_path(args.out), panels))
    write_json(args.out, report.finish(result, t))
    for m, v in result["bf16_minus_fp32"].items():
        print(f"{m}: fp32 {out['none']['final'][m]['mean']:.4f}, bf16 {out['bf16']['final'][m]['mean']:.4f}; "
              f"bf16 - fp32 per seed {[round(x, 4) for x in v['per_seed']]} (mean {v['mean']:+.4f})")  # fmt: skip
    print(f"bf16 speed-up per seed {[round(x, 2) for x in speed]} (median {statistics.median(speed):.2f})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
