"""The persistent FAISS gallery index, one module per job.

* :mod:`~reid_ssl.index.gallery`: :class:`GalleryIndex`, add / remove / search / calibrate / save / load.
* :mod:`~reid_ssl.index.types`: :data:`INDEX_TYPES`, the registry of FAISS index types, and ``auto``.
* :mod:`~reid_ssl.index.sizing`: index parameters by gallery size (IVF lists, ``nprobe``, PQ codes, HNSW).
* :mod:`~reid_ssl.index.factory`: the FAISS index of a spec (checks, training, adding), when to rebuild it.
* :mod:`~reid_ssl.index.persistence`: :meth:`GalleryIndex.load`, ``open_for_update`` and ``save``.
* :mod:`~reid_ssl.index.search`: search results (:class:`Hits`, :class:`SearchHit`, :class:`Shortfall`).
* :mod:`~reid_ssl.index.sidecar`: the SQLite item table (:class:`GalleryItem`).
* :mod:`~reid_ssl.index.store`: generations on disk, ``CURRENT``, the writer lock.
* :mod:`~reid_ssl.index.manifest`: what an index remembers (embedder identity, type, counts).
* :mod:`~reid_ssl.index.calibration`: the "no match" threshold.
* :mod:`~reid_ssl.index.sources`: what to index (data sets, folders, files).
* :mod:`~reid_ssl.index.build`: resumable, torchrun-sharded builds.

Camera ids are 0-based everywhere (file name ``c1`` is camid 0).

Names are loaded on first use (:pep:`562`): ``import reid_ssl.index.types`` for the command line's ``--type``
choices does not load FAISS, the sidecar or the embedder.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reid_ssl.errors import EmbedderMismatchError, IndexFormatError, IndexLockedError, StaleIndexError
    from reid_ssl.index.build import BuildOptions, build_index
    from reid_ssl.index.calibration import calibrate_threshold, describe_calibration, open_set_scores
    from reid_ssl.index.gallery import GalleryIndex
    from reid_ssl.index.manifest import embedder_info
    from reid_ssl.index.search import Hits, SearchHit, Shortfall, gpu_available, omp_threads
    from reid_ssl.index.sidecar import GalleryItem, display_path
    from reid_ssl.index.sources import GallerySource, folder_items, gallery_source, market_fields, path_items
    from reid_ssl.index.store import FORMAT_VERSION, WriterLock, current_generation, is_index
    from reid_ssl.index.types import AUTO_FLAT_MAX, INDEX_TYPES, IndexSpec, IndexType, index_spec, type_choices

# where each public name lives (the TYPE_CHECKING imports above, for the loader below)
_EXPORTS = {
    "reid_ssl.errors": ("EmbedderMismatchError", "IndexFormatError", "IndexLockedError", "StaleIndexError"),
    "reid_ssl.index.build": ("BuildOptions", "build_index"),
    "reid_ssl.index.calibration": ("calibrate_threshold", "describe_calibration", "open_set_scores"),
    "reid_ssl.index.gallery": ("GalleryIndex",),
    "reid_ssl.index.manifest": ("embedder_info",),
    "reid_ssl.index.search": ("Hits", "SearchHit", "Shortfall", "gpu_available", "omp_threads"),
    "reid_ssl.index.sidecar": ("GalleryItem", "display_path"),
    "reid_ssl.index.sources": ("GallerySource", "folder_items", "gallery_source", "market_fields", "path_items"),
    "reid_ssl.index.store": ("FORMAT_VERSION", "WriterLock", "current_generation", "is_index"),
    "reid_ssl.index.types": ("AUTO_FLAT_MAX", "INDEX_TYPES", "IndexSpec", "IndexType", "index_spec", "type_choices"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
# the name reid_ssl.app.demo and reid_ssl.cli.app import: the item fields of a Market-style file name (a dict)
_ALIASES = {"parse_market_name": ("reid_ssl.index.sources", "market_fields")}

__all__ = [
    "AUTO_FLAT_MAX",
    "FORMAT_VERSION",
    "INDEX_TYPES",
    "BuildOptions",
    "EmbedderMismatchError",
    "GalleryIndex",
    "GalleryItem",
    "GallerySource",
    "Hits",
    "IndexFormatError",
    "IndexLockedError",
    "IndexSpec",
    "IndexType",
    "SearchHit",
    "Shortfall",
    "StaleIndexError",
    "WriterLock",
    "build_index",
    "calibrate_threshold",
    "current_generation",
    "describe_calibration",
    "display_path",
    "embedder_info",
    "folder_items",
    "gallery_source",
    "gpu_available",
    "index_spec",
    "is_index",
    "market_fields",
    "omp_threads",
    "open_set_scores",
    "parse_market_name",
    "path_items",
    "type_choices",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (:pep:`562`)."""
    module, attr = _ALIASES.get(name) or (_HOME.get(name), name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
