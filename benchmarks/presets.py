"""Presets: the config every method shares on a dataset, the options that change it, and each method's
overrides. Sized for 2 CPU cores (benchmarks/README.md, "Sizing")."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.machine import REPO, available_cores, set_threads
from reid_ssl.config import BYOL_AUGMENT, Config, apply_changes, augment_overrides, load_config, parse_overrides

WORK_DIR = REPO / "runs" / "bench"
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
PETS09_ROOT = str(REPO / "data" / "pets09")
DATASETS = ("fashion-mnist", "pets09")
# Classes (Fashion-MNIST) or people in view (PETS09-S2L1, datasets/README.md, "PETS09") for the Bernoulli choice of k.
CLASSES = {"fashion-mnist": 10, "pets09": 20}
# The headline metric of each dataset's monitor, then the others worth plotting.
METRICS = {"fashion-mnist": ("knn_top1",), "pets09": ("rank1", "mAP")}
METHODS = ("truncated_triplet", "byol", "simclr", "median_triplet", "truncated_triplet_bernoulli")


@dataclass(frozen=True)
class MonitorSpec:
    """What is measured after every epoch.

    ``fashion-mnist``: weighted kNN (k=20, T=0.07; :func:`reid_ssl.classify.knn_classify`) of a fixed labeled
    subset of the test split (``test_per_class`` per class) against a fixed labeled subset of the train split
    (``bank_per_class``); features are the backbone's pooled output of the eval preprocessing, without flip.
    ``pets09``: :func:`reid_ssl.monitor.retrieval_monitor` (rank-1 / rank-5 / mAP, flip-averaged features) on
    ``split`` (default the test split; ``pets09-val`` for the validation split that recipes are chosen on).
    """

    dataset: str
    root: str
    bank_per_class: int = 500
    test_per_class: int = 200
    split: str = ""  # pets09: the retrieval split ("" = the test split, "pets09-val" = validation)


@dataclass(frozen=True)
class Preset:
    """A dataset's shared benchmark setting (sized for 2 CPU cores; see benchmarks/README.md)."""

    dataset: str
    root: str
    size: tuple[int, int]
    backbone: str
    subset: int  # training images (0 = all)
    batch_size: int
    epochs: int
    workers: int
    monitor: MonitorSpec
    heads: tuple[int, int, int] = (4096, 256, 4096)  # projector hidden, projection, predictor hidden
    log_every_steps: int = 10
    extra: tuple[str, ...] = ()

    def overrides(self) -> list[str]:
        """``key=value`` overrides that turn the built-in defaults into this preset."""
        h, w = self.size
        source = self.dataset
        return [
            f"data.source={source}",
            f"data.root={self.root}",
            f"data.height={h}",
            f"data.width={w}",
            f"data.eval_height={h}",
            f"data.eval_width={w}",
            f"data.max_images={self.subset}",
            f"data.num_workers={self.workers}",
            f"model.backbone={self.backbone}",
            f"model.proj_hidden_dim={self.heads[0]}",
            f"model.proj_dim={self.heads[1]}",
            f"model.pred_hidden_dim={self.heads[2]}",
            "model.multires=false",  # the same views for every method; bench_ablations turns it on
            *augment_overrides(BYOL_AUGMENT),  # the paper's views for every method
            "data.positives=augment",  # two views of one image, as the paper (and every compared method) does
            f"train.batch_size={self.batch_size}",
            f"train.epochs={self.epochs}",
            "train.device=auto",
            "train.eval_every_epochs=1",
            "train.checkpoint_every_steps=1000000000",  # only the end-of-epoch checkpoint
            f"train.log_every_steps={self.log_every_steps}",
            "train.tensorboard=false",
            *self.extra,
        ]


def preset(dataset: str, smoke: bool = False) -> Preset:
    """The full preset of a dataset (sized in benchmarks/README.md) or its smoke version (seconds, CI)."""
    if dataset == "fashion-mnist":
        full = Preset(
            dataset,
            FASHION_MNIST_ROOT,
            size=(32, 32),
            backbone="resnet18",
            subset=4096,
            batch_size=128,
            epochs=15,
            workers=1,
            monitor=MonitorSpec(dataset, FASHION_MNIST_ROOT, bank_per_class=500, test_per_class=200),
        )
        tiny = {"size": (16, 16), "epochs": 2, "monitor": replace(full.monitor, bank_per_class=10, test_per_class=10)}
    elif dataset == "pets09":
        full = Preset(
            dataset,
            PETS09_ROOT,
            size=(64, 32),
            backbone="resnet18",
            subset=0,
            batch_size=64,
            epochs=12,
            workers=1,
            monitor=MonitorSpec(dataset, PETS09_ROOT),
        )
        tiny = {"size": (32, 16), "epochs": 1}
    else:
        raise KeyError(f"unknown benchmark dataset {dataset!r}; choose one of {list(DATASETS)}")
    if not smoke:
        return full
    return replace(full, subset=64, batch_size=24, workers=0, heads=(64, 32, 64), log_every_steps=1, **tiny)


def parse_size(text: str) -> tuple[int, int]:
    """``"32"`` -> (32, 32); ``"64x32"`` -> (64, 32) (height x width)."""
    parts = text.lower().split("x")
    try:
        h, w = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be N or HxW, got {text!r}") from None
    return h, w


def parse_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_ints(text: str) -> list[int]:
    try:
        return [int(x) for x in parse_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_preset_args(ap: argparse.ArgumentParser, runs: bool = True) -> None:
    """The options that change a dataset preset (each defaults to the preset's value), and with ``runs`` the
    options of cached training runs (work folder, --fresh, --keep-checkpoints, --jobs)."""
    g = ap.add_argument_group("preset overrides (default: the dataset's preset, see benchmarks/README.md)")
    g.add_argument("--epochs", type=int, help="training epochs per run")
    g.add_argument("--subset", type=int, help="training images (0 = all)")
    g.add_argument("--batch-size", type=int, help="images per step (negatives per anchor = batch - 1)")
    g.add_argument("--size", type=parse_size, help="input size, N or HxW (training and eval)")
    g.add_argument("--backbone", help="resnet18 | resnet18_small | resnet34 | resnet50")
    g.add_argument("--workers", type=int, help="data-loader worker processes")
    g.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any further config override for every run (repeatable), e.g. --set optim.lr=0.1",
    )
    ap.add_argument("--threads", type=int, help="torch threads (default: all available cores; 1 with --smoke)")
    if not runs:
        return
    ap.add_argument(
        "--work-dir",
        type=Path,
        help=f"training runs go here (default {WORK_DIR.relative_to(REPO)}; a temporary folder with --smoke)",
    )
    ap.add_argument("--fresh", action="store_true", help="retrain even when a finished identical run exists")
    ap.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoint.pt (~50-150 MB)")
    ap.add_argument(
        "--jobs",
        type=int,
        help="trainings at once, each a single-threaded process with in-process data loading "
        "(default: the available cores; 1 with --smoke). --jobs 1 trains one run at a time with --threads threads",
    )


def apply_preset_args(p: Preset, args: argparse.Namespace) -> Preset:
    """``p`` with the command line's preset overrides applied."""
    changes: dict[str, Any] = {}
    for name in ("epochs", "subset", "batch_size", "size", "backbone", "workers"):
        value = getattr(args, name, None)
        if value is not None:
            changes[name] = value
    if getattr(args, "extra", None):
        changes["extra"] = (*p.extra, *args.extra)
    if getattr(args, "jobs", None) and args.jobs > 1 and getattr(args, "workers", None) is None:
        changes["workers"] = 0  # each job is one single-threaded process; loader workers would oversubscribe
    return replace(p, **changes) if changes else p


def resolve_jobs(args: argparse.Namespace) -> int:
    """``--jobs``, defaulting to 1 with --smoke or an explicit --threads, else to the available cores."""
    if args.jobs is None:
        args.jobs = 1 if (args.smoke or args.threads) else available_cores()
    if args.jobs < 1:
        raise SystemExit("--jobs must be >= 1")
    return int(args.jobs)


def run_settings(args: argparse.Namespace, seeds: Sequence[int]) -> dict[str, Any]:
    """Default ``--seeds`` (seed 0 alone with --smoke), set the torch threads (``--threads``; 1 with --smoke)
    and resolve ``--jobs``: the settings every multi-run benchmark records (seeds, threads per run, concurrent
    runs)."""
    args.seeds = args.seeds or ([0] if args.smoke else list(seeds))
    threads = set_threads(args.threads or (1 if args.smoke else None))
    jobs = resolve_jobs(args)
    return {"seeds": args.seeds, "threads": threads if jobs == 1 else 1, "concurrent_runs": jobs}


def method_overrides(method: str, batch_size: int, classes: int) -> list[str]:
    """Config overrides that select a method; everything else (backbone, views, optimizer) stays shared.

    ``truncated_triplet_bernoulli`` is the truncated triplet with a single rank-k deputy, k the smallest rank
    that is a true negative with probability >= 0.99 (docs/method.md, "Choosing k") for ``batch_size - 1`` negatives and
    ``classes`` balanced classes.
    """
    if method == "truncated_triplet":
        return ["loss.name=truncated_triplet", "loss.k=fixed"]
    if method == "truncated_triplet_bernoulli":
        from reid_ssl.losses import smallest_safe_k

        k = smallest_safe_k(batch_size - 1, classes)
        return ["loss.name=truncated_triplet", "loss.k=fixed", f"loss.k_lo={k}", f"loss.k_hi={k}"]
    if method == "median_triplet":
        return ["loss.name=median_triplet"]
    if method == "byol":
        return ["loss.name=byol"]
    if method == "simclr":
        return ["loss.name=simclr", "model.target=shared", "model.predictor=false"]
    raise KeyError(f"unknown method {method!r}; choose one of {list(METHODS)}")


def build_config(p: Preset, method: str, seed: int, extra: Sequence[str] = ()) -> Config:
    """The resolved config of one run: preset, then method, then ``extra`` overrides, then the seed."""
    return load_config(
        None,
        [*p.overrides(), *method_overrides(method, p.batch_size, CLASSES[p.dataset]), *extra, f"train.seed={seed}"],
    )


def available_preset(dataset: str, args: argparse.Namespace) -> Preset | str:
    """The dataset's preset (smoke-sized with ``args.smoke``) with the command line's overrides, or, when the
    dataset's files are missing, the line saying how to get them (printed as the dataset being skipped)."""
    missing = dataset_available(dataset)
    if missing:
        print(f"{dataset}: skipped ({missing})")
        return missing
    return apply_preset_args(preset(dataset, args.smoke), args)


def dataset_available(dataset: str) -> str | None:
    """None when the dataset's files are present, else a line saying how to get them."""
    if dataset == "fashion-mnist":
        if not (Path(FASHION_MNIST_ROOT) / "train-images-idx3-ubyte.gz").is_file():
            return f"Fashion-MNIST not found in {FASHION_MNIST_ROOT} (apt-get install dataset-fashion-mnist)"
        return None
    if dataset == "pets09":
        if not (Path(PETS09_ROOT) / "market").is_dir() or not (Path(PETS09_ROOT) / "train").is_dir():
            return f"PETS09 crops not found in {PETS09_ROOT} (make data, or: reid_ssl prepare pets09 --fetch)"
        return None
    raise KeyError(f"unknown benchmark dataset {dataset!r}; choose one of {list(DATASETS)}")


def with_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """``cfg`` with ``key=value`` overrides applied, validated again."""
    return apply_changes(cfg, parse_overrides(list(overrides)))
