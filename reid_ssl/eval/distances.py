"""Distances between features, and the streaming evaluator for galleries too large for a distance matrix.

:func:`evaluate_features` gives exactly :func:`~reid_ssl.eval.metrics.evaluate_rank`'s numbers (same protocol,
same tie rule) while holding only one block of distances at a time: SYSU-30k's 1,000 x 479,730 gallery is
evaluated without its 1.8 GiB distance matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from reid_ssl.errors import InputError
from reid_ssl.eval.metrics import (
    METRICS,
    _as_ids,
    _count_not_farther,
    _mask,
    _Matches,
    _query_groups,
    _run,
    _summarise,
)


def _normalized(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.sqrt(np.einsum("ij,ij->i", x, x)), 1e-12)[:, None]


def distance_matrix(qf: np.ndarray, gf: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """(num_query, num_gallery) float32 distances, as torchreid's ``compute_distance_matrix`` defines them.

    ``"cosine"``: ``1 - <q/|q|, g/|g|>``; ``"euclidean"``: squared L2 distance. Either ranks L2-normalised
    features the same way.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {list(METRICS)}")
    q, g = np.asarray(qf, dtype=np.float32), np.asarray(gf, dtype=np.float32)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"feature shapes do not match: query {q.shape}, gallery {g.shape}")
    if metric == "cosine":
        d = _normalized(q) @ g.T
        d /= np.maximum(np.sqrt(np.einsum("ij,ij->i", g, g)), 1e-12)[None, :]  # cheaper than normalising g
        np.subtract(1.0, d, out=d)
        return d
    d = q @ g.T
    d *= -2.0
    d += np.einsum("ij,ij->i", q, q)[:, None]
    d += np.einsum("ij,ij->i", g, g)[None, :]
    return d


def _rowwise_distances(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """Distance between row i of ``a`` and row i of ``b``, with :func:`distance_matrix`'s formulas."""
    if metric == "cosine":
        norms = np.maximum(np.sqrt(np.einsum("ij,ij->i", b, b)), 1e-12)
        return 1.0 - np.einsum("ij,ij->i", _normalized(a), b) / norms
    dot = np.einsum("ij,ij->i", a, b)
    return np.einsum("ij,ij->i", a, a) + np.einsum("ij,ij->i", b, b) - 2.0 * dot


def _pair_distances(q: np.ndarray, gf: Any, q_idx: np.ndarray, g_idx: np.ndarray, metric: str) -> np.ndarray:
    """float64 distances of (query, gallery) pairs; the gallery rows are read once, in order."""
    out = np.zeros(len(q_idx), dtype=np.float64)
    if len(q_idx) == 0:
        return out
    uniq, inverse = np.unique(g_idx, return_inverse=True)
    g = np.asarray(gf[uniq], dtype=np.float32)  # sorted fancy index: reads a memmap sequentially
    for start in range(0, len(q_idx), 65536):
        sl = slice(start, start + 65536)
        out[sl] = _rowwise_distances(q[q_idx[sl]], g[inverse[sl]], metric)
    return out


def _merge_topk(
    best_d: np.ndarray | None, best_i: np.ndarray | None, d: np.ndarray, offset: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Running top-k (smallest distances) of a stream of (num_query, block) distance blocks."""
    import torch

    kk = min(k, d.shape[1])
    top = torch.topk(torch.from_numpy(d), kk, dim=1, largest=False, sorted=False)
    vals, idx = top.values.numpy(), top.indices.numpy() + offset
    if best_d is not None and best_i is not None:
        vals, idx = np.concatenate([best_d, vals], axis=1), np.concatenate([best_i, idx], axis=1)
    if vals.shape[1] > k:
        part = np.argpartition(vals, k - 1, axis=1)[:, :k]
        vals, idx = np.take_along_axis(vals, part, 1), np.take_along_axis(idx, part, 1)
    return vals, idx


def evaluate_features(
    qf: np.ndarray,
    gf: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    metric: str = "cosine",
    max_rank: int = 50,
    topk: int = 0,
    block_size: int | None = None,
    num_threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """:func:`evaluate_rank` on features, streaming the gallery in blocks: no distance matrix in memory.

    One pass over the gallery computes each block's exact distances (one BLAS product, the computation of a
    FAISS ``IndexFlat`` search), keeps a running top-k list per query, and counts, for every true match, the
    wrong matches that are not farther (the module docstring's tie rule). CMC, AP and mINP therefore equal
    :func:`evaluate_rank` on the full matrix, not an approximation from truncated lists. Memory: the query
    features, one (num_query, block_size) float32 block and the pair lists.

    Args:
        qf: (num_query, D) query features.
        gf: (num_gallery, D) gallery features; any array that supports row slicing (``np.load(...,
            mmap_mode="r")`` keeps SYSU-30k's 479,730 x 2048 gallery on disk).
        q_pids, g_pids, q_camids, g_camids: integer ids, as in :func:`evaluate_rank`.
        metric: ``"cosine"`` or ``"euclidean"`` (see :func:`distance_matrix`).
        topk: also return the ``topk`` nearest gallery items per query (junk excluded), nearest first.
        block_size: gallery rows per block (default: ~256 MB of distances per block).
        progress: called with (gallery rows done, num_gallery) after each block.

    Returns:
        :func:`evaluate_rank`'s dict, plus ``"topk_indices"`` (num_query, topk) int64 and
        ``"topk_distances"`` (num_query, topk) float32 when ``topk > 0``.
    """
    if metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}; choose one of {list(METRICS)}")
    q = np.ascontiguousarray(qf, dtype=np.float32)
    nq, ng = q.shape[0], gf.shape[0]
    if q.ndim != 2 or len(gf.shape) != 2 or gf.shape[1] != q.shape[1]:
        raise ValueError(f"feature shapes do not match: query {q.shape}, gallery {tuple(gf.shape)}")
    qp, gp = _as_ids(q_pids, "q_pids", nq), _as_ids(g_pids, "g_pids", ng)
    qc, gc = _as_ids(q_camids, "q_camids", nq), _as_ids(g_camids, "g_camids", ng)
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    m = _Matches(qp, gp, qc, gc)
    m.set_distances(_pair_distances(q, gf, m.pos_q, m.pos_g, metric))
    wrong = np.zeros(len(m.pos_q), dtype=np.int64)
    queries = np.flatnonzero(m.num_pos)
    block = block_size or max(1024, (64 << 20) // max(1, nq))
    best_d = best_i = None
    for start in range(0, ng, block):
        g = np.asarray(gf[start : start + block], dtype=np.float32)
        d = distance_matrix(q, g, metric)
        if not np.isfinite(d).all():
            raise ValueError(
                f"non-finite distances in gallery rows {start}..{start + len(g) - 1} (NaN or inf features?)"
            )
        if topk > 0:
            _mask(d, np.arange(nq), m, offset=start, mask_true=False)  # junk never enters the ranked lists
            best_d, best_i = _merge_topk(best_d, best_i, d, start, topk)
        _count_wrong(d, start, m, queries, wrong, num_threads)
        if progress is not None:
            progress(min(start + block, ng), ng)
    result = _summarise(m, wrong, nq, ng, max_rank)
    if topk > 0 and best_d is not None and best_i is not None:
        result.update(_sorted_topk(best_d, best_i))
    return result


def _count_wrong(
    d: np.ndarray, start: int, m: _Matches, queries: np.ndarray, wrong: np.ndarray, num_threads: int | None
) -> None:
    """Add to ``wrong``, per true match, the wrong matches of this block (gallery rows from ``start``) not farther."""

    def work(group: np.ndarray) -> None:
        width = int(m.num_pos[group].max())
        rows = _mask(d[group], group, m, offset=start)
        counts = _count_not_farther(rows, m.thresholds(group, width))
        for row, qi in enumerate(group):
            s = m.pos_start[qi]
            wrong[s : s + m.num_pos[qi]] += counts[row, : m.num_pos[qi]]

    _run(work, _query_groups(queries, m.num_pos, d.shape[1]), num_threads)


def _sorted_topk(best_d: np.ndarray, best_i: np.ndarray) -> dict[str, np.ndarray]:
    """The running top-k lists nearest first: ``topk_indices`` (-1 where fewer items) and ``topk_distances``."""
    order = np.argsort(best_d, axis=1, kind="stable")
    best_d, best_i = np.take_along_axis(best_d, order, 1), np.take_along_axis(best_i, order, 1)
    finite = np.isfinite(best_d)
    return {"topk_indices": np.where(finite, best_i, -1), "topk_distances": best_d.astype(np.float32)}
