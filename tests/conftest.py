"""Shared fixtures: tiny checkpoints and image trees built on the fly (no data is downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

# Keep gradio offline before anything imports it (ui-testing.md).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_SHARE", "False")
os.environ["NO_PROXY"] = "127.0.0.1,localhost"
os.environ["no_proxy"] = "127.0.0.1,localhost"

import numpy as np
import pytest
import torch
from PIL import Image

from reid_ssl.checkpoint import backbone_block, make_preprocess, save_checkpoint
from reid_ssl.models import build_backbone

torch.set_num_threads(2)


def write_checkpoint(path: Path, backbone: str = "resnet18", height: int = 64, width: int = 32, seed: int = 0) -> Path:
    """A valid reid_ssl checkpoint with a randomly initialised backbone (no training state)."""
    torch.manual_seed(seed)
    net = build_backbone(backbone)
    return save_checkpoint(
        path,
        {
            "backbone": backbone_block(backbone, net.feature_dim, net.state_dict()),
            "preprocess": make_preprocess(height, width),
            "config": {},
            "step": 0,
            "epoch": 0,
        },
    )


def write_person_image(path: Path, pid: int, rng: np.random.Generator, size: tuple[int, int] = (48, 24)) -> Path:
    """A synthetic "person": two colour blocks (shirt, trousers) that depend on ``pid``, plus noise."""
    h, w = size
    colours = np.random.default_rng(pid).integers(0, 255, size=(2, 3))
    img = np.empty((h, w, 3), np.float32)
    img[: h // 2] = colours[0]
    img[h // 2 :] = colours[1]
    img += rng.normal(0, 12, img.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "ckpt.pt")


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """``tmp/images/<pid>/<n>.jpg``: 6 identities x 5 images."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for pid in range(6):
        for n in range(5):
            write_person_image(root / f"{pid:04d}" / f"{n}.jpg", pid, rng)
    return root
