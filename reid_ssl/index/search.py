"""What a search returns, and the FAISS plumbing around it: features, threads, the GPU, exact re-ranking.

:meth:`GalleryIndex.search` returns one :class:`Hits` per query: a list of :class:`SearchHit`, best first,
that also says when it holds fewer than the ``k`` results asked for and why (:class:`Shortfall`): the gallery
or the filters leave fewer items, or an approximate search visited too little of the index (IVF ``nprobe``,
HNSW ``efSearch``), with the setting that fixes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from reid_ssl.console import plural
from reid_ssl.errors import InputError
from reid_ssl.index.sidecar import COLUMNS, GalleryItem

if TYPE_CHECKING:
    from reid_ssl.embedder import Embedder
    from reid_ssl.index.types import IndexSpec, IndexType

DEFAULT_SEARCH_THREADS = 1  # OpenMP threads for small query batches (see GalleryIndex.search)


@dataclass(frozen=True, kw_only=True)
class SearchHit(GalleryItem):
    """One search result: the item's metadata (camid 0-based), its stable id and the cosine similarity.

    Attributes:
        id: the stable id; score: cosine similarity in [-1, 1]; added: when it was added (Unix time, seconds).
    """

    id: int
    score: float
    added: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON output)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Shortfall:
    """Why a search returned fewer than ``k`` results for one query.

    Attributes:
        k: results asked for; returned: results given.
        available: gallery items that pass the filters (the most any search could return).
        cause: ``"gallery"`` (the gallery holds fewer than k items), ``"filters"`` (the exclusions leave fewer),
            or the search setting that limited an approximate search: ``"nprobe"`` (IVF), ``"ef_search"`` (HNSW).
        message: the reason in words.
        setting: the :meth:`GalleryIndex.search` keyword that fixes it (``nprobe``, ``ef_search``), if any.
        current: that setting's value in this search; maximum: its largest useful value (IVF: the list count).
    """

    k: int
    returned: int
    available: int
    cause: str
    message: str
    setting: str | None = None
    current: int | None = None
    maximum: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON output)."""
        return dataclasses.asdict(self)


class Hits(list[SearchHit]):
    """The results of one query, best first (a plain list of :class:`SearchHit` to existing code).

    Attributes:
        k: results asked for.
        shortfall: ``None`` when ``len(hits) == k``, else why there are fewer.
    """

    def __init__(self, hits: Iterable[SearchHit] = (), k: int = 0, shortfall: Shortfall | None = None) -> None:
        super().__init__(hits)
        self.k = k
        self.shortfall = shortfall


def unit_features(x: np.ndarray, dim: int) -> np.ndarray:
    """``(n, dim)`` or ``(dim,)`` features -> a new contiguous ``(n, dim)`` float32 array of unit rows.

    Raises:
        ValueError: another shape, or NaN / inf values (programming errors of the caller).
    """
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


def gpu_available() -> bool:
    """Whether faiss-gpu is installed and sees a GPU (used for search when present, never required)."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def to_gpu(index: faiss.Index, nprobe: int | None) -> faiss.Index | None:
    """A GPU copy of ``index`` (with ``nprobe`` set), or ``None`` when the GPU cloner cannot take it."""
    try:
        gpu = faiss.index_cpu_to_all_gpus(index)
    except Exception as e:  # an index type the GPU cloner does not support: stay on the CPU
        warnings.warn(f"faiss-gpu could not take this index ({e}); searching on the CPU", stacklevel=3)
        return None
    if nprobe:
        faiss.GpuParameterSpace().set_index_parameter(gpu, "nprobe", int(nprobe))
    return gpu


def rerank(
    q: np.ndarray, labels: np.ndarray, k: int, ids: np.ndarray, vectors: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products for the candidates (PQ codes are approximate), from the stored vectors.

    Args:
        q: (Q, D) unit queries; labels: (Q, K') candidate ids, -1 for none; k: results to keep.
        ids: (n,) ascending stored ids; vectors: (n, D) stored unit vectors, row i <-> ids[i].

    Returns:
        ``(scores, labels)``, (Q, k) each, best first; -inf / -1 where fewer candidates existed.
    """
    out_s = np.full((len(q), k), -np.inf, np.float32)
    out_l = np.full((len(q), k), -1, np.int64)
    for r, (qv, cand) in enumerate(zip(q, labels, strict=True)):
        cand = cand[cand >= 0]
        if not len(cand):
            continue
        exact = np.asarray(vectors[np.searchsorted(ids, cand)]) @ qv
        order = np.argsort(-exact, kind="stable")[:k]
        out_s[r, : len(order)], out_l[r, : len(order)] = exact[order], cand[order]
    return out_s, out_l


def limit_shortfall(k: int, returned: int, available: int, ntotal: int, filters: str) -> Shortfall | None:
    """The shortfall that the gallery or the filters explain (``returned == available < k``), else None.

    Args:
        filters: the exclusions in words ("camid 0, 3 ids"), empty when none.
    """
    if returned >= k or returned < available:
        return None
    if available == ntotal:
        return Shortfall(k, returned, available, "gallery", f"the gallery holds only {plural(ntotal, 'item')}")
    return Shortfall(
        k,
        returned,
        available,
        "filters",
        f"only {available} of the gallery's {plural(ntotal, 'item')} pass the filters (excluded: {filters})",
    )


class SearchMixin:
    """The search methods of :class:`~reid_ssl.index.gallery.GalleryIndex` (they only read the index)."""

    manifest: dict[str, Any]
    _index: faiss.Index | None
    _ids: np.ndarray
    _vectors: np.ndarray
    _gpu_index: faiss.Index | None
    _gpu_tried: bool

    if TYPE_CHECKING:  # read-only properties of GalleryIndex

        @property
        def ntotal(self) -> int: ...
        @property
        def dim(self) -> int: ...
        @property
        def spec(self) -> IndexSpec | None: ...
        @property
        def index_type(self) -> IndexType | None: ...
        @property
        def lists_on_disk(self) -> bool: ...

    items: Callable[[Sequence[int] | np.ndarray], dict[int, dict[str, Any]]]
    ids_where: Callable[..., np.ndarray]
    check_embedder: Callable[[Embedder], None]

    def _gpu(self) -> faiss.Index | None:
        """A GPU copy of the index for unfiltered searches, when faiss-gpu and a GPU are present."""
        kind = self.index_type
        if self._gpu_tried or not self.manifest["index"].get("use_gpu", True) or not kind or not kind.on_gpu:
            return self._gpu_index
        if self._index is None or self.lists_on_disk:  # a GPU copy would need every list in GPU memory
            return None
        if not gpu_available():
            return None
        self._gpu_tried = True
        self._gpu_index = to_gpu(self._index, self.manifest["index"]["nprobe"])
        return self._gpu_index

    def _excluded(self, exclude_ids: Any, exclude_camid: int | None) -> tuple[np.ndarray, str]:
        """Ids to leave out, and the filters in words."""
        excluded = np.zeros(0, np.int64) if exclude_ids is None else np.asarray(exclude_ids, np.int64).ravel()
        words = [plural(len(np.unique(excluded)), "id")] if len(excluded) else []
        if exclude_camid is not None:
            excluded = np.concatenate([excluded, self.ids_where(camid=int(exclude_camid))])
            words.insert(0, f"camid {exclude_camid}")
        return excluded, ", ".join(words)

    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        *,
        exclude_ids: Sequence[int] | np.ndarray | None = None,
        exclude_camid: int | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        threads: int | None = None,
    ) -> list[Hits]:
        """Top-``k`` gallery items per query, best first, with their metadata.

        Args:
            queries: (Q, D) or (D,) features (normalised here).
            k: results per query, >= 1.
            exclude_ids: ids never returned (e.g. the query's own gallery entry).
            exclude_camid: drop gallery items of this 0-based camera id (the re-ID "other cameras only" rule).
            nprobe: IVF lists to visit (default: the index's); ignored by types without lists.
            ef_search: HNSW candidate list size (default: the index's); ignored by other types.
            threads: OpenMP threads; default one thread for up to 4 queries (single-query latency on a
                busy 2-core machine was 4x worse with 2 threads), FAISS's default for batches.

        Returns:
            One :class:`Hits` per query. A query with fewer than ``k`` results has ``hits.shortfall`` saying
            why: the gallery or the filters hold fewer items, or the search setting (``nprobe``,
            ``ef_search``) that would find more.

        Raises:
            ValueError: ``k``, ``nprobe`` or ``ef_search`` < 1, or queries of the wrong shape.
        """
        for name, value in (("k", k), ("nprobe", nprobe), ("ef_search", ef_search)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        q = unit_features(queries, self.dim)
        if self._index is None or self.ntotal == 0:
            return [Hits([], k, Shortfall(k, 0, 0, "gallery", "the gallery is empty")) for _ in q]
        excluded, filters = self._excluded(exclude_ids, exclude_camid)
        sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(excluded)) if len(excluded) else None
        spec, kind = self.spec, self.index_type
        assert spec is not None and kind is not None
        gpu = self._gpu() if sel is None and nprobe is None and ef_search is None else None
        if threads is None and len(q) <= 4:
            threads = DEFAULT_SEARCH_THREADS
        with omp_threads(threads):
            kk = min(self.ntotal, k * spec.rerank)
            if gpu is not None:
                scores, labels = gpu.search(q, kk)
            else:
                scores, labels = self._index.search(q, kk, params=kind.search_params(spec, sel, nprobe, ef_search))
        if spec.rerank > 1:
            scores, labels = rerank(q, labels, k, self._ids, self._vectors)
        scores = np.clip(scores, -1.0, 1.0)  # cosine similarities: float rounding can give 1.0000002
        meta = self.items(sorted({int(i) for i in labels[:, :k].ravel() if i >= 0}))
        available = self.ntotal - int(np.isin(self._ids, excluded).sum()) if len(excluded) else self.ntotal
        out: list[Hits] = []
        for srow, lrow in zip(scores, labels, strict=True):
            hits = [
                SearchHit(id=int(i), score=float(s), **{c: meta[int(i)][c] for c in COLUMNS[1:]})
                for s, i in zip(srow[:k], lrow[:k], strict=True)
                if i >= 0 and int(i) in meta
            ]
            short = None
            if len(hits) < k:
                short = limit_shortfall(k, len(hits), available, self.ntotal, filters) or self._missed(
                    k, len(hits), available, nprobe, ef_search
                )
            out.append(Hits(hits, k, short))
        return out

    def _missed(self, k: int, returned: int, available: int, nprobe: int | None, ef_search: int | None) -> Shortfall:
        """Why an approximate search returned fewer items than exist: the index type's search setting."""
        spec, kind = self.spec, self.index_type
        assert spec is not None and kind is not None and self._index is not None
        why = kind.shortfall(self._index, spec, nprobe, ef_search)
        if why is None:
            why = {"cause": "index", "message": f"the {spec.type} index returned only {returned} candidates"}
        return Shortfall(k, returned, available, **why)

    def search_exact(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force (scores, ids), (Q, k) each, from the stored vectors: the ground truth for tests."""
        q = unit_features(queries, self.dim)
        k = min(k, self.ntotal)
        sim = np.clip(q @ np.asarray(self._vectors).T, -1.0, 1.0)
        order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(sim, order, 1), self._ids[order]

    def search_embedded(self, embedder: Embedder, images: Sequence[Any], k: int = 10, **kwargs: Any) -> list[Hits]:
        """Embed query images (paths or PIL) with the index's own embedder and :meth:`search` them.

        Raises:
            EmbedderMismatchError: another embedder built the index; InputError: an unreadable image.
        """
        self.check_embedder(embedder)
        res = embedder.embed_images(list(images), batch_size=max(1, min(64, len(images))))
        if res.failures:
            raise InputError("; ".join(reason for _, reason in res.failures))
        return self.search(res.features, k, **kwargs)
