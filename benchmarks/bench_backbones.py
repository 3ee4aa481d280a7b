"""Backbones at equal training wall-clock on the same data: ResNet-18, OSNet x1.0 and x0.25, ViT-Tiny (and ViT-S).

Every backbone trains on the PETS09 training bags with the default recipe except the backbone, for the same
number of seconds: a pilot measures each backbone's training throughput back to back (same load, same
threads), and each run gets ``budget seconds x its img/s`` images, as optimizer steps (``train.max_steps``, so
the learning-rate and EMA schedules span exactly that budget). Scored on the validation split (where a choice
would be made) and on the test split, at the stored test size, against each architecture's untrained network
over the same seeds.

Writes ``benchmarks/results/backbones.json`` and prints a Markdown table.

    python -m benchmarks.bench_backbones                         # 4 backbones x 3 seeds x 8 min + pilots
    python -m benchmarks.bench_backbones --budget 60 --seeds 0   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_recipe import Rows, score, train_run
from benchmarks.machine import REPO
from benchmarks.report import default_out, finish, header, markdown_table
from reid_ssl.fileio import write_json

BACKBONES = ("resnet18", "osnet_x1_0", "osnet_x0_25", "vit_tiny_patch16")
PILOT_STEPS = 12


def pilot(backbone: str, root: str, work: Path, threads: int, recipe: list[str]) -> float:
    """Training img/s of ``backbone`` over a few steps (the first two excluded by the loop's own rate)."""
    out = work / "pilot" / backbone
    steps = [f"model.backbone={backbone}", f"train.max_steps={PILOT_STEPS}"]
    summary = train_run(
        out, [*recipe, *steps, "train.eval_dataset=", "train.checkpoint_every_steps=1000"], 0, root, threads
    )
    return float(summary["images_per_second"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--backbones", default=",".join(BACKBONES))
    p.add_argument("--budget", type=float, default=480.0, help="training seconds per run (default 480)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--recipe", default="", help="overrides shared by every run (default: the default recipe)")
    p.add_argument("--root", default=str(REPO / "data" / "pets09"))
    p.add_argument("--work-dir", default=str(REPO / "runs" / "backbones"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    started = time.perf_counter()
    work, rows = Path(args.work_dir), Rows(Path(args.work_dir))
    names, seeds = args.backbones.split(","), [int(s) for s in args.seeds.split(",")]
    recipe = args.recipe.split() if args.recipe else []
    rates = {}
    for name in names:  # back to back: the same load for every backbone
        found = rows.find(kind="pilot", backbone=name)
        rates[name] = found["img_per_s"] if found else pilot(name, args.root, work, args.threads, recipe)
        if not found:
            rows.add({"kind": "pilot", "backbone": name, "img_per_s": rates[name]})
    for seed in seeds:
        for name in names:
            steps = max(1, round(args.budget * rates[name] / 64))
            trained = rows.find(kind="train", backbone=name, seed=seed, budget=args.budget)
            if trained is None:
                out = work / name / f"seed{seed}"
                overrides = [*recipe, f"model.backbone={name}", "train.epochs=1000", f"train.max_steps={steps}"]
                trained = {"kind": "train", "backbone": name, "seed": seed, "budget": args.budget, "steps": steps,
                           **train_run(out, overrides, seed, args.root, args.threads)}  # fmt: skip
                rows.add(trained)
            for split in ("pets09-val", "pets09"):
                for kind, ckpt in (("trained", trained["checkpoint"]), ("untrained", None)):
                    if rows.find(kind="score", backbone=name, seed=seed, split=split, model=kind) is None:
                        s = score(ckpt, split, args.root, (96, 48), seed, name)
                        rows.add({"kind": "score", "backbone": name, "seed": seed, "split": split, "model": kind, **s})
                        print(json.dumps(rows.all()[-1]), flush=True)
    table = summarise(rows.all(), names, args.budget)
    result = header("backbones", False)
    result.update(budget_s=args.budget, seeds=seeds, recipe=recipe, pilot_img_per_s=rates, table=table, rows=rows.all())
    write_json(Path(args.out) if args.out else default_out("backbones"), finish(result, started))
    print(
        markdown_table(table, ["backbone", "split", "model", "seeds", "images", "rank1", "rank1_sd", "mAP", "mAP_sd"])
    )
    return 0


def summarise(rows: list[dict[str, Any]], names: list[str], budget: float) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds per backbone, split and model (trained / untrained)."""
    table = []
    for name in names:
        images = [
            r["steps"] * 64 for r in rows if r["kind"] == "train" and r["backbone"] == name and r["budget"] == budget
        ]
        for split in ("pets09-val", "pets09"):
            for model in ("trained", "untrained"):
                rs = [
                    r
                    for r in rows
                    if r["kind"] == "score" and r["backbone"] == name and r["split"] == split and r["model"] == model
                ]
                if not rs:
                    continue
                row: dict[str, Any] = {"backbone": name, "split": split, "model": model, "seeds": len(rs),
                                       "images": images[0] if images and model == "trained" else None}  # fmt: skip
                for m in ("rank1", "mAP"):
                    values = [r[m] for r in rs]
                    row[m], row[f"{m}_sd"] = (
                        statistics.fmean(values),
                        statistics.stdev(values) if len(values) > 1 else None,
                    )
                table.append(row)
    return table


if __name__ == "__main__":
    raise SystemExit(main())
