"""Our training loop against the hardware's ceiling, in one process (see :mod:`benchmarks.ceiling`).

The ceiling is the same model's forward + target forward + backward + optimizer step on synthetic tensors of
the batch's shape; the real loop is ``reid_ssl train`` with the same config. Configs (``--configs``):

* ``cpu_default``: the built-in defaults (``reid_ssl train``: PETS09 crops with tracklet positives, ResNet-18 at
  64x32, batch 64, no loader workers (decoded crops cached, augmented in the training process), TensorBoard,
  logs every 10 steps, checkpoints every 200 steps and every 5 epochs) with the monitor off; 80 steps, timed over
  steps 10..80 (more than three whole epochs);
* ``cpu_default_bf16``: the same with ``train.amp=bf16`` (ceiling in bf16 too);
* ``paper_r50_small``: ``configs/imagenet_r50_paper.yaml``'s architecture and optimizer (ResNet-50, heads
  4096/256/4096, LARS) at small scale: PETS09 at 64x32, batch 64, no accumulation, fp32, the CPU default's
  loader (no workers), logs every 10 steps; 45 steps, timed over steps 10..45 (two epochs).

Each config runs ceiling, real, ceiling, real, ... ceiling (``--repeats`` real runs); each real rate is divided
by the mean of the two ceilings around it, so the machine's load at that moment cancels as far as possible.
The JSON also splits each real run's CPU time between the training process and the loader workers.
``--profile`` adds a cProfile of one real run of the first config (the training process's top functions);
``--breakdown`` times the first config's ingredients one at a time (:func:`benchmarks.ceiling.breakdown`) and
its real loop with a checkpoint every epoch against the configured cadence.

    python -m benchmarks.bench_ceiling                              # ~10 min on a quiet 2-core machine
    python -m benchmarks.bench_ceiling --configs cpu_default --repeats 5
    python -m benchmarks.bench_ceiling --configs cpu_default,paper_r50_small --repeats 3 --breakdown
    python -m benchmarks.bench_ceiling --smoke
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks import ceiling, machine, presets, report
from benchmarks.presets import with_overrides
from reid_ssl.config import Config, load_config
from reid_ssl.fileio import write_json

CONFIGS = ("cpu_default", "cpu_default_bf16", "paper_r50_small")


def config(name: str, smoke: bool) -> tuple[Config, int, int]:
    """The config of ``name``, its timed warm-up (steps) and the ceiling's timed steps."""
    pets = [f"data.root={presets.PETS09_ROOT}", "model.multires=false", "train.eval_dataset="]
    if smoke:
        tiny = ["data.source=fashion-mnist", f"data.root={presets.FASHION_MNIST_ROOT}", "data.max_images=256"]
        tiny += ["data.height=16", "data.width=16", "data.num_workers=0", "train.batch_size=16", "train.max_steps=8"]
        tiny += ["model.proj_hidden_dim=64", "model.proj_dim=32", "model.pred_hidden_dim=64", "train.log_every_steps=2"]
        tiny += ["model.multires=false", "train.eval_dataset=", "train.tensorboard=false"]
        paper = ["model.backbone=resnet50", "optim.name=lars"]
        extra = {"cpu_default_bf16": ["train.amp=bf16"], "paper_r50_small": paper}
        return load_config(None, [*tiny, *extra.get(name, [])]), 2, 3
    if name == "cpu_default":
        return load_config(None, [*pets, "train.max_steps=80"]), 10, 20
    if name == "cpu_default_bf16":
        return load_config(None, [*pets, "train.max_steps=80", "train.amp=bf16"]), 10, 20
    if name == "paper_r50_small":
        small = ["data.source=pets09", "data.height=64", "data.width=32", "data.eval_height=64", "data.eval_width=32"]
        small += ["data.num_workers=0", "train.batch_size=64", "train.accumulate=1", "train.amp=none"]
        small += ["train.max_steps=45", "train.log_every_steps=10", "train.tensorboard=false"]
        paper = machine.REPO / "configs" / "imagenet_r50_paper.yaml"
        return load_config(paper, [*pets, *small]), 10, 10
    raise KeyError(f"unknown config {name!r}; choose from {list(CONFIGS)}")


def breakdown(cfg: Config, warmup: int, steps: int, repeats: int) -> dict[str, Any]:
    """:func:`benchmarks.ceiling.breakdown` of ``cfg``, then its real loop with a checkpoint at every epoch's end
    and with the configured cadence, alternating (``repeats`` each)."""
    parts = ceiling.breakdown(cfg, steps, warmup, repeats)
    every_epoch = with_overrides(cfg, ["train.checkpoint_every_epochs=1"])
    loops: dict[str, list[float]] = {"checkpoint_every_epoch": [], "configured": []}
    for _ in range(repeats):
        loops["checkpoint_every_epoch"].append(ceiling.real_rate(every_epoch, warmup)["img_per_s"])
        loops["configured"].append(ceiling.real_rate(cfg, warmup)["img_per_s"])
    parts["real_loop_img_per_s"] = loops
    parts["checkpoint_every_epochs_configured"] = cfg.train.checkpoint_every_epochs
    syn = parts["median_img_per_s"]["synthetic"]
    parts["real_loop_ratio_to_synthetic"] = {k: statistics.median(v) / syn for k, v in loops.items()}
    for name, ratio in {**parts["ratio_to_synthetic"], **parts["real_loop_ratio_to_synthetic"]}.items():
        print(f"  breakdown {name}: {ratio:.3f} of the synthetic rate", flush=True)
    return parts


def profile(cfg: Config, warmup: int, top: int = 25) -> dict[str, Any]:
    """cProfile of one real run: the ``top`` functions by cumulative time (training process only)."""
    prof = cProfile.Profile()
    prof.enable()
    rate = ceiling.real_rate(cfg, warmup)
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(top)
    rows = []
    for (file, line, fn), (_, calls, _, cum, _) in pstats.Stats(prof).stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(file).name}:{line}({fn})", "calls": calls, "cumulative_s": round(cum, 3)})
    rows.sort(key=lambda r: -r["cumulative_s"])
    return {"real": rate, "top_cumulative": rows[:top], "text": text.getvalue()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny Fashion-MNIST runs, seconds (CI)")
    ap.add_argument("--out", type=Path, default=report.default_out("ceiling"), help="JSON output")
    ap.add_argument("--configs", type=presets.parse_list, default=list(CONFIGS), help="comma-separated")
    ap.add_argument("--repeats", type=int, help="real runs per config, each between two ceiling runs (default 3)")
    ap.add_argument("--profile", action="store_true", help="also cProfile one real run of the first config")
    ap.add_argument(
        "--breakdown",
        action="store_true",
        help="also time the first config's ingredients one by one (synthetic, real batches, + loss and EMA, + "
        "augmentation) and its real loop with a checkpoint every epoch against the default cadence",
    )
    ap.add_argument("--threads", type=int, help="torch threads (default: all available cores; smoke 1)")
    args = ap.parse_args(argv)
    repeats = args.repeats or (1 if args.smoke else 3)
    if not args.smoke and presets.dataset_available("pets09"):
        ap.error(presets.dataset_available("pets09"))
    threads = machine.set_threads(args.threads or (1 if args.smoke else None))
    result = report.header("ceiling", args.smoke)
    result["settings"] = {"threads": threads, "repeats": repeats, "ratio": "real img/s / mean of the ceilings around"}
    result["configs"] = {}
    t = time.perf_counter()
    for name in args.configs:
        cfg, warmup, steps = config(name, args.smoke)
        r = ceiling.loop_vs_ceiling(cfg, warmup, steps, repeats)
        ratios = r["ratio"]
        r["ratio_median"], r["ratio_min"], r["ratio_max"] = statistics.median(ratios), min(ratios), max(ratios)
        r["overrides"] = {"backbone": cfg.model.backbone, "size": [cfg.data.height, cfg.data.width]}
        result["configs"][name] = r
        print(
            f"{name}: real / ceiling {r['ratio_median']:.3f} (min {r['ratio_min']:.3f}, max {r['ratio_max']:.3f});"
            f" real {statistics.median(x['img_per_s'] for x in r['real']):.1f} img/s,"
            f" ceiling {statistics.median(x['img_per_s'] for x in r['ceiling']):.1f} img/s",
            flush=True,
        )
        write_json(args.out, report.finish(result, t))
    if args.breakdown:
        result["breakdown"] = breakdown(*config(args.configs[0], args.smoke), repeats)
        write_json(args.out, report.finish(result, t))
    if args.profile:
        cfg, warmup, _ = config(args.configs[0], args.smoke)
        result["profile"] = profile(cfg, warmup)
        print(result["profile"]["text"][:4000])
    print(f"wrote {write_json(args.out, report.finish(result, t))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
