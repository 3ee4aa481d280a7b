"""Training and feature-extraction throughput on this machine.

1. **Our loop vs a minimal reference loop** (:func:`benchmarks.reference_loop.reference_loop`: lightly's loss and EMA
   helpers, our model, data and optimizer) on the identical config, in one process, alternating: steady-state
   training img/s (steps after ``--warmup``), and the ratio ours / reference. BYOL and SimCLR compare like
   with like (both loops run each view through the network once); the truncated triplet is timed in our
   loop only (lightly has no such loss).
2. **Data loading**: the reference loop with 0, 1 and 2 loader workers: img/s and the fraction of the step
   time spent waiting for the next batch; and the loader alone (augmentation only).
3. **Flags of our trainer**: ``train.channels_last``, ``train.amp=bf16`` (``fp16`` too on CUDA),
   ``train.compile`` and ``model.multires``, each against the same baseline; for compile the time to the
   first step (compilation) as well.
4. **Feature extraction** with the one :class:`~reid_ssl.embedder.Embedder`: img/s on preprocessed batches
   (flip off / on) and end to end from images (decode + resize + forward).

Default: the CPU demo's input (PETS09 crops, resnet18, 64x32, batch 64, 2 loader workers), on CUDA when one
is available. Writes ``benchmarks/results/throughput.json`` and ``throughput.png``.

    python -m benchmarks.bench_throughput                         # ~15 min on 2 cores
    python -m benchmarks.bench_throughput --dataset fashion-mnist --size 32
    python -m benchmarks.bench_throughput --smoke
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks import machine, plots, presets, reference_loop, report, stats
from reid_ssl.config import Config
from reid_ssl.fileio import write_json


def ensure_steps(p: presets.Preset, steps: int) -> presets.Preset:
    """``p`` with enough epochs (and, on Fashion-MNIST, a subset of exactly one epoch) for ``steps`` steps."""
    from reid_ssl.data.ssl_sources import bags_source

    if p.dataset == "fashion-mnist":
        p = replace(p, subset=p.batch_size * max(steps, 2))
    n = p.subset or len(bags_source(Path(p.root), "reid_ssl prepare pets09 --fetch"))
    per_epoch = max(1, n // p.batch_size)
    return replace(p, epochs=max(1, math.ceil(steps / per_epoch)))


def time_ours(cfg: Config, warmup: int) -> dict[str, Any]:
    """Our trainer on ``cfg`` (``train.max_steps`` set): steady img/s after ``warmup`` steps, time to step 1."""
    from reid_ssl.train.logs import read_metrics
    from reid_ssl.train.loop import train

    with tempfile.TemporaryDirectory(prefix="reid_ssl_tput_") as tmp:
        cfg = presets.with_overrides(cfg, [f"train.out_dir={tmp}", "train.log_every_steps=1"])
        t0, p0 = time.time(), time.perf_counter()
        train(cfg, progress=False)
        wall = time.perf_counter() - p0
        ends = [r["time"] - t0 for r in read_metrics(Path(tmp) / "metrics.jsonl") if "loss" in r]
    return {
        "img_per_s": stats.steady_rate(ends, cfg.train.batch_size, warmup),
        "first_step_s": ends[0] if ends else None,
        "wall_s": wall,
        "steps": len(ends),
    }


def time_reference(cfg: Config, warmup: int) -> dict[str, Any]:
    """The reference loop on ``cfg``: steady img/s and the data-wait fraction of the steady window."""
    p0 = time.perf_counter()
    ref = reference_loop.reference_loop(cfg, max_steps=cfg.train.max_steps)
    wall = time.perf_counter() - p0
    ends, waits = ref["step_end"], ref["data_wait"]
    window = ends[-1] - ends[warmup] if len(ends) > warmup + 1 else math.nan
    return {
        "img_per_s": stats.steady_rate(ends, cfg.train.batch_size, warmup),
        "data_wait_fraction": sum(waits[warmup + 1 :]) / window if window > 0 else None,
        "first_step_s": ends[0] if ends else None,
        "wall_s": wall,
        "steps": len(ends),
    }


def time_loader(cfg: Config, batches: int) -> float:
    """Images per second of the training data loader alone (two augmented views per image)."""
    from reid_ssl.data.augment import two_view_dataset
    from reid_ssl.data.sampler import EpochSampler
    from reid_ssl.train.feed import view_loader

    dataset = two_view_dataset(cfg.data, cfg.augment)
    loader = view_loader(dataset, EpochSampler(len(dataset), cfg.train.batch_size, 0), cfg.data.num_workers)
    it = iter(loader)
    next(it)  # worker start-up is not part of the rate
    t, n = time.perf_counter(), 0
    for _ in range(batches):
        try:
            v1, _, _ = next(it)
        except StopIteration:
            break
        n += v1.shape[0]
    return n / (time.perf_counter() - t)


def loops(p: presets.Preset, args: argparse.Namespace) -> dict[str, Any]:
    """Section 1: our loop vs the reference loop, alternating, ``--repeats`` times."""
    out: dict[str, Any] = {}
    for method in ("byol", "simclr", "truncated_triplet"):
        cfg = presets.build_config(p, method, 0, [f"train.max_steps={args.warmup + args.steps}"])
        ours, ref = [], []
        for _ in range(args.repeats):
            ours.append(time_ours(cfg, args.warmup))
            if method != "truncated_triplet":
                ref.append(time_reference(cfg, args.warmup))
        entry: dict[str, Any] = {
            "ours_img_per_s": statistics.median(r["img_per_s"] for r in ours),
            "ours_runs": ours,
        }
        if ref:
            entry["reference_img_per_s"] = statistics.median(r["img_per_s"] for r in ref)
            entry["ratio_ours_over_reference"] = entry["ours_img_per_s"] / entry["reference_img_per_s"]
            entry["reference_data_wait_fraction"] = statistics.median(r["data_wait_fraction"] for r in ref)
            entry["reference_runs"] = ref
        out[method] = entry
        ratio = f", ratio {entry['ratio_ours_over_reference']:.2f}" if ref else ""
        ref_rate = f", reference {entry['reference_img_per_s']:.1f}" if ref else ""
        print(f"loop {method}: ours {entry['ours_img_per_s']:.1f} img/s{ref_rate}{ratio}")
    return out


def data_loading(p: presets.Preset, args: argparse.Namespace) -> dict[str, Any]:
    """Section 2: loader workers: reference-loop img/s and data-wait fraction, and loader-only img/s."""
    out: dict[str, Any] = {}
    for workers in args.worker_counts:
        q = replace(p, workers=workers)
        cfg = presets.build_config(q, "byol", 0, [f"train.max_steps={args.warmup + args.steps}"])
        r = time_reference(cfg, args.warmup)
        r["loader_only_img_per_s"] = time_loader(cfg, max(2, args.steps))
        out[f"workers_{workers}"] = r
        print(
            f"data workers={workers}: training {r['img_per_s']:.1f} img/s, waiting "
            f"{100 * (r['data_wait_fraction'] or 0):.0f}% of the time; "
            f"loader alone {r['loader_only_img_per_s']:.0f} img/s"
        )
    return out


def flags(p: presets.Preset, args: argparse.Namespace) -> dict[str, Any]:
    """Section 3: one trainer flag at a time against the same baseline (BYOL)."""
    cuda = torch.cuda.is_available()
    variants: dict[str, list[str]] = {
        "baseline": [],
        "channels_last_off": ["train.channels_last=false"],
        "bf16_autocast": ["train.amp=bf16"],
        "multires_on": ["model.multires=true"],
    }
    if cuda:
        variants["fp16_autocast"] = ["train.amp=fp16"]
    if not args.no_compile:
        variants["compile"] = ["train.compile=true"]
    out: dict[str, Any] = {}
    for name, extra in variants.items():
        cfg = presets.build_config(p, "byol", 0, [f"train.max_steps={args.warmup + args.steps}", *extra])
        try:
            out[name] = {"overrides": extra, **time_ours(cfg, args.warmup)}
        except Exception as e:  # a flag this machine cannot use (no compiler, no bf16 kernels) is a result too
            if name == "baseline":
                raise
            out[name] = {"overrides": extra, "error": f"{type(e).__name__}: {e}"[:500]}
            print(f"flag {name}: failed ({out[name]['error'][:120]})")
    base = out["baseline"]
    for name, r in out.items():
        if "error" in r:
            continue
        r["speedup_vs_baseline"] = r["img_per_s"] / base["img_per_s"] if r["img_per_s"] else None
        r["extra_first_step_s"] = r["first_step_s"] - base["first_step_s"]
        print(
            f"flag {name}: {r['img_per_s']:.1f} img/s ({r['speedup_vs_baseline']:.2f}x), "
            f"first step {r['first_step_s']:.1f} s"
        )
    if args.no_compile:
        out["compile"] = {"skipped": "--no-compile (compiling takes minutes on 2 CPU cores)"}
    return out


def feature_extraction(p: presets.Preset, args: argparse.Namespace) -> dict[str, Any]:
    """Section 4: Embedder img/s on tensors (flip off/on) and end to end from images (0 and 2 workers)."""
    from reid_ssl.checkpoint import make_preprocess
    from reid_ssl.embedder import Embedder
    from reid_ssl.models import build_backbone

    h, w = p.size
    preprocess = make_preprocess(h, w)
    backbone = build_backbone(p.backbone)
    x = torch.randn(args.embed_batch, 3, h, w)
    out: dict[str, Any] = {"input": [h, w], "backbone": p.backbone, "batch": args.embed_batch}
    for flip in (False, True):
        emb = Embedder(backbone, preprocess, "throughput", flip=flip)
        emb.embed_tensor(x)  # warm-up
        t = time.perf_counter()
        for _ in range(args.embed_batches):
            emb.embed_tensor(x)
        out[f"tensor_flip_{'on' if flip else 'off'}_img_per_s"] = (
            args.embed_batches * args.embed_batch / (time.perf_counter() - t)
        )
    images = sample_images(p, args.embed_images)
    emb = Embedder(backbone, preprocess, "throughput", flip=False)
    for workers in (0, 2):
        t = time.perf_counter()
        res = emb.embed_images(images, batch_size=args.embed_batch, num_workers=workers)
        out[f"images_workers_{workers}_img_per_s"] = len(res.ok) / (time.perf_counter() - t)
    out["images"] = len(images)
    out["images_source"] = "PETS09 gallery JPEG files" if p.dataset == "pets09" else "Fashion-MNIST test images (PIL)"
    print(
        "extract: tensors {:.0f} img/s (flip {:.0f}); from images {:.0f} img/s (2 workers {:.0f})".format(
            out["tensor_flip_off_img_per_s"],
            out["tensor_flip_on_img_per_s"],
            out["images_workers_0_img_per_s"],
            out["images_workers_2_img_per_s"],
        )
    )
    return out


def sample_images(p: presets.Preset, n: int) -> list[Any]:
    """``n`` real images of the dataset: PETS09 gallery files or Fashion-MNIST test images."""
    if p.dataset == "pets09":
        from reid_ssl.data.datasets import load_split

        return [path for path, _, _ in load_split("pets09", p.root).gallery[:n]]
    from PIL import Image

    from reid_ssl.data.classification import load_fashion_mnist

    x, _ = load_fashion_mnist(p.root, "test")
    return [Image.fromarray(x[i], mode="L") for i in range(min(n, len(x)))]


def plot(result: dict[str, Any], path: Path) -> Path:
    labels, means = [], []
    for method, r in result["loops"].items():
        labels.append(f"ours {method}")
        means.append(r["ours_img_per_s"])
        if "reference_img_per_s" in r:
            labels.append(f"reference (lightly loss) {method}")
            means.append(r["reference_img_per_s"])
    for name, r in result["data_loading"].items():
        labels.append(f"reference byol, {name.replace('_', ' ')}")
        means.append(r["img_per_s"])
    for name, r in result["flags"].items():
        if "img_per_s" in r:
            labels.append(f"ours byol, {name}")
            means.append(r["img_per_s"])
    s = result["settings"]
    return plots.plot_bars(
        path,
        labels,
        means,
        [None] * len(means),
        xlabel="training images / s (steady state)",
        title=f"{s['dataset']} {s['size'][0]}x{s['size'][1]} {s['backbone']} batch {s['batch_size']} on {s['device']}",
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="a few steps on tiny inputs, no compile (CI)")
    ap.add_argument("--out", type=Path, default=report.default_out("throughput"), help="JSON output")
    ap.add_argument("--dataset", default=None, help="pets09 (default; smoke: fashion-mnist) or fashion-mnist")
    ap.add_argument("--warmup", type=int, help="steps before the timed window (default 3; smoke 1)")
    ap.add_argument("--steps", type=int, help="timed steps (default 20; smoke 2)")
    ap.add_argument("--repeats", type=int, help="alternating repeats of ours / reference (default 2; smoke 1)")
    ap.add_argument("--worker-counts", type=presets.parse_ints, help="loader workers to try (default 0,1,2)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (always skipped with --smoke)")
    ap.add_argument("--embed-batch", type=int, help="feature-extraction batch (default 128; smoke 16)")
    ap.add_argument("--embed-batches", type=int, help="timed tensor batches (default 10; smoke 2)")
    ap.add_argument("--embed-images", type=int, help="images embedded end to end (default 1024; smoke 48)")
    presets.add_preset_args(ap, runs=False)
    args = ap.parse_args(argv)
    smoke = args.smoke
    defaults = {
        "warmup": (1, 3),
        "steps": (2, 20),
        "repeats": (1, 2),
        "worker_counts": ([0, 1], [0, 1, 2]),
        "embed_batch": (16, 128),
        "embed_batches": (2, 10),
        "embed_images": (48, 1024),
    }
    for name, (small, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if smoke else full)
    args.no_compile = args.no_compile or smoke
    dataset = args.dataset or ("fashion-mnist" if smoke else "pets09")
    missing = presets.dataset_available(dataset)
    if missing:
        ap.error(missing)
    threads = machine.set_threads(args.threads or (1 if smoke else None))
    p = presets.preset(dataset, smoke)
    if dataset == "pets09" and not smoke:
        p = replace(p, size=(64, 32), workers=2)  # the CPU demo (configs/pets09_r18_cpu.yaml) minus multires
    p = ensure_steps(presets.apply_preset_args(p, args), args.warmup + args.steps)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    result = report.header("throughput", smoke)
    result["settings"] = {
        "dataset": dataset,
        "size": list(p.size),
        "backbone": p.backbone,
        "batch_size": p.batch_size,
        "device": device,
        "threads": threads,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "repeats": args.repeats,
        "preset": {**asdict(p), "overrides": p.overrides()},
        "img_per_s": "steady state: images of the steps after the warm-up / their wall time",
    }
    t = time.perf_counter()
    result["loops"] = loops(p, args)
    result["data_loading"] = data_loading(p, args)
    result["flags"] = flags(p, args)
    result["feature_extraction"] = feature_extraction(p, args)
    result["plot"] = str(plot(result, report.png_path(args.out)))
    write_json(args.out, report.finish(result, t))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
