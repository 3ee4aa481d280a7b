"""An index folder on disk: atomic generations, ``CURRENT``, the writer lock and fsync'd files.

One index is one folder::

    IDX/
      CURRENT            "gen-00000007": the published generation, replaced atomically (os.replace)
      gen-00000007/      never modified once published
        manifest.json    format, embedder fingerprint + preprocess, index type/factory/params, counts, calibration
        index.faiss      the FAISS index with the stable ids (IDMap2 or IVF lists), inner product on unit vectors
        ids.npy          (n,) int64, ascending: the stable ids (never reused after a removal)
        vectors.npy      (n, D) float32 unit features, row i <-> ids[i] (read with mmap, loaded without pickle)
        items.sqlite     one row per id (see :mod:`reid_ssl.index.sidecar`)
      gen-00000006/      the previous generation, kept for a reader that raced the last save
      .lock              writers hold flock(LOCK_EX) on it while they load-modify-save
      .build/            plan + per-chunk features of an unfinished `build` (see :mod:`reid_ssl.index.build`)

Readers never lock: they read ``CURRENT`` and open an immutable generation, so they never see a half-written
index. :func:`publish` writes ``.tmp-gen-*``, fsyncs every file, renames it to ``gen-N`` and only then replaces
``CURRENT``; a crash or SIGKILL at any point leaves the previous generation published and loadable.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from reid_ssl.errors import IndexFormatError, IndexLockedError, MissingFileError
from reid_ssl.fileio import atomic_write_bytes, fsync_path, json_text
from reid_ssl.index import ondisk

FORMAT = "reid_ssl.index"
# 2: camera ids are 0-based (file name c1 = camid 0); non-UTF-8 paths are stored as their bytes.
FORMAT_VERSION = 2
CURRENT = "CURRENT"
LOCK_FILE = ".lock"
BUILD_DIR = ".build"
FILES = ("manifest.json", "index.faiss", "ids.npy", "vectors.npy", "items.sqlite")
MANIFEST_KEYS = frozenset({"dim", "ntotal", "next_id", "embedder", "index"})

_GEN_RE = re.compile(r"^gen-(\d{8})$")


def now() -> str:
    """The current UTC time, ISO 8601 to the second (manifest dates)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------------
# fsync'd writes
# ---------------------------------------------------------------------------------------------------------


def write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file and fsync it (inside a generation that is not published yet)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_faiss(path: Path, index: faiss.Index) -> None:
    """``faiss.write_index`` through a Python file, so a full disk raises OSError with its errno."""
    with open(path, "wb") as f:
        # PyCallbackIOWriter/Reader exist (SWIG) but faiss's stubs do not declare them
        faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))  # type: ignore[attr-defined]
        f.flush()
        os.fsync(f.fileno())


def read_faiss(path: Path) -> faiss.Index:
    """``faiss.read_index`` through a Python file (FAISS's own path argument refuses non-UTF-8 names)."""
    with open(path, "rb") as f:
        return faiss.read_index(faiss.PyCallbackIOReader(f.read))  # type: ignore[attr-defined]  # as above


def save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` without pickle, fsynced."""
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------------------
# The writer lock
# ---------------------------------------------------------------------------------------------------------


class WriterLock:
    """An exclusive ``flock`` on ``IDX/.lock``: one writer at a time, across processes and threads.

    The lock dies with its holder (a SIGKILLed writer never leaves a stale lock). The holder's pid is
    written into the file for error messages only.

    Args:
        folder: the index folder (created if missing).
        timeout: seconds to wait for another writer before :class:`IndexLockedError`.
    """

    def __init__(self, folder: str | Path, timeout: float = 60.0) -> None:
        self.path = Path(folder) / LOCK_FILE
        self.timeout = timeout
        self._fd: int | None = None

    def acquire(self) -> WriterLock:
        """Take the lock, waiting up to ``timeout`` seconds.

        Raises:
            IndexLockedError: another process held it for the whole timeout (the message names its pid).
        """
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
        """Release the lock (no-op when not held)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------------------
# CURRENT and generations
# ---------------------------------------------------------------------------------------------------------


def read_current(folder: Path) -> str | None:
    """The published generation's folder name (``gen-00000007``), or ``None`` when there is no ``CURRENT``.

    Raises:
        IndexFormatError: ``folder`` is a file, or ``CURRENT`` names something else than a generation.
    """
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
    name = read_current(Path(folder))
    return int(name[4:]) if name else 0


def is_index(folder: str | Path) -> bool:
    """Whether ``folder`` has a ``CURRENT`` file (a published index, possibly of another format)."""
    return (Path(folder) / CURRENT).is_file()


def missing_index_error(folder: Path) -> MissingFileError:
    """The error for a folder without a published index: not there at all, or no ``CURRENT`` in it."""
    if not folder.exists():
        return MissingFileError(f"index not found: {folder}")
    return MissingFileError(
        f"{folder} holds no reid_ssl index (no {CURRENT} file); build one with `reid_ssl index build`"
    )


def read_manifest(folder: Path, gen: Path) -> dict[str, Any]:
    """The manifest of generation folder ``gen``, checked for format and version (never unpickled).

    Raises:
        FileNotFoundError: the generation was collected meanwhile (the caller reads ``CURRENT`` again).
        IndexFormatError: not JSON, not a reid_ssl index, keys missing, file sizes that do not match, a newer
            format, or format 1 (1-based camera ids: the message says how to rebuild).
    """
    try:
        manifest = json.loads((gen / "manifest.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # e.g. a pickle in its place: never unpickled
        raise IndexFormatError(f"{gen / 'manifest.json'} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{folder} is not a reid_ssl index (no '{FORMAT}' manifest)")
    missing = MANIFEST_KEYS - set(manifest)
    if missing:
        raise IndexFormatError(f"{gen / 'manifest.json'} lacks {sorted(missing)} (damaged or hand-edited?)")
    check_version(folder, manifest)
    for fname, size in manifest.get("files", {}).items():
        actual = (gen / fname).stat().st_size
        if actual != size:
            raise IndexFormatError(f"{gen / fname} has {actual} bytes, the manifest says {size} (damaged?)")
    return manifest


def check_version(folder: Path, manifest: dict[str, Any]) -> None:
    """Refuse formats this reid_ssl cannot read correctly.

    Raises:
        IndexFormatError: a newer format (upgrade reid_ssl), or format 1, whose sidecar stored the file name's
            1-based camera numbers where reid_ssl now uses 0-based camids (rebuild with ``--overwrite``).
    """
    try:
        version = int(manifest.get("format_version", 0))
    except (TypeError, ValueError):
        raise IndexFormatError(f"{folder}: format_version {manifest.get('format_version')!r} is not a number") from None
    if version > FORMAT_VERSION:
        raise IndexFormatError(
            f"{folder} has index format {version}, newer than this reid_ssl ({FORMAT_VERSION}); upgrade reid_ssl"
        )
    if version < FORMAT_VERSION:
        ckpt = (manifest.get("embedder") or {}).get("checkpoint") or "CHECKPOINT"
        raise IndexFormatError(
            f"{folder} has index format {version}, which stored camera numbers as in the file names (c1 = 1); "
            f"reid_ssl now stores 0-based camids (c1 = camid 0) and reads format {FORMAT_VERSION} only. Rebuild "
            f"it: reid_ssl index build --checkpoint {ckpt} --images <the same images> --out {folder} --overwrite"
        )


def collect_garbage(folder: Path, keep: tuple[int, ...]) -> None:
    """Delete old generations and temp folders of killed saves (the caller holds the lock)."""
    for p in folder.iterdir():
        m = _GEN_RE.match(p.name)
        if (m and int(m.group(1)) not in keep) or p.name.startswith(".tmp-gen-"):
            shutil.rmtree(p, ignore_errors=True)


def write_generation(folder: Path, generation: int, write_files: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Write generation ``generation`` and publish it by replacing ``CURRENT`` (the commit point).

    Args:
        write_files: writes every file of :data:`FILES` but the manifest into the given temp folder and
            returns the manifest to store (``generation``, ``updated`` and file sizes are added here).

    Returns:
        The manifest as written.
    """
    name = f"gen-{generation:08d}"
    tmp = folder / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        manifest = dict(write_files(tmp), generation=generation, updated=now())
        manifest["files"] = {f: (tmp / f).stat().st_size for f in FILES if f != "manifest.json"}
        write_file(tmp / "manifest.json", json_text(manifest, indent=1).encode())
        fsync_path(tmp)
        os.rename(tmp, folder / name)
        fsync_path(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_bytes(folder / CURRENT, f"{name}\n".encode())  # the commit point
    return manifest


def publish(folder: Path, published: int, write_files: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Publish generation ``published + 1`` of ``folder`` (the caller holds the lock and checked staleness).

    Garbage of killed saves is collected first, generations older than the previous one after.

    Returns:
        The manifest as written (its ``generation`` is the new number).

    Raises:
        OSError: the disk refused (full, read-only); the message says that ``published`` is unchanged.
    """
    generation = published + 1
    # a save killed between its rename and CURRENT left gen-N unpublished: it is garbage now
    collect_garbage(folder, keep=(published, published - 1))
    try:
        manifest = write_generation(folder, generation, write_files)
    except OSError as e:  # full disk, read-only, quota: say so, and that nothing was lost
        message = (
            f"could not save the index to {folder} ({e.strerror or e}); generation {published} "
            "is still the published one, unchanged"
        )
        raise (OSError(e.errno, message) if e.errno is not None else OSError(message)) from e
    collect_garbage(folder, keep=(generation, generation - 1))
    return manifest


def generation_bytes(folder: Path) -> int:
    """Bytes on disk of the published generation (0 when none)."""
    name = read_current(folder)
    return sum(p.stat().st_size for p in (folder / name).iterdir() if p.is_file()) if name else 0


def read_arrays(
    gen: Path, manifest: dict[str, Any], mmap: bool
) -> tuple[faiss.Index | None, ondisk.MappedFile | None, np.ndarray, np.ndarray]:
    """The FAISS index, its mapped file, ids ``(n,)`` int64 and vectors ``(n, D)`` float32 of generation ``gen``.

    Args:
        mmap: map ``vectors.npy`` read-only instead of reading it into memory, and the inverted lists of an
            index built ``on_disk`` (see :mod:`reid_ssl.index.ondisk`; the mapped file is returned, else None).

    Raises:
        FileNotFoundError: a file is missing (the generation was collected meanwhile, or it is incomplete).
        IndexFormatError: a file that cannot be read (a pickle, damage) or whose shape does not fit the manifest.
    """
    index, mapped = None, None
    try:
        if manifest["ntotal"] and mmap and manifest["index"].get("on_disk"):
            index, mapped = ondisk.read_mapped(gen / "index.faiss")
        elif manifest["ntotal"]:
            index = read_faiss(gen / "index.faiss")
        ids = np.load(gen / "ids.npy", allow_pickle=False)
        vectors = np.load(gen / "vectors.npy", allow_pickle=False, mmap_mode="r" if mmap else None)
        _check_arrays(gen, manifest, index, ids, vectors)
    except BaseException as e:
        if mapped is not None:
            mapped.close()
        if isinstance(e, (FileNotFoundError, IndexFormatError)) or not isinstance(
            e, (RuntimeError, ValueError, OSError)
        ):
            raise
        raise IndexFormatError(f"{gen}: cannot read the index files ({str(e).splitlines()[0][:200]})") from None
    return index, mapped, ids, vectors


def _check_arrays(
    gen: Path, manifest: dict[str, Any], index: faiss.Index | None, ids: np.ndarray, vectors: np.ndarray
) -> None:
    """Raise unless the arrays fit the manifest and the item table exists."""
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
