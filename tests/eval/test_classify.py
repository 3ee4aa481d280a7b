"""reid_ssl.classify: IDX reading, Fashion-MNIST, ImageNet-layout folders, weighted kNN and the linear probe."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from reid_ssl.data.classification import (
    FASHION_MNIST_ROOT,
    load_fashion_mnist,
    load_image_folder,
    per_class_subset,
    read_idx,
)
from reid_ssl.eval.classify import evaluate_classification, knn_classify, linear_probe
from tests.helpers import write_person_image


def write_idx(path: Path, array: np.ndarray) -> Path:
    code = {np.uint8: 0x08, np.int32: 0x0C}[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def fake_fashion_mnist(root: Path, n_train: int = 40, n_test: int = 20) -> Path:
    """Tiny idx files: class c is a 28x28 image whose top 2c rows are bright."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            images[i, : 2 * c + 2] = 220
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    return root


def test_read_idx_round_trip_and_errors(tmp_path: Path) -> None:
    a = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "a.idx", a)), a)
    b = np.arange(10, dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "b.idx.gz", b)), b)
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(tmp_path / "bad")
    raw = (tmp_path / "a.idx").read_bytes()
    (tmp_path / "short.idx").write_bytes(raw[:-5])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short.idx")
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "missing.idx")


def test_fashion_mnist_loader(tmp_path: Path) -> None:
    images, labels = load_fashion_mnist(fake_fashion_mnist(tmp_path / "fm"), "test")
    assert images.shape == (20, 28, 28) and images.dtype == np.uint8 and labels.tolist()[:3] == [0, 1, 2]
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "nothing")


@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT).is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_real_fashion_mnist_files() -> None:
    images, labels = load_fashion_mnist(FASHION_MNIST_ROOT, "test")
    assert images.shape == (10000, 28, 28) and np.bincount(labels).tolist() == [1000] * 10


def test_per_class_subset() -> None:
    labels = np.repeat(np.arange(3), [5, 2, 9])
    keep = per_class_subset(labels, 3, seed=1)
    assert np.bincount(labels[keep]).tolist() == [3, 2, 3]
    assert np.array_equal(keep, per_class_subset(labels, 3, seed=1)) and len(per_class_subset(labels, None)) == 16


def knn_reference(train, ytrain, test, num_classes, k, temperature) -> np.ndarray:
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    scores = np.zeros((len(test), num_classes))
    for i, x in enumerate(test):
        sims = train @ x
        for j in np.argsort(-sims)[:k]:
            scores[i, ytrain[j]] += np.exp(sims[j] / temperature)
    return scores


def test_knn_matches_a_loop_reference() -> None:
    rng = np.random.default_rng(0)
    train, test = rng.standard_normal((60, 8)), rng.standard_normal((25, 8))
    ytrain, ytest = rng.integers(0, 4, 60), rng.integers(0, 4, 25)
    res = knn_classify(train, ytrain, test, ytest, 4, k=7, temperature=0.5)
    scores = knn_reference(train, ytrain, test, 4, 7, 0.5)
    assert res["top1"] == pytest.approx(np.mean(scores.argmax(1) == ytest))
    top4 = np.argsort(-scores, 1)[:, :4]
    assert res["top5"] == pytest.approx(np.mean((top4 == ytest[:, None]).any(1)))  # 4 classes: top-5 = top-4


def test_knn_and_linear_separate_clusters() -> None:
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((6, 16)) * 3
    ytrain, ytest = np.repeat(np.arange(6), 20), np.repeat(np.arange(6), 10)
    train = centres[ytrain] + rng.standard_normal((120, 16))
    test = centres[ytest] + rng.standard_normal((60, 16))
    assert knn_classify(train, ytrain, test, ytest, 6)["top1"] > 0.95
    res = linear_probe(train, ytrain, test, ytest, 6, epochs=30, batch_size=32)
    assert res["top1"] > 0.95 and res["top5"] == 1.0 and res["final_train_loss"] < 0.5
    shuffled = linear_probe(train, rng.permutation(ytrain), test, ytest, 6, epochs=30, batch_size=32)
    assert shuffled["top1"] < 0.6  # labels carry the signal, not the probe


def write_imagenet_layout(root: Path, classes: int = 3, train: int = 6, val: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        for split, n in (("train", train), ("val", val)):
            for i in range(n):
                write_person_image(root / split / f"n{c:08d}" / f"{i}.JPEG", c, rng)
    return root


@pytest.mark.parametrize("protocol", ["knn", "linear"])
def test_protocols_on_a_tiny_imagenet_layout(tmp_path, checkpoint, protocol) -> None:
    root = write_imagenet_layout(tmp_path / "inet")
    paths, labels, classes = load_image_folder(root, "val")
    assert (
        len(paths) == 9 and classes == ["n00000000", "n00000001", "n00000002"] and labels.tolist()[:4] == [0] * 3 + [1]
    )
    res = evaluate_classification(checkpoint, "imagenet", root, protocol=protocol, k=3, epochs=20)
    assert res["num_train"] == 18 and res["num_test"] == 9 and res["num_classes"] == 3
    assert res["top1"] >= 2 / 3 and res["top5"] == 1.0  # colour blocks separate even with random weights


def test_fashion_mnist_protocol_with_limits_and_errors(tmp_path, checkpoint) -> None:
    root = fake_fashion_mnist(tmp_path / "fm")
    res = evaluate_classification(checkpoint, "fashion-mnist", root, protocol="knn", limit_train=3, limit_test=1)
    assert res["num_train"] == 30 and res["num_test"] == 10 and 0 <= res["top1"] <= 1
    with pytest.raises(KeyError, match="fashion-mnist"):
        evaluate_classification(checkpoint, "cifar10", root)
    with pytest.raises(FileNotFoundError, match="train/<class>"):
        evaluate_classification(checkpoint, "imagenet", tmp_path / "empty")
