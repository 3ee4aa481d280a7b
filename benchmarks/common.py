"""Helpers shared by the training benchmarks: machine info, JSON, seeds, mean ± spread, plots, presets and runs.

A benchmark run is one call of the project's trainer (:func:`reid_ssl.train.train`, ``impl="ours"``) or of the
minimal lightly-style reference loop below (``impl="lightly"``), with a monitor evaluated after every epoch
and once before training ("epoch 0": the seed's freshly initialised backbone; ``train`` seeds and builds the
model the same way). Each finished run leaves ``run.json`` in its folder under ``runs/bench/``; a later
benchmark with the same resolved config, monitor and implementation reuses it (``--fresh`` ignores it), so an
interrupted full run resumes and ``bench_peer_lightly`` reuses the "ours" runs of ``bench_efficiency``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from reid_ssl.config import Config, from_dict, load_config, parse_overrides, to_dict

RESULTS_DIR = REPO / "benchmarks" / "results"
WORK_DIR = REPO / "runs" / "bench"
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
PETS09_ROOT = str(REPO / "data" / "pets09")
DATASETS = ("fashion-mnist", "pets09")
# Classes (Fashion-MNIST) or people in view (PETS09-S2L1, data.md §1) for the Bernoulli choice of k.
CLASSES = {"fashion-mnist": 10, "pets09": 20}
# The headline metric of each dataset's monitor, then the others worth plotting.
METRICS = {"fashion-mnist": ("knn_top1",), "pets09": ("rank1", "mAP")}
METHODS = ("truncated_triplet", "byol", "simclr", "median_triplet", "truncated_triplet_bernoulli")

Monitor = Callable[[Any], dict[str, float]]


# ---------------------------------------------------------------------------------------------------------
# Machine, threads, seeds, JSON
# ---------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_flags(wanted: Sequence[str] = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")) -> list[str]:
    """Which of the instruction-set flags that matter for bf16 / compiled kernels this CPU reports."""
    info = Path("/proc/cpuinfo")
    if not info.exists():
        return []
    for line in info.read_text().splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return [f for f in wanted if f in have]
    return []


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def package_version(name: str) -> str | None:
    """The installed version of a distribution, or None when it is missing."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, load, library versions and GPU (if any): every result carries this."""
    import torchvision

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores_available": available_cores(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "lightly": package_version("lightly"),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def header(benchmark: str, smoke: bool) -> dict[str, Any]:
    """The fields every result file starts with: name, date, exact command, machine."""
    argv = [Path(sys.argv[0]).as_posix(), *sys.argv[1:]]
    with contextlib.suppress(ValueError):
        argv[0] = Path(sys.argv[0]).resolve().relative_to(REPO).as_posix()
    return {
        "benchmark": benchmark,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python " + " ".join(argv),
        "smoke": smoke,
        "machine": machine_info(),
    }


def finish(result: dict[str, Any], started: float) -> dict[str, Any]:
    """Stamp a result with its total seconds and the load average at the end (a busy machine skews timings)."""
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def set_threads(threads: int | None) -> int:
    """Use ``threads`` intra-op threads (default: every available core); returns the number set."""
    n = threads or available_cores()
    torch.set_num_threads(n)
    return n


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (the trainer does the same at its start)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def jsonable(obj: Any) -> Any:
    """Plain JSON types: NumPy scalars/arrays unwrapped, tuples as lists, NaN and ±inf as None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as a Markdown table (floats with 4 significant digits, None as "—"), for the results page."""

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "—"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (through :func:`jsonable`) as indented, strict JSON; creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(payload), indent=2, allow_nan=False) + "\n")
    return path


def default_out(name: str) -> Path:
    """``benchmarks/results/<name>.json``."""
    return RESULTS_DIR / f"{name}.json"


def png_path(out: str | Path, suffix: str = "") -> Path:
    """The PNG written next to a result file: ``<stem>[_<suffix>].png``."""
    out = Path(out)
    return out.with_name(f"{out.stem}{'_' + suffix if suffix else ''}.png")


# ---------------------------------------------------------------------------------------------------------
# Statistics over seeds
# ---------------------------------------------------------------------------------------------------------


def mean_spread(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Mean, sample std (ddof=1; 0 for one value), min and max of the finite values, and their count.

    The "spread" reported everywhere is this sample standard deviation over seeds.
    """
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if len(x) == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    std = float(x.std(ddof=1)) if len(x) > 1 else 0.0
    return {"mean": float(x.mean()), "std": std, "min": float(x.min()), "max": float(x.max()), "n": len(x)}


def curve_summary(epochs: Sequence[int], curves: Sequence[Sequence[float]]) -> dict[str, list[Any]]:
    """Per-epoch mean ± spread of several runs' curves (each as long as ``epochs``)."""
    per_epoch = [mean_spread([c[i] for c in curves if i < len(c)]) for i in range(len(epochs))]
    return {"epochs": list(epochs), **{k: [p[k] for p in per_epoch] for k in ("mean", "std", "min", "max")}}


def first_epoch_reaching(epochs: Sequence[int], values: Sequence[float | None], threshold: float) -> int | None:
    """The first training epoch (>= 1) whose value is >= ``threshold``, or None when the curve never gets there.

    Epoch 0 is the untrained network: a method does not "reach" an accuracy by not training.
    """
    for e, v in zip(epochs, values, strict=True):
        if e >= 1 and v is not None and v >= threshold:
            return int(e)
    return None


# ---------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Curve:
    """One line of a plot: mean per epoch with a ± spread band and, optionally, one marked epoch."""

    label: str
    epochs: list[int]
    mean: list[float | None]
    spread: list[float | None]
    mark: int | None = None
    style: str = "-"


@dataclass
class Panel:
    """One axis: its curves, y label and an optional horizontal reference line."""

    ylabel: str
    curves: list[Curve]
    hline: float | None = None
    hline_label: str = ""
    title: str = ""


def plot_panels(path: str | Path, panels: Sequence[Panel], suptitle: str = "") -> Path:
    """Mean ± spread curves (shaded band), one axis per panel; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes[0], panels, strict=True):
        for i, c in enumerate(panel.curves):
            color = colors[i % len(colors)]
            x = np.asarray(c.epochs, dtype=float)
            m = np.asarray([np.nan if v is None else v for v in c.mean], dtype=float)
            s = np.asarray([0.0 if v is None else v for v in c.spread], dtype=float)
            ax.plot(x, m, c.style, color=color, marker="o", ms=3, lw=1.5, label=c.label)
            ax.fill_between(x, m - s, m + s, color=color, alpha=0.18, lw=0)
            if c.mark is not None and c.mark in c.epochs:
                j = c.epochs.index(c.mark)
                ax.plot([x[j]], [m[j]], marker="*", ms=14, color=color, mec="black", mew=0.6, ls="none")
        if panel.hline is not None:
            ax.axhline(panel.hline, color="gray", ls="--", lw=1, label=panel.hline_label or None)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(panel.ylabel)
        if panel.title:
            ax.set_title(panel.title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bars(
    path: str | Path,
    labels: Sequence[str],
    means: Sequence[float | None],
    errors: Sequence[float | None],
    xlabel: str,
    title: str = "",
    reference: float | None = None,
) -> Path:
    """Horizontal bars with error bars (e.g. an ablation's final metric per variant)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(labels) + 1.4))
    y = np.arange(len(labels))
    m = np.asarray([np.nan if v is None else v for v in means], dtype=float)
    e = np.asarray([0.0 if v is None else v for v in errors], dtype=float)
    ax.barh(y, m, xerr=e, color="#4c72b0", alpha=0.85, capsize=3)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    if reference is not None:
        ax.axvline(reference, color="gray", ls="--", lw=1)
    finite = m[np.isfinite(m)]
    if len(finite):
        lo, hi = float(finite.min() - e.max()), float(finite.max() + e.max())
        pad = max(0.02, 0.15 * (hi - lo))
        ax.set_xlim(max(0.0, lo - pad), hi + pad)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------
# Presets: the config every method shares on a dataset
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MonitorSpec:
    """What is measured after every epoch.

    ``fashion-mnist``: weighted kNN (k=20, T=0.07; :func:`reid_ssl.classify.knn_classify`) of a fixed labeled
    subset of the test split (``test_per_class`` per class) against a fixed labeled subset of the train split
    (``bank_per_class``); features are the backbone's pooled output of the eval preprocessing, without flip.
    ``pets09``: :func:`reid_ssl.monitor.retrieval_monitor` (rank-1 / rank-5 / mAP, flip-averaged features).
    """

    dataset: str
    root: str
    bank_per_class: int = 500
    test_per_class: int = 200


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
    tiny_heads = (64, 32, 64)
    if dataset == "fashion-mnist":
        root = FASHION_MNIST_ROOT
        if smoke:
            spec = MonitorSpec(dataset, root, bank_per_class=10, test_per_class=10)
            return Preset(
                dataset,
                root,
                size=(16, 16),
                backbone="resnet18",
                subset=64,
                batch_size=24,
                epochs=2,
                workers=0,
                monitor=spec,
                heads=tiny_heads,
                log_every_steps=1,
            )
        spec = MonitorSpec(dataset, root, bank_per_class=500, test_per_class=200)
        return Preset(
            dataset,
            root,
            size=(32, 32),
            backbone="resnet18",
            subset=4096,
            batch_size=128,
            epochs=15,
            workers=1,
            monitor=spec,
        )
    if dataset == "pets09":
        root, spec = PETS09_ROOT, MonitorSpec(dataset, PETS09_ROOT)
        if smoke:
            return Preset(
                dataset,
                root,
                size=(32, 16),
                backbone="resnet18",
                subset=64,
                batch_size=24,
                epochs=1,
                workers=0,
                monitor=spec,
                heads=tiny_heads,
                log_every_steps=1,
            )
        return Preset(
            dataset,
            root,
            size=(64, 32),
            backbone="resnet18",
            subset=0,
            batch_size=64,
            epochs=12,
            workers=1,
            monitor=spec,
        )
    raise KeyError(f"unknown benchmark dataset {dataset!r}; choose one of {list(DATASETS)}")


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


def method_overrides(method: str, batch_size: int, classes: int) -> list[str]:
    """Config overrides that select a method; everything else (backbone, views, optimizer) stays shared.

    ``truncated_triplet_bernoulli`` is the truncated triplet with a single rank-k deputy, k the smallest rank
    that is a true negative with probability >= 0.99 (method.md §1.16) for ``batch_size - 1`` negatives and
    ``classes`` balanced classes.
    """
    if method == "truncated_triplet":
        return ["loss.name=truncated_triplet"]
    if method == "truncated_triplet_bernoulli":
        from reid_ssl.losses import smallest_safe_k

        k = smallest_safe_k(batch_size - 1, classes)
        return ["loss.name=truncated_triplet", f"loss.k_lo={k}", f"loss.k_hi={k}"]
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


# ---------------------------------------------------------------------------------------------------------
# Monitors
# ---------------------------------------------------------------------------------------------------------


class KnnMonitor:
    """Fashion-MNIST kNN top-1 / top-5 of a backbone on fixed labeled subsets (see :class:`MonitorSpec`).

    The images are preprocessed once (the embedder's eval transform) and kept as a tensor, so a call costs
    one forward pass over ``10 * (bank_per_class + test_per_class)`` images.
    """

    def __init__(self, spec: MonitorSpec, batch_size: int = 256) -> None:
        from PIL import Image

        from reid_ssl.data.classification import load_fashion_mnist, per_class_subset

        self.spec, self.batch_size = spec, batch_size
        self.images: dict[str, list[Any]] = {}
        self.labels: dict[str, np.ndarray] = {}
        for split, per_class in (("train", spec.bank_per_class), ("test", spec.test_per_class)):
            x, y = load_fashion_mnist(spec.root, split)
            keep = per_class_subset(y, per_class, seed=0)
            self.images[split] = [Image.fromarray(x[i], mode="L") for i in keep]
            self.labels[split] = y[keep]
        self._tensors: dict[str, torch.Tensor] = {}
        self._preprocess_key = ""

    def _inputs(self, embedder: Any) -> dict[str, torch.Tensor]:
        key = json.dumps(embedder.preprocess, sort_keys=True)
        if key != self._preprocess_key:
            self._tensors = {
                s: torch.stack([embedder.transform(im.convert("RGB")) for im in ims]) for s, ims in self.images.items()
            }
            self._preprocess_key = key
        return self._tensors

    @torch.no_grad()
    def features(self, embedder: Any) -> dict[str, np.ndarray]:
        """Unit-norm pooled backbone features of the bank ("train") and the test subset."""
        net = embedder.backbone.eval()
        out = {}
        for split, x in self._inputs(embedder).items():
            parts = [
                net(x[i : i + self.batch_size].to(embedder.device)).float().cpu()
                for i in range(0, len(x), self.batch_size)
            ]
            out[split] = torch.nn.functional.normalize(torch.cat(parts), dim=1).numpy()
        return out

    def __call__(self, embedder: Any) -> dict[str, float]:
        from reid_ssl.eval.classify import knn_classify

        f = self.features(embedder)
        r = knn_classify(f["train"], self.labels["train"], f["test"], self.labels["test"], 10, k=20, temperature=0.07)
        return {"knn_top1": r["top1"], "knn_top5": r["top5"]}

    def linear(self, embedder: Any, epochs: int = 100) -> dict[str, float]:
        """Linear probe (:func:`reid_ssl.classify.linear_probe`) trained on the bank, tested on the test subset."""
        from reid_ssl.eval.classify import linear_probe

        f = self.features(embedder)
        r = linear_probe(f["train"], self.labels["train"], f["test"], self.labels["test"], 10, epochs=epochs)
        return {"linear_top1": r["top1"], "linear_top5": r["top5"]}


@functools.lru_cache(maxsize=4)
def build_monitor(spec: MonitorSpec) -> Monitor:
    """The per-epoch monitor of a dataset (reads its data now, so a missing dataset fails before training).

    One per spec and process: the Fashion-MNIST monitor keeps its preprocessed images between runs.
    """
    if spec.dataset == "fashion-mnist":
        return KnnMonitor(spec)
    if spec.dataset == "pets09":
        from reid_ssl.train.monitor import retrieval_monitor

        inner = retrieval_monitor("pets09", spec.root)
        return lambda embedder: {k: v for k, v in inner(embedder).items() if k != "unreadable"}
    raise KeyError(f"no monitor for dataset {spec.dataset!r}")


class TimedMonitor:
    """Wraps a monitor and adds up the seconds it takes (so training time can be reported without it)."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor, self.seconds, self.calls = monitor, 0.0, 0

    def __call__(self, embedder: Any) -> dict[str, float]:
        t = time.perf_counter()
        try:
            return self.monitor(embedder)
        finally:
            self.seconds += time.perf_counter() - t
            self.calls += 1


_INITIAL: dict[str, dict[str, float]] = {}


def initial_metrics(cfg: Config, spec: MonitorSpec, monitor: Monitor) -> dict[str, float]:
    """The monitor's values for the backbone a run starts from ("epoch 0"), computed once per process.

    The backbone is built first, from the seed alone, so every method and variant of a seed with the same
    backbone, initial weights and eval size starts from the same weights.
    """
    key = json.dumps(
        [asdict(spec), cfg.model.backbone, cfg.model.init, cfg.train.seed, cfg.data.eval_height, cfg.data.eval_width]
    )
    if key not in _INITIAL:
        _INITIAL[key] = monitor(initial_embedder(cfg))
    return dict(_INITIAL[key])


def initial_embedder(cfg: Config) -> Any:
    """An Embedder of the backbone that a run with ``cfg`` starts from (same seed, same construction order)."""
    from reid_ssl.checkpoint import make_preprocess
    from reid_ssl.embedder import Embedder
    from reid_ssl.train.loop import build_model

    seed_all(cfg.train.seed)
    model = build_model(cfg)
    return Embedder(
        model.backbone,
        make_preprocess(cfg.data.eval_height, cfg.data.eval_width),
        "initial",
        device=cfg.train.device if cfg.train.device != "auto" else None,
    )


# ---------------------------------------------------------------------------------------------------------
# Runs (cached)
# ---------------------------------------------------------------------------------------------------------


def run_key(cfg: Config, spec: MonitorSpec, impl: str, linear: bool, ddp: int = 1) -> str:
    """A hash of everything that determines a run's result (not its output folder)."""
    from reid_ssl import __version__

    d = to_dict(cfg)
    d["train"].pop("out_dir")
    blob = {"config": d, "monitor": asdict(spec), "impl": impl, "linear": linear, "ddp": ddp, "reid_ssl": __version__}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def run_dir(work: Path, cfg: Config, spec: MonitorSpec, impl: str, label: str, key: str) -> Path:
    return work / f"{spec.dataset}-{label}-{impl}-s{cfg.train.seed}-{key[:10]}"


def read_run_metrics(out_dir: Path) -> tuple[dict[int, dict[str, float]], dict[int, float]]:
    """Per-epoch monitor values (``eval_*`` records) and per-epoch mean training loss from metrics.jsonl.

    Loss records carry the 0-based epoch they were logged in; eval records the number of finished epochs.
    """
    evals: dict[int, dict[str, float]] = {}
    losses: dict[int, list[float]] = {}
    path = out_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        r = json.loads(line)
        if "loss" in r:
            losses.setdefault(int(r["epoch"]) + 1, []).append(float(r["loss"]))
        scores = {k[5:]: float(v) for k, v in r.items() if k.startswith("eval_")}
        if scores:
            evals[int(r["epoch"])] = scores
    return evals, {e: float(np.mean(v)) for e, v in losses.items()}


def assemble_run(
    cfg: Config,
    impl: str,
    label: str,
    initial: dict[str, float],
    evals: dict[int, dict[str, float]],
    losses: dict[int, float],
    seconds: float,
    monitor_seconds: float | None,
    images: int,
) -> dict[str, Any]:
    """One run's result: curves per metric over epochs 0..E (0 = before training), loss, timings."""
    epochs = [0, *sorted(evals)]
    names = sorted(initial)
    curves = {n: [initial[n], *(evals[e].get(n, math.nan) for e in epochs[1:])] for n in names}
    train_s = seconds - (monitor_seconds or 0.0)
    return {
        "impl": impl,
        "method": label,
        "seed": cfg.train.seed,
        "epochs": epochs,
        "metrics": curves,
        "loss": [losses.get(e) for e in epochs[1:]],
        "seconds": round(seconds, 2),
        "monitor_seconds": None if monitor_seconds is None else round(monitor_seconds, 2),
        "train_images_per_second": images / train_s if train_s > 0 else None,
    }


def run_training(
    cfg: Config,
    spec: MonitorSpec,
    label: str,
    impl: str = "ours",
    work: Path = WORK_DIR,
    fresh: bool = False,
    keep_checkpoint: bool = False,
    linear: bool = False,
    processes: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train one run (``impl="ours"``: :func:`reid_ssl.train.train`; ``"lightly"``: :func:`reference_loop`).

    With ``processes > 1`` our trainer runs under ``torchrun`` (gloo on CPU, one thread per process) and
    ``cfg.train.batch_size`` is the per-process batch.

    Returns the result of :func:`assemble_run`, plus ``linear`` (Fashion-MNIST linear probe of the final
    backbone) when asked. A finished identical run found under ``work`` is reused (``"cached": true``).
    """
    if processes > 1 and impl != "ours":
        raise ValueError("only our trainer runs on several processes")
    key = run_key(cfg, spec, impl, linear, processes)
    out = run_dir(work, cfg, spec, impl, label, key)
    done = out / "run.json"
    if done.is_file() and not fresh:
        result = json.loads(done.read_text())
        if result.get("key") == key:
            log(f"  {label} ({impl}) seed {cfg.train.seed}: reused {done}")
            return {**result, "cached": True}
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cfg = with_overrides(cfg, [f"train.out_dir={out}"])
    monitor = build_monitor(spec)
    ref: dict[str, Any] | None = None
    initial = initial_metrics(cfg, spec, monitor)
    timed = TimedMonitor(monitor)
    t = time.perf_counter()
    if impl == "ours" and processes > 1:
        out.mkdir(parents=True, exist_ok=True)
        spec_file = write_json(out / "worker_spec.json", {"config": to_dict(cfg), "monitor": asdict(spec)})
        torchrun(Path(__file__), ["--ddp-worker", str(spec_file)], processes)
        worker = json.loads((out / "worker.json").read_text())
        steps, timed.seconds = int(worker["steps"]), float(worker["monitor_seconds"])
        evals, losses = read_run_metrics(out)
    elif impl == "ours":
        from reid_ssl.train.loop import train

        summary = train(cfg, monitor=timed, progress=False)
        steps = int(summary["steps"])
        evals, losses = read_run_metrics(out)
    elif impl == "lightly":
        ref = reference_loop(cfg, monitor=timed)
        steps = ref["steps"]
        evals, losses = ref["evals"], ref["epoch_loss"]
        out.mkdir(parents=True, exist_ok=True)
    else:
        raise KeyError(f"unknown implementation {impl!r} (ours | lightly)")
    seconds = time.perf_counter() - t
    result = assemble_run(
        cfg,
        impl,
        label,
        initial,
        evals,
        losses,
        seconds,
        timed.seconds,
        steps * cfg.train.batch_size * cfg.train.accumulate * processes,
    )
    if linear and isinstance(monitor, KnnMonitor):
        result["linear"] = monitor.linear(_final_embedder(cfg, out, ref))
    if not keep_checkpoint:
        (out / "checkpoint.pt").unlink(missing_ok=True)
    result["key"], result["dir"] = key, str(out)
    write_json(done, result)
    first = METRICS[spec.dataset][0]
    log(
        f"  {label} ({impl}) seed {cfg.train.seed}: {first} {result['metrics'][first][0]:.4f} -> "
        f"{result['metrics'][first][-1]:.4f} in {seconds:.0f} s"
    )
    return {**result, "cached": False}


def ddp_worker(spec_file: Path) -> None:
    """One ``torchrun`` process of :func:`run_training`: train, and on rank 0 monitor and write worker.json."""
    from reid_ssl.train.loop import train

    torch.set_num_threads(1)
    spec = json.loads(Path(spec_file).read_text())
    cfg = from_dict(spec["config"])
    main = int(os.environ.get("RANK", "0")) == 0
    timed = TimedMonitor(build_monitor(MonitorSpec(**spec["monitor"]))) if main else None
    summary = train(cfg, monitor=timed, progress=False)
    if main:
        assert timed is not None
        info = {"steps": summary["steps"], "monitor_seconds": timed.seconds, "seconds": summary["seconds"]}
        write_json(Path(cfg.train.out_dir) / "worker.json", info)


def run_many(tasks: Sequence[dict[str, Any]], jobs: int = 1) -> list[dict[str, Any]]:
    """:func:`run_training` for each task (its keyword arguments), in task order.

    With ``jobs > 1`` the runs go to ``jobs`` spawned processes with one torch thread each: on a small CPU
    two single-threaded trainings get more done than one two-threaded one, and a busy machine does not
    stall them the way it stalls a multi-threaded run.
    """
    if jobs <= 1 or len(tasks) <= 1:
        return [run_training(**t) for t in tasks]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(jobs, len(tasks)), mp_context=ctx, initializer=set_threads, initargs=(1,)) as pool:
        futures = [pool.submit(run_training, **t) for t in tasks]
        return [f.result() for f in futures]


def _final_embedder(cfg: Config, out: Path, ref: dict[str, Any] | None) -> Any:
    """The trained backbone: the reference loop's, or the one in our run's checkpoint (without flip)."""
    from reid_ssl.embedder import load_embedder

    if ref is not None:
        return ref["embedder"]
    device = cfg.train.device if cfg.train.device != "auto" else None
    return load_embedder(out / "checkpoint.pt", device=device, flip=False)


def with_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """``cfg`` with ``key=value`` overrides applied, validated again."""
    data = to_dict(cfg)
    for section, values in parse_overrides(list(overrides)).items():
        data.setdefault(section, {}).update(values)
    return from_dict(data)


# ---------------------------------------------------------------------------------------------------------
# The minimal reference loop built on lightly's losses and EMA helpers
# ---------------------------------------------------------------------------------------------------------


def lightly_loss(name: str, temperature: float) -> Callable[..., torch.Tensor]:
    """lightly's loss for ``name``, scaled to our training loss (the trainer sums both directions).

    * BYOL: ours per direction is ``mean(2 - 2 cos)``, lightly's ``NegativeCosineSimilarity`` is ``-mean(cos)``,
      so ``ours(p1, z2) + ours(p2, z1) = 4 + 2 * (ncs(p1, z2) + ncs(p2, z1))`` (values and gradients equal).
    * SimCLR: ours per direction averages N anchors; lightly's ``NTXentLoss(a, b)`` averages all 2N anchors of
      both views, so ``ours(a, b) + ours(b, a) = 2 * NTXentLoss(a, b)``. The loop passes the two views'
      projections (two forward passes), as lightly's SimCLR example does.

    Returns:
        ``f(p1, p2, z1, z2) -> loss`` (for SimCLR only ``p1``, ``p2`` are used).
    """
    from lightly.loss import NegativeCosineSimilarity, NTXentLoss

    if name == "byol":
        ncs = NegativeCosineSimilarity()
        return lambda p1, p2, z1, z2: 4.0 + 2.0 * (ncs(p1, z2) + ncs(p2, z1))
    if name == "simclr":
        ntx = NTXentLoss(temperature=temperature)
        return lambda p1, p2, z1, z2: 2.0 * ntx(p1, p2)
    raise KeyError(f"lightly has no loss for {name!r} here; the reference loop supports byol and simclr")


def reference_loop(
    cfg: Config, monitor: Monitor | None = None, max_steps: int = 0, on_step: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """A minimal training loop with lightly's loss and EMA helpers and our model, data and optimizer.

    Same seed, model (:func:`reid_ssl.train.build_model`), two-view data and sampler, optimizer and learning
    rate schedule as :func:`reid_ssl.train.train`; the loss is lightly's (:func:`lightly_loss`) and the target
    follows ``lightly.models.utils.update_momentum`` with ``lightly.utils.scheduler.cosine_schedule``. No
    logging, checkpoints or diagnostics. SimCLR (``model.target="shared"``) runs one forward pass per view.

    Returns:
        ``steps``, per-step ``step_end`` / ``data_wait`` seconds (from the loop start), per-epoch ``evals`` and
        ``epoch_loss``, and the final ``embedder``.
    """
    from lightly.models.utils import update_momentum
    from lightly.utils.scheduler import cosine_schedule
    from torch.utils.data import DataLoader

    from reid_ssl.checkpoint import make_preprocess
    from reid_ssl.data.sampler import EpochSampler
    from reid_ssl.data.augment import two_view_dataset
    from reid_ssl.embedder import Embedder, resolve_device
    from reid_ssl.optim import build_optimizer, warmup_cosine_lr
    from reid_ssl.train.loop import autocast_context, build_model

    seed_all(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    dataset = two_view_dataset(cfg.data, cfg.augment)
    sampler = EpochSampler(len(dataset), cfg.train.batch_size, cfg.train.seed)
    loader = DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
    )
    steps_per_epoch = sampler.batches_per_epoch()
    total = cfg.train.epochs * steps_per_epoch
    total = min(total, max_steps) if max_steps else total
    warmup = round(cfg.optim.warmup_epochs * steps_per_epoch)
    model = build_model(cfg).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(
        cfg.optim.name,
        [m for m in (model.backbone, model.projector, model.predictor) if m],
        cfg.optim.lr,
        cfg.optim.momentum,
        cfg.optim.weight_decay,
        cfg.optim.trust_coefficient,
    )
    criterion = lightly_loss(cfg.loss.name, cfg.loss.temperature)
    shared = cfg.model.target == "shared"
    preprocess = make_preprocess(cfg.data.eval_height, cfg.data.eval_width)

    step, epoch = 0, 0
    step_end: list[float] = []
    data_wait: list[float] = []
    evals: dict[int, dict[str, float]] = {}
    epoch_loss: dict[int, float] = {}
    t0 = time.perf_counter()
    while step < total:
        sampler.set_epoch(epoch)
        model.train()
        losses = []
        batches = iter(loader)
        while step < total:
            t_wait = time.perf_counter()
            try:
                v1, v2, _ = next(batches)
            except StopIteration:
                break
            data_wait.append(time.perf_counter() - t_wait)
            v1, v2 = v1.to(device, non_blocking=True), v2.to(device, non_blocking=True)
            if cfg.train.channels_last:
                v1 = v1.contiguous(memory_format=torch.channels_last)
                v2 = v2.contiguous(memory_format=torch.channels_last)
            with autocast_context(cfg.train.amp, device):
                if shared:
                    p1, p2 = model.online(v1), model.online(v2)
                    z1 = z2 = p1  # unused by NT-Xent
                else:
                    p1, p2, z1, z2 = model(v1, v2)
            loss = criterion(p1.float(), p2.float(), z1.float(), z2.float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine_lr(step, total, cfg.optim.lr, warmup, cfg.optim.warmup_start_factor)
            optimizer.step()
            if not shared:
                m = cosine_schedule(step, total, cfg.optim.ema_start, cfg.optim.ema_end)
                update_momentum(model.backbone, model.target_backbone, m)
                update_momentum(model.projector, model.target_projector, m)
            step += 1
            losses.append(float(loss.detach()))
            step_end.append(time.perf_counter() - t0)
            if on_step is not None:
                on_step(step)
        epoch += 1
        epoch_loss[epoch] = float(np.mean(losses)) if losses else math.nan
        if monitor is not None and step_end:
            model.eval()
            evals[epoch] = monitor(Embedder(model.backbone, preprocess, "reference", device=device))
    model.eval()
    return {
        "steps": step,
        "step_end": step_end,
        "data_wait": data_wait,
        "evals": evals,
        "epoch_loss": epoch_loss,
        "embedder": Embedder(model.backbone, preprocess, "reference", device=device, flip=False),
    }


def steady_rate(step_end: Sequence[float], batch: int, warmup: int) -> float | None:
    """Images per second between the end of step ``warmup`` and the last step (None if too few steps)."""
    if len(step_end) < warmup + 2:
        return None
    return (len(step_end) - 1 - warmup) * batch / (step_end[-1] - step_end[warmup])


# ---------------------------------------------------------------------------------------------------------
# Work folders and subprocesses
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def work_dir(requested: Path | None, smoke: bool) -> Iterator[Path]:
    """The folder for training runs: ``requested``, else a temporary one (smoke) or ``runs/bench``."""
    if requested is not None:
        requested.mkdir(parents=True, exist_ok=True)
        yield requested
    elif smoke:
        with tempfile.TemporaryDirectory(prefix="reid_ssl_bench_") as tmp:
            yield Path(tmp)
    else:
        WORK_DIR.mkdir(parents=True, exist_ok=True)
        yield WORK_DIR


def torchrun(script: Path, args: Sequence[str], nproc: int, timeout: float | None = None) -> None:
    """Run ``script args`` under ``torch.distributed.run`` with ``nproc`` local processes (gloo on CPU)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(script),
        *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


if __name__ == "__main__":  # the torchrun worker of run_training(processes > 1)
    if len(sys.argv) != 3 or sys.argv[1] != "--ddp-worker":
        sys.exit("usage: common.py --ddp-worker SPEC.json (started by run_training through torchrun)")
    ddp_worker(Path(sys.argv[2]))
