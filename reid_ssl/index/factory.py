"""Building the FAISS index that an :class:`~reid_ssl.index.types.IndexSpec` describes, and when to rebuild it.

* :func:`check_factory`, :func:`check_on_disk`: refuse what cannot be built before any work is done;
* :func:`build_faiss`: a new index, trained on a sample of the vectors, with every vector added;
* :func:`choose_spec`, :func:`should_rebuild`: the growth rules of a gallery, read from the manifest's
  ``index`` block: which spec ``n`` vectors get (a type that must be trained stays exact while too small to
  train), and when an add rebuilds the index instead of adding to it.
"""

from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from reid_ssl.errors import InputError
from reid_ssl.index.types import AUTO, INDEX_TYPES, IndexSpec, index_spec, resolve_type, type_for_factory

if TYPE_CHECKING:
    import faiss


def check_factory(factory: str, dim: int) -> None:
    """Refuse a factory string FAISS cannot build, before any work is done.

    Raises:
        InputError: with FAISS's reason.
    """
    try:
        type_for_factory(factory).new_index(factory, dim)
    except RuntimeError as e:
        raise InputError(f"FAISS cannot build the factory string {factory!r} ({_faiss_reason(e)})") from None


def check_on_disk(index_type: str, factory: str | None) -> None:
    """Refuse ``on_disk`` for a type or factory that never has inverted lists (``auto`` builds them when large).

    Raises:
        InputError: e.g. ``--type hnsw --on-disk``.
    """
    kind = type_for_factory(factory) if factory else None if index_type == AUTO else INDEX_TYPES[index_type]
    if kind is not None and not kind.lists:
        what = f"the factory {factory!r}" if factory else f"a {kind.name} index"
        choices = ", ".join(name for name, k in INDEX_TYPES.items() if k.lists)
        raise InputError(
            f"--on-disk serves inverted lists from disk, and {what} has none; use an IVF type ({choices}) or auto"
        )


def build_faiss(
    spec: IndexSpec, vectors: np.ndarray, ids: np.ndarray, timings: dict[str, float] | None = None
) -> faiss.Index:
    """A new FAISS index for ``spec``, trained on a sample of ``vectors`` (n, D), with ``ids`` (n,) added.

    Args:
        timings: filled with ``train_s`` and ``add_s`` (seconds) when given (benchmarks).

    Raises:
        InputError: FAISS cannot train this factory on these vectors (e.g. more IVF lists than vectors).
    """
    n, dim = vectors.shape
    index = INDEX_TYPES[spec.type].new_index(spec.factory, dim)
    t0 = time.perf_counter()
    if not index.is_trained:
        sample_n = min(n, max(spec.train_size, 1))
        rows = np.sort(np.random.default_rng(0).choice(n, sample_n, replace=False))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                index.train(np.ascontiguousarray(vectors[rows]))
        except RuntimeError as e:
            raise InputError(
                f"FAISS cannot train {spec.factory!r} on {sample_n} vectors ({_faiss_reason(e)}); "
                "use a factory with fewer lists or centroids, or let the index type choose"
            ) from None
    t1 = time.perf_counter()
    index.add_with_ids(np.ascontiguousarray(vectors), ids)
    if timings is not None:
        timings.update(train_s=t1 - t0, add_s=time.perf_counter() - t1)
    return index


def _faiss_reason(e: Exception) -> str:
    """FAISS's error without its C++ file/line preamble."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = next((ln.split("Error: ", 1)[-1] for ln in lines if "Error" in ln), lines[0] if lines else str(e))
    return text[:200]


def choose_spec(m: dict[str, Any], n: int, dim: int) -> IndexSpec:
    """The spec to build for ``n`` vectors from the manifest's ``index`` block (requested type, overrides).

    A type that must be trained stays an exact ``flat`` index while there are fewer than its ``min_train``
    vectors (unless an explicit factory was given).
    """
    spec = index_spec(
        m["requested"],
        n,
        dim,
        factory=m["factory_override"],
        nprobe=m["nprobe_override"],
        ef_search=m["ef_search_override"],
    )
    if not m["factory_override"] and n < INDEX_TYPES[spec.type].min_train:
        spec = index_spec("flat", n, dim)  # too few vectors to train: exact until a later add rebuilds
    return spec


def should_rebuild(m: dict[str, Any], n_after: int, dim: int) -> bool:
    """Whether adding vectors up to ``n_after`` should rebuild the FAISS index rather than add to it.

    Args:
        m: the manifest's ``index`` block (requested type, overrides, current type, ``trained_on``).
    """
    if m["type"] is None:
        return True
    if m["factory_override"]:
        return False
    if m["requested"] == AUTO and resolve_type(AUTO, n_after, dim).name != m["type"]:
        return True  # crossed a size threshold of auto: flat -> ivf-flat -> ivf-opq
    if m["requested"] not in (AUTO, m["type"]) and n_after >= INDEX_TYPES[m["requested"]].min_train:
        return True  # was kept exact while too small to train the requested type
    return INDEX_TYPES[m["type"]].retrain_due(int(m["trained_on"]), n_after)
