"""Learning efficiency on real data: truncated triplet vs BYOL vs SimCLR in the same trainer.

Every method runs through :func:`reid_ssl.train.train` with the same backbone, views, optimizer, schedule,
data subset and seeds; only the loss (and, for SimCLR, the shared target without predictor) changes. After
every epoch (and before the first) a monitor scores the online backbone:

* ``fashion-mnist``: weighted kNN top-1 of 2,000 test images against a 5,000-image labeled bank (labels are
  used only here), plus a linear probe of the final backbone;
* ``pets09``: rank-1 / mAP on the PETS09-S2L1 tracklet retrieval split (tracklet ids as identities: an
  undercount of true matches, datasets/README.md, "PETS09").

Reports, per dataset, the mean ± spread (sample std over seeds) per epoch, the final values, and the epoch at
which each method's mean curve first reaches BYOL's final mean (also per seed, against the same seed's BYOL).
Writes ``benchmarks/results/efficiency.json`` and one PNG per dataset next to it.

    python -m benchmarks.bench_efficiency                      # both datasets, 3 methods x 3 seeds (~80 min)
    python -m benchmarks.bench_efficiency --datasets fashion-mnist --seeds 0,1,2
    python -m benchmarks.bench_efficiency --smoke              # seconds (CI)
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks import plots, presets, report, runs, stats
from reid_ssl.config import to_dict

DEFAULT_METHODS = ("truncated_triplet", "byol", "simclr")


def summarize(dataset: str, by_method: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Curves, finals, linear probes and epochs-to-BYOL's-final of every method on one dataset."""
    metrics = presets.METRICS[dataset]
    byol = by_method.get("byol", [])
    byol_final = {m: stats.mean_spread([r["metrics"][m][-1] for r in byol]) for m in metrics} if byol else {}
    byol_by_seed = {r["seed"]: r for r in byol}
    methods: dict[str, Any] = {}
    for method, method_runs in by_method.items():
        epochs = method_runs[0]["epochs"]
        curves = {m: stats.curve_summary(epochs, [r["metrics"][m] for r in method_runs]) for m in metrics}
        entry: dict[str, Any] = {
            "curves": curves,
            "final": {m: stats.mean_spread([r["metrics"][m][-1] for r in method_runs]) for m in metrics},
            "seconds_per_run": stats.mean_spread([r["seconds"] for r in method_runs]),
            "train_images_per_second": stats.mean_spread([r["train_images_per_second"] for r in method_runs]),
        }
        if all("linear" in r for r in method_runs):
            entry["linear_top1"] = stats.mean_spread([r["linear"]["linear_top1"] for r in method_runs])
        if byol_final:
            entry["epochs_to_byol_final"] = {
                m: {
                    "mean_curve": stats.first_epoch_reaching(epochs, curves[m]["mean"], byol_final[m]["mean"]),
                    "per_seed": [
                        stats.first_epoch_reaching(epochs, r["metrics"][m], byol_by_seed[r["seed"]]["metrics"][m][-1])
                        if r["seed"] in byol_by_seed
                        else None
                        for r in method_runs
                    ],
                }
                for m in metrics
            }
        methods[method] = {**entry, "runs": method_runs}
    table = []
    for method, entry in methods.items():
        row: dict[str, Any] = {"method": method, "seeds": len(entry["runs"])}
        for m in metrics:
            row[f"untrained_{m}"] = entry["curves"][m]["mean"][0]
            row[f"final_{m}"] = entry["final"][m]["mean"]
            row[f"final_{m}_std"] = entry["final"][m]["std"]
            if "epochs_to_byol_final" in entry:
                row[f"epochs_to_byol_final_{m}"] = entry["epochs_to_byol_final"][m]["mean_curve"]
        if "linear_top1" in entry:
            row["linear_top1"], row["linear_top1_std"] = entry["linear_top1"]["mean"], entry["linear_top1"]["std"]
        row["seconds_per_run"] = entry["seconds_per_run"]["mean"]
        table.append(row)
    return {"metrics": list(metrics), "byol_final": byol_final, "methods": methods, "table": table}


def plot(dataset: str, summary: dict[str, Any], path: Path, seeds: int) -> Path:
    """Mean ± spread per epoch for each method and metric; a star where a curve first reaches BYOL's final."""
    panels = []
    for m in summary["metrics"]:
        curves = []
        for method, entry in summary["methods"].items():
            c = entry["curves"][m]
            label = method
            if "linear_top1" in entry and entry["linear_top1"]["mean"] is not None:
                label += f" (linear {entry['linear_top1']['mean']:.3f}±{entry['linear_top1']['std']:.3f})"
            mark = entry.get("epochs_to_byol_final", {}).get(m, {}).get("mean_curve")
            curves.append(plots.Curve(label, c["epochs"], c["mean"], c["std"], mark=mark))
        byol = summary["byol_final"].get(m, {}).get("mean")
        panels.append(
            plots.Panel(
                ylabel=m,
                curves=curves,
                hline=byol,
                hline_label="BYOL final" if byol is not None else "",
                title=f"{dataset}: {m} (band: ±1 std over {seeds} seed{'s' * (seeds > 1)}; ★ first reaches BYOL final)",
            )
        )
    return plots.plot_panels(path, panels)


def run_dataset(dataset: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """All methods x seeds on one dataset, then :func:`summarize` and :func:`plot`."""
    p = presets.available_preset(dataset, args)
    if isinstance(p, str):
        return {"skipped": p}
    print(f"{dataset}: {', '.join(args.methods)} x seeds {args.seeds}, {p.epochs} epochs, {p.backbone} {p.size}")
    tasks, configs = [], {}
    for seed in args.seeds:  # seed-major: a cut-short benchmark has every method for the first seeds
        for method in args.methods:
            cfg = presets.build_config(p, method, seed)
            configs.setdefault(method, to_dict(cfg))
            tasks.append(runs.training_task(p, cfg, method, work, args))
    by_method: dict[str, list[dict[str, Any]]] = {}
    for task, run in zip(tasks, runs.run_many(tasks, args.jobs), strict=True):
        by_method.setdefault(task["label"], []).append(run)
    summary = summarize(dataset, by_method)
    png = plot(dataset, summary, report.png_path(args.out, dataset), len(args.seeds))
    shared = configs[args.methods[0]]
    for key in ("out_dir", "seed"):
        shared["train"].pop(key)
    return {
        "preset": {**asdict(p), "overrides": p.overrides()},
        "shared_config": shared,  # of the first method; method_overrides says what each method changes
        "method_overrides": {
            m: presets.method_overrides(m, p.batch_size, presets.CLASSES[dataset]) for m in args.methods
        },
        **summary,
        "plot": str(png),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny subsets and models, seconds (CI)")
    ap.add_argument("--out", type=Path, default=report.default_out("efficiency"), help="JSON output")
    ap.add_argument("--datasets", type=presets.parse_list, default=list(presets.DATASETS), help="comma-separated")
    ap.add_argument("--methods", type=presets.parse_list, default=list(DEFAULT_METHODS), help="comma-separated")
    ap.add_argument("--seeds", type=presets.parse_ints, help="comma-separated (default 0,1,2; smoke 0)")
    presets.add_preset_args(ap)
    args = ap.parse_args(argv)
    for m in args.methods:
        if m not in presets.METHODS:
            ap.error(f"unknown method {m!r}; choose from {list(presets.METHODS)}")
    for d in args.datasets:
        if d not in presets.DATASETS:
            ap.error(f"unknown dataset {d!r}; choose from {list(presets.DATASETS)}")
    result = report.header("efficiency", args.smoke)
    result["settings"] = {
        "methods": args.methods,
        **presets.run_settings(args, seeds=(0, 1, 2)),
        "spread": "sample standard deviation over seeds (ddof=1)",
        "epoch_0": "the seed's freshly initialised backbone, before any training",
    }
    runs.run_datasets(result, args, run_dataset, time.perf_counter())
    for dataset, r in result["datasets"].items():
        if "table" in r:
            columns = [c for c in r["table"][0] if c != "seeds"]
            print(f"\n{dataset} ({len(args.seeds)} seeds; *_std: sample std over seeds)")
            print(report.markdown_table(r["table"], columns))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
