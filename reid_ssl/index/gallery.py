"""The gallery index: FAISS over L2-normalised features, stable ids, an SQLite item table, atomic saves.

:class:`GalleryIndex` holds the state and ties the parts together: the index type (:mod:`reid_ssl.index.types`)
and its FAISS build (:mod:`reid_ssl.index.factory`), the item table (:mod:`reid_ssl.index.sidecar`), searches
(:mod:`reid_ssl.index.search`), loading and saving generations (:mod:`reid_ssl.index.persistence` on top of
:mod:`reid_ssl.index.store`) and the "no match" threshold (:mod:`reid_ssl.index.calibration`).

faiss-gpu is used for unfiltered searches when it is installed and a GPU is visible. An index created with
``on_disk=True`` serves its IVF lists memory-mapped from the generation's files (:mod:`reid_ssl.index.ondisk`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from reid_ssl.index import manifest as manifest_
from reid_ssl.index import ondisk, store
from reid_ssl.index.calibration import calibrate_gallery
from reid_ssl.index.factory import build_faiss, check_factory, check_on_disk, choose_spec, should_rebuild
from reid_ssl.index.persistence import PersistenceMixin
from reid_ssl.index.search import SearchMixin, gpu_available, unit_features
from reid_ssl.index.sidecar import GalleryItem, Sidecar
from reid_ssl.index.types import AUTO, INDEX_TYPES, IndexSpec, IndexType, resolve_type

if TYPE_CHECKING:
    from reid_ssl.embedder import Embedder


class GalleryIndex(SearchMixin, PersistenceMixin):
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
        sidecar: Sidecar,
        path: Path | None,
        mapped: ondisk.MappedFile | None = None,
    ) -> None:
        self.manifest = manifest
        self._index = index
        self._mapped = mapped  # the file whose inverted lists self._index maps, unchanged (None: lists in RAM)
        self._ids = ids
        self._vectors = vectors
        self._sidecar = sidecar
        self.path = path
        self._base_generation = int(manifest.get("generation", 0))
        self._lock: store.WriterLock | None = None
        self._gpu_index: faiss.Index | None = None
        self._gpu_tried = False
        self.dirty = False

    # --- construction --------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        embedder: dict[str, Any] | Embedder,
        index_type: str = AUTO,
        *,
        factory: str | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        use_gpu: bool = True,
        on_disk: bool = False,
    ) -> GalleryIndex:
        """An empty index for features of one embedder (an :class:`Embedder` or :func:`embedder_info`).

        Args:
            on_disk: serve the IVF inverted lists memory-mapped from the saved generation instead of reading
                them into RAM (galleries bigger than RAM; see :mod:`reid_ssl.index.ondisk`). Applies whenever
                the built index has lists (an exact index of a gallery too small to train has none).

        Raises:
            UnknownNameError: ``index_type`` is neither ``auto`` nor in :data:`INDEX_TYPES`.
            InputError: FAISS cannot build ``factory``; ``on_disk`` for a type or factory without inverted lists.
        """
        info = embedder if isinstance(embedder, dict) else manifest_.embedder_info(embedder)
        resolve_type(index_type, 0)
        if factory:
            check_factory(factory, int(info["feature_dim"]))
        if on_disk:
            check_on_disk(index_type, factory)
        manifest = manifest_.new_manifest(
            info,
            {
                "requested": index_type,
                "factory_override": factory,
                "nprobe_override": nprobe,
                "ef_search_override": ef_search,
                "use_gpu": use_gpu,
                "on_disk": on_disk,
            },
        )
        dim = manifest["dim"]
        return cls(manifest, None, np.zeros(0, np.int64), np.zeros((0, dim), np.float32), Sidecar.new(), None)

    # --- properties -----------------------------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        """Items in the index."""
        return len(self._ids)

    @property
    def generation(self) -> int:
        """The generation this copy was loaded from or last saved as (0: never saved)."""
        return self._base_generation

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return int(self.manifest["dim"])

    @property
    def ids(self) -> np.ndarray:
        """(n,) int64 stable ids, ascending (a copy)."""
        return self._ids.copy()

    @property
    def vectors(self) -> np.ndarray:
        """(n, D) unit features in id order (read-only view)."""
        v = self._vectors.view()
        v.flags.writeable = False
        return v

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the embedder that built the index."""
        return str(self.manifest["embedder"]["fingerprint"])

    @property
    def calibration(self) -> dict[str, Any] | None:
        """The stored calibration (see :func:`~reid_ssl.index.calibration.calibrate_threshold`), or None."""
        return self.manifest.get("calibration")

    @property
    def threshold(self) -> float | None:
        """The calibrated no-match threshold; None when uncalibrated or the calibration is unreliable."""
        cal = self.calibration
        return None if cal is None or cal.get("reliable") is False else float(cal["threshold"])

    @property
    def spec(self) -> IndexSpec | None:
        """The FAISS index built now (``None`` before the first add)."""
        return manifest_.built_spec(self.manifest)

    @property
    def lists_on_disk(self) -> bool:
        """Whether the inverted lists are served memory-mapped from the generation's ``index.faiss`` now."""
        return self._mapped is not None

    @property
    def index_type(self) -> IndexType | None:
        """The :data:`INDEX_TYPES` entry of the FAISS index built now."""
        m = self.manifest["index"]
        return None if m["type"] is None else INDEX_TYPES[m["type"]]

    def check_embedder(self, embedder: Embedder) -> None:
        """Raise :class:`EmbedderMismatchError` unless ``embedder`` is the one that built this index."""
        manifest_.check_embedder(self.manifest, embedder, self.path)

    # --- metadata (see Sidecar) -----------------------------------------------------------------------

    def items(self, ids: Sequence[int] | np.ndarray) -> dict[int, dict[str, Any]]:
        """Metadata rows for ``ids`` as ``{id: {column: value}}`` (missing ids are absent)."""
        return self._sidecar.items(ids)

    def ids_where(self, **equals: Any) -> np.ndarray:
        """Ids whose metadata columns equal the given values, e.g. ``ids_where(camid=0)``."""
        return self._sidecar.ids_where(**equals)

    def ids_for_paths(self, paths: Sequence[str]) -> dict[str, int]:
        """``{path: id}`` for the paths that are indexed."""
        return self._sidecar.ids_for_paths(paths)

    def duplicates(self, paths: Sequence[str]) -> list[bool]:
        """For each path, whether adding it would duplicate an item: the path is indexed already, or comes
        earlier in ``paths``. The one duplicate rule of ``index add`` and of the app's gallery uploads (whose
        files are named by their content, so the same image uploaded again has the same path)."""
        known = set(self.ids_for_paths(list(paths)))
        seen: set[str] = set()
        out = []
        for p in paths:
            out.append(p in known or p in seen)
            seen.add(p)
        return out

    def ids_under(self, folder: str | Path) -> list[int]:
        """Ids of the items whose file is ``folder`` or lies under it (``folder`` is resolved)."""
        return self._sidecar.ids_under(str(Path(folder).resolve()))

    def stats(self) -> dict[str, Any]:
        """Counts for people: items, identities, cameras (0-based camids), sources."""
        return self._sidecar.stats()

    # --- mutation -------------------------------------------------------------------------------------

    def _rebuild(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """(Re)build the FAISS index from scratch for these vectors: choose the spec, train on a sample, add."""
        self._gpu_index, self._gpu_tried = None, False
        self._release_mapped()
        if len(ids) == 0:
            self._index = None
            return
        m = self.manifest["index"]
        spec = choose_spec(m, len(ids), self.dim)
        self._index = build_faiss(spec, vectors, ids)
        m.update(
            type=spec.type,
            factory=spec.factory,
            nprobe=spec.nprobe,
            ef_search=spec.ef_search,
            rerank=spec.rerank,
            trained_on=len(ids),
        )

    def add(
        self, features: np.ndarray, items: Sequence[GalleryItem | dict[str, Any]], added: float | None = None
    ) -> np.ndarray:
        """Add features with one metadata item each.

        Args:
            features: (n, D) or (D,) features (normalised here).
            items: one :class:`GalleryItem` (or dict of its fields) per row.
            added: Unix time in seconds to record (default: now).

        Returns:
            (n,) int64 new stable ids.

        Raises:
            ValueError: wrong shape, non-finite values, or a count that differs from ``items``.
            InputError: FAISS cannot train the requested factory on these vectors.
        """
        feats = unit_features(features, self.dim)
        if len(feats) != len(items):
            raise ValueError(f"{len(feats)} features but {len(items)} items")
        if not len(feats):
            return np.zeros(0, np.int64)
        rows = [it if isinstance(it, GalleryItem) else GalleryItem(**it) for it in items]
        start = int(self.manifest["next_id"])
        new_ids = np.arange(start, start + len(feats), dtype=np.int64)
        all_ids = np.concatenate([self._ids, new_ids])
        all_vecs = np.concatenate([np.asarray(self._vectors), feats]) if self.ntotal else feats
        if self._index is None or should_rebuild(self.manifest["index"], len(all_ids), self.dim):
            self._rebuild(all_vecs, all_ids)
        else:
            self._lists_in_ram()
            self._index.add_with_ids(feats, new_ids)
            self._gpu_index, self._gpu_tried = None, False
        self._sidecar.insert(new_ids, rows, time.time() if added is None else added)
        self._ids, self._vectors = all_ids, all_vecs
        self.manifest["next_id"] = start + len(feats)
        self.manifest["ntotal"] = self.ntotal
        self.dirty = True
        return new_ids

    def remove(self, ids: Sequence[int] | np.ndarray) -> int:
        """Remove items by id; returns how many existed. Other ids never change.

        A type that cannot delete (HNSW, :attr:`IndexType.can_remove`) is rebuilt from the stored vectors.
        """
        ids = np.unique(np.asarray(ids, np.int64))
        present = ids[np.isin(ids, self._ids)]
        if not len(present):
            return 0
        keep = ~np.isin(self._ids, present)
        self._ids = self._ids[keep]
        self._vectors = np.ascontiguousarray(np.asarray(self._vectors)[keep])
        if self._index is None or not INDEX_TYPES[self.manifest["index"]["type"]].can_remove:
            self._rebuild(self._vectors, self._ids)
        else:
            self._lists_in_ram()
            removed = self._index.remove_ids(faiss.IDSelectorBatch(present))
            if removed != len(present):
                raise RuntimeError(f"FAISS removed {removed} of {len(present)} ids (index out of sync)")
            self._gpu_index, self._gpu_tried = None, False
        self._sidecar.delete(present)
        self.manifest["ntotal"] = self.ntotal
        self.dirty = True
        return len(present)

    def _lists_in_ram(self) -> None:
        """Before a change in place: copy mapped inverted lists into RAM (mapped lists are read-only)."""
        if self._mapped is not None:
            assert self._index is not None  # mapped lists belong to a loaded index
            ondisk.lists_in_ram(self._index)
            self._release_mapped()

    def _release_mapped(self) -> None:
        if self._mapped is not None:
            self._mapped.close()
            self._mapped = None

    def set_calibration(self, calibration: dict[str, Any] | None) -> None:
        """Store a calibration (``None`` removes it); saved with the next :meth:`save`."""
        self.manifest["calibration"] = calibration
        self.dirty = True

    def add_roots(self, *roots: str | Path) -> None:
        """Remember folders whose images this index may show (the app reads images only under them)."""
        for r in roots:
            r = str(Path(r).resolve())
            if r not in self.manifest["roots"]:
                self.manifest["roots"].append(r)
                self.dirty = True

    # --- calibration ----------------------------------------------------------------------------------

    def calibrate(
        self, query_features: np.ndarray | None = None, query_items: Sequence[GalleryItem] | None = None
    ) -> dict[str, Any]:
        """Calibrate the "no match" threshold from labelled data (see :func:`calibrate_gallery`) and store it.

        Args:
            query_features: (Q, D) features of labelled queries, each searched against the whole gallery;
                ``None``: leave-one-out over the gallery's own labelled items.
            query_items: the Q queries' items (pid, 0-based camid).

        Raises:
            InputError: the labels cannot give enough true and false matches.
        """
        g_pids, g_cams = self._sidecar.labels(self._ids)
        queries = None
        if query_features is not None:
            if query_items is None or len(query_items) != len(query_features):
                raise ValueError("query_features need one query item each")
            q_pids = np.array([-1 if it.pid is None else it.pid for it in query_items], np.int64)
            q_cams = np.array([-1 if it.camid is None else it.camid for it in query_items], np.int64)
            queries = (unit_features(query_features, self.dim), q_pids, q_cams)
        cal = {**calibrate_gallery(np.asarray(self._vectors), g_pids, g_cams, queries), "date": store.now()}
        self.set_calibration(cal)
        return cal

    # --- reporting ------------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Everything ``index info`` shows: size, type and parameters, embedder, calibration, statistics."""
        return {
            "path": str(self.path) if self.path else None,
            "generation": self._base_generation,
            "ntotal": self.ntotal,
            **manifest_.describe(self.manifest),
            "gpu": self._gpu_index is not None,
            "lists_on_disk": self.lists_on_disk,
            "gpu_available": gpu_available(),
            "threshold": self.threshold,
            "bytes_on_disk": store.generation_bytes(self.path) if self.path is not None else 0,
            **self.stats(),
        }
