"""Choosing the default PETS09 recipe on the validation split, then reporting it once on the test split.

The protocol, fixed before any run:

* Data: ``reid_ssl prepare pets09`` gives training bags (``train/``), a validation split (``market_val/``, 12
  tracklets held out of training) and the test split (``market/``, tracklets disjoint from both). Candidates
  are trained on ``train/`` and compared on ``market_val/`` only.
* Candidates (:data:`CANDIDATES`): the current default and single or paired changes to it (deputy window by the
  Bernoulli rule, single resolution, tracklet positives, re-ID-friendly augmentation, schedule length). Each is
  also scored at two test sizes (the stored 96x48 and the training size 64x32): the test size is part of the
  recipe.
* Stages: ``screen`` trains every candidate with seeds 0 and 1; ``confirm`` adds seeds 2.. to the candidates
  named; ``floors`` scores the untrained network (seeds 0-5) and the colour histogram on both splits.
* Rule: the recipe (candidate and test size) with the highest mean validation mAP over at least 3 seeds, rank-1
  breaking ties, is chosen. ``test`` then scores exactly that recipe's checkpoints on the test split, once.
* ``report`` writes ``benchmarks/results/recipe.json``: every validation row, the means and standard deviations,
  the choice, the test rows, the floors, and the issue's acceptance checks (seed mean above the untrained mean
  by 2 untrained standard deviations on rank-1 and mAP, worst seed above the untrained mean, mean above the
  colour histogram) evaluated on the test split.

Runs are resumable: every finished training and score is kept in ``--work-dir``/rows.jsonl.

    python -m benchmarks.bench_recipe screen                       # ~2 x 8 candidates x 5-13 min
    python -m benchmarks.bench_recipe confirm --candidates k-auto,k-auto-1res --seeds 2,3
    python -m benchmarks.bench_recipe floors
    python -m benchmarks.bench_recipe test                         # the chosen recipe, on the test split
    python -m benchmarks.bench_recipe report
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.machine import REPO
from benchmarks.report import default_out, finish, header, markdown_table
from reid_ssl.config import BYOL_AUGMENT, augment_overrides
from reid_ssl.fileio import write_json

# The candidates are changes to the default this benchmark replaced (deputy ranks 2..10, multi-resolution, 35
# epochs, BYOL's views), pinned here so that the protocol reruns the same trainings whatever the default is now.
BASE = ["-c", str(REPO / "configs" / "pets09_r18_cpu.yaml"), "loss.k=fixed", "model.multires=true", "train.epochs=35",
        "data.positives=augment", *augment_overrides(BYOL_AUGMENT)]  # fmt: skip
AUTO_1RES = ["loss.k=auto", "model.multires=false"]
REID_AUG = ["augment.crop_scale=[0.3,1.0]", "augment.hue=0.0", "augment.saturation=0.0", "augment.grayscale=0.0"]
CANDIDATES: dict[str, list[str]] = {
    "default": [],
    "k-auto": ["loss.k=auto"],
    "k-auto-1res": AUTO_1RES,
    "k-auto-1res-bag": [*AUTO_1RES, "data.positives=bag"],
    "k-auto-1res-reid-aug": [*AUTO_1RES, *REID_AUG],
    "k-auto-1res-bag-reid-aug": [*AUTO_1RES, "data.positives=bag", *REID_AUG],
    "k-auto-1res-short": [*AUTO_1RES, "train.epochs=15"],
    "k-auto-1res-short-reid-aug": [*AUTO_1RES, "train.epochs=15", *REID_AUG],
    "k-auto-1res-5ep-reid-aug": [*AUTO_1RES, "train.epochs=5", *REID_AUG],
    "k-auto-1res-lr0.05": [*AUTO_1RES, "optim.lr=0.05"],
    # added after the choice above: the chosen recipe with tracklet positives (another crop of the same bag)
    "k-auto-1res-short-bag-reid-aug": [*AUTO_1RES, "train.epochs=15", "data.positives=bag", *REID_AUG],
    # added after that choice (its validation mAP was still rising at epoch 15): a longer schedule that still fits
    # 12 minutes at 60 img/s, at the same and at half the learning rate
    "k-auto-1res-25ep-bag-reid-aug": [*AUTO_1RES, "train.epochs=25", "data.positives=bag", *REID_AUG],
    "k-auto-1res-25ep-bag-reid-aug-lr0.05": [
        *AUTO_1RES,
        "train.epochs=25",
        "data.positives=bag",
        *REID_AUG,
        "optim.lr=0.05",
    ],
}
TEST_SIZES = ((96, 48), (64, 32))
METRICS = ("rank1", "rank5", "rank10", "mAP")


# ----- one training, one score ------------------------------------------------------------------------------


def train(name: str, seed: int, root: str, work: Path, threads: int) -> dict[str, Any]:
    """Train candidate ``name`` with ``seed`` (monitor on the validation split); returns the CLI summary."""
    return train_run(work / name / f"seed{seed}", [*BASE, *CANDIDATES[name]], seed, root, threads)


def train_run(out: Path, overrides: list[str], seed: int, root: str, threads: int) -> dict[str, Any]:
    """``reid_ssl train OVERRIDES`` into ``out`` (monitor on the validation split every 5 epochs), in a subprocess
    with ``threads`` threads; returns the CLI summary and the wall time. ``overrides`` are the arguments after
    ``train`` (``-c FILE``, ``key=value``); none trains the built-in default recipe."""
    cmd = [sys.executable, "-m", "reid_ssl.cli", "train", *overrides, f"data.root={root}",
           f"train.seed={seed}", f"train.out_dir={out}", "train.eval_dataset=pets09-val", "train.eval_every_epochs=5",
           "train.tensorboard=false", "-q", "--json"]  # fmt: skip
    if (out / "checkpoint.pt").is_file():
        cmd.append("--resume")  # an interrupted training continues where it stopped
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{out} (seed {seed}): {done.stderr[-2000:]}")
    summary = json.loads(done.stdout[done.stdout.index("{") :])
    return {"wall_s": round(time.perf_counter() - t0, 1), "checkpoint": str(out / "checkpoint.pt"), **summary}


def score(
    checkpoint: str | None, split: str, root: str, size: tuple[int, int], seed: int = 0, backbone: str = "resnet18"
) -> dict[str, float]:
    """Rank-1/5/10 and mAP (flip-averaged cosine) of a checkpoint, or of the untrained ``backbone`` (``None``)."""
    import torch

    from reid_ssl.checkpoint import load_checkpoint, make_preprocess, state_dict_sha256
    from reid_ssl.embedder import Embedder, backbone_from_checkpoint
    from reid_ssl.models import build_backbone
    from reid_ssl.train.monitor import retrieval_monitor
    from reid_ssl.train.state import seed_everything

    torch.set_num_threads(1)
    pre = make_preprocess(*size)
    if checkpoint is None:
        seed_everything(seed)
        net = build_backbone(backbone)
        sha = state_dict_sha256(net.state_dict())
    else:
        ckpt = load_checkpoint(checkpoint)
        net, sha = backbone_from_checkpoint(ckpt), ckpt["backbone"]["sha256"]
        pre = make_preprocess(*size, ckpt["preprocess"]["mean"], ckpt["preprocess"]["std"])
    scores = retrieval_monitor(split, root)(Embedder(net, pre, sha, device="cpu", flip=True))
    if scores.pop("unreadable"):
        raise RuntimeError(f"unreadable crops in {root}: rebuild it with `reid_ssl prepare pets09`")
    return scores


# ----- rows -----------------------------------------------------------------------------------------------


class Rows:
    """``rows.jsonl`` in the work folder: every training and every score, appended as it finishes."""

    def __init__(self, work: Path) -> None:
        self.path = work / "rows.jsonl"
        work.mkdir(parents=True, exist_ok=True)

    def all(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]

    def find(self, **key: Any) -> dict[str, Any] | None:
        return next((r for r in self.all() if all(r.get(k) == v for k, v in key.items())), None)

    def add(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def run_candidate(rows: Rows, name: str, seed: int, root: str, work: Path, threads: int) -> None:
    """Train (unless done) and score on the validation split at every test size."""
    trained = rows.find(kind="train", candidate=name, seed=seed)
    if trained is None:
        trained = {"kind": "train", "candidate": name, "seed": seed, **train(name, seed, root, work, threads)}
        rows.add(trained)
    for size in TEST_SIZES:
        if rows.find(kind="score", split="pets09-val", candidate=name, seed=seed, size=list(size)) is None:
            s = score(trained["checkpoint"], "pets09-val", root, size)
            rows.add({"kind": "score", "split": "pets09-val", "candidate": name, "seed": seed, "size": list(size), **s})
            print(f"{name} seed {seed} {size[0]}x{size[1]}: rank-1 {s['rank1']:.3f} mAP {s['mAP']:.3f}", flush=True)


def run_floors(rows: Rows, root: str, seeds: list[int]) -> None:
    """The untrained network (every seed, both splits, both sizes) and the colour histogram (both splits)."""
    from reid_ssl.eval.baselines import histogram_baseline

    for split, folder in (("pets09-val", "market_val"), ("pets09", "market")):
        for seed in seeds:
            for size in TEST_SIZES:
                if rows.find(kind="score", split=split, candidate="untrained", seed=seed, size=list(size)) is None:
                    s = score(None, split, root, size, seed)
                    rows.add(
                        {
                            "kind": "score",
                            "split": split,
                            "candidate": "untrained",
                            "seed": seed,
                            "size": list(size),
                            **s,
                        }
                    )
        if rows.find(kind="score", split=split, candidate="histogram") is None:
            h = histogram_baseline(Path(root) / folder)
            rows.add({"kind": "score", "split": split, "candidate": "histogram", "seed": None, "size": None,
                      **{k: float(h[k]) for k in METRICS}})  # fmt: skip


# ----- the choice and the report --------------------------------------------------------------------------


def summarise(rows: list[dict[str, Any]], split: str) -> list[dict[str, Any]]:
    """Mean and standard deviation per (candidate, test size) over seeds."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r["kind"] == "score" and r["split"] == split:
            size = "x".join(map(str, r["size"])) if r["size"] else "-"
            groups.setdefault((r["candidate"], size), []).append(r)
    table = []
    for (cand, size), rs in sorted(groups.items()):
        row: dict[str, Any] = {"candidate": cand, "size": size, "seeds": len(rs)}
        for m in METRICS:
            values = [r[m] for r in rs]
            row[m] = statistics.fmean(values)
            row[f"{m}_sd"] = statistics.stdev(values) if len(values) > 1 else None
            row[f"{m}_min"] = min(values)
        table.append(row)
    return table


def choose(val: list[dict[str, Any]], min_seeds: int = 3) -> dict[str, Any] | None:
    """The rule: highest mean validation mAP over >= ``min_seeds`` seeds, then rank-1."""
    eligible = [r for r in val if r["candidate"] in CANDIDATES and r["seeds"] >= min_seeds]
    return max(eligible, key=lambda r: (r["mAP"], r["rank1"]), default=None)


def acceptance(test: list[dict[str, Any]], chosen: dict[str, Any]) -> dict[str, Any]:
    """The acceptance checks on the test split: trained seeds against the untrained seeds and the histogram."""
    mine = next(r for r in test if r["candidate"] == chosen["candidate"] and r["size"] == chosen["size"])
    floor = next(r for r in test if r["candidate"] == "untrained" and r["size"] == chosen["size"])
    hist = next(r for r in test if r["candidate"] == "histogram")
    checks = {}
    for m in ("rank1", "mAP"):
        checks[f"{m}_mean_above_untrained_by_2sd"] = mine[m] >= floor[m] + 2 * (floor[f"{m}_sd"] or 0)
        checks[f"{m}_worst_seed_above_untrained_mean"] = mine[f"{m}_min"] > floor[m]
        checks[f"{m}_mean_above_histogram"] = mine[m] > hist[m]
    return {"all": all(checks.values()), **checks}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("stage", choices=["screen", "confirm", "floors", "test", "report"])
    p.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated (screen, confirm)")
    p.add_argument("--seeds", default=None, help="comma-separated (default: screen 0,1; confirm 2; floors 0-5)")
    p.add_argument("--root", default=str(REPO / "data" / "pets09"))
    p.add_argument("--work-dir", default=str(REPO / "runs" / "recipe"))
    p.add_argument("--parallel", type=int, default=2, help="trainings at once (default 2, one thread each)")
    p.add_argument("--threads", type=int, default=1, help="threads per training (default 1)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    work = Path(args.work_dir)
    rows = Rows(work)
    default_seeds = {"screen": "0,1", "confirm": "2", "floors": "0,1,2,3,4,5", "test": "", "report": ""}[args.stage]
    seeds = [int(s) for s in (args.seeds or default_seeds).split(",") if s]
    if args.stage in ("screen", "confirm"):
        names = [n for n in args.candidates.split(",") if n]
        unknown = [n for n in names if n not in CANDIDATES]
        if unknown:
            p.error(f"unknown candidates {unknown}; choose from {list(CANDIDATES)}")
        jobs = [(n, s) for s in seeds for n in names]
        with ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(lambda j: run_candidate(rows, j[0], j[1], args.root, work, args.threads), jobs))
    elif args.stage == "floors":
        run_floors(rows, args.root, seeds)
    elif args.stage == "test":
        chosen = choose(summarise(rows.all(), "pets09-val"))
        if chosen is None:
            p.error("no candidate has 3 seeds on the validation split yet: run `confirm` first")
        size = tuple(int(v) for v in chosen["size"].split("x"))
        for r in [r for r in rows.all() if r["kind"] == "train" and r["candidate"] == chosen["candidate"]]:
            if (
                rows.find(kind="score", split="pets09", candidate=r["candidate"], seed=r["seed"], size=list(size))
                is None
            ):
                s = score(r["checkpoint"], "pets09", args.root, size)
                rows.add(
                    {
                        "kind": "score",
                        "split": "pets09",
                        "candidate": r["candidate"],
                        "seed": r["seed"],
                        "size": list(size),
                        **s,
                    }
                )
    else:
        report(rows, args.out)
    return 0


def report(rows: Rows, out: str | None) -> None:
    started = time.perf_counter()
    everything = rows.all()
    val, test = summarise(everything, "pets09-val"), summarise(everything, "pets09")
    chosen = choose(val)
    trainings = [r for r in everything if r["kind"] == "train"]
    tested = chosen is not None and any(r["candidate"] == chosen["candidate"] for r in test)
    keys = ("candidate", "seed", "wall_s", "images_per_second", "seconds", "steps")
    result = header("recipe", False)
    result.update(
        protocol=__doc__, candidates=CANDIDATES, validation=val, test=test, chosen=chosen,
        acceptance=acceptance(test, chosen) if tested else None,
        val_test_agreement=val_test_agreement(everything),
        trainings=[{k: r.get(k) for k in keys} for r in trainings],
        rows=everything,
    )  # fmt: skip
    path = Path(out) if out else default_out("recipe")
    write_json(path, finish(result, started))
    cols = ["candidate", "size", "seeds", "rank1", "rank1_sd", "rank1_min", "mAP", "mAP_sd", "mAP_min"]
    print("validation (choose here)\n" + markdown_table(val, cols))
    print("\ntest (reported once)\n" + markdown_table(test, cols))
    print(f"\nchosen: {chosen and (chosen['candidate'], chosen['size'])}; acceptance: {result['acceptance']}")
    print(f"validation vs test, per checkpoint: {result['val_test_agreement']}")


def val_test_agreement(rows: list[dict[str, Any]], size: tuple[int, int] = (96, 48)) -> dict[str, Any]:
    """How well the validation split predicts the test split: Spearman's rank correlation over every network
    (trained checkpoint or untrained seed) scored on both splits at ``size``, per metric, with its p-value."""
    from scipy.stats import spearmanr

    def scores(split: str) -> dict[tuple[str, int], dict[str, Any]]:
        return {(r["candidate"], r["seed"]): r for r in rows
                if r["kind"] == "score" and r["split"] == split and r.get("size") == list(size)}  # fmt: skip

    val, test = scores("pets09-val"), scores("pets09")
    both = sorted(k for k in test if k in val)
    out: dict[str, Any] = {"networks": len(both), "size": f"{size[0]}x{size[1]}"}
    for m in ("rank1", "mAP"):
        if len(both) >= 3:
            rho, p = spearmanr([val[k][m] for k in both], [test[k][m] for k in both])
            out[m] = {"spearman": round(float(rho), 3), "p": round(float(p), 4)}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
