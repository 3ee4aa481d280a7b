"""Re-ID evaluation: features -> CMC / mAP / mINP, at Market-1501 scale and at SYSU-30k scale.

Protocol (torchreid's ``evaluate_rank``, Market-1501 style): for each query, gallery items with the query's pid
*and* camid are dropped ("junk"); every other item with the query's pid is a true match; queries without a true
match are skipped. CMC is cut at ``max_rank``; AP is the mean over true matches of precision at their rank
(``j / rank_j`` for the j-th true match); mAP and mINP average over the queries kept. mINP is the mean inverse
negative penalty of Ye et al. (``num_true_matches / rank_of_the_hardest_true_match``).

- [0] L. Zheng et al., "Scalable Person Re-identification: A Benchmark", ICCV 2015 (protocol, AP).
- [1] M. Ye et al., "Deep Learning for Person Re-identification: A Survey and Outlook", TPAMI 2021,
  https://arxiv.org/abs/2001.04193 (mINP).

**Tie rule.** At equal distance, wrong matches rank *before* true matches (the pessimistic rule): the j-th true
match of a query (true matches sorted by distance) has rank ``j + #{wrong matches with distance <= its
distance}``. The rule depends only on the distances, never on gallery order, and it never flatters a model
whose features collapse. torchreid's order among ties is whatever ``np.argsort``'s unstable quicksort returns;
on matrices without ties both agree exactly.

**Why it is fast.** mAP needs the rank of every true match, not a sorted row. For each query we count, per true
match, the wrong matches that are not farther: one vectorised comparison pass over the row per true match
when a query has few of them (Market-1501: ~14), numpy's SIMD sort of the row plus a binary search per true
match when it has many. Rows are processed in chunks that stay in cache, on all cores. (torchreid 0.2.5
argsorts the full matrix, then loops over queries in Python with a list comprehension over every gallery
position.) The same counting works on gallery blocks, which is how :func:`evaluate_features` handles
SYSU-30k's 479,730-image gallery without a full distance matrix.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

# Rows x true-matches x gallery booleans per comparison chunk (~4 MB keeps the chunk in cache).
_CHUNK_CELLS = 1 << 22
# Above this many true matches per query, sorting the row (numpy's SIMD sort) beats one comparison pass per
# true match (measured on AVX-512 and AVX2 machines).
_SORT_ABOVE = 8

METRICS = ("cosine", "euclidean")
CMC_RANKS = (1, 5, 10, 20)


# ---------------------------------------------------------------------------------------------------------
# Metrics from a distance matrix
# ---------------------------------------------------------------------------------------------------------


def default_threads() -> int:
    """Cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _as_ids(values: Any, name: str, n: int) -> np.ndarray:
    arr = np.asarray(values.cpu() if hasattr(values, "cpu") else values).reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries, the distance matrix needs {n}")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{name} must hold integer ids")
        arr = arr.astype(np.int64)
    return arr.astype(np.int64, copy=False)


def _as_distmat(distmat: Any) -> np.ndarray:
    if hasattr(distmat, "detach"):  # torch.Tensor
        distmat = distmat.detach().cpu().numpy()
    d = np.asarray(distmat)
    if d.ndim != 2:
        raise ValueError(f"distmat must be 2-D (num_query, num_gallery), got shape {d.shape}")
    if d.dtype not in (np.float32, np.float64):
        d = d.astype(np.float64)
    return d


class _Matches:
    """Per-query true matches and junk, as flat arrays sorted by (query, distance).

    ``pos_q``/``pos_g``/``pos_d``: query index, gallery index and distance of every true match;
    ``junk_q``/``junk_g``: the same-pid-same-camid pairs. ``num_pos[q]`` counts the true matches of query q.
    """

    def __init__(self, q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray, g_camids: np.ndarray) -> None:
        order = np.argsort(g_pids, kind="stable")
        sorted_pids = g_pids[order]
        lo = np.searchsorted(sorted_pids, q_pids, side="left")
        hi = np.searchsorted(sorted_pids, q_pids, side="right")
        count = hi - lo
        pair_q = np.repeat(np.arange(len(q_pids)), count)
        pair_g = order[_ranges(lo, count)]
        junk = g_camids[pair_g] == q_camids[pair_q]
        self.pos_q, self.pos_g = pair_q[~junk], pair_g[~junk]
        self.junk_q, self.junk_g = pair_q[junk], pair_g[junk]
        self.num_pos = np.bincount(self.pos_q, minlength=len(q_pids))
        self.num_junk = np.bincount(self.junk_q, minlength=len(q_pids))
        self.junk_start = np.cumsum(self.num_junk) - self.num_junk
        self.pos_start = np.cumsum(self.num_pos) - self.num_pos
        self.pos_d = np.zeros(len(self.pos_q))

    def set_distances(self, pos_d: np.ndarray) -> None:
        """Attach the true matches' distances and sort each query's matches by distance."""
        order = np.lexsort((pos_d, self.pos_q))
        self.pos_q, self.pos_g, self.pos_d = self.pos_q[order], self.pos_g[order], pos_d[order]

    def thresholds(self, queries: np.ndarray, width: int) -> np.ndarray:
        """(len(queries), width) sorted true-match distances, NaN-padded (NaN compares False)."""
        out = np.full((len(queries), width), np.nan, dtype=np.float64)
        for row, q in enumerate(queries):
            s = self.pos_start[q]
            out[row, : self.num_pos[q]] = self.pos_d[s : s + self.num_pos[q]]
        return out


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + c)`` for each (s, c)."""
    total = int(counts.sum())
    return np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(starts, counts)


def _mask(rows: np.ndarray, group: np.ndarray, m: _Matches, offset: int = 0, mask_true: bool = True) -> np.ndarray:
    """Set junk, and true matches when ``mask_true``, to +inf in ``rows`` (in place; the distances of the
    ``group`` queries to gallery items ``offset ..``): what is left finite are the wrong matches."""
    local = np.arange(len(group))
    pairs = [(m.junk_start, m.num_junk, m.junk_g)]
    if mask_true:
        pairs.append((m.pos_start, m.num_pos, m.pos_g))
    for starts, counts, gallery in pairs:
        idx = _ranges(starts[group], counts[group])
        r, g = np.repeat(local, counts[group]), gallery[idx] - offset
        keep = (g >= 0) & (g < rows.shape[1])
        rows[r[keep], g[keep]] = np.inf
    return rows


def _count_not_farther(rows: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """counts[i, j] = #{k : rows[i, k] <= thresholds[i, j]} (NaN thresholds count 0)."""
    width = thresholds.shape[1]
    if width > _SORT_ABOVE:
        srt = np.sort(rows, axis=1)
        counts = np.zeros(thresholds.shape, dtype=np.int64)
        for i in range(len(rows)):
            ok = ~np.isnan(thresholds[i])
            counts[i, ok] = np.searchsorted(srt[i], thresholds[i, ok], side="right")
        return counts
    thr = thresholds.astype(rows.dtype)
    acc = np.uint16 if rows.shape[1] < 65536 else np.int64  # narrow accumulators sum bools much faster
    return (rows[:, None, :] <= thr[:, :, None]).sum(axis=2, dtype=acc).astype(np.int64)


def _query_groups(queries: np.ndarray, num_pos: np.ndarray, num_gallery: int) -> list[np.ndarray]:
    """Split queries into chunks of similar true-match counts whose comparison block fits in cache."""
    queries = queries[np.argsort(num_pos[queries], kind="stable")]
    widths = num_pos[queries]
    groups, start = [], 0
    while start < len(queries):
        w0 = int(widths[start])
        sort = w0 > _SORT_ABOVE
        cap = np.inf if sort else min(max(2 * w0, w0 + 4), _SORT_ABOVE)  # widest row in this chunk
        per_row = num_gallery * (4 if sort else int(cap))
        size = max(1, min(256, _CHUNK_CELLS // per_row))
        stop = min(start + size, start + int(np.searchsorted(widths[start:], cap, side="right")))
        groups.append(queries[start:stop])
        start = stop
    return groups


def _summarise(
    m: _Matches, wrong_not_farther: np.ndarray, num_query: int, num_gallery: int, max_rank: int
) -> dict[str, Any]:
    """CMC / AP / INP from the rank of every true match (rank_j = j + wrong matches not farther)."""
    j = np.arange(len(m.pos_q)) - np.repeat(m.pos_start, m.num_pos) + 1  # 1-based index within the query
    ranks = j + wrong_not_farther
    valid = m.num_pos > 0
    if not valid.any():
        raise ValueError("no query has a true match in the gallery (same pid, different camid)")
    ap = np.full(num_query, np.nan)
    ap[valid] = np.bincount(m.pos_q, weights=j / ranks, minlength=num_query)[valid] / m.num_pos[valid]
    last = m.pos_start + m.num_pos - 1
    inp = np.full(num_query, np.nan)
    inp[valid] = m.num_pos[valid] / ranks[last[valid]]
    first = np.zeros(num_query, dtype=np.int64)
    first[valid] = ranks[m.pos_start[valid]]
    max_rank = min(max_rank, num_gallery)
    hits = np.bincount(np.minimum(first[valid], max_rank + 1), minlength=max_rank + 2)[1 : max_rank + 1]
    cmc = np.cumsum(hits) / valid.sum()
    return {
        "cmc": cmc.astype(np.float64),
        "mAP": float(np.mean(ap[valid])),
        "mINP": float(np.mean(inp[valid])),
        "num_valid_queries": int(valid.sum()),
        "AP": ap,
        "first_match_rank": first,
    }


def evaluate_rank(
    distmat: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    max_rank: int = 50,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """CMC, mAP and mINP of a query x gallery distance matrix, with torchreid's protocol (module docstring).

    Equals ``torchreid.metrics.evaluate_rank`` (CMC and mAP) on matrices without ties; ties follow the
    pessimistic rule of the module docstring.

    Args:
        distmat: (num_query, num_gallery) distances (numpy array or torch tensor); smaller = more similar.
        q_pids, q_camids: (num_query,) integer person and camera ids.
        g_pids, g_camids: (num_gallery,) integer person and camera ids (any value works as a distractor id).
        max_rank: CMC length; cut to num_gallery when the gallery is smaller (as torchreid does).
        num_threads: worker threads (default: the cores this process may use).

    Returns:
        ``{"cmc": (max_rank,) float64, "mAP": float, "mINP": float, "num_valid_queries": int,
        "AP": (num_query,) per-query AP (NaN where skipped), "first_match_rank": (num_query,) 1-based rank of
        the first true match (0 where skipped)}``.

    Raises:
        ValueError: wrong shapes, non-finite distances, or no query with a true match.
    """
    d = _as_distmat(distmat)
    nq, ng = d.shape
    qp, gp = _as_ids(q_pids, "q_pids", nq), _as_ids(g_pids, "g_pids", ng)
    qc, gc = _as_ids(q_camids, "q_camids", nq), _as_ids(g_camids, "g_camids", ng)
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    if not np.isfinite(d).all():
        raise ValueError("distmat contains NaN or infinite values")
    m = _Matches(qp, gp, qc, gc)
    m.set_distances(d[m.pos_q, m.pos_g].astype(np.float64))
    wrong = np.zeros(len(m.pos_q), dtype=np.int64)
    queries = np.flatnonzero(m.num_pos)

    def work(group: np.ndarray) -> None:
        width = int(m.num_pos[group].max())
        counts = _count_not_farther(_mask(d[group], group, m), m.thresholds(group, width))
        for row, q in enumerate(group):
            s = m.pos_start[q]
            wrong[s : s + m.num_pos[q]] = counts[row, : m.num_pos[q]]

    _run(work, _query_groups(queries, m.num_pos, ng), num_threads)
    return _summarise(m, wrong, nq, ng, max_rank)


def _run(fn: Callable[[Any], None], items: Sequence[Any], num_threads: int | None) -> None:
    threads = min(num_threads or default_threads(), len(items))
    if threads <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(fn, items):  # numpy releases the GIL inside the comparisons
            pass


# ---------------------------------------------------------------------------------------------------------
# Distances and the streaming evaluator (galleries too large for a distance matrix)
# ---------------------------------------------------------------------------------------------------------


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
    vals, idx = torch.topk(torch.from_numpy(d), kk, dim=1, largest=False, sorted=False)
    vals, idx = vals.numpy(), idx.numpy() + offset
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
        raise ValueError(f"unknown metric {metric!r}; choose one of {list(METRICS)}")
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

        def work(group: np.ndarray, d: np.ndarray = d, start: int = start) -> None:
            width = int(m.num_pos[group].max())
            rows = _mask(d[group], group, m, offset=start)
            counts = _count_not_farther(rows, m.thresholds(group, width))
            for row, qi in enumerate(group):
                s = m.pos_start[qi]
                wrong[s : s + m.num_pos[qi]] += counts[row, : m.num_pos[qi]]

        _run(work, _query_groups(queries, m.num_pos, len(g)), num_threads)
        if progress is not None:
            progress(min(start + block, ng), ng)
    result = _summarise(m, wrong, nq, ng, max_rank)
    if topk > 0 and best_d is not None and best_i is not None:
        order = np.argsort(best_d, axis=1, kind="stable")
        best_d, best_i = np.take_along_axis(best_d, order, 1), np.take_along_axis(best_i, order, 1)
        finite = np.isfinite(best_d)
        result["topk_indices"] = np.where(finite, best_i, -1)
        result["topk_distances"] = best_d.astype(np.float32)
    return result


# ---------------------------------------------------------------------------------------------------------
# k-reciprocal re-ranking (torchreid's implementation, guarded by a memory estimate)
# ---------------------------------------------------------------------------------------------------------

# torchreid's re_ranking holds ~6 (n x n) arrays at once (float32 distances, their transpose, V, V_qe, int32
# and int64 argsort outputs): about 24 bytes per cell of the (query + gallery)^2 matrix.
RERANK_BYTES_PER_CELL = 24


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rerank_distances(
    qf: np.ndarray, gf: np.ndarray, metric: str = "cosine", k1: int = 20, k2: int = 6, lambda_value: float = 0.3
) -> np.ndarray:
    """k-reciprocal re-ranked (num_query, num_gallery) distances (Zhong et al., CVPR 2017) via torchreid.

    Raises:
        MemoryError: the (query + gallery)^2 working set would not fit in the available memory (the message
            gives both numbers); fine for Market-1501, DukeMTMC-reID and CUHK03, not MSMT17 or SYSU-30k.
    """
    n = len(qf) + len(gf)
    need, have = RERANK_BYTES_PER_CELL * n * n, available_memory_bytes()
    if have is not None and need > 0.8 * have:
        raise MemoryError(
            f"k-reciprocal re-ranking of {len(qf)} queries + {len(gf)} gallery images needs "
            f"~{need / 2**30:.1f} GiB ({RERANK_BYTES_PER_CELL} bytes x {n}^2), only "
            f"{have / 2**30:.1f} GiB available; run without --rerank"
        )
    from reid_ssl.reid_data import import_torchreid

    torchreid = import_torchreid()
    qg, qq, gg = (distance_matrix(a, b, metric) for a, b in ((qf, gf), (qf, qf), (gf, gf)))
    if metric == "cosine":  # torchreid squares the distances; keep them non-negative
        for d in (qg, qq, gg):
            np.maximum(d, 0.0, out=d)
    return np.asarray(torchreid.utils.re_ranking(qg, qq, gg, k1=k1, k2=k2, lambda_value=lambda_value), dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------
# Figures: CMC curve and ranked-result strips
# ---------------------------------------------------------------------------------------------------------

CORRECT, WRONG, QUERY = (40, 170, 60), (210, 40, 40), (60, 90, 200)


def plot_cmc(curves: dict[str, np.ndarray], path: str | Path, title: str = "CMC") -> Path:
    """CMC curve(s) as a PNG: x = rank (1..len), y = matching rate in %."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=110)
    for label, cmc in curves.items():
        cmc = np.asarray(cmc, dtype=float)
        ranks = np.arange(1, len(cmc) + 1)
        ax.plot(
            ranks,
            100 * cmc,
            marker="o" if len(cmc) <= 20 else None,
            markersize=3,
            clip_on=False,
            label=f"{label} (rank-1 {100 * cmc[0]:.1f}%)",
        )
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_ylim(0, 101)
    ax.set_xlim(1, max(2, max(len(c) for c in curves.values())))
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _tile(path: str, size: tuple[int, int], colour: tuple[int, int, int], border: int = 4) -> Any:
    from PIL import Image, ImageOps

    from reid_ssl.images import ImageError, open_rgb

    w, h = size
    try:
        img = open_rgb(path).resize((w - 2 * border, h - 2 * border))
    except ImageError:
        img = Image.new("RGB", (w - 2 * border, h - 2 * border), (128, 128, 128))
    return ImageOps.expand(img, border=border, fill=colour)


def ranked_strip(
    query: tuple[str, int, int],
    ranked: Sequence[tuple[str, int, int]],
    path: str | Path,
    size: tuple[int, int] = (64, 128),
) -> Path:
    """One PNG row: the query (blue frame), a gap, then its ranked gallery items, green = same pid (a true
    match), red = wrong. Each tile is labelled with its rank and pid."""
    from PIL import Image, ImageDraw

    w, h = size
    gap, label_h = 12, 14
    canvas = Image.new("RGB", (w * (len(ranked) + 1) + gap, h + label_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    canvas.paste(_tile(query[0], size, QUERY), (0, 0))
    draw.text((2, h + 1), f"q {query[1]}", fill=(0, 0, 0))
    for r, (img, pid, _) in enumerate(ranked, 1):
        x = w * r + gap
        canvas.paste(_tile(img, size, CORRECT if pid == query[1] else WRONG), (x, 0))
        draw.text((x + 2, h + 1), f"{r}: {pid}", fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


# ---------------------------------------------------------------------------------------------------------
# Features with an on-disk cache
# ---------------------------------------------------------------------------------------------------------

_EMBED_CHUNK = 8192  # images per embed_images call: bounded memory, rows go straight to the .npy file


def _list_key(fingerprint: str, paths: Sequence[str]) -> str:
    """Cache key: the embedder (weights + preprocessing + flip) and each file's path, size and mtime."""
    h = hashlib.sha256(fingerprint.encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}|missing\n".encode())
    return h.hexdigest()


def embed_items(
    embedder: Any,
    paths: Sequence[str],
    cache_dir: str | Path | None = None,
    tag: str = "features",
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, list[int], list[tuple[int, str]], bool]:
    """Embed image paths, reusing ``<cache_dir>/<tag>-<key>.npy`` when the same embedder saw the same files.

    Rows are written chunk by chunk into a memory-mapped ``.npy`` (SYSU-30k's gallery is ~3.9 GB at 2048-d)
    that is renamed into place only when complete; the JSON sidecar records which inputs failed to decode.

    Returns:
        (features (n_ok, D) float32, memory-mapped when cached; ok input indices; (index, reason) failures;
        whether the cache was hit).
    """
    from reid_ssl.checkpoint import atomic_write_bytes

    target = meta_path = None
    if cache_dir is not None:
        key = _list_key(embedder.fingerprint, paths)
        target = Path(cache_dir) / f"{tag}-{key[:20]}.npy"
        meta_path = target.with_suffix(".json")
        if target.is_file() and meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
                feats = np.load(target, mmap_mode="r", allow_pickle=False)
                if meta.get("key") == key and feats.shape == (len(meta["ok"]), embedder.feature_dim):
                    return feats, list(meta["ok"]), [(int(i), str(r)) for i, r in meta["failures"]], True
            except (OSError, ValueError, KeyError):
                pass  # unreadable cache: embed again
        target.parent.mkdir(parents=True, exist_ok=True)
    n, dim = len(paths), embedder.feature_dim
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp") if target is not None else None
    feats = (
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
        if tmp
        else np.empty((n, dim), np.float32)
    )
    ok: list[int] = []
    failures: list[tuple[int, str]] = []
    try:
        for start in range(0, n, _EMBED_CHUNK):
            res = embedder.embed_images(
                paths[start : start + _EMBED_CHUNK],
                batch_size=batch_size,
                num_workers=num_workers,
                progress=progress,
                desc=f"embedding {tag}",
            )
            feats[len(ok) : len(ok) + len(res.ok)] = res.features
            ok += [start + i for i in res.ok]
            failures += [(start + i, reason) for i, reason in res.failures]
        if tmp is None or target is None or meta_path is None:
            return feats[: len(ok)], ok, failures, False
        if len(ok) < n:  # rare: some images failed; keep only the rows that exist
            full, feats = feats, None
            np.save(tmp.with_suffix(".part.npy"), full[: len(ok)])
            del full
            os.replace(tmp.with_suffix(".part.npy"), tmp)
        else:
            feats.flush()
            del feats
        os.replace(tmp, target)
        meta = {
            "key": key,
            "tag": tag,
            "fingerprint": embedder.fingerprint,
            "num_inputs": n,
            "dim": dim,
            "ok": ok,
            "failures": failures,
        }
        atomic_write_bytes(meta_path, json.dumps(meta).encode())
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
            tmp.with_suffix(".part.npy").unlink(missing_ok=True)
    return np.load(target, mmap_mode="r", allow_pickle=False), ok, failures, False


# ---------------------------------------------------------------------------------------------------------
# The eval pipeline: checkpoint + dataset -> numbers, JSON, CMC PNG, ranked strips
# ---------------------------------------------------------------------------------------------------------

DENSE_LIMIT_BYTES = 1 << 30  # above a 1 GiB distance matrix, evaluate by streaming the gallery
FLIP_NOTE = "flip: feature = normalize(normalize(f(x)) + normalize(f(flip(x))))"
TIE_NOTE = "ties: at equal distance wrong matches rank before true matches (pessimistic)"


def _pick_queries(valid: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    idx = np.flatnonzero(valid)
    if count <= 0 or len(idx) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(idx, size=min(count, len(idx)), replace=False))


def evaluate_checkpoint(
    checkpoint: str | Path,
    dataset: str,
    root: str | Path | None = None,
    out_dir: str | Path | None = None,
    metric: str = "cosine",
    flip: bool = True,
    rerank: bool = False,
    max_rank: int = 50,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | None = None,
    num_strips: int = 8,
    strip_topk: int = 10,
    cache: bool = True,
    streaming: bool | None = None,
    strict: bool = False,
    progress: bool = False,
    split_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint on a re-ID benchmark; writes ``eval_<dataset>.json``, a CMC PNG and strips.

    Features come from the checkpoint's one Embedder (its preprocessing; :data:`FLIP_NOTE` with ``flip``).
    Galleries whose distance matrix would pass :data:`DENSE_LIMIT_BYTES` (SYSU-30k, MSMT17) are evaluated
    with :func:`evaluate_features` (``streaming=None`` decides; True/False forces). Gallery and query
    features are cached under ``<out_dir>/features/``.

    Args:
        checkpoint: reid_ssl checkpoint path.
        dataset, root, split_options: see :func:`reid_ssl.reid_data.load_split`.
        out_dir: where the JSON, PNGs and feature cache go (default: the checkpoint's folder).
        rerank: k-reciprocal re-ranking (dense only; refused with a MemoryError where it would not fit).
        strict: raise if any image fails to decode (default: report them in ``"failures"`` and evaluate the
            rest).

    Returns:
        The dict written to the JSON file (rank-1/5/10/20, mAP, mINP, CMC, counts, failures, files, timings).
    """
    from reid_ssl.checkpoint import atomic_write_bytes, load_checkpoint
    from reid_ssl.embedder import Embedder, backbone_from_checkpoint
    from reid_ssl.reid_data import load_split

    t_start = time.perf_counter()
    checkpoint = Path(checkpoint)
    split = load_split(dataset, root, **(split_options or {}))
    ckpt = load_checkpoint(checkpoint)
    embedder = Embedder(backbone_from_checkpoint(ckpt), ckpt["preprocess"], ckpt["backbone"]["sha256"], device, flip)
    backbone_name, backbone_sha = ckpt["backbone"]["name"], ckpt["backbone"]["sha256"]
    del ckpt  # training state (optimizer, heads) is not needed past this point
    out = Path(out_dir) if out_dir is not None else checkpoint.resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = out / "features" if cache else None
    seconds: dict[str, float] = {}
    sets: dict[str, Any] = {}
    for subset, items in (("query", split.query), ("gallery", split.gallery)):
        t0 = time.perf_counter()
        feats, ok, failed, hit = embed_items(
            embedder, [p for p, _, _ in items], cache_dir, f"{dataset}-{subset}", batch_size, num_workers, progress
        )
        seconds[f"embed_{subset}"] = round(time.perf_counter() - t0, 3)
        sets[subset] = {
            "features": feats,
            "items": [items[i] for i in ok],
            "cache_hit": hit,
            "failures": [{"image": items[i][0], "reason": r} for i, r in failed],
        }
    failures = {s: sets[s]["failures"] for s in sets}
    if strict and any(failures.values()):
        first = next(f for fs in failures.values() for f in fs)
        raise ValueError(
            f"{sum(map(len, failures.values()))} images could not be read "
            f"(first: {first['reason']}); fix them or run without --strict"
        )
    q_items, g_items = sets["query"]["items"], sets["gallery"]["items"]
    if not q_items or not g_items:
        raise ValueError(f"{dataset}: no readable {'query' if not q_items else 'gallery'} image")
    qf = np.asarray(sets["query"]["features"])
    gf = sets["gallery"]["features"]
    ids = {
        name: np.asarray([it[col] for it in items], dtype=np.int64)
        for name, items, col in (
            ("q_pids", q_items, 1),
            ("g_pids", g_items, 1),
            ("q_camids", q_items, 2),
            ("g_camids", g_items, 2),
        )
    }
    dense_bytes = 4 * len(q_items) * len(g_items)
    use_stream = (dense_bytes > DENSE_LIMIT_BYTES) if streaming is None else streaming
    if rerank and use_stream:
        raise ValueError(
            f"re-ranking needs the full distance matrix ({dense_bytes / 2**30:.1f} GiB for "
            f"{len(q_items)} x {len(g_items)}); run without --rerank"
        )
    t0 = time.perf_counter()
    if use_stream:
        metrics = evaluate_features(
            qf,
            gf,
            ids["q_pids"],
            ids["g_pids"],
            ids["q_camids"],
            ids["g_camids"],
            metric=metric,
            max_rank=max_rank,
            topk=strip_topk if num_strips else 0,
        )
        ranked = metrics.pop("topk_indices", None)
        metrics.pop("topk_distances", None)
        distmat = None
    else:
        gf = np.asarray(gf)
        distmat = rerank_distances(qf, gf, metric) if rerank else distance_matrix(qf, gf, metric)
        metrics = evaluate_rank(
            distmat, ids["q_pids"], ids["g_pids"], ids["q_camids"], ids["g_camids"], max_rank=max_rank
        )
        ranked = None
    seconds["metrics"] = round(time.perf_counter() - t0, 3)

    # ---- figures -------------------------------------------------------------------------------------
    cmc = np.asarray(metrics["cmc"])
    files: dict[str, Any] = {"json": str(out / f"eval_{dataset}.json")}
    files["cmc_png"] = str(
        plot_cmc(
            {f"{dataset} ({metric}{', re-ranked' if rerank else ''})": cmc},
            out / f"cmc_{dataset}.png",
            title=f"CMC: {dataset}",
        )
    )
    strips = []
    for q in _pick_queries(~np.isnan(metrics["AP"]), num_strips):  # AP is NaN for skipped queries
        if ranked is not None:
            order = ranked[q][ranked[q] >= 0]
        else:
            assert distmat is not None
            junk = (ids["g_pids"] == ids["q_pids"][q]) & (ids["g_camids"] == ids["q_camids"][q])
            row = np.where(junk, np.inf, distmat[q])
            order = np.argsort(row, kind="stable")[: min(strip_topk, int((~junk).sum()))]
        name = f"q{q:05d}_pid{ids['q_pids'][q]}.png"
        strips.append(
            str(ranked_strip(q_items[q], [g_items[i] for i in order[:strip_topk]], out / f"ranked_{dataset}" / name))
        )
    files["strips"] = strips

    result: dict[str, Any] = {
        "dataset": dataset,
        "root": str(split.root),
        "checkpoint": str(checkpoint),
        "backbone": backbone_name,
        "backbone_sha256": backbone_sha,
        "embedder_fingerprint": embedder.fingerprint,
        "preprocess": embedder.preprocess,
        "flip": flip,
        "metric": metric,
        "rerank": rerank,
        "mode": "streaming" if use_stream else "dense",
        **{f"rank{r}": (float(cmc[r - 1]) if r <= len(cmc) else None) for r in CMC_RANKS},
        "mAP": metrics["mAP"],
        "mINP": metrics["mINP"],
        "cmc": [float(c) for c in cmc],
        "num_query": len(q_items),
        "num_gallery": len(g_items),
        "num_valid_queries": metrics["num_valid_queries"],
        "num_query_ids": len(np.unique(ids["q_pids"])),
        "num_gallery_ids": len(np.unique(ids["g_pids"])),
        "failures": failures,
        "notes": [*split.notes, TIE_NOTE] + ([FLIP_NOTE] if flip else []),
        "cache": {s: sets[s]["cache_hit"] for s in sets} if cache else None,
        "files": files,
        "seconds": {**seconds, "total": round(time.perf_counter() - t_start, 3)},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_bytes(files["json"], (json.dumps(result, indent=2) + "\n").encode())
    return result
