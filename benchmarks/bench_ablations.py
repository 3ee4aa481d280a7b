"""Ablations of the truncated triplet: what each ingredient is worth, in the same trainer and budget.

The reference is ``bench_efficiency.py``'s truncated-triplet setting (deputy = mean of the negatives ranked
2..10, gamma 2, margin 100, single-resolution views, two augmented views of one image as positives, one
process). Each variant changes one thing:

* deputy window: ``hardest_1`` (rank 1 only), ``rank_k`` (a single rank k, the smallest whose negative is a
  true one with probability >= 0.99 for ``batch - 1`` negatives and the dataset's classes; docs/method.md,
  "Choosing k"),
  ``median`` (the paper's earlier median-triplet loss);
* ``gamma_1`` / ``gamma_4``: the weight of the positive distance (gamma 1 makes the pull BYOL's);
* ``margin_0.5``: a small margin, so the hinge switches off for easy triplets (100 keeps it always on);
* ``multires``: the reference code's random per-batch resize of each view (docs/method.md, "Views");
* ``bag_positives``: the second view is another crop of the same PETS09 tracklet (pets09 only);
* ``ddp2_per_device`` / ``ddp2_gathered``: two ``torchrun`` processes (gloo, one thread each) of half the batch,
  with negatives from the process's own half or gathered from both (``loss.gather_negatives``).

Reports each variant's curve and final metric (mean ± sample std over seeds) and its difference from the
reference, paired by seed. Writes ``benchmarks/results/ablations.json`` and ``ablations.png``.

    python -m benchmarks.bench_ablations                           # PETS09, all variants, seeds 0,1, 6 epochs
    python -m benchmarks.bench_ablations --dataset fashion-mnist --seeds 0 --epochs 10
    python -m benchmarks.bench_ablations --variants reference,hardest_1,rank_k
    python -m benchmarks.bench_ablations --smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from benchmarks import plots, presets, report, runs, stats
from reid_ssl.fileio import write_json
from reid_ssl.losses import smallest_safe_k

# name -> (group, description)
VARIANTS: dict[str, tuple[str, str]] = {
    "reference": ("reference", "deputy ranks 2..10, gamma 2, margin 100, no multires, augment positives, 1 process"),
    "hardest_1": ("deputy window", "hardest negative only (ranks 1..1)"),
    "rank_k": ("deputy window", "one rank k from the Bernoulli rule (docs/method.md, 'Choosing k')"),
    "median": ("deputy window", "median negative (median_triplet, paper v1/v2)"),
    "gamma_1": ("gamma", "gamma 1"),
    "gamma_4": ("gamma", "gamma 4"),
    "margin_0.5": ("margin", "margin 0.5: hinge inactive for easy triplets"),
    "multires": ("multi-resolution", "random per-batch resize of each view on"),
    "bag_positives": ("positives", "second view from another crop of the same tracklet"),
    "ddp2_per_device": ("negatives", "2 processes x batch/2, per-device negatives (batch/2 - 1)"),
    "ddp2_gathered": ("negatives", "2 processes x batch/2, gathered negatives (batch - 1)"),
}
SMOKE_VARIANTS = ("reference", "rank_k", "median", "bag_positives", "ddp2_gathered")
ABLATION_EPOCHS = 6  # default epochs (the efficiency preset's are for 3 methods x 3 seeds)


def variant_overrides(name: str, p: presets.Preset) -> tuple[list[str], int] | str:
    """The config overrides and process count of a variant, or the reason it does not apply to ``p``."""
    half = p.batch_size // 2
    if name == "reference":
        return [], 1
    if name == "hardest_1":
        return ["loss.k_lo=1", "loss.k_hi=1"], 1
    if name == "rank_k":
        k = smallest_safe_k(p.batch_size - 1, presets.CLASSES[p.dataset])
        return [f"loss.k_lo={k}", f"loss.k_hi={k}"], 1
    if name == "median":
        return ["loss.name=median_triplet"], 1
    if name in ("gamma_1", "gamma_4"):
        return [f"loss.gamma={name[-1]}"], 1
    if name == "margin_0.5":
        return ["loss.margin=0.5"], 1
    if name == "multires":
        return ["model.multires=true"], 1
    if name == "bag_positives":
        if p.dataset != "pets09":
            return f"{p.dataset} has no bags (tracklets); only pets09 does"
        return ["data.positives=bag"], 1
    if name in ("ddp2_per_device", "ddp2_gathered"):
        if half - 1 < 10:
            return f"batch {p.batch_size} / 2 processes leaves {half - 1} negatives, fewer than the deputy window's 10"
        return [f"train.batch_size={half}", f"loss.gather_negatives={name == 'ddp2_gathered'}"], 2
    raise KeyError(f"unknown variant {name!r}; choose from {list(VARIANTS)}")


def summarize(dataset: str, results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per variant: final metric mean ± std and the seed-paired difference from the reference."""
    head = presets.METRICS[dataset][0]
    ref = {r["seed"]: r["metrics"][head][-1] for r in results.get("reference", {}).get("runs", [])}
    rows = []
    for name, entry in results.items():
        if "runs" not in entry:
            rows.append({"variant": name, "group": entry["group"], "skipped": entry["skipped"]})
            continue
        finals = [r["metrics"][head][-1] for r in entry["runs"]]
        paired = [r["metrics"][head][-1] - ref[r["seed"]] for r in entry["runs"] if r["seed"] in ref]
        entry["final"] = {m: stats.mean_spread([r["metrics"][m][-1] for r in entry["runs"]]) for m in entry["curves"]}
        entry["delta_vs_reference"] = stats.mean_spread(paired)
        rows.append(
            {
                "variant": name,
                "group": entry["group"],
                f"final_{head}": stats.mean_spread(finals)["mean"],
                f"final_{head}_std": stats.mean_spread(finals)["std"],
                f"delta_{head}": entry["delta_vs_reference"]["mean"],
                f"delta_{head}_std": entry["delta_vs_reference"]["std"],
                "seeds": len(finals),
                "seconds_per_run": stats.mean_spread([r["seconds"] for r in entry["runs"]])["mean"],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help=f"tiny runs of {', '.join(SMOKE_VARIANTS)} (CI)")
    ap.add_argument("--out", type=Path, default=report.default_out("ablations"), help="JSON output")
    ap.add_argument("--dataset", default=None, help="pets09 (default) or fashion-mnist")
    ap.add_argument("--variants", type=presets.parse_list, help="comma-separated (default: all)")
    ap.add_argument("--seeds", type=presets.parse_ints, help="comma-separated (default 0,1; smoke 0)")
    presets.add_preset_args(ap)
    args = ap.parse_args(argv)
    variants = args.variants or list(SMOKE_VARIANTS if args.smoke else VARIANTS)
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; choose from {list(VARIANTS)}")
    dataset = args.dataset or ("pets09" if presets.dataset_available("pets09") is None else "fashion-mnist")
    missing = presets.dataset_available(dataset)
    if missing:
        ap.error(missing)
    run_opts = presets.run_settings(args, seeds=(0, 1))
    p = presets.preset(dataset, args.smoke)
    if not args.smoke:
        p = replace(p, epochs=ABLATION_EPOCHS)
    p = presets.apply_preset_args(p, args)
    head = presets.METRICS[dataset][0]

    result = report.header("ablations", args.smoke)
    result["settings"] = {
        "dataset": dataset,
        "variants": variants,
        **run_opts,
        "preset": {**asdict(p), "overrides": p.overrides()},
        "reference_method": "truncated_triplet",
        "delta": f"final {head} of the variant minus the reference's, paired by seed",
    }
    print(f"{dataset}: {len(variants)} variants x seeds {args.seeds}, {p.epochs} epochs")
    t = time.perf_counter()
    results: dict[str, Any] = {
        name: {"group": VARIANTS[name][0], "description": VARIANTS[name][1]} for name in variants
    }
    tasks = []
    with runs.work_dir(args.work_dir, args.smoke) as work:
        for seed in args.seeds:
            for name in variants:
                spec = variant_overrides(name, p)
                if isinstance(spec, str):
                    results[name]["skipped"] = spec
                    continue
                overrides, processes = spec
                results[name]["overrides"], results[name]["processes"] = overrides, processes
                cfg = presets.build_config(p, "truncated_triplet", seed, overrides)
                task = runs.training_task(p, cfg, f"ablation-{name}", work, args, linear=False, processes=processes)
                tasks.append(task)
        for task, run in zip(tasks, runs.run_many(tasks, args.jobs), strict=True):
            results[task["label"].removeprefix("ablation-")].setdefault("runs", []).append(run)
    for entry in results.values():
        if "runs" in entry:
            epochs = entry["runs"][0]["epochs"]
            metrics = entry["runs"][0]["metrics"]
            entry["curves"] = {
                m: stats.curve_summary(epochs, [r["metrics"][m] for r in entry["runs"]]) for m in metrics
            }
    result["table"] = summarize(dataset, results)
    result["variants"] = results
    rows = [r for r in result["table"] if "skipped" not in r]
    png = plots.plot_bars(
        report.png_path(args.out),
        [f"{r['variant']} ({r['group']})" for r in rows],
        [r[f"final_{head}"] for r in rows],
        [r[f"final_{head}_std"] for r in rows],
        xlabel=f"final {head} (error bar: ±1 std over seeds)",
        title=f"truncated-triplet ablations on {dataset}, {p.epochs} epochs, seeds {args.seeds}",
        reference=results.get("reference", {}).get("final", {}).get(head, {}).get("mean"),
    )
    result["plot"] = str(png)
    write_json(args.out, report.finish(result, t))
    columns = ["variant", "group", f"final_{head}", f"final_{head}_std", f"delta_{head}", f"delta_{head}_std"]
    print(report.markdown_table(result["table"], [*columns, "seeds", "skipped"]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
