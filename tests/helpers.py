"""Helpers the tests share: tiny checkpoints, synthetic person images, dataset trees, hostile files, ports."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import textwrap
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


# ---------------------------------------------------------------------------------------------------------
# Gallery index (tests/index, tests/cli/test_index.py)
# ---------------------------------------------------------------------------------------------------------

INDEX_ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def index_info(dim: int, fingerprint: str = "f" * 64) -> dict:
    """What an index records about its embedder (see ``embedder_info``), for indexes of synthetic features."""
    return {
        "fingerprint": fingerprint,
        "preprocess": {"height": 8, "width": 4},
        "feature_dim": dim,
        "flip": True,
        "checkpoint": None,
    }


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32)."""
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clustered(n: int, dim: int, per_cluster: int = 50, noise: float = 0.5, seed: int = 0):
    """A re-ID-like gallery: unit vectors around n/per_cluster identity centres (cosine ~0.8 within one).

    Queries: 100 further crops of gallery identities, then 100 crops of identities absent from the gallery
    (their top 10 are near-ties, which is what makes approximate search miss). Returns (x, queries, labels).
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // per_cluster + 100, dim)).astype(np.float32)
    labels = rng.integers(0, n // per_cluster, n)
    x = unit(centres[labels] + noise * rng.standard_normal((n, dim)).astype(np.float32))
    q_labels = np.concatenate([rng.integers(0, n // per_cluster, 100), n // per_cluster + np.arange(100)])
    q = unit(centres[q_labels] + noise * rng.standard_normal((200, dim)).astype(np.float32))
    return x, q, labels


def gallery_items(n: int, start: int = 0, cams: int = 2) -> list:
    """``GalleryItem(path=/g/<i>.jpg, pid=i // 4, camid=i % cams, frame=i)`` for i in [start, start + n)."""
    from reid_ssl.index import GalleryItem

    return [GalleryItem(path=f"/g/{i}.jpg", pid=i // 4, camid=i % cams, frame=i) for i in range(start, start + n)]


def hit_ids(hits) -> list[list[int]]:
    """The ids of search results, per query."""
    return [[h.id for h in row] for row in hits]


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    """``python -m reid_ssl.cli ARGV`` in a fresh process (this checkout first on the path)."""
    return subprocess.run(
        [sys.executable, "-m", "reid_ssl.cli", *argv], env=INDEX_ENV, capture_output=True, text=True, timeout=300
    )


def latin1_name(folder: Path, name: bytes) -> Path:
    """A path in ``folder`` whose file name is raw bytes that are not UTF-8 (``b"caf\\xe9.jpg"``), as a ``str``
    with surrogate escapes, the way ``os.listdir`` returns it."""
    return Path(folder) / os.fsdecode(name)


def index_writer_script(rounds: int) -> str:
    """``python -c`` source of a writer process (argv: index folder, w): ``rounds`` locked adds of 3 items each,
    vectors pointing along axis ``w`` and paths ``/w<w>/r<round>/<i>.jpg`` (for concurrent-writer tests)."""
    return textwrap.dedent(f"""
        import sys, numpy as np
        from reid_ssl.index import GalleryIndex, GalleryItem
        folder, w = sys.argv[1], int(sys.argv[2])
        for r in range({rounds}):
            with GalleryIndex.open_for_update(folder) as idx:
                x = np.full((3, 8), 0.01, np.float32); x[:, w] = 1.0 + r
                idx.add(x, [GalleryItem(path=f"/w{{w}}/r{{r}}/{{i}}.jpg", pid=w) for i in range(3)])
    """)


def build_market_index(root: Path) -> dict:
    """A checkpoint, a Market tree and an index built from it through the library, under ``root``."""
    from reid_ssl.embedder import load_embedder
    from reid_ssl.index import build_index, gallery_source

    ckpt = write_checkpoint(root / "ckpt.pt")
    tree = write_market_tree(root / "market")
    res = build_index(load_embedder(ckpt, device="cpu"), gallery_source(tree), root / "idx", checkpoint=ckpt)
    return {"root": root, "checkpoint": ckpt, "tree": tree, "index": root / "idx", "result": res}
