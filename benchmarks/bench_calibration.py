"""Can a "no match" threshold be calibrated on PETS09? Youden's J, its ceiling, and how spread the scores are.

The index calibrates the app's "no match" cut from labelled queries: for each query, ``pos`` is its top-1 score
with its identity in the gallery and ``neg`` the best impostor's score (its identity removed); the cut maximises
Youden's J = TPR - FPR (:mod:`reid_ssl.index.calibration`). Whenever an impostor outranks every true match,
``pos == neg`` for that query, and such a query adds the same amount to TPR and FPR at every threshold. So

    J <= share of queries whose true match outranks the best impostor  (the "J ceiling", ~ rank-1),

whatever the scores' scale. This script measures, per checkpoint (and the untrained ResNet-18 over seeds):
rank-1, J, the J ceiling, and the spread of the top-10 scores, both as the features come (cosine of
L2-normalised features) and after centring on the gallery mean (subtract it, re-normalise: the whitening-lite
step that spreads scores). Centring changes how scores spread, not the order of a query's matches much, so it
cannot lift J above the ceiling: a reliable threshold (J >= 0.5) needs rank-1 well above 0.5.

    python -m benchmarks.bench_calibration --checkpoint runs/pets09_r18/checkpoint.pt [--checkpoint ...]
    python -m benchmarks.bench_calibration --smoke        # the untrained network, one seed (CI)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import REPO
from benchmarks.report import default_out, finish, header, markdown_table
from reid_ssl.fileio import write_json


def _embed(checkpoint: str | None, split: Any, seed: int) -> tuple[np.ndarray, np.ndarray]:
    import torch

    from reid_ssl.checkpoint import make_preprocess, state_dict_sha256
    from reid_ssl.embedder import Embedder, load_embedder
    from reid_ssl.models import build_backbone
    from reid_ssl.train.state import seed_everything

    torch.set_num_threads(1)
    if checkpoint is None:
        seed_everything(seed)
        net = build_backbone("resnet18")
        emb = Embedder(net, make_preprocess(96, 48), state_dict_sha256(net.state_dict()), device="cpu", flip=True)
    else:
        emb = load_embedder(checkpoint, device="cpu", flip=True)  # the checkpoint's own preprocessing
    q = emb.embed_images([p for p, _, _ in split.query], batch_size=128)
    g = emb.embed_images([p for p, _, _ in split.gallery], batch_size=128)
    if q.failures or g.failures:
        raise RuntimeError("unreadable crops: rebuild the split with `reid_ssl prepare pets09 --fetch`")
    return q.features.astype(np.float32), g.features.astype(np.float32)


def measure(qf: np.ndarray, gf: np.ndarray, split: Any) -> dict[str, Any]:
    """Rank-1, J, the J ceiling and the top-10 score spread, raw and centred on the gallery mean."""
    from reid_ssl.index.calibration import calibrate_threshold, open_set_scores

    qp = np.array([x[1] for x in split.query])
    qc = np.array([x[2] for x in split.query])
    gp = np.array([x[1] for x in split.gallery])
    gc = np.array([x[2] for x in split.gallery])
    out: dict[str, Any] = {}
    mean = gf.mean(0, keepdims=True)
    for name, (q, g) in {"raw": (qf, gf), "centred": (qf - mean, gf - mean)}.items():
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
        pos, neg = open_set_scores(q, qp, qc, g, gp, gc)
        cal = calibrate_threshold(pos, neg)
        top10 = np.sort(q @ g.T, axis=1)[:, ::-1][:, :10]
        out[name] = {
            "queries": len(pos),
            "youden_j": cal["youden_j"],
            "threshold": cal["threshold"],
            "j_ceiling": float(np.mean(pos > neg)),
            "top1_minus_top10_median": float(np.median(top10[:, 0] - top10[:, -1])),
            "top10_range": [float(top10.min()), float(top10.max())],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", default=[], help="a checkpoint to measure (repeatable)")
    p.add_argument("--root", default=str(REPO / "data" / "pets09"))
    p.add_argument("--split", default="pets09", help="pets09 (test) or pets09-val")
    p.add_argument("--untrained-seeds", type=int, default=6)
    p.add_argument("--smoke", action="store_true", help="one untrained seed, nothing else")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from reid_ssl.data.datasets import load_split

    started = time.perf_counter()
    split = load_split(args.split, args.root)
    runs: list[dict[str, Any]] = []
    seeds = 1 if args.smoke else args.untrained_seeds
    for seed in range(seeds):
        qf, gf = _embed(None, split, seed)
        runs.append({"model": "untrained", "seed": seed, **measure(qf, gf, split)})
        print(f"untrained seed {seed}: J {runs[-1]['raw']['youden_j']:.3f} ceiling {runs[-1]['raw']['j_ceiling']:.3f}")
    for ckpt in [] if args.smoke else args.checkpoint:
        qf, gf = _embed(ckpt, split, 0)
        runs.append({"model": ckpt, "seed": None, **measure(qf, gf, split)})
        print(f"{ckpt}: J {runs[-1]['raw']['youden_j']:.3f} ceiling {runs[-1]['raw']['j_ceiling']:.3f}")
    result = header("calibration", args.smoke)
    result.update(split=args.split, root=args.root, protocol=__doc__, runs=runs)
    path = Path(args.out) if args.out else default_out("calibration")
    write_json(path, finish(result, started))
    rows = [
        {
            "model": r["model"] if r["seed"] is None else f"untrained seed {r['seed']}",
            **{f"{k} {v}": round(r[v][k], 3) for v in ("raw", "centred") for k in ("youden_j", "j_ceiling")},
            "raw top-10 range": "{:.3f}-{:.3f}".format(*r["raw"]["top10_range"]),
            "centred top-10 range": "{:.3f}-{:.3f}".format(*r["centred"]["top10_range"]),
        }
        for r in runs
    ]
    print(markdown_table(rows, list(rows[0])))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
