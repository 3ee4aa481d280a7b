"""Helpers the tests share: tiny checkpoints, synthetic person images, dataset trees, hostile files, ports."""

from __future__ import annotations

import socket
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reid_ssl.checkpoint import backbone_block, make_preprocess, save_checkpoint
from reid_ssl.models import build_backbone

REPO = Path(__file__).resolve().parents[1]
SMOKE_CONFIG = REPO / "configs" / "smoke.yaml"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def write_market_tree(
    root: Path,
    train_ids: range = range(1, 7),
    test_ids: range = range(11, 16),
    per_cam: int = 2,
    cams: int = 3,
    seed: int = 0,
) -> Path:
    """A Market-1501 layout: ``bounding_box_train/``, ``query/`` (one image per test id and camera 1) and
    ``bounding_box_test/`` (``per_cam`` images per test id and camera, plus ``0000`` distractors and ``-1`` junk).
    """
    rng = np.random.default_rng(seed)
    for pid in train_ids:
        for cam in range(1, cams + 1):
            for n in range(per_cam):
                write_person_image(root / "bounding_box_train" / f"{pid:04d}_c{cam}s1_{n:06d}_00.jpg", pid, rng)
    for pid in test_ids:
        write_person_image(root / "query" / f"{pid:04d}_c1s1_000000_00.jpg", pid, rng)
        for cam in range(1, cams + 1):
            for n in range(per_cam):
                write_person_image(root / "bounding_box_test" / f"{pid:04d}_c{cam}s1_{n + 1:06d}_00.jpg", pid, rng)
    for n in range(3):
        write_person_image(root / "bounding_box_test" / f"0000_c{n % cams + 1}s1_{n:06d}_00.jpg", 900 + n, rng)
        write_person_image(root / "bounding_box_test" / f"-1_c{n % cams + 1}s1_{n:06d}_00.jpg", 950 + n, rng)
    return root


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims ``width x height`` pixels: a decompression bomb's calling card."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return path


def write_zip(path: Path, members: dict[str, bytes], symlink: str | None = None) -> Path:
    """A zip of ``members``; ``symlink`` adds a member of that name that is a symlink to /etc/passwd."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = 0o120777 << 16
            z.writestr(info, "/etc/passwd")
    return path
