"""Loading and saving a :class:`~reid_ssl.index.gallery.GalleryIndex` on top of :mod:`reid_ssl.index.store`.

Readers :meth:`~PersistenceMixin.load` the published generation without a lock. A writer saves only on top of
the generation it loaded (else :class:`StaleIndexError`), so two writers cannot lose each other's updates;
:meth:`~PersistenceMixin.open_for_update` holds the lock across load, modify and save. An index created with
``on_disk=True`` serves its IVF lists memory-mapped from the generation's files (:mod:`reid_ssl.index.ondisk`)
once it has been saved.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from reid_ssl.errors import IndexFormatError, StaleIndexError
from reid_ssl.index import ondisk, store
from reid_ssl.index.sidecar import Sidecar
from reid_ssl.index.types import INDEX_TYPES

if TYPE_CHECKING:
    import faiss

_G = TypeVar("_G", bound="PersistenceMixin")


class PersistenceMixin:
    """The load and save methods of :class:`~reid_ssl.index.gallery.GalleryIndex` (which holds the state)."""

    manifest: dict[str, Any]
    path: Path | None
    dirty: bool
    _index: faiss.Index | None
    _mapped: ondisk.MappedFile | None
    _ids: np.ndarray
    _vectors: np.ndarray
    _sidecar: Sidecar
    _base_generation: int
    _lock: store.WriterLock | None
    _gpu_index: faiss.Index | None
    _gpu_tried: bool

    if TYPE_CHECKING:  # GalleryIndex's constructor (manifest, index, ids, vectors, sidecar, path, mapped) and size

        def __init__(self, *args: Any, **kwargs: Any) -> None: ...
        @property
        def ntotal(self) -> int: ...

    # --- reading --------------------------------------------------------------------------------------

    @classmethod
    def load(cls: type[_G], folder: str | Path, *, mmap: bool = True, retries: int = 3) -> _G:
        """Open the published generation of ``folder`` (no lock; never a half-written state).

        Raises:
            MissingFileError: no index there.
            IndexFormatError: wrong, newer or older format (format 1: rebuild), or damaged files.
        """
        folder = Path(folder)
        for attempt in range(retries + 1):
            name = store.read_current(folder)
            if name is None:
                raise store.missing_index_error(folder)
            try:
                return cls._load_generation(folder, folder / name, mmap)
            except FileNotFoundError:
                if attempt == retries or store.read_current(folder) == name:
                    raise IndexFormatError(f"{folder / name} is incomplete (missing files)") from None
                # a writer published a newer generation and collected ours meanwhile: read CURRENT again
        raise AssertionError("unreachable")

    @classmethod
    def _load_generation(cls: type[_G], folder: Path, gen: Path, mmap: bool = True) -> _G:
        manifest = store.read_manifest(folder, gen)
        kind = manifest["index"].get("type") if isinstance(manifest["index"], dict) else "?"
        if kind is not None and kind not in INDEX_TYPES:
            raise IndexFormatError(f"{folder} has index type {kind!r}, which this reid_ssl does not know")
        index, mapped, ids, vectors = store.read_arrays(gen, manifest, mmap)
        return cls(manifest, index, ids, vectors, Sidecar.open_readonly(gen / "items.sqlite"), folder, mapped)

    @classmethod
    @contextlib.contextmanager
    def open_for_update(cls: type[_G], folder: str | Path, timeout: float = 60.0) -> Iterator[_G]:
        """Lock, load the newest generation, yield it, save it if changed, unlock (the writer's pattern).

        Raises:
            IndexLockedError: another writer held the lock for ``timeout`` seconds.
        """
        if not store.is_index(folder):
            cls.load(folder)  # raises "not found" / "no index" before the lock could create the folder
        lock = store.WriterLock(folder, timeout).acquire()
        try:
            idx = cls.load(folder)
            idx._lock = lock
            yield idx
            if idx.dirty:
                idx.save()
        finally:
            lock.release()

    # --- writing --------------------------------------------------------------------------------------

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
        own_lock = None if lock else store.WriterLock(folder).acquire()
        try:
            published = store.current_generation(folder)
            same_place = self.path is not None and folder.resolve() == self.path.resolve()
            if not force and published != (self._base_generation if same_place else 0):
                raise StaleIndexError(
                    f"{folder} is at generation {published}, this copy was loaded at "
                    f"{self._base_generation if same_place else 'none'}: another writer saved meanwhile; "
                    "reload and redo the change (or use GalleryIndex.open_for_update)"
                )
            self.manifest = store.publish(folder, published, self._write_files)
        finally:
            if own_lock is not None:
                own_lock.release()
        self.path, self._base_generation, self.dirty = folder, int(self.manifest["generation"]), False
        if self.manifest["index"].get("on_disk") and self._mapped is None and ondisk.has_lists(self._index):
            self._map_saved(folder / f"gen-{self._base_generation:08d}")
        return folder

    def _map_saved(self, gen: Path) -> None:
        """Serve from the generation just written: its lists and vectors mapped, the copies in RAM dropped."""
        index, mapped = ondisk.read_mapped(gen / "index.faiss")
        vectors = np.load(gen / "vectors.npy", allow_pickle=False, mmap_mode="r")
        self._index, self._mapped, self._vectors = index, mapped, vectors
        self._gpu_index, self._gpu_tried = None, False

    def _write_files(self, tmp: Path) -> dict[str, Any]:
        """Write the FAISS index, ids, vectors and item table into ``tmp``; return the manifest to store."""
        if self._mapped is not None:  # lists unchanged since the load: link the mapped file, no rewrite
            ondisk.copy_mapped(self._mapped, tmp / "index.faiss")
        elif self._index is not None and self.ntotal:
            store.write_faiss(tmp / "index.faiss", self._index)
        else:
            store.write_file(tmp / "index.faiss", b"")
        store.save_npy(tmp / "ids.npy", self._ids)
        store.save_npy(tmp / "vectors.npy", np.asarray(self._vectors, np.float32))
        self._sidecar.save(tmp / "items.sqlite")
        return dict(self.manifest, ntotal=self.ntotal)
