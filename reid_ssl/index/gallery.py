"""Gallery index: FAISS over L2-normalised features, an SQLite metadata sidecar, atomic generations.

One index is one folder::

    IDX/
      CURRENT            "gen-00000007": the published generation, replaced atomically (os.replace)
      gen-00000007/      never modified once published
        manifest.json    format, embedder fingerprint + preprocess, index type/factory/params, counts, calibration
        index.faiss      faiss.write_index(IndexIDMap2(<factory index>)), inner product on unit vectors = cosine
        ids.npy          (n,) int64, ascending: the stable ids (never reused after a removal)
        vectors.npy      (n, D) float32 unit features, row i <-> ids[i]: rebuilds, HNSW removals, PQ re-ranking,
                         calibration (read with mmap, loaded without pickle)
        items.sqlite     one row per id: path, pid, camid, frame, tracklet, source, added (data, never pickle)
      gen-00000006/      the previous generation, kept for a reader that raced the last save
      .lock              writers hold flock(LOCK_EX) on it while they load-modify-save
      .build/            plan + per-chunk features of an unfinished `build` (a killed build resumes from here)

Readers never lock: they read ``CURRENT`` and open an immutable generation, so they never see a half-written
index. A save writes ``.tmp-gen-*``, fsyncs every file, renames it to ``gen-N`` and only then replaces
``CURRENT``; a crash or SIGKILL at any point leaves the previous generation published and loadable. A writer
saves only on top of the generation it loaded (else :class:`StaleIndexError`), so two writers cannot lose
each other's updates; :meth:`GalleryIndex.open_for_update` holds the lock across load, modify and save.

Index types come from the FAISS factory (:data:`INDEX_TYPES`): exact ``Flat`` below
:data:`AUTO_FLAT_MAX` vectors, ``IVF{nlist},Flat`` above it, ``IVF{nlist},PQ{m}`` and ``HNSW32,Flat`` by choice;
IVF and PQ are trained on a random sample. faiss-gpu is used for search when it is installed and a GPU
is visible (HNSW and filtered searches stay on the CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from reid_ssl import __version__
from reid_ssl.errors import (
    AlreadyExistsError,
    DatasetLayoutError,
    EmbedderMismatchError,
    IndexFormatError,
    IndexLockedError,
    InputError,
    MissingFileError,
    StaleIndexError,
    UnknownNameError,
)
from reid_ssl.fileio import atomic_write_bytes, fsync_path
from reid_ssl.images import is_image_name

if TYPE_CHECKING:
    from reid_ssl.embedder import Embedder

FORMAT = "reid_ssl.index"
FORMAT_VERSION = 1
BUILD_FORMAT = "reid_ssl.index-build"
CURRENT = "CURRENT"
LOCK_FILE = ".lock"
BUILD_DIR = ".build"
FILES = ("manifest.json", "index.faiss", "ids.npy", "vectors.npy", "items.sqlite")

AUTO_FLAT_MAX = 20_000  # exact search up to here: 1.2 ms/query at 20k x 512-D on one core (README table)
MIN_TRAIN = {"ivf-flat": 156, "ivf-pq": 1000}  # fewer vectors than this: keep an exact Flat index for now
HNSW_EF_CONSTRUCTION = 100  # 40 (FAISS's default) gave recall@10 0.88 on clustered data, 100 gave 0.99
DEFAULT_SEARCH_THREADS = 1  # OpenMP threads for small query batches (see GalleryIndex.search)

_GEN_RE = re.compile(r"^gen-(\d{8})$")
_MARKET_RE = re.compile(r"^(-?\d+)_c(\d+)(?:s(\d+))?_(\d+)(?:_\d+)?$")


# ---------------------------------------------------------------------------------------------------------
# Items and hits
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GalleryItem:
    """What the sidecar stores per image; unknown fields stay ``None``."""

    path: str
    pid: int | None = None
    camid: int | None = None
    frame: int | None = None
    tracklet: int | None = None
    source: str | None = None


@dataclass(frozen=True)
class SearchHit:
    """One search result: the stable id, the cosine similarity and the item's metadata."""

    id: int
    score: float
    path: str
    pid: int | None = None
    camid: int | None = None
    frame: int | None = None
    tracklet: int | None = None
    source: str | None = None
    added: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_market_name(name: str | Path, pid_is_tracklet: bool = False) -> dict[str, int | None] | None:
    """``PPPP_cCsS_FFFFFF_NN.jpg`` -> {pid, camid, frame, tracklet}; ``None`` when the name does not match.

    ``pid_is_tracklet`` marks data sets whose "identities" are tracklets (PETS09: no identity ground truth).
    """
    m = _MARKET_RE.match(Path(name).stem)
    if m is None:
        return None
    pid = int(m.group(1))
    return {
        "pid": pid,
        "camid": int(m.group(2)),
        "frame": int(m.group(4)),
        "tracklet": pid if pid_is_tracklet and pid >= 0 else None,
    }


# ---------------------------------------------------------------------------------------------------------
# Galleries on disk: a dataset name or any folder of images
# ---------------------------------------------------------------------------------------------------------

# Named galleries: Market-1501-layout roots under the data folder. gallery = bounding_box_test, and the
# query folder serves to calibrate the "no match" threshold.
DATASETS: dict[str, dict[str, Any]] = {
    "pets09": {
        "root": "pets09/market",
        "pid_is_tracklet": True,
        "hint": "build it with `reid_ssl prepare pets09 --fetch`",
    },
}


@dataclass
class GallerySource:
    """The images to index, the folders they live in, and where calibration queries come from."""

    items: list[GalleryItem]
    roots: list[str]
    queries: list[GalleryItem] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    pid_is_tracklet: bool = False


def _walk_images(folder: Path) -> Iterator[Path]:
    """Image files under ``folder``, sorted, never descending into symlinked folders (no loops)."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            if is_image_name(name):
                yield Path(dirpath) / name


def folder_items(folder: Path, pid_is_tracklet: bool, source: str) -> tuple[list[GalleryItem], list]:
    """Images under ``folder``; files whose real path leaves the folder (symlinks) are skipped."""
    root = folder.resolve()
    items: list[GalleryItem] = []
    skipped: list[tuple[str, str]] = []
    for p in _walk_images(folder):
        real = p.resolve()
        if not real.is_relative_to(root):
            skipped.append((str(p), f"symlink to {real}, outside the gallery folder {root}"))
            continue
        if not real.is_file():
            skipped.append((str(p), "not a regular file"))
            continue
        meta = parse_market_name(p.name, pid_is_tracklet) or {}
        items.append(GalleryItem(path=str(real), source=source, **meta))
    return items, skipped


def gallery_source(images: str | Path, data_root: str | Path = "data") -> GallerySource:
    """Resolve ``--images``: a name from :data:`DATASETS`, a Market-1501-layout root, or any image folder.

    A data set name or a Market-layout root (it has ``bounding_box_test/``) indexes ``bounding_box_test``
    and keeps ``query/`` (when present) for calibration; any other folder is indexed recursively, with
    pid/camera/frame parsed from Market-style file names where they match.
    """
    name = str(images)
    if name in DATASETS:
        spec = DATASETS[name]
        root = Path(data_root) / spec["root"]
        pid_is_tracklet = bool(spec["pid_is_tracklet"])
        if not (root / "bounding_box_test").is_dir():
            raise DatasetLayoutError(f"{name} gallery not found at {root / 'bounding_box_test'}; {spec['hint']}")
    else:
        root, pid_is_tracklet = Path(images), False
        if not root.exists():
            raise MissingFileError(f"no such image folder or data set: {name!r} (data sets: {sorted(DATASETS)})")
        if not root.is_dir():
            raise InputError(f"--images must be a folder or a data set name, got the file {root}")
    if (root / "bounding_box_test").is_dir():
        items, skipped = folder_items(root / "bounding_box_test", pid_is_tracklet, "gallery")
        roots = [str((root / "bounding_box_test").resolve())]
        queries: list[GalleryItem] = []
        if (root / "query").is_dir():
            queries, q_skipped = folder_items(root / "query", pid_is_tracklet, "query")
            skipped += q_skipped
            roots.append(str((root / "query").resolve()))
        src = GallerySource(items, roots, queries, skipped, pid_is_tracklet)
        where = root / "bounding_box_test"
    else:
        items, skipped = folder_items(root, False, "folder")
        src, where = GallerySource(items, [str(root.resolve())], [], skipped), root
    if not src.items:
        raise DatasetLayoutError(f"no image files under {where}")
    return src


# ---------------------------------------------------------------------------------------------------------
# Index types (FAISS factory strings)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexSpec:
    """A FAISS factory string and its search-time parameters.

    Args:
        factory: ``faiss.index_factory`` description, wrapped in ``IDMap2`` for stable ids.
        nprobe: IVF lists visited per query.
        ef_search: HNSW candidate list size.
        rerank: fetch ``k * rerank`` candidates and re-score them exactly from the stored vectors
            (used for PQ, whose codes are lossy).
        train_size: vectors sampled to train the coarse quantizer / PQ codebooks (0: no training).
    """

    type: str
    factory: str
    nprobe: int | None = None
    ef_search: int | None = None
    rerank: int = 1
    train_size: int = 0


def ivf_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: the power of two nearest 4*sqrt(n), with >= 39 training points each."""
    nlist = 2 ** round(math.log2(max(4 * math.sqrt(max(n, 1)), 1)))
    while nlist > 1 and n < 39 * nlist:
        nlist //= 2
    return int(min(nlist, 65536))


def _pq_m(dim: int) -> int:
    """PQ sub-quantizers: the largest divisor of ``dim`` that is <= dim/8 (512-D -> 64 bytes/vector)."""
    return next(m for m in range(max(dim // 8, 1), 0, -1) if dim % m == 0)


def _flat(n: int, dim: int) -> IndexSpec:
    return IndexSpec("flat", "Flat")


def _ivf_flat(n: int, dim: int) -> IndexSpec:
    nlist = ivf_nlist(n)
    return IndexSpec(
        "ivf-flat", f"IVF{nlist},Flat", nprobe=min(nlist, max(32, nlist // 16)), train_size=min(n, 256 * nlist)
    )


def _ivf_pq(n: int, dim: int) -> IndexSpec:
    nlist = ivf_nlist(n)
    nbits = int(min(8, max(1, math.floor(math.log2(max(n, 2) / 39)))))  # >= 39 points per PQ centroid
    return IndexSpec(
        "ivf-pq",
        f"IVF{nlist},PQ{_pq_m(dim)}x{nbits}np",
        nprobe=min(nlist, max(32, nlist // 16)),
        rerank=8,
        train_size=min(n, max(256 * nlist, 39 * 2**nbits)),
    )


def _hnsw(n: int, dim: int) -> IndexSpec:
    return IndexSpec("hnsw", "HNSW32,Flat", ef_search=128)


# name -> spec for n vectors of dimension dim. "auto" picks flat or ivf-flat by size.
INDEX_TYPES: dict[str, Callable[[int, int], IndexSpec]] = {
    "flat": _flat,
    "ivf-flat": _ivf_flat,
    "ivf-pq": _ivf_pq,
    "hnsw": _hnsw,
}


def index_spec(
    index_type: str,
    n: int,
    dim: int,
    *,
    factory: str | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
    rerank: int | None = None,
) -> IndexSpec:
    """The spec for ``n`` vectors: ``index_type`` from :data:`INDEX_TYPES` or ``"auto"``; overrides win."""
    if index_type == "auto":
        index_type = "flat" if n <= AUTO_FLAT_MAX else "ivf-flat"
    if index_type not in INDEX_TYPES:
        raise UnknownNameError(f"unknown index type {index_type!r}; choose one of {['auto', *sorted(INDEX_TYPES)]}")
    spec = INDEX_TYPES[index_type](n, dim)
    if factory:
        spec = dataclasses.replace(spec, factory=factory)
        if "IVF" in factory and spec.nprobe is None:
            spec = dataclasses.replace(spec, nprobe=16)
    changes = {k: v for k, v in {"nprobe": nprobe, "ef_search": ef_search, "rerank": rerank}.items() if v}
    return dataclasses.replace(spec, **changes) if changes else spec


# ---------------------------------------------------------------------------------------------------------
# GPU (faiss-gpu + CUDA): used when present, never required
# ---------------------------------------------------------------------------------------------------------


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _to_gpu(index: faiss.Index) -> faiss.Index | None:
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except Exception as e:  # an index type the GPU cloner does not support: stay on the CPU
        warnings.warn(f"faiss-gpu could not take this index ({e}); searching on the CPU", stacklevel=3)
        return None


@contextlib.contextmanager
def omp_threads(n: int | None) -> Iterator[None]:
    """Run FAISS with ``n`` OpenMP threads inside the block (the calling thread's OpenMP setting)."""
    if not n:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------
# Files: fsync'd writes, the writer lock
# ---------------------------------------------------------------------------------------------------------


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_faiss(path: Path, index: faiss.Index) -> None:
    # through a Python file: a failed write (full disk) raises OSError with its errno, not FAISS's RuntimeError
    with open(path, "wb") as f:
        faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))
        f.flush()
        os.fsync(f.fileno())


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


class WriterLock:
    """An exclusive ``flock`` on ``IDX/.lock``: one writer at a time, across processes and threads.

    The lock dies with its holder (a SIGKILLed writer never leaves a stale lock). The holder's pid is
    written into the file for error messages only.
    """

    def __init__(self, folder: str | Path, timeout: float = 60.0) -> None:
        self.path = Path(folder) / LOCK_FILE
        self.timeout = timeout
        self._fd: int | None = None

    def acquire(self) -> WriterLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                    os.close(fd)
                    raise IndexLockedError(
                        f"{self.path.parent} is being written by another process (pid "
                        f"{holder}); waited {self.timeout:.0f} s"
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_current(folder: Path) -> str | None:
    try:
        name = (folder / CURRENT).read_text(errors="replace").strip()
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise IndexFormatError(f"{folder} is a file, not an index folder") from None
    if not _GEN_RE.match(name):
        raise IndexFormatError(f"{folder}: {CURRENT} names {name[:40]!r}, not a generation folder")
    return name


def current_generation(folder: str | Path) -> int:
    """The published generation number (0 when the folder holds no index)."""
    name = _read_current(Path(folder))
    return int(name[4:]) if name else 0


def is_index(folder: str | Path) -> bool:
    return (Path(folder) / CURRENT).is_file()


# ---------------------------------------------------------------------------------------------------------
# Metadata sidecar (SQLite)
# ---------------------------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE items (id INTEGER PRIMARY KEY, path TEXT NOT NULL, pid INTEGER, camid INTEGER, frame INTEGER,
                    tracklet INTEGER, source TEXT, added REAL NOT NULL);
CREATE INDEX items_camid ON items(camid);
CREATE INDEX items_path ON items(path);
"""
_COLUMNS = ("id", "path", "pid", "camid", "frame", "tracklet", "source", "added")


def _new_db() -> sqlite3.Connection:
    db = sqlite3.connect(":memory:", check_same_thread=False)
    db.executescript(_SCHEMA)
    return db


def _open_db_readonly(path: Path) -> sqlite3.Connection:
    # immutable=1: the file never changes once its generation is published, so no locking is needed
    db = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False)
    cols = [r[1] for r in db.execute("PRAGMA table_info(items)")]
    if tuple(cols) != _COLUMNS:
        db.close()
        raise IndexFormatError(f"{path}: unexpected metadata columns {cols}")
    return db


# ---------------------------------------------------------------------------------------------------------
# Calibration of the "no match" threshold
# ---------------------------------------------------------------------------------------------------------


def describe_calibration(cal: dict[str, Any] | None) -> str:
    """One line for tables and the app: the threshold and its quality, or why there is none."""
    if cal is None:
        return "not calibrated"
    quality = f"{cal.get('source', '?')}; TPR {cal['tpr']:.2f}, FPR {cal['fpr']:.2f}"
    if cal.get("reliable") is False:
        return (
            f"off: {cal['threshold']:.4f} would be the best cut, but true and impostor scores overlap "
            f"(Youden J {cal['youden_j']:.2f} < {MIN_RELIABLE_J}; {quality})"
        )
    return f"{cal['threshold']:.4f} ({quality})"


# Below this Youden J (balanced accuracy 0.75) true and impostor top-1 scores overlap too much for a verdict:
# the calibration is stored, but the index offers no threshold (every result is shown as a candidate).
MIN_RELIABLE_J = 0.5


def calibrate_threshold(pos: np.ndarray, neg: np.ndarray) -> dict[str, Any]:
    """Pick the score below which "nobody in the gallery matches".

    ``pos``: top-1 score of queries whose identity IS in the gallery; ``neg``: top-1 score of the same
    queries with their identity removed from the gallery (the best impostor). The threshold maximises
    Youden's J = TPR - FPR (TPR: share of ``pos`` >= t, FPR: share of ``neg`` >= t), i.e. balanced accuracy
    of the match / no-match decision; candidates are midpoints between consecutive observed scores.
    ``reliable`` is False when the best J is under :data:`MIN_RELIABLE_J`.
    """
    pos = np.asarray(pos, np.float64)
    neg = np.asarray(neg, np.float64)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"calibration needs true and false matches (got {len(pos)} and {len(neg)})")
    scores = np.unique(np.concatenate([pos, neg]))
    cands = np.concatenate([[scores[0] - 1e-6], (scores[1:] + scores[:-1]) / 2, [scores[-1] + 1e-6]])
    tpr = (pos[None, :] >= cands[:, None]).mean(1)
    fpr = (neg[None, :] >= cands[:, None]).mean(1)
    j = tpr - fpr
    best = int(np.argmax(j))  # first maximum = lowest threshold among ties (favours answering)
    auc = float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())
    return {
        "threshold": float(cands[best]),
        "tpr": float(tpr[best]),
        "fpr": float(fpr[best]),
        "youden_j": float(j[best]),
        "reliable": bool(j[best] >= MIN_RELIABLE_J),
        "auc": auc,
        "n_pos": len(pos),
        "n_neg": len(neg),
        "pos_median": float(np.median(pos)),
        "neg_median": float(np.median(neg)),
        "method": "max Youden J over top-1 scores: identity present vs removed from the gallery",
    }


def open_set_scores(
    q_feats: np.ndarray,
    q_pids: np.ndarray,
    q_cams: np.ndarray,
    g_feats: np.ndarray,
    g_pids: np.ndarray,
    g_cams: np.ndarray,
    q_self: np.ndarray | None = None,
    block: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 scores with each query's identity present (``pos``) and removed (``neg``).

    Market protocol: gallery items with the query's pid AND camera are junk (dropped), so are pid -1
    items. Only queries with a cross-camera true match and at least one impostor count.

    Args:
        q_feats: (Q, D) unit features; g_feats: (G, D) unit features.
        q_self: (Q,) gallery row of each query to ignore (leave-one-out), or -1.
        block: queries per matrix product (bounds memory to block x G).
    """
    pos_out, neg_out = [], []
    for s in range(0, len(q_feats), block):
        sl = slice(s, s + block)
        sim = q_feats[sl] @ g_feats.T  # (b, G)
        qp, qc = q_pids[sl, None], q_cams[sl, None]
        same_pid = qp == g_pids[None, :]
        junk = (same_pid & (qc == g_cams[None, :])) | (g_pids[None, :] < 0)
        if q_self is not None:
            rows = q_self[sl]
            hit = rows >= 0
            junk[np.flatnonzero(hit), rows[hit]] = True
        pos_mask, neg_mask = same_pid & ~junk, ~same_pid & ~junk
        valid = pos_mask.any(1) & neg_mask.any(1) & (q_pids[sl] >= 0)
        top_all = np.where(pos_mask | neg_mask, sim, -np.inf).max(1)
        top_neg = np.where(neg_mask, sim, -np.inf).max(1)
        pos_out.append(top_all[valid])
        neg_out.append(top_neg[valid])
    if not pos_out:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    return np.concatenate(pos_out).astype(np.float32), np.concatenate(neg_out).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# The index
# ---------------------------------------------------------------------------------------------------------


def embedder_info(embedder: Embedder, checkpoint: str | Path | None = None) -> dict[str, Any]:
    """What the index remembers about the embedder that built it."""
    return {
        "fingerprint": embedder.fingerprint,
        "preprocess": dict(embedder.preprocess),
        "feature_dim": int(embedder.feature_dim),
        "flip": bool(getattr(embedder, "flip", True)),
        "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _as_features(x: np.ndarray, dim: int) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"features must have shape (n, {dim}), got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or inf")
    x = x.copy()
    faiss.normalize_L2(x)
    return x


class GalleryIndex:
    """A FAISS index over unit features with stable ids, a metadata sidecar and atomic saves.

    Create with :meth:`create` (empty, in memory) or :meth:`load`; mutate with :meth:`add` / :meth:`remove`;
    persist with :meth:`save`. One object serves many concurrent :meth:`search` calls, but mutations must
    not run concurrently with searches on the same object (the app swaps in a new object after an add).
    """

    def __init__(
        self,
        manifest: dict[str, Any],
        index: faiss.Index | None,
        ids: np.ndarray,
        vectors: np.ndarray,
        db: sqlite3.Connection,
        path: Path | None,
        db_mutable: bool,
    ) -> None:
        self.manifest = manifest
        self._index = index
        self._ids = ids
        self._vectors = vectors
        self._db = db
        self._db_mutable = db_mutable
        self._db_lock = threading.Lock()
        self.path = path
        self._base_generation = int(manifest.get("generation", 0))
        self._lock: WriterLock | None = None
        self._gpu_index: faiss.Index | None = None
        self._gpu_tried = False
        self.dirty = False

    # --- construction --------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        embedder: dict[str, Any] | Embedder,
        index_type: str = "auto",
        *,
        factory: str | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        use_gpu: bool = True,
    ) -> GalleryIndex:
        """An empty index for features of one embedder (an :class:`Embedder` or :func:`embedder_info`)."""
        info = embedder if isinstance(embedder, dict) else embedder_info(embedder)
        if index_type != "auto" and index_type not in INDEX_TYPES:
            raise UnknownNameError(f"unknown index type {index_type!r}; choose one of {['auto', *sorted(INDEX_TYPES)]}")
        dim = int(info["feature_dim"])
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "reid_ssl_version": __version__,
            "generation": 0,
            "created": _now(),
            "updated": _now(),
            "dim": dim,
            "ntotal": 0,
            "next_id": 0,
            "embedder": info,
            "index": {
                "requested": index_type,
                "factory_override": factory,
                "nprobe_override": nprobe,
                "ef_search_override": ef_search,
                "use_gpu": use_gpu,
                "type": None,
                "factory": None,
                "nprobe": None,
                "ef_search": None,
                "rerank": 1,
                "trained_on": 0,
            },
            "roots": [],
            "queries": None,
            "calibration": None,
        }
        return cls(manifest, None, np.zeros(0, np.int64), np.zeros((0, dim), np.float32), _new_db(), None, True)

    @classmethod
    def load(cls, folder: str | Path, *, mmap: bool = True, retries: int = 3) -> GalleryIndex:
        """Open the published generation of ``folder`` (no lock; never a half-written state).

        Raises:
            FileNotFoundError: no index there.
            IndexFormatError: wrong format, newer format, or damaged files.
        """
        folder = Path(folder)
        for attempt in range(retries + 1):
            name = _read_current(folder)
            if name is None:
                if not folder.exists():
                    raise MissingFileError(f"index not found: {folder}")
                raise MissingFileError(
                    f"{folder} holds no reid_ssl index (no {CURRENT} file); build one with `reid_ssl index build`"
                )
            try:
                return cls._load_generation(folder, folder / name, mmap)
            except FileNotFoundError:
                if attempt == retries or _read_current(folder) == name:
                    raise IndexFormatError(f"{folder / name} is incomplete (missing files)") from None
                # a writer published a newer generation and collected ours meanwhile: read CURRENT again
        raise AssertionError("unreachable")

    @classmethod
    def _load_generation(cls, folder: Path, gen: Path, mmap: bool) -> GalleryIndex:
        try:
            manifest = json.loads((gen / "manifest.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:  # e.g. a pickle in its place: never unpickled
            raise IndexFormatError(f"{gen / 'manifest.json'} is not valid JSON ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise IndexFormatError(f"{folder} is not a reid_ssl index (no '{FORMAT}' manifest)")
        missing = {"dim", "ntotal", "next_id", "embedder", "index"} - set(manifest)
        if missing:
            raise IndexFormatError(f"{gen / 'manifest.json'} lacks {sorted(missing)} (damaged or hand-edited?)")
        if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
            raise IndexFormatError(
                f"{folder} has index format {manifest['format_version']}, newer than this "
                f"reid_ssl ({FORMAT_VERSION}); upgrade reid_ssl"
            )
        for fname, size in manifest.get("files", {}).items():
            actual = (gen / fname).stat().st_size
            if actual != size:
                raise IndexFormatError(f"{gen / fname} has {actual} bytes, the manifest says {size} (damaged?)")
        try:
            index = faiss.read_index(str(gen / "index.faiss")) if manifest["ntotal"] else None
            ids = np.load(gen / "ids.npy", allow_pickle=False)
            vectors = np.load(gen / "vectors.npy", allow_pickle=False, mmap_mode="r" if mmap else None)
        except FileNotFoundError:
            raise
        except (RuntimeError, ValueError, OSError) as e:
            raise IndexFormatError(f"{gen}: cannot read the index files ({str(e).splitlines()[0][:200]})") from None
        n, dim = int(manifest["ntotal"]), int(manifest["dim"])
        if ids.shape != (n,) or ids.dtype != np.int64 or vectors.shape != (n, dim) or vectors.dtype != np.float32:
            raise IndexFormatError(
                f"{gen}: ids {ids.shape}/{ids.dtype} or vectors {vectors.shape}/{vectors.dtype} "
                f"do not fit ntotal={n}, dim={dim}"
            )
        if index is not None and (index.ntotal != n or index.d != dim):
            raise IndexFormatError(f"{gen}/index.faiss holds {index.ntotal} x {index.d}, expected {n} x {dim}")
        if not (gen / "items.sqlite").is_file():
            raise FileNotFoundError(gen / "items.sqlite")
        db = _open_db_readonly(gen / "items.sqlite")
        return cls(manifest, index, ids, vectors, db, folder, db_mutable=False)

    @classmethod
    @contextlib.contextmanager
    def open_for_update(cls, folder: str | Path, timeout: float = 60.0) -> Iterator[GalleryIndex]:
        """Lock, load the newest generation, yield it, save it if changed, unlock (the writer's pattern)."""
        if not is_index(folder):
            cls.load(folder)  # raises "not found" / "no index" before the lock could create the folder
        lock = WriterLock(folder, timeout).acquire()
        try:
            idx = cls.load(folder)
            idx._lock = lock
            yield idx
            if idx.dirty:
                idx.save()
        finally:
            lock.release()

    # --- properties -----------------------------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        return len(self._ids)

    @property
    def generation(self) -> int:
        """The generation this copy was loaded from or last saved as (0: never saved)."""
        return self._base_generation

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def ids(self) -> np.ndarray:
        return self._ids.copy()

    @property
    def vectors(self) -> np.ndarray:
        """(n, D) unit features in id order (read-only view)."""
        v = self._vectors.view()
        v.flags.writeable = False
        return v

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["embedder"]["fingerprint"])

    @property
    def calibration(self) -> dict[str, Any] | None:
        return self.manifest.get("calibration")

    @property
    def threshold(self) -> float | None:
        """The calibrated no-match threshold; None when uncalibrated or the calibration is unreliable."""
        cal = self.calibration
        return None if cal is None or cal.get("reliable") is False else float(cal["threshold"])

    @property
    def spec(self) -> IndexSpec | None:
        m = self.manifest["index"]
        if m["type"] is None:
            return None
        return IndexSpec(m["type"], m["factory"], m["nprobe"], m["ef_search"], m["rerank"], m["trained_on"])

    def check_embedder(self, embedder: Embedder) -> None:
        """Raise :class:`EmbedderMismatchError` unless ``embedder`` is the one that built this index."""
        info = self.manifest["embedder"]
        if embedder.fingerprint != info["fingerprint"]:
            raise EmbedderMismatchError(
                f"index {self.path or '(unsaved)'} was built by embedder {info['fingerprint'][:12]} "
                f"(checkpoint {info.get('checkpoint')}, preprocess {info['preprocess']}, flip {info.get('flip')}); "
                f"the given one is {embedder.fingerprint[:12]} (preprocess {embedder.preprocess}, flip "
                f"{getattr(embedder, 'flip', '?')}). Features would not be comparable: use the original "
                "checkpoint or rebuild the index"
            )

    # --- metadata -------------------------------------------------------------------------------------

    def _ensure_mutable_db(self) -> None:
        if not self._db_mutable:
            with self._db_lock:
                mem = sqlite3.connect(":memory:", check_same_thread=False)
                self._db.backup(mem)
                self._db.close()
                self._db, self._db_mutable = mem, True

    def items(self, ids: Sequence[int] | np.ndarray) -> dict[int, dict[str, Any]]:
        """Metadata rows for ``ids`` (missing ids are absent from the result)."""
        ids = [int(i) for i in ids]
        out: dict[int, dict[str, Any]] = {}
        with self._db_lock:
            for start in range(0, len(ids), 900):  # SQLite's bound-parameter limit
                part = ids[start : start + 900]
                rows = self._db.execute(
                    f"SELECT {', '.join(_COLUMNS)} FROM items WHERE id IN ({', '.join('?' * len(part))})", part
                )
                out.update({r[0]: dict(zip(_COLUMNS, r, strict=True)) for r in rows})
        return out

    def ids_where(self, **equals: Any) -> np.ndarray:
        """Ids whose metadata columns equal the given values, e.g. ``ids_where(camid=2)``."""
        for key in equals:
            if key not in _COLUMNS:
                raise KeyError(f"unknown metadata column {key!r}; choose one of {list(_COLUMNS)}")
        where = " AND ".join(f"{k} = ?" for k in equals) or "1"
        with self._db_lock:
            rows = self._db.execute(f"SELECT id FROM items WHERE {where} ORDER BY id", list(equals.values()))
            return np.array([r[0] for r in rows], np.int64)

    def ids_for_paths(self, paths: Sequence[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        with self._db_lock:
            for start in range(0, len(paths), 900):
                part = list(paths[start : start + 900])
                q = f"SELECT path, id FROM items WHERE path IN ({', '.join('?' * len(part))})"
                out.update(dict(self._db.execute(q, part).fetchall()))
        return out

    def stats(self) -> dict[str, Any]:
        """Counts for humans: items, identities, cameras, sources."""
        with self._db_lock:
            q = self._db.execute
            return {
                "items": int(q("SELECT COUNT(*) FROM items").fetchone()[0]),
                "identities": int(q("SELECT COUNT(DISTINCT pid) FROM items WHERE pid > 0").fetchone()[0]),
                "cameras": sorted(r[0] for r in q("SELECT DISTINCT camid FROM items WHERE camid IS NOT NULL")),
                "sources": dict(q("SELECT COALESCE(source, '?'), COUNT(*) FROM items GROUP BY source").fetchall()),
            }

    # --- mutation -------------------------------------------------------------------------------------

    def _build_faiss(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """(Re)build the FAISS index from scratch for these vectors: choose the spec, train on a sample, add."""
        m = self.manifest["index"]
        n = len(ids)
        self._gpu_index, self._gpu_tried = None, False
        if n == 0:
            self._index = None
            return
        spec = index_spec(
            m["requested"],
            n,
            self.dim,
            factory=m["factory_override"],
            nprobe=m["nprobe_override"],
            ef_search=m["ef_search_override"],
        )
        if not m["factory_override"] and n < MIN_TRAIN.get(spec.type, 0):
            spec = index_spec("flat", n, self.dim)  # too few vectors to train: exact until a later add rebuilds
        index = faiss.index_factory(self.dim, "IDMap2," + spec.factory, faiss.METRIC_INNER_PRODUCT)
        inner = faiss.downcast_index(index.index)
        if isinstance(inner, faiss.IndexHNSW):
            inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        if not index.is_trained:
            sample_n = min(n, max(spec.train_size, 1))
            rows = np.sort(np.random.default_rng(0).choice(n, sample_n, replace=False))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                index.train(np.ascontiguousarray(vectors[rows]))
        index.add_with_ids(np.ascontiguousarray(vectors), ids)
        m.update(
            type=spec.type,
            factory=spec.factory,
            nprobe=spec.nprobe,
            ef_search=spec.ef_search,
            rerank=spec.rerank,
            trained_on=n,
        )
        self._index = index

    def _should_rebuild(self, n_after: int) -> bool:
        m = self.manifest["index"]
        if self._index is None or m["type"] is None:
            return True
        if m["factory_override"]:
            return False
        if m["requested"] == "auto" and index_spec("auto", n_after, self.dim).type != m["type"]:
            return True  # crossed AUTO_FLAT_MAX: flat -> ivf-flat
        if m["requested"] not in ("auto", m["type"]) and n_after >= MIN_TRAIN.get(m["requested"], 0):
            return True  # was kept exact while too small to train the requested type
        # IVF trained on a much smaller gallery: too few lists now, retrain on a fresh sample
        return m["type"] in ("ivf-flat", "ivf-pq") and n_after >= 4 * max(m["trained_on"], 1)

    def add(
        self, features: np.ndarray, items: Sequence[GalleryItem | dict[str, Any]], added: float | None = None
    ) -> np.ndarray:
        """Add (n, D) features with one metadata item each; returns their new stable ids."""
        feats = _as_features(features, self.dim)
        if len(feats) != len(items):
            raise ValueError(f"{len(feats)} features but {len(items)} items")
        if not len(feats):
            return np.zeros(0, np.int64)
        rows = [it if isinstance(it, GalleryItem) else GalleryItem(**it) for it in items]
        start = int(self.manifest["next_id"])
        new_ids = np.arange(start, start + len(feats), dtype=np.int64)
        all_ids = np.concatenate([self._ids, new_ids])
        all_vecs = np.concatenate([np.asarray(self._vectors), feats]) if self.ntotal else feats
        if self._should_rebuild(len(all_ids)):
            self._build_faiss(all_vecs, all_ids)
        else:
            assert self._index is not None
            self._index.add_with_ids(feats, new_ids)
            self._gpu_index, self._gpu_tried = None, False
        self._ensure_mutable_db()
        t = time.time() if added is None else added
        with self._db_lock, self._db:
            self._db.executemany(
                "INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (int(i), r.path, r.pid, r.camid, r.frame, r.tracklet, r.source, t)
                    for i, r in zip(new_ids, rows, strict=True)
                ],
            )
        self._ids, self._vectors = all_ids, all_vecs
        self.manifest["next_id"] = start + len(feats)
        self.manifest["ntotal"] = self.ntotal
        self.dirty = True
        return new_ids

    def remove(self, ids: Sequence[int] | np.ndarray) -> int:
        """Remove items by id; returns how many existed. Other ids never change."""
        ids = np.unique(np.asarray(ids, np.int64))
        present = ids[np.isin(ids, self._ids)]
        if not len(present):
            return 0
        keep = ~np.isin(self._ids, present)
        self._ids = self._ids[keep]
        self._vectors = np.ascontiguousarray(np.asarray(self._vectors)[keep])
        if self.manifest["index"]["type"] == "hnsw" or self._index is None:  # HNSW cannot delete: rebuild
            self._build_faiss(self._vectors, self._ids)
        else:
            removed = self._index.remove_ids(faiss.IDSelectorBatch(present))
            if removed != len(present):
                raise RuntimeError(f"FAISS removed {removed} of {len(present)} ids (index out of sync)")
            self._gpu_index, self._gpu_tried = None, False
        self._ensure_mutable_db()
        with self._db_lock, self._db:
            self._db.executemany("DELETE FROM items WHERE id = ?", [(int(i),) for i in present])
        self.manifest["ntotal"] = self.ntotal
        self.dirty = True
        return len(present)

    def set_calibration(self, calibration: dict[str, Any] | None) -> None:
        self.manifest["calibration"] = calibration
        self.dirty = True

    def add_roots(self, *roots: str | Path) -> None:
        """Remember folders whose images this index may show (the app reads images only under them)."""
        for r in roots:
            r = str(Path(r).resolve())
            if r not in self.manifest["roots"]:
                self.manifest["roots"].append(r)
                self.dirty = True

    # --- search ---------------------------------------------------------------------------------------

    def _search_params(self, k_nprobe: int | None, sel: Any) -> faiss.SearchParameters | None:
        m = self.manifest["index"]
        if m["type"] in ("ivf-flat", "ivf-pq") or (m["nprobe"] and m["type"] != "hnsw"):
            return faiss.SearchParametersIVF(nprobe=int(k_nprobe or m["nprobe"]), sel=sel)
        if m["type"] == "hnsw":
            return faiss.SearchParametersHNSW(efSearch=int(m["ef_search"] or 64), sel=sel)
        return faiss.SearchParameters(sel=sel) if sel is not None else None

    def _gpu(self) -> faiss.Index | None:
        """A GPU copy of the index for unfiltered searches, when faiss-gpu and a GPU are present."""
        m = self.manifest["index"]
        if self._gpu_tried or not m.get("use_gpu", True) or m["type"] == "hnsw" or not gpu_available():
            return self._gpu_index
        self._gpu_tried = True
        self._gpu_index = _to_gpu(self._index)
        if self._gpu_index is not None and m["nprobe"]:
            faiss.GpuParameterSpace().set_index_parameter(self._gpu_index, "nprobe", int(m["nprobe"]))
        return self._gpu_index

    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        *,
        exclude_ids: Sequence[int] | np.ndarray | None = None,
        exclude_camid: int | None = None,
        nprobe: int | None = None,
        threads: int | None = None,
    ) -> list[list[SearchHit]]:
        """Top-``k`` gallery items per query, best first, with their metadata.

        Args:
            queries: (Q, D) or (D,) features (normalised here).
            exclude_ids: ids never returned (e.g. the query's own gallery entry).
            exclude_camid: drop gallery items of this camera (the re-ID "other cameras only" protocol).
            nprobe: IVF lists to visit (default: the index's).
            threads: OpenMP threads; default one thread for up to 4 queries (single-query latency on a
                busy 2-core machine was 4x worse with 2 threads), FAISS's default for batches.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = _as_features(queries, self.dim)
        if self._index is None or self.ntotal == 0:
            return [[] for _ in range(len(q))]
        excluded = np.zeros(0, np.int64)
        if exclude_ids is not None:
            excluded = np.asarray(exclude_ids, np.int64).ravel()
        if exclude_camid is not None:
            excluded = np.concatenate([excluded, self.ids_where(camid=int(exclude_camid))])
        sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(excluded)) if len(excluded) else None
        rerank = int(self.manifest["index"]["rerank"] or 1)
        kk = min(self.ntotal, k * rerank)
        gpu = self._gpu() if sel is None and nprobe is None else None
        if threads is None and len(q) <= 4:
            threads = DEFAULT_SEARCH_THREADS
        with omp_threads(threads):
            if gpu is not None:
                scores, labels = gpu.search(q, kk)
            else:
                scores, labels = self._index.search(q, kk, params=self._search_params(nprobe, sel))
        if rerank > 1:
            scores, labels = self._rerank(q, labels, k)
        wanted = sorted({int(i) for i in labels[:, :k].ravel() if i >= 0})
        meta = self.items(wanted)
        out: list[list[SearchHit]] = []
        for srow, lrow in zip(scores, labels, strict=True):
            hits = [
                SearchHit(id=int(i), score=float(s), **{c: meta[int(i)][c] for c in _COLUMNS[1:]})
                for s, i in zip(srow[:k], lrow[:k], strict=True)
                if i >= 0 and int(i) in meta
            ]
            out.append(hits)
        return out

    def _rerank(self, q: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner products for the candidates (PQ codes are approximate), from the stored vectors."""
        out_s = np.full((len(q), k), -np.inf, np.float32)
        out_l = np.full((len(q), k), -1, np.int64)
        for r, (qv, cand) in enumerate(zip(q, labels, strict=True)):
            cand = cand[cand >= 0]
            if not len(cand):
                continue
            rows = np.searchsorted(self._ids, cand)
            exact = np.asarray(self._vectors[rows]) @ qv
            order = np.argsort(-exact, kind="stable")[:k]
            out_s[r, : len(order)], out_l[r, : len(order)] = exact[order], cand[order]
        return out_s, out_l

    def search_exact(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force (scores, ids), (Q, k) each, from the stored vectors: the ground truth for tests."""
        q = _as_features(queries, self.dim)
        k = min(k, self.ntotal)
        sim = q @ np.asarray(self._vectors).T
        order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(sim, order, 1), self._ids[order]

    def search_embedded(
        self, embedder: Embedder, images: Sequence[Any], k: int = 10, **kwargs: Any
    ) -> list[list[SearchHit]]:
        """Embed query images (paths or PIL) with the index's own embedder and search them."""
        self.check_embedder(embedder)
        res = embedder.embed_images(list(images), batch_size=max(1, min(64, len(images))))
        if res.failures:
            raise InputError("; ".join(reason for _, reason in res.failures))
        return self.search(res.features, k, **kwargs)

    # --- calibration ----------------------------------------------------------------------------------

    def calibrate(
        self, query_features: np.ndarray | None = None, query_items: Sequence[GalleryItem] | None = None
    ) -> dict[str, Any]:
        """Calibrate the "no match" threshold from labelled data (see :func:`calibrate_threshold`).

        With queries: each query against the whole gallery. Without: leave-one-out over the gallery's own
        labelled items (each item a query against the others). Stores and returns the calibration.
        Raises ValueError when the labels cannot give both true and false matches.
        """
        meta = self.items(self._ids)
        g_pids = np.array([meta[int(i)]["pid"] if meta[int(i)]["pid"] is not None else -1 for i in self._ids])
        g_cams = np.array([meta[int(i)]["camid"] if meta[int(i)]["camid"] is not None else -1 for i in self._ids])
        g_feats = np.asarray(self._vectors)
        if query_features is not None:
            assert query_items is not None
            q_feats = _as_features(query_features, self.dim)
            q_pids = np.array([it.pid if it.pid is not None else -1 for it in query_items])
            q_cams = np.array([it.camid if it.camid is not None else -1 for it in query_items])
            pos, neg = open_set_scores(q_feats, q_pids, q_cams, g_feats, g_pids, g_cams)
            source = f"{len(q_feats)} queries"
        else:
            sel = np.flatnonzero(g_pids >= 0)
            if len(sel) > 5000:
                sel = np.sort(np.random.default_rng(0).choice(sel, 5000, replace=False))
            pos, neg = open_set_scores(g_feats[sel], g_pids[sel], g_cams[sel], g_feats, g_pids, g_cams, sel)
            source = f"leave-one-out over {len(sel)} labelled gallery items"
        if len(pos) < 5:
            raise InputError(
                f"cannot calibrate: only {len(pos)} queries have a true match on another camera "
                "(needs pid/camera labels, e.g. Market-style file names)"
            )
        cal = calibrate_threshold(pos, neg)
        cal.update(source=source, date=_now())
        self.set_calibration(cal)
        return cal

    # --- persistence ----------------------------------------------------------------------------------

    def save(self, folder: str | Path | None = None, *, force: bool = False) -> Path:
        """Publish this state as a new generation of ``folder`` (default: where it was loaded from).

        Atomic: the previous generation stays published until the new one is complete on disk.

        Raises:
            StaleIndexError: someone else saved since this copy was loaded (unless ``force``).
            IndexLockedError: another writer holds the lock too long.
            OSError: the disk refused (full, read-only); the previous generation is untouched.
        """
        folder = Path(folder) if folder is not None else self.path
        if folder is None:
            raise ValueError("save() needs a folder for an index that was never saved")
        lock = self._lock if (self._lock is not None and self._lock.held and folder == self.path) else None
        own_lock = None if lock else WriterLock(folder).acquire()
        try:
            published = current_generation(folder)
            same_place = self.path is not None and folder.resolve() == self.path.resolve()
            if not force and published != (self._base_generation if same_place else 0):
                raise StaleIndexError(
                    f"{folder} is at generation {published}, this copy was loaded at "
                    f"{self._base_generation if same_place else 'none'}: another writer saved meanwhile; "
                    "reload and redo the change (or use GalleryIndex.open_for_update)"
                )
            generation = published + 1
            # a save killed between its rename and CURRENT left gen-N unpublished: it is garbage now
            self._collect_garbage(folder, keep=(published, published - 1))
            try:
                self._write_generation(folder, generation)
            except OSError as e:  # full disk, read-only, quota: say so, and that nothing was lost
                message = (
                    f"could not save the index to {folder} ({e.strerror or e}); generation {published} "
                    "is still the published one, unchanged"
                )
                raise (OSError(e.errno, message) if e.errno is not None else OSError(message)) from e
            self._collect_garbage(folder, keep=(generation, generation - 1))
        finally:
            if own_lock is not None:
                own_lock.release()
        self.path, self._base_generation, self.dirty = folder, generation, False
        return folder

    def _write_generation(self, folder: Path, generation: int) -> None:
        name = f"gen-{generation:08d}"
        tmp = folder / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            if self._index is not None and self.ntotal:
                _write_faiss(tmp / "index.faiss", self._index)
            else:
                _write_file(tmp / "index.faiss", b"")
            _save_npy(tmp / "ids.npy", self._ids)
            _save_npy(tmp / "vectors.npy", np.asarray(self._vectors, np.float32))
            out = sqlite3.connect(tmp / "items.sqlite")
            try:
                with self._db_lock:
                    self._db.backup(out)
            finally:
                out.close()
            fsync_path(tmp / "items.sqlite")
            manifest = dict(self.manifest, generation=generation, updated=_now(), ntotal=self.ntotal)
            manifest["files"] = {f: (tmp / f).stat().st_size for f in FILES if f != "manifest.json"}
            _write_file(tmp / "manifest.json", json.dumps(manifest, indent=1).encode())
            fsync_path(tmp)
            os.rename(tmp, folder / name)
            fsync_path(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_bytes(folder / CURRENT, f"{name}\n".encode())  # the commit point
        self.manifest = manifest

    @staticmethod
    def _collect_garbage(folder: Path, keep: tuple[int, ...]) -> None:
        """Delete old generations and temp folders of killed saves (we hold the lock: nobody else writes)."""
        for p in folder.iterdir():
            m = _GEN_RE.match(p.name)
            if (m and int(m.group(1)) not in keep) or p.name.startswith(".tmp-gen-"):
                shutil.rmtree(p, ignore_errors=True)

    # --- reporting ------------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        m = self.manifest
        disk = 0
        if self.path is not None and (name := _read_current(self.path)):
            disk = sum(p.stat().st_size for p in (self.path / name).iterdir() if p.is_file())
        return {
            "path": str(self.path) if self.path else None,
            "generation": self._base_generation,
            "ntotal": self.ntotal,
            "dim": self.dim,
            "next_id": m["next_id"],
            "index_type": m["index"]["type"],
            "requested_type": m["index"]["requested"],
            "factory": m["index"]["factory"],
            "nprobe": m["index"]["nprobe"],
            "ef_search": m["index"]["ef_search"],
            "rerank": m["index"]["rerank"],
            "trained_on": m["index"]["trained_on"],
            "gpu": self._gpu_index is not None,
            "gpu_available": gpu_available(),
            "embedder_fingerprint": m["embedder"]["fingerprint"],
            "checkpoint": m["embedder"].get("checkpoint"),
            "preprocess": m["embedder"]["preprocess"],
            "flip": m["embedder"].get("flip"),
            "threshold": self.threshold,
            "calibration": self.calibration,
            "roots": m["roots"],
            "bytes_on_disk": disk,
            "created": m["created"],
            "updated": m["updated"],
            **self.stats(),
        }


# ---------------------------------------------------------------------------------------------------------
# Building from images: chunked, resumable, shardable over torchrun ranks
# ---------------------------------------------------------------------------------------------------------


@dataclass
class BuildOptions:
    """How :func:`build_index` embeds and stores a gallery."""

    index_type: str = "auto"
    factory: str | None = None
    nprobe: int | None = None
    chunk_size: int = 512  # images per resumable unit; a killed build redoes at most one chunk per rank
    batch_size: int = 64
    num_workers: int = 0
    overwrite: bool = False
    progress: bool = False
    calibrate: bool = True


def _plan_digest(plan: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def _chunk_path(build: Path, c: int) -> Path:
    return build / f"chunk-{c:06d}.npz"


def _write_chunk(path: Path, features: np.ndarray, ok: list[int], failures: list[tuple[int, str]]) -> None:
    import io

    buf = io.BytesIO()
    np.savez(
        buf, features=features.astype(np.float32), ok=np.asarray(ok, np.int64), failures=np.array(json.dumps(failures))
    )
    atomic_write_bytes(path, buf.getvalue())


def _read_chunk(path: Path, dim: int) -> tuple[np.ndarray, np.ndarray, list] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            feats, ok, failures = z["features"], z["ok"], json.loads(str(z["failures"]))
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None  # damaged chunk (cannot happen with atomic writes, but then: redo it)
    if feats.ndim != 2 or feats.shape[1] != dim or len(feats) != len(ok):
        return None
    return feats, ok, failures


def build_index(
    embedder: Embedder,
    source: GallerySource,
    out: str | Path,
    options: BuildOptions | None = None,
    *,
    checkpoint: str | Path | None = None,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Embed a gallery in resumable chunks and publish it as an index at ``out``.

    Chunk ``c`` is embedded by rank ``c % world_size`` and written atomically to ``out/.build``; a rerun of
    the same build skips finished chunks. After a barrier rank 0 merges the chunks (in gallery order, so
    ids do not depend on the number of ranks), trains and publishes the index, calibrates the threshold
    when labels allow, and removes ``.build``. Returns a summary (rank 0) or the rank's own counts.
    """
    opt = options or BuildOptions()
    out = Path(out)
    barrier = barrier or (lambda: None)
    t0 = time.time()
    if is_index(out) and not opt.overwrite:
        raise AlreadyExistsError(
            f"{out} already holds an index: add to it with `reid_ssl index add`, or rebuild with --overwrite"
        )
    info = embedder_info(embedder, checkpoint)
    build = out / BUILD_DIR
    plan = {
        "format": BUILD_FORMAT,
        "fingerprint": info["fingerprint"],
        "chunk_size": opt.chunk_size,
        "items": [dataclasses.asdict(it) for it in source.items],
    }
    digest = _plan_digest(plan)
    n_chunks = math.ceil(len(source.items) / opt.chunk_size)
    lock = None
    discarded = False
    if rank == 0:
        lock = WriterLock(out).acquire()
    try:
        if rank == 0:
            old = build / "plan.json"
            if old.is_file():
                try:
                    same = json.loads(old.read_text()).get("digest") == digest
                except (OSError, json.JSONDecodeError):
                    same = False
                if not same:
                    shutil.rmtree(build)
                    discarded = True
            build.mkdir(parents=True, exist_ok=True)
            if not old.is_file():
                atomic_write_bytes(
                    old,
                    json.dumps(
                        {
                            "digest": digest,
                            "n_items": len(source.items),
                            "chunk_size": opt.chunk_size,
                            "created": _now(),
                        }
                    ).encode(),
                )
        barrier()
        if json.loads((build / "plan.json").read_text()).get("digest") != digest:
            raise RuntimeError(f"rank {rank}: gallery list differs from rank 0's (same --images on every rank?)")

        # ---- embed this rank's chunks -------------------------------------------------------------------
        mine = [c for c in range(n_chunks) if c % world_size == rank]
        todo = [c for c in mine if _read_chunk(_chunk_path(build, c), embedder.feature_dim) is None]
        from tqdm import tqdm

        total = sum(min(opt.chunk_size, len(source.items) - c * opt.chunk_size) for c in mine)
        done = total - sum(min(opt.chunk_size, len(source.items) - c * opt.chunk_size) for c in todo)
        with tqdm(
            total=total,
            initial=done,
            desc=f"index build (rank {rank})" if world_size > 1 else "index build",
            unit="img",
            disable=not opt.progress,
        ) as bar:
            for c in todo:
                chunk = source.items[c * opt.chunk_size : (c + 1) * opt.chunk_size]
                res = embedder.embed_images(
                    [it.path for it in chunk], batch_size=opt.batch_size, num_workers=opt.num_workers
                )
                _write_chunk(_chunk_path(build, c), res.features, res.ok, res.failures)
                bar.update(len(chunk))
        barrier()
        if rank != 0:
            barrier()  # wait until rank 0 published
            return {"rank": rank, "chunks": len(mine), "embedded_chunks": len(todo)}

        # ---- merge (rank 0) -----------------------------------------------------------------------------
        feats, items, failures = [], [], []
        for c in range(n_chunks):
            got = _read_chunk(_chunk_path(build, c), embedder.feature_dim)
            if got is None:
                raise RuntimeError(f"chunk {c} of {n_chunks} is missing: rank {c % world_size} did not finish")
            f, ok, fails = got
            feats.append(f)
            items.extend(source.items[c * opt.chunk_size + int(i)] for i in ok)
            failures.extend((source.items[c * opt.chunk_size + int(i)].path, reason) for i, reason in fails)
        features = np.concatenate(feats) if feats else np.zeros((0, embedder.feature_dim), np.float32)
        if not len(features):
            raise DatasetLayoutError(f"none of the {len(source.items)} images could be read: {failures[:3]}")
        idx = GalleryIndex.create(info, opt.index_type, factory=opt.factory, nprobe=opt.nprobe)
        idx.add(features, items)
        idx.add_roots(*source.roots)
        calibration: dict[str, Any] | str | None = None
        if opt.calibrate:
            calibration = _calibrate_for_build(idx, embedder, source, opt)
        # publish on top of whatever is there (--overwrite), under the lock we already hold
        idx.path, idx._base_generation, idx._lock = out, current_generation(out), lock
        idx.save(out)
        shutil.rmtree(build, ignore_errors=True)
        result = {
            "out": str(out),
            "n_images": len(source.items),
            "n_indexed": idx.ntotal,
            "n_failed": len(failures),
            "failures": failures[:50],
            "skipped": source.skipped[:50],
            "n_skipped": len(source.skipped),
            "chunks": n_chunks,
            "resumed_chunks": n_chunks - len(todo) if world_size == 1 else None,
            "embedded_chunks": len(todo),
            "discarded_unfinished_build": discarded,
            "world_size": world_size,
            "index_type": idx.manifest["index"]["type"],
            "factory": idx.manifest["index"]["factory"],
            "threshold": idx.threshold,
            "calibration": calibration,
            "seconds": round(time.time() - t0, 2),
        }
        barrier()
        return result
    finally:
        if lock is not None:
            lock.release()


def _calibrate_for_build(
    idx: GalleryIndex, embedder: Embedder, source: GallerySource, opt: BuildOptions
) -> dict[str, Any] | str:
    """Queries when the source has them (Market layout), else leave-one-out; a reason string if impossible."""
    try:
        if source.queries:
            res = embedder.embed_images(
                [q.path for q in source.queries], batch_size=opt.batch_size, num_workers=opt.num_workers
            )
            idx.manifest["queries"] = str(Path(source.queries[0].path).parent)
            return idx.calibrate(res.features, [source.queries[i] for i in res.ok])
        return idx.calibrate()
    except ValueError as e:
        return f"not calibrated: {e}"
