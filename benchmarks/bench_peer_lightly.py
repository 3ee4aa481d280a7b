"""Peer check of the baselines: our BYOL / SimCLR against the same model and data trained with lightly's losses.

Two parts:

1. **Loss equivalence** on random embeddings (float64): our training loss, which SUMS the two directions
   (``loss(p1, z2) + loss(p2, z1)``), against lightly's ``NegativeCosineSimilarity`` and ``NTXentLoss`` (PyPI
   ``lightly``) rescaled as :func:`benchmarks.reference_loop.lightly_loss` explains: ours = 4 + 2 x (ncs(p1, z2) +
   ncs(p2, z1)) for BYOL, and ours = 2 x NTXentLoss(a, b) for SimCLR, whose NT-Xent averages all 2N anchors.
   Values and gradients must agree to rounding.
2. **Learning curves**: :func:`reid_ssl.train.train` with our loss vs :func:`benchmarks.reference_loop.reference_loop`
   (lightly's loss, ``update_momentum`` and ``cosine_schedule``; our model, data, optimizer and learning-rate
   schedule), same seeds, monitored after every epoch as in ``bench_efficiency.py``. The curves agree "within
   noise" when at every epoch ``|mean_ours - mean_lightly| <= max(2 * SE, --tolerance)``, SE being the
   standard error of the difference of the two means over seeds.

Writes ``benchmarks/results/peer_lightly.json`` and ``peer_lightly_<dataset>.png``. "Ours" runs are reused
from ``bench_efficiency.py`` when the settings match (same work folder).

    python -m benchmarks.bench_peer_lightly                       # Fashion-MNIST, 3 seeds
    python -m benchmarks.bench_peer_lightly --datasets fashion-mnist,pets09
    python -m benchmarks.bench_peer_lightly --smoke
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks import plots, presets, reference_loop, report, runs, stats
from reid_ssl.losses import byol_loss, nt_xent_loss

METHODS = ("byol", "simclr")


def loss_equivalence(sizes: tuple[int, ...] = (8, 64), dim: int = 32, temperature: float = 0.2) -> dict[str, Any]:
    """Largest |value| and |gradient| differences between our summed losses and lightly's rescaled ones."""
    out: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(0)
    for name in METHODS:
        theirs = reference_loop.lightly_loss(name, temperature)
        worst = {"value": 0.0, "grad": 0.0}
        for n in sizes:
            x = [torch.randn(n, dim, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(4)]
            p1, p2, z1, z2 = x
            if name == "byol":
                ours = byol_loss(p1, z2) + byol_loss(p2, z1)
            else:  # SimCLR's target is the online network itself: the "z" of a view is its "p"
                ours = nt_xent_loss(p1, p2, temperature) + nt_xent_loss(p2, p1, temperature)
            ref = theirs(p1, p2, z1, z2)
            g_ours = torch.autograd.grad(ours, [p1, p2])
            g_ref = torch.autograd.grad(ref, [p1, p2])
            worst["value"] = max(worst["value"], abs(float((ours - ref).detach())))
            worst["grad"] = max(
                worst["grad"], max(float((a - b).abs().max()) for a, b in zip(g_ours, g_ref, strict=True))
            )
        out[name] = {
            "max_abs_value_diff": worst["value"],
            "max_abs_grad_diff": worst["grad"],
            "batch_sizes": list(sizes),
            "dim": dim,
            "rescaling": "ours = 4 + 2*(ncs(p1,z2) + ncs(p2,z1))"
            if name == "byol"
            else "ours = nt_xent(a,b) + nt_xent(b,a) = 2 * lightly.NTXentLoss(a,b)",
        }
    return out


def compare(ours: list[dict[str, Any]], theirs: list[dict[str, Any]], metric: str, tol: float) -> dict[str, Any]:
    """Per-epoch difference of the two mean curves, its standard error, and the within-noise verdict."""
    epochs = ours[0]["epochs"]
    a = stats.curve_summary(epochs, [r["metrics"][metric] for r in ours])
    b = stats.curve_summary(epochs, [r["metrics"][metric] for r in theirs])
    diffs, ses, ok = [], [], True
    for i in range(len(epochs)):
        d = a["mean"][i] - b["mean"][i]
        se = math.sqrt(a["std"][i] ** 2 / len(ours) + b["std"][i] ** 2 / len(theirs))
        diffs.append(d)
        ses.append(se)
        ok = ok and abs(d) <= max(2 * se, tol)
    return {
        "ours": a,
        "lightly": b,
        "diff_of_means": diffs,
        "stderr_of_diff": ses,
        "max_abs_diff": max(abs(d) for d in diffs),
        "within_noise": ok,
    }


def run_dataset(dataset: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    p = presets.available_preset(dataset, args)
    if isinstance(p, str):
        return {"skipped": p}
    print(f"{dataset}: ours vs lightly for {', '.join(args.methods)} x seeds {args.seeds}, {p.epochs} epochs")
    result: dict[str, Any] = {"preset": {**asdict(p), "overrides": p.overrides()}, "methods": {}}
    panels = []
    for method in args.methods:
        tasks = [
            runs.training_task(p, presets.build_config(p, method, seed), method, work, args, impl=impl)
            for seed in args.seeds
            for impl in ("ours", "lightly")
        ]
        by_impl: dict[str, list[dict[str, Any]]] = {"ours": [], "lightly": []}
        for task, run in zip(tasks, runs.run_many(tasks, args.jobs), strict=True):
            by_impl[task["impl"]].append(run)
        metrics = {m: compare(by_impl["ours"], by_impl["lightly"], m, args.tolerance) for m in presets.METRICS[dataset]}
        entry: dict[str, Any] = {
            "metrics": metrics,
            "within_noise": all(v["within_noise"] for v in metrics.values()),
            "seconds_per_run": {k: stats.mean_spread([r["seconds"] for r in v]) for k, v in by_impl.items()},
            "final_loss": {k: stats.mean_spread([r["loss"][-1] for r in v]) for k, v in by_impl.items()},
            "runs": by_impl,
        }
        if dataset == "fashion-mnist":
            entry["linear_top1"] = {
                k: stats.mean_spread([r["linear"]["linear_top1"] for r in v]) for k, v in by_impl.items()
            }
        result["methods"][method] = entry
        head = presets.METRICS[dataset][0]
        curves = [
            plots.Curve(
                f"{impl} ({'reid_ssl train' if impl == 'ours' else 'lightly loss loop'})",
                c["epochs"],
                c["mean"],
                c["std"],
                style="-" if impl == "ours" else "--",
            )
            for impl, c in (("ours", metrics[head]["ours"]), ("lightly", metrics[head]["lightly"]))
        ]
        verdict = "within noise" if metrics[head]["within_noise"] else "NOT within noise"
        panels.append(plots.Panel(head, curves, title=f"{dataset} {method}: {verdict} (band ±1 std)"))
    result["plot"] = str(plots.plot_panels(report.png_path(args.out, dataset), panels))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny subsets and models, seconds (CI)")
    ap.add_argument("--out", type=Path, default=report.default_out("peer_lightly"), help="JSON output")
    ap.add_argument("--datasets", type=presets.parse_list, default=["fashion-mnist"], help="comma-separated")
    ap.add_argument("--methods", type=presets.parse_list, default=list(METHODS), help="byol,simclr")
    ap.add_argument("--seeds", type=presets.parse_ints, help="comma-separated (default 0,1,2; smoke 0)")
    ap.add_argument("--tolerance", type=float, default=0.01, help="absolute difference always accepted")
    presets.add_preset_args(ap)
    args = ap.parse_args(argv)
    for m in args.methods:
        if m not in METHODS:
            ap.error(f"lightly counterparts exist for {list(METHODS)}, not {m!r}")
    result = report.header("peer_lightly", args.smoke)
    result["settings"] = {
        "methods": args.methods,
        **presets.run_settings(args, seeds=(0, 1, 2)),
        "tolerance": args.tolerance,
        "within_noise": "|diff| <= max(2 SE, tolerance) every epoch",
    }
    t = time.perf_counter()
    result["loss_equivalence"] = loss_equivalence()
    for name, r in result["loss_equivalence"].items():
        print(
            f"loss equivalence {name}: |value diff| {r['max_abs_value_diff']:.1e}, "
            f"|grad diff| {r['max_abs_grad_diff']:.1e}"
        )
    runs.run_datasets(result, args, run_dataset, t)
    for dataset, r in result["datasets"].items():
        for method, e in r.get("methods", {}).items():
            print(
                f"{dataset} {method}: within noise {e['within_noise']}, "
                + ", ".join(f"max |diff| {m} {v['max_abs_diff']:.4f}" for m, v in e["metrics"].items())
            )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
