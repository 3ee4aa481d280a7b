"""Classification protocols on frozen features: weighted kNN and a linear probe (top-1 / top-5).

Data: an ImageNet-layout folder (``<root>/train/<class>/*``, ``<root>/val/<class>/*``) or Fashion-MNIST's idx
files (Debian ``dataset-fashion-mnist``: ``/usr/share/datasets/fashion-mnist/``). Labels are used only here,
never in SSL training. Features come from the checkpoint's one :class:`~reid_ssl.embedder.Embedder`
(its preprocessing resizes every image, grey Fashion-MNIST included, to the checkpoint's input size).

* ``knn`` (ours; the reference repo has no kNN, docs/method.md, "Evaluation protocols"): cosine similarity to
  the training features, the k nearest vote with weight ``exp(sim / T)``, as in Wu et al.'s instance
  discrimination monitor.
* ``linear`` (docs/method.md, "Evaluation protocols"): frozen backbone, global-average-pooled feature, one linear
  layer (init normal, std 0.01), SGD momentum 0.9, weight decay 0, cosine schedule with a linear warmup over the
  first 10% of epochs, batch 256. Deviation: the features are computed once (no RandomResizedCrop/flip per epoch, so
  a CPU can run it) and standardised with the training set's mean and std, the role a non-affine BatchNorm plays in
  MAE's linear probe; the Embedder's features are L2-normalised, which would otherwise need a far larger lr.

- [0] Z. Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance Discrimination", CVPR 2018,
  https://arxiv.org/abs/1805.01978
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from reid_ssl.errors import DatasetLayoutError, InputError
from reid_ssl.optim import warmup_cosine_lr

if TYPE_CHECKING:
    from reid_ssl.data.classification import LabeledSet
    from reid_ssl.embedder import Embedder

PROTOCOLS = ("knn", "linear")

# ---------------------------------------------------------------------------------------------------------
# Protocols
# ---------------------------------------------------------------------------------------------------------


def _topk_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    k = min(5, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    hit = top == labels[:, None]
    return {"top1": float(hit[:, 0].float().mean()), "top5": float(hit.any(dim=1).float().mean())}


@torch.no_grad()
def knn_classify(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> dict[str, Any]:
    """Weighted kNN on cosine similarity (module docstring); returns top-1 / top-5 accuracy.

    Args:
        train_features, test_features: (N, D) features (normalised here).
        train_labels, test_labels: (N,) class indices in ``[0, num_classes)``.
    """
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    train = F.normalize(torch.as_tensor(np.asarray(train_features, np.float32)), dim=1)
    test = F.normalize(torch.as_tensor(np.asarray(test_features, np.float32)), dim=1)
    ytrain = torch.as_tensor(np.asarray(train_labels, np.int64))
    k = min(k, len(train))
    scores = torch.zeros(len(test), num_classes)
    for start in range(0, len(test), chunk):
        sim, idx = (test[start : start + chunk] @ train.T).topk(k, dim=1)
        weight = (sim / temperature).exp()
        scores[start : start + chunk].scatter_add_(1, ytrain[idx], weight)
    result = _topk_accuracy(scores, torch.as_tensor(np.asarray(test_labels, np.int64)))
    return {**result, "k": k, "temperature": temperature}


def linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    epochs: int = 100,
    lr: float = 0.15,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, Any]:
    """Linear classifier on frozen, standardised features (module docstring); returns top-1 / top-5."""
    if epochs < 1 or lr <= 0 or batch_size < 1:
        raise ValueError(f"epochs, lr and batch_size must be positive, got {epochs}, {lr}, {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    xtr = torch.as_tensor(np.asarray(train_features, np.float32))
    xte = torch.as_tensor(np.asarray(test_features, np.float32))
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    ytr = torch.as_tensor(np.asarray(train_labels, np.int64))
    head = nn.Linear(xtr.shape[1], num_classes)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=gen)
        head.bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(xtr) / batch_size)
    total, warmup = epochs * steps_per_epoch, max(1, epochs // 10) * steps_per_epoch
    step, loss_value = 0, float("nan")
    for _ in range(epochs):
        order = torch.randperm(len(xtr), generator=gen)
        for start in range(0, len(xtr), batch_size):
            for group in opt.param_groups:
                group["lr"] = warmup_cosine_lr(step, total, lr, warmup)
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(head(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_value = float(loss.detach())
    with torch.no_grad():
        result = _topk_accuracy(head(xte), torch.as_tensor(np.asarray(test_labels, np.int64)))
    return {**result, "epochs": epochs, "lr": lr, "batch_size": batch_size, "final_train_loss": loss_value}


# ---------------------------------------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------------------------------------


def evaluate_classification(
    checkpoint: str | Path,
    dataset: str,
    root: str | Path | None = None,
    protocol: str = "knn",
    limit_train: int | None = None,
    limit_test: int | None = None,
    k: int = 20,
    temperature: float = 0.07,
    epochs: int = 100,
    lr: float = 0.15,
    batch_size: int = 64,
    num_workers: int = 0,
    flip: bool = False,
    device: str | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """kNN or linear-probe accuracy of a checkpoint's frozen features on a labeled image set.

    Args:
        dataset: ``"fashion-mnist"`` (root defaults to the Debian package's folder) or ``"imagenet"``
            (``<root>/train/<class>/*`` and ``<root>/val/<class>/*``).
        limit_train, limit_test: at most this many images per class (random, ``seed``): CPU-sized runs.
        batch_size: embedding batch size (the linear probe always trains with batch 256).

    Returns:
        ``{"top1", "top5", "protocol", "dataset", "num_train", "num_test", "num_classes", "failures", ...}``;
        images that fail to decode are listed in ``"failures"`` and left out (never silently).
    """
    from reid_ssl.data.classification import subset
    from reid_ssl.data.datasets import default_root, load_labeled
    from reid_ssl.embedder import load_embedder

    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r}; choose one of {list(PROTOCOLS)}")
    t0 = time.perf_counter()
    sets = {
        split: subset(load_labeled(dataset, root, split), limit, seed)
        for split, limit in (("train", limit_train), ("test", limit_test))
    }
    classes = sets["train"].classes
    if sets["test"].classes != classes:
        raise DatasetLayoutError(f"{dataset}: the train and test splits have different classes")
    embedder = load_embedder(checkpoint, device=device, flip=flip)
    feats, labels, failures = _embed_splits(embedder, sets, batch_size, num_workers, progress)
    if len(feats["train"]) == 0 or len(feats["test"]) == 0:
        raise DatasetLayoutError(f"{dataset}: no readable images in the train or test set")
    args = (feats["train"], labels["train"], feats["test"], labels["test"], len(classes))
    t1 = time.perf_counter()
    if protocol == "knn":
        result = knn_classify(*args, k=k, temperature=temperature)
    else:
        result = linear_probe(*args, epochs=epochs, lr=lr, seed=seed)
    return {
        **result,
        "protocol": protocol,
        "dataset": dataset,
        "root": str(root or default_root(dataset)),
        "checkpoint": str(checkpoint),
        "embedder_fingerprint": embedder.fingerprint,
        "flip": flip,
        "num_train": len(feats["train"]),
        "num_test": len(feats["test"]),
        "num_classes": len(classes),
        "classes": classes,
        "failures": failures,
        "seconds": {"embed": round(t1 - t0, 3), "protocol": round(time.perf_counter() - t1, 3)},
    }


def _embed_splits(
    embedder: Embedder, sets: dict[str, LabeledSet], batch_size: int, num_workers: int, progress: bool
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[dict[str, str]]]:
    """Each split's features and labels (readable images only), and the failures (``#i`` for in-memory images)."""
    feats: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    failures: list[dict[str, str]] = []
    for split, data in sets.items():
        images, y = data.images, data.labels
        res = embedder.embed_images(
            images, batch_size=batch_size, num_workers=num_workers, progress=progress, desc=f"embedding {split}"
        )
        feats[split], labels[split] = res.features, y[res.ok]
        failures += [
            {
                "split": split,
                "image": str(images[i]) if not isinstance(images[i], Image.Image) else f"#{i}",
                "reason": reason,
            }
            for i, reason in res.failures
        ]
    return feats, labels, failures
