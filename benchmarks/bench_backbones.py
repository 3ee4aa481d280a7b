"""Backbones at equal training wall-clock on the same data: ResNet-18, OSNet x1.0 and x0.25, ViT-Tiny (and ViT-S).

Every backbone trains on the PETS09 training bags with the default recipe except the backbone, for the same
number of seconds: a pilot measures each backbone's steady training throughput back to back (same load, same
threads; the rate between logged steps 10 and 40, so start-up, decoding the crops and the first steps do not
count), and each run gets ``budget seconds x its img/s`` images, as optimizer steps (``train.max_steps``, so the
learning-rate and EMA schedules span exactly that budget). The table also gives each run's measured training
seconds, so any inequality left (load changes between pilot and run) is visible. Scored on the validation split
(where a choice would be made) and on the test split, at the stored test size, against each architecture's
untrained network over the same seeds.

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
PILOT_FROM, PILOT_TO = 10, 40  # the pilot's steady-state window, in optimizer steps (logged every 10)
PILOT_METHOD = "steady-10-40"  # earlier pilots (whole-run rate of 12 steps, start-up included) are not reused


def pilot(backbone: str, root: str, work: Path, threads: int, recipe: list[str]) -> float:
    """Steady training img/s of ``backbone``: images between logged steps 10 and 40 over the wall time between
    them (``time`` in the run's metrics.jsonl), so start-up and the first steps do not count."""
    out = work / "pilot" / f"{backbone}-{PILOT_METHOD}"
    steps = [
        f"model.backbone={backbone}",
        f"train.max_steps={PILOT_TO}",
        "train.epochs=1000",
        "train.log_every_steps=10",
    ]
    train_run(out, [*recipe, *steps, "train.eval_dataset=", "train.checkpoint_every_steps=1000"], 0, root, threads)
    return steady_rate(out / "metrics.jsonl", PILOT_FROM, PILOT_TO, batch=64)


def steady_rate(metrics: Path, first: int, last: int, batch: int) -> float:
    """Images per second between logged steps ``first`` and ``last`` of a run's metrics.jsonl."""
    times = {}
    for line in metrics.read_text().splitlines():
        r = json.loads(line)
        if "time" in r and r.get("step") in (first, last):
            times[r["step"]] = r["time"]
    if len(times) != 2:
        raise RuntimeError(f"{metrics}: steps {first} and {last} were not both logged")
    return (last - first) * batch / (times[last] - times[first])


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
        found = rows.find(kind="pilot", backbone=name, method=PILOT_METHOD)
        rates[name] = found["img_per_s"] if found else pilot(name, args.root, work, args.threads, recipe)
        if not found:
            rows.add({"kind": "pilot", "backbone": name, "method": PILOT_METHOD, "img_per_s": rates[name]})
    for seed in seeds:
        for name in names:
            steps = max(1, round(args.budget * rates[name] / 64))
            trained = rows.find(kind="train", backbone=name, seed=seed, budget=args.budget, pilot=PILOT_METHOD)
            if trained is None:
                out = work / f"{name}-{PILOT_METHOD}" / f"seed{seed}-{args.budget:g}s"
                overrides = [*recipe, f"model.backbone={name}", "train.epochs=1000", f"train.max_steps={steps}"]
                summary = train_run(out, overrides, seed, args.root, args.threads)
                trained = {"kind": "train", "backbone": name, "seed": seed, "budget": args.budget, "steps": steps,
                           "pilot": PILOT_METHOD, **summary}  # fmt: skip
                rows.add(trained)
            for split in ("pets09-val", "pets09"):
                for kind, ckpt in (("trained", trained["checkpoint"]), ("untrained", None)):
                    run = {"budget": args.budget, "pilot": PILOT_METHOD} if kind == "trained" else {}
                    key = {"kind": "score", "backbone": name, "seed": seed, "split": split, "model": kind, **run}
                    if rows.find(**key) is None:
                        rows.add({**key, **score(ckpt, split, args.root, (96, 48), seed, name)})
                        print(json.dumps(rows.all()[-1]), flush=True)
    table = summarise(rows.all(), names, args.budget, seeds)
    result = header("backbones", False)
    result.update(budget_s=args.budget, seeds=seeds, recipe=recipe, pilot_img_per_s=rates, table=table, rows=rows.all())
    write_json(Path(args.out) if args.out else default_out("backbones"), finish(result, started))
    print(
        markdown_table(
            table, ["backbone", "split", "model", "seeds", "images", "train_s", "rank1", "rank1_sd", "mAP", "mAP_sd"]
        )
    )
    return 0


def summarise(rows: list[dict[str, Any]], names: list[str], budget: float, seeds: list[int]) -> list[dict[str, Any]]:
    """Mean and standard deviation over ``seeds`` per backbone, split and model (trained / untrained), with the
    images and the measured training seconds (mean) of the runs at ``budget`` under the current pilot."""
    this_run = {"budget": budget, "pilot": PILOT_METHOD}
    table = []
    for name in names:
        runs = [r for r in rows if r["kind"] == "train" and r["backbone"] == name and r["seed"] in seeds
                and all(r.get(k) == v for k, v in this_run.items())]  # fmt: skip
        for split in ("pets09-val", "pets09"):
            for model in ("trained", "untrained"):
                want = {"kind": "score", "backbone": name, "split": split, "model": model}
                want.update(this_run if model == "trained" else {})
                rs = [r for r in rows if r.get("seed") in seeds and all(r.get(k) == v for k, v in want.items())]
                if not rs:
                    continue
                row: dict[str, Any] = {"backbone": name, "split": split, "model": model, "seeds": len(rs),
                                       "images": runs[0]["steps"] * 64 if runs and model == "trained" else None,
                                       "train_s": statistics.fmean(r["seconds"] for r in runs)
                                       if runs and model == "trained" else None}  # fmt: skip
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
