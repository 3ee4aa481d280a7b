"""Helpers the tests share: tiny checkpoints, synthetic person images, dataset trees, a small gallery index, the
command line in-process, hostile files (pickles that act, zips, bombs), fake embedders, full disks, ports."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from reid_ssl.checkpoint import backbone_block, make_preprocess, save_checkpoint
from reid_ssl.models import build_backbone

REPO = Path(__file__).resolve().parents[1]
SMOKE_CONFIG = REPO / "configs" / "smoke.yaml"
# For child processes that import this checkout: one OpenMP thread each on the shared cores.
SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


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


def run_cli_process(*argv: str) -> subprocess.CompletedProcess:
    """``python -m reid_ssl.cli ARGV`` in a fresh process (this checkout first on the path)."""
    return subprocess.run(
        [sys.executable, "-m", "reid_ssl.cli", *argv], env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300
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


# A small Market-style gallery index with its checkpoint and embedder
# ---------------------------------------------------------------------------------------------------------


@dataclass
class MarketIndex:
    """A Market-1501 tree, a random-weights checkpoint, its embedder and a gallery index built from the tree
    (``result``: what ``build_index`` returned). Fields read as attributes or as ``market["index"]``."""

    root: Path
    checkpoint: Path
    tree: Path
    index: Path
    embedder: Any
    result: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def queries(self) -> list[Path]:
        return sorted((self.tree / "query").iterdir())


def build_market_index(root: Path, **embedder_options: Any) -> MarketIndex:
    """:class:`MarketIndex` under ``root`` (train ids 1-2 only: the index is built from the test split)."""
    from reid_ssl.embedder import load_embedder
    from reid_ssl.index import build_index, gallery_source

    ckpt = write_checkpoint(root / "ckpt.pt")
    tree = write_market_tree(root / "market", train_ids=range(1, 3))
    embedder = load_embedder(ckpt, device="cpu", **embedder_options)
    result = build_index(embedder, gallery_source(tree), root / "idx", checkpoint=ckpt)
    return MarketIndex(root, ckpt, tree, root / "idx", embedder, result)


# ---------------------------------------------------------------------------------------------------------
# The command line, in-process
# ---------------------------------------------------------------------------------------------------------


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``reid_ssl <argv>`` in-process: (exit code, stdout, stderr); argparse's exits count as exit codes."""
    from reid_ssl import cli

    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()  # `app` sets its own; keep the session's
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            torch.set_num_threads(threads)
    return code, out.getvalue(), err.getvalue()


def assert_one_clear_line(code: int, err: str, message: str) -> None:
    lines = err.strip().splitlines()
    assert code != 0, err
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------------------
# Hostile files: pickles that act when loaded
# ---------------------------------------------------------------------------------------------------------


class CreatesFile:
    """Unpickling this calls ``open(path, "w")``: a payload that would create a file on the host."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def evil(kind: str, marker: Path) -> bytes:
    """A payload that creates ``marker`` when unpickled: a raw pickle, a torch zip, or an object-array .npy."""
    if kind == "pickle":
        return pickle.dumps({"format": "reid_ssl.checkpoint", "x": CreatesFile(marker)})
    buf = io.BytesIO()
    if kind == "torch":
        torch.save({"format": "reid_ssl.checkpoint", "x": CreatesFile(marker)}, buf)
    else:
        arr = np.empty((4, 8), dtype=object)
        arr[0, 0] = CreatesFile(marker)
        np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def assert_live(kind: str, tmp: Path) -> None:
    """The payload really does create a file when trusted, so a refusal means something."""
    probe = tmp / f"probe-{kind}"
    data = evil(kind, probe)
    {
        "pickle": pickle.loads,
        "torch": lambda b: torch.load(io.BytesIO(b), weights_only=False),
        "npy": lambda b: np.load(io.BytesIO(b), allow_pickle=True),
    }[kind](data)
    assert probe.exists(), f"the {kind} payload is not live"
    probe.unlink()


# ---------------------------------------------------------------------------------------------------------
# Fake embedders and small indexes (no torch: the same in every process, so kill tests can use them)
# ---------------------------------------------------------------------------------------------------------

# Deterministic features from each file's bytes; also run as source code in child processes.
FAKE_EMBEDDER = textwrap.dedent("""
    import hashlib, types
    import numpy as np

    class FakeEmbedder:
        fingerprint = "fake-embedder-" + "0" * 50
        feature_dim = 16
        preprocess = {"height": 8, "width": 4, "mean": [0.5], "std": [0.5], "interpolation": "bicubic"}
        flip = False

        def __init__(self, delay=0.0):
            self.delay = delay

        def embed_images(self, images, batch_size=64, num_workers=0, progress=False, desc=""):
            import time
            time.sleep(self.delay)
            feats, ok, failures = [], [], []
            for i, p in enumerate(images):
                data = open(p, "rb").read()
                if not data.startswith((b"\\xff\\xd8", b"\\x89PNG")):
                    failures.append((i, f"{p}: not an image file"))
                    continue
                seed = int(hashlib.sha256(data).hexdigest()[:8], 16)
                feats.append(np.random.default_rng(seed).standard_normal(16).astype(np.float32))
                ok.append(i)
            x = np.stack(feats) if feats else np.zeros((0, 16), np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
            return types.SimpleNamespace(features=x, ok=ok, failures=failures)
""")
_namespace: dict = {}
exec(FAKE_EMBEDDER, _namespace)
FakeEmbedder = _namespace["FakeEmbedder"]


def small_index(folder: Path, n: int = 8, dim: int = 8) -> Any:
    """A saved flat index of ``n`` random vectors (pid = id)."""
    from reid_ssl.index import GalleryIndex, GalleryItem

    idx = GalleryIndex.create(index_info(dim), "flat")
    x = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    idx.add(x, [GalleryItem(path=f"/g/{i}.jpg", pid=i) for i in range(n)])
    idx.save(folder)
    return idx


def assert_consistent(folder: Path) -> Any:
    """The published generation loads whole: FAISS, ids, vectors and metadata agree."""
    from reid_ssl.index import GalleryIndex

    idx = GalleryIndex.load(folder)
    n = idx.ntotal
    assert len(idx.ids) == len(idx.vectors) == len(idx.items(idx.ids)) == n
    assert idx._index is None if n == 0 else idx._index.ntotal == n
    return idx


# ---------------------------------------------------------------------------------------------------------
# Full disks
# ---------------------------------------------------------------------------------------------------------


class SmallDisk:
    """A folder whose writes can be made to fail as on a full disk; use as ``with SmallDisk(folder) as disk``.

    As root: a 16 MiB tmpfs mounted on the folder and filled to ``leave`` free bytes (the kernel says ENOSPC).
    Elsewhere (CI runners without mount rights): ``RLIMIT_FSIZE``, so the kernel refuses to grow any file past
    ``leave`` bytes (EFBIG). Either way the write syscall itself fails, not a patched Python function.
    """

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.mounted = folder, False
        if os.geteuid() == 0 and shutil.which("mount") and not os.environ.get("REID_SSL_TEST_NO_MOUNT"):
            r = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)], capture_output=True, check=False
            )
            self.mounted = r.returncode == 0

    def __enter__(self) -> SmallDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.folder)], check=False)

    @contextlib.contextmanager
    def full(self, leave: int = 16384) -> Iterator[None]:
        if self.mounted:
            filler = self.folder / ".filler"
            st = os.statvfs(self.folder)
            with open(filler, "wb") as f:
                os.posix_fallocate(f.fileno(), 0, max(st.f_bavail * st.f_frsize - leave, 4096))
            try:
                yield
            finally:
                filler.unlink()
        else:
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (leave, hard))
            try:
                yield
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
                signal.signal(signal.SIGXFSZ, handler)


def full_disk_error(e: pytest.ExceptionInfo, what: str) -> None:
    """The error of a write that hit a full disk names the file, says nothing changed, and gives the OS reason."""
    text = str(e.value)
    assert what in text and "unchanged" in text and ("No space left" in text or "File too large" in text), text


def person_zip(path: Path, pids: range, camera: int = 3, seed: int = 21) -> Path:
    """A zip of synthetic person crops with Market-style names ``0<pid>_c<camera>s1_<n>_00.jpg``."""
    rng = np.random.default_rng(seed)
    folder = path.parent / f"{path.stem}_members"
    members = {}
    for n, pid in enumerate(pids):
        image = write_person_image(folder / f"u{n}.jpg", pid, rng)
        members[f"0{pid}_c{camera}s1_{n:06d}_00.jpg"] = image.read_bytes()
    return write_zip(path, members)
