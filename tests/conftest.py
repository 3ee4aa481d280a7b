"""Shared fixtures: tiny checkpoints and image trees built on the fly (no data is downloaded).

Helpers that tests import live in tests/helpers.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from reid_ssl.app.serve import set_offline_env
from tests.helpers import write_checkpoint, write_market_tree, write_person_image

set_offline_env()  # before anything imports gradio: no telemetry, no share links, loopback never proxied

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
