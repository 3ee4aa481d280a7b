"""Shared fixtures: tiny checkpoints and image trees built on the fly (no data is downloaded).

Helpers that tests import live in tests/helpers.py.
"""

from __future__ import annotations

import os
from pathlib import Path

# Keep gradio offline before anything imports it.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_SHARE", "False")
os.environ["NO_PROXY"] = "127.0.0.1,localhost"
os.environ["no_proxy"] = "127.0.0.1,localhost"

import numpy as np
import pytest
import torch

from tests.helpers import write_checkpoint, write_market_tree, write_person_image

torch.set_num_threads(2)


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


@pytest.fixture
def market_tree(tmp_path: Path) -> Path:
    """A small Market-1501 tree (see :func:`write_market_tree`)."""
    return write_market_tree(tmp_path / "market")
