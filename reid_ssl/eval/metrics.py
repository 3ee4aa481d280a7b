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

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from reid_ssl.errors import InputError

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
        raise InputError("no query has a true match in the gallery (same pid, different camid)")
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
