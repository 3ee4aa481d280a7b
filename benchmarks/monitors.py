"""Monitors: what a benchmark measures after every epoch (Fashion-MNIST kNN / linear probe, PETS09
retrieval), timed, and the values of the untrained backbone a run starts from ("epoch 0")."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from benchmarks.presets import MonitorSpec
from reid_ssl.config import Config
from reid_ssl.train.state import build_model, seed_everything

Monitor = Callable[[Any], dict[str, float]]


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


class ProbeMonitor(KnnMonitor):
    """Linear probe (the primary metric) and weighted kNN from one pass of features over bank and test set.

    Used by ``bench_learning_efficiency`` with the whole Fashion-MNIST test set (``test_per_class=1000``) and a
    1,000-per-class bank from the train split.
    """

    def __call__(self, embedder: Any) -> dict[str, float]:
        from reid_ssl.eval.classify import knn_classify, linear_probe

        f = self.features(embedder)
        args = (f["train"], self.labels["train"], f["test"], self.labels["test"], 10)
        knn, lin = knn_classify(*args, k=20, temperature=0.07), linear_probe(*args, epochs=100)
        return {"linear_top1": lin["top1"], "knn_top1": knn["top1"], "knn_top5": knn["top5"]}


class RawPixels(torch.nn.Module):
    """A stand-in backbone whose feature is its (preprocessed) input, flattened: the raw-pixel floor.

    ``grey``: keep one channel (Fashion-MNIST's three channels are copies of one).
    """

    def __init__(self, height: int, width: int, grey: bool) -> None:
        super().__init__()
        self.grey = grey
        self.feature_dim = (1 if grey else 3) * height * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, :1] if self.grey else x).flatten(1)


@functools.lru_cache(maxsize=4)
def build_monitor(spec: MonitorSpec) -> Monitor:
    """The per-epoch monitor of a dataset (reads its data now, so a missing dataset fails before training).

    One per spec and process: the Fashion-MNIST monitor keeps its preprocessed images between runs.
    """
    if spec.dataset == "fashion-mnist":
        return KnnMonitor(spec)
    if spec.dataset == "pets09":
        from reid_ssl.train.monitor import retrieval_monitor

        inner = retrieval_monitor(spec.split or "pets09", spec.root)
        return lambda embedder: {k: v for k, v in inner(embedder).items() if k != "unreadable"}
    raise KeyError(f"no monitor for dataset {spec.dataset!r}")


@functools.lru_cache(maxsize=4)
def build_probe_monitor(spec: MonitorSpec) -> Monitor:
    """Fashion-MNIST: :class:`ProbeMonitor` (linear probe and kNN); PETS09: the retrieval monitor. Once per process."""
    return ProbeMonitor(spec) if spec.dataset == "fashion-mnist" else build_monitor(spec)


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
    what = [asdict(spec), type(monitor).__name__, cfg.model.backbone, cfg.model.init, cfg.train.seed]
    key = json.dumps([*what, cfg.data.eval_height, cfg.data.eval_width])
    if key not in _INITIAL:
        _INITIAL[key] = monitor(initial_embedder(cfg))
    return dict(_INITIAL[key])


def initial_embedder(cfg: Config) -> Any:
    """An Embedder of the backbone that a run with ``cfg`` starts from (same seed, same construction order)."""
    from reid_ssl.checkpoint import make_preprocess
    from reid_ssl.embedder import Embedder

    seed_everything(cfg.train.seed)
    model = build_model(cfg)
    return Embedder(
        model.backbone,
        make_preprocess(cfg.data.eval_height, cfg.data.eval_width),
        "initial",
        device=cfg.train.device if cfg.train.device != "auto" else None,
    )
