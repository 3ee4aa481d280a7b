"""The README's headline table: the default PETS09 checkpoint against the baselines any backbone must beat.

Rows, all on the PETS09-S2L1 retrieval split (``data/pets09``, Market protocol, flip-averaged cosine):

* the trained checkpoint (``make demo`` writes ``runs/pets09_r18/checkpoint.pt``) at its stored preprocessing,
  and at other test resolutions (the train/test resolution effect behind the 96x48 default);
* the same architecture with random weights, one row per seed, at the checkpoint's preprocessing: what
  pretraining adds over an untrained ResNet's features;
* the colour-histogram baseline of :func:`reid_ssl.eval.baselines.histogram_baseline`.

Writes ``benchmarks/results/pets09_default.json`` and prints a Markdown table.

    python -m benchmarks.bench_pets09_default                      # ~2 min after `make demo`
    python -m benchmarks.bench_pets09_default --smoke              # one seed, one resolution (CI)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.machine import REPO
from benchmarks.presets import PETS09_ROOT, parse_ints
from benchmarks.report import finish, header, markdown_table, write_result
from reid_ssl.checkpoint import load_checkpoint, make_preprocess, state_dict_sha256
from reid_ssl.data.datasets import load_split
from reid_ssl.embedder import Embedder, backbone_from_checkpoint
from reid_ssl.eval.baselines import histogram_baseline
from reid_ssl.models import build_backbone
from reid_ssl.train.monitor import retrieval_monitor
from reid_ssl.train.state import seed_everything


def retrieval(embedder: Embedder, root: str) -> dict[str, float]:
    """Rank-1/5/10 and mAP of one embedder on the PETS09 split (every crop must decode)."""
    scores = retrieval_monitor("pets09", root)(embedder)
    if scores.pop("unreadable"):
        raise RuntimeError(f"unreadable crops in {root}: rebuild it with `reid_ssl prepare pets09`")
    return scores


def random_backbone_rows(name: str, preprocess: dict[str, Any], seeds: list[int], root: str) -> list[dict[str, Any]]:
    """One row per seed: the architecture with its default (torchvision) initialisation, never trained."""
    rows = []
    for seed in seeds:
        seed_everything(seed)
        net = build_backbone(name)
        emb = Embedder(net, preprocess, state_dict_sha256(net.state_dict()), device="cpu", flip=True)
        rows.append({"model": f"{name}, random init (seed {seed})", "test_size": _size(preprocess)})
        rows[-1].update(retrieval(emb, root))
    return rows


def _size(pre: dict[str, Any]) -> str:
    return f"{pre['height']}x{pre['width']}"


def _train_size(ckpt: dict[str, Any]) -> str | None:
    data = (ckpt.get("config") or {}).get("data") or {}
    return f"{data['height']}x{data['width']}" if "height" in data else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(REPO / "runs/pets09_r18/checkpoint.pt"))
    ap.add_argument("--root", default=PETS09_ROOT, help="the PETS09 folder built by `reid_ssl prepare pets09`")
    ap.add_argument("--seeds", type=parse_ints, default=[0, 1, 2], help="random-init seeds")
    ap.add_argument("--sizes", default="64x32,96x48,128x64", help="extra test resolutions of the checkpoint")
    ap.add_argument("--smoke", action="store_true", help="one seed, no extra resolutions")
    ap.add_argument("--out", help="JSON output (default benchmarks/results/pets09_default.json; none with --smoke)")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    if not Path(args.checkpoint).is_file():
        ap.error(f"no checkpoint at {args.checkpoint}: run `make demo` (or reid_ssl train) first")
    torch.set_num_threads(max(torch.get_num_threads(), 1))

    ckpt = load_checkpoint(args.checkpoint)
    pre = ckpt["preprocess"]
    trained = backbone_from_checkpoint(ckpt)
    sizes = [] if args.smoke else [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",") if s]
    rows: list[dict[str, Any]] = []
    stored = (pre["height"], pre["width"])
    for h, w in [stored, *(s for s in sizes if s != stored)]:
        p = make_preprocess(h, w, pre["mean"], pre["std"], pre.get("interpolation", "bicubic"))
        emb = Embedder(trained, p, ckpt["backbone"]["sha256"], device="cpu", flip=True)
        label = "stored preprocessing" if (h, w) == stored else "other test size"
        rows.append({"model": f"{ckpt['backbone']['name']}, truncated triplet ({label})", "test_size": f"{h}x{w}"})
        rows[-1].update(retrieval(emb, args.root))
    seeds = args.seeds[:1] if args.smoke else args.seeds
    rows += random_backbone_rows(ckpt["backbone"]["name"], pre, seeds, args.root)
    hist = histogram_baseline(Path(args.root) / "market")
    rows.append({"model": "colour histogram (3 stripes, 16x8 HSV)", "test_size": "-"})
    rows[-1].update({k: hist[k] for k in ("rank1", "rank5", "rank10", "mAP")})

    result = header("pets09_default", args.smoke)
    result.update(
        {
            "checkpoint": str(args.checkpoint),
            "checkpoint_steps": ckpt.get("step"),
            "train_size": _train_size(ckpt),
            "num_query": len(load_split("pets09", args.root).query),
            "rows": rows,
        }
    )
    finish(result, started)
    print(markdown_table(rows, ["model", "test_size", "rank1", "rank5", "rank10", "mAP"]))
    write_result(result, args.out, args.smoke, "pets09_default")
    return result


if __name__ == "__main__":
    main()
