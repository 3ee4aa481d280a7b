"""Classification protocols on frozen features: weighted kNN and a linear probe (top-1 / top-5).

Data: an ImageNet-layout folder (``<root>/train/<class>/*``, ``<root>/val/<class>/*``) or Fashion-MNIST's idx
files (Debian ``dataset-fashion-mnist``: ``/usr/share/datasets/fashion-mnist/``). Labels are used only here,
never in SSL training. Features come from the checkpoint's one :class:`~reid_ssl.embedder.Embedder`
(its preprocessing resizes every image, grey Fashion-MNIST included, to the checkpoint's input size).

* ``knn`` (ours; the reference repo has no kNN, method.md §6.2): cosine similarity to the training features,
  the k nearest vote with weight ``exp(sim / T)``, as in Wu et al.'s instance discrimination monitor.
* ``linear`` (method.md §6.1): frozen backbone, global-average-pooled feature, one linear layer (init normal,
  std 0.01), SGD momentum 0.9, weight decay 0, cosine schedule with a linear warmup over the first 10% of
  epochs, batch 256. Deviation: the features are computed once (no RandomResizedCrop/flip per epoch, so a CPU
  can run it) and standardised with the training set's mean and std, the role a non-affine BatchNorm plays in
  MAE's linear probe; the Embedder's features are L2-normalised, which would otherwise need a far larger lr.

- [0] Z. Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance Discrimination", CVPR 2018,
  https://arxiv.org/abs/1805.01978
"""

from __future__ import annotations

import gzip
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from reid_ssl.images import is_image_name
from reid_ssl.optim import warmup_cosine_lr

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CLASSIFICATION_DATASETS = ("fashion-mnist", "imagenet")
PROTOCOLS = ("knn", "linear")
_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (MNIST format, optionally gzipped) as an array of its declared shape and dtype.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an IDX file, or truncated.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: {len(data)} bytes, the header promises {expected} (truncated?)")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def load_fashion_mnist(root: str | Path = FASHION_MNIST_ROOT, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images (N, 28, 28) uint8 and labels (N,) int64; ``split`` is ``"train"`` or ``"test"``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root, prefix = Path(root), "train" if split == "train" else "t10k"
    if not root.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST folder not found: {root} (Debian: apt-get install dataset-fashion-mnist)"
        )
    images = read_idx(_idx_path(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_idx_path(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise ValueError(f"{root}: {split} images {images.shape} and labels {labels.shape} do not match")
    return images, labels


def _idx_path(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"expected {stem}.gz (or {stem}) in {root}")


def load_image_folder(root: str | Path, split: str) -> tuple[list[Path], np.ndarray, list[str]]:
    """ImageNet layout ``<root>/<split>/<class>/*``: image paths, labels (class index) and class names.

    Raises:
        FileNotFoundError: no ``<root>/<split>/`` folder or no class folder with images in it.
    """
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(
            f"expected class folders in {folder} (ImageNet layout <root>/{split}/<class>/*); {folder} does not exist"
        )
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    paths: list[Path] = []
    labels: list[int] = []
    for i, name in enumerate(classes):
        files = sorted(p for p in (folder / name).rglob("*") if p.is_file() and is_image_name(p.name))
        paths += files
        labels += [i] * len(files)
    if not paths:
        raise FileNotFoundError(
            f"no images in class folders under {folder} (found: "
            f"{', '.join(sorted(p.name for p in folder.iterdir())[:8]) or 'nothing'})"
        )
    return paths, np.asarray(labels, dtype=np.int64), classes


def per_class_subset(labels: np.ndarray, limit: int | None, seed: int = 0) -> np.ndarray:
    """Indices of at most ``limit`` examples per class, chosen at random with ``seed`` (all when None)."""
    if limit is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:limit] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep))


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


def _labeled_sets(
    dataset: str, root: str | Path | None, limit_train: int | None, limit_test: int | None, seed: int
) -> tuple[dict[str, tuple[Sequence[Any], np.ndarray]], list[str]]:
    if dataset == "fashion-mnist":
        sets, classes = {}, list(FASHION_MNIST_CLASSES)
        for split, limit in (("train", limit_train), ("test", limit_test)):
            images, labels = load_fashion_mnist(root or FASHION_MNIST_ROOT, split)
            keep = per_class_subset(labels, limit, seed)
            sets[split] = ([Image.fromarray(images[i], mode="L") for i in keep], labels[keep])
        return sets, classes
    if dataset == "imagenet":
        if root is None:
            raise ValueError("--root is required for an ImageNet-layout folder")
        sets = {}
        classes: list[str] = []
        for split, folder, limit in (("train", "train", limit_train), ("test", "val", limit_test)):
            paths, labels, found = load_image_folder(root, folder)
            if classes and found != classes:
                raise ValueError(f"{root}: train/ and val/ have different class folders")
            classes = found
            keep = per_class_subset(labels, limit, seed)
            sets[split] = ([paths[i] for i in keep], labels[keep])
        return sets, classes
    raise KeyError(f"unknown classification dataset {dataset!r}; choose one of {list(CLASSIFICATION_DATASETS)}")


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
    from reid_ssl.embedder import load_embedder

    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {list(PROTOCOLS)}")
    t0 = time.perf_counter()
    sets, classes = _labeled_sets(dataset, root, limit_train, limit_test, seed)
    embedder = load_embedder(checkpoint, device=device, flip=flip)
    feats, labels, failures = {}, {}, []
    for split, (images, y) in sets.items():
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
    if len(feats["train"]) == 0 or len(feats["test"]) == 0:
        raise ValueError(f"{dataset}: no readable images in the train or test set")
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
        "root": str(root or (FASHION_MNIST_ROOT if dataset == "fashion-mnist" else "")),
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
