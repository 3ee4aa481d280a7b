"""The "no match" threshold: the top-1 score below which nobody in the gallery is the query's person.

:func:`calibrate_gallery` measures top-1 scores of labelled queries with their identity present in the gallery
and removed from it (Market protocol: same pid on the same camera is junk), :func:`calibrate_threshold` picks
the cut that maximises Youden's J, and :func:`describe_calibration` says in one line what the index offers.
Camera ids are 0-based; -1 marks an unknown pid or camera.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reid_ssl.errors import InputError

MAX_LOO_QUERIES = 5000  # leave-one-out calibration samples at most this many gallery items as queries
MIN_POSITIVES = 5  # queries with a true match on another camera that a calibration needs
# Below this Youden J (balanced accuracy 0.75) true and impostor top-1 scores overlap too much for a verdict:
# the calibration is stored, but the index offers no threshold (every result is shown as a candidate).
MIN_RELIABLE_J = 0.5


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


def calibrate_threshold(pos: np.ndarray, neg: np.ndarray) -> dict[str, Any]:
    """Pick the score below which "nobody in the gallery matches".

    ``pos``: top-1 score of queries whose identity IS in the gallery; ``neg``: top-1 score of the same
    queries with their identity removed from the gallery (the best impostor). The threshold maximises
    Youden's J = TPR - FPR (TPR: share of ``pos`` >= t, FPR: share of ``neg`` >= t), i.e. balanced accuracy
    of the match / no-match decision; candidates are midpoints between consecutive observed scores.
    ``reliable`` is False when the best J is under :data:`MIN_RELIABLE_J`.

    Args:
        pos, neg: (P,) and (N,) cosine scores.

    Returns:
        ``threshold``, ``tpr``, ``fpr``, ``youden_j``, ``reliable``, ``auc``, counts, medians and ``method``.

    Raises:
        ValueError: ``pos`` or ``neg`` is empty (a programming error: callers check the counts first).
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
        q_pids, q_cams, g_pids, g_cams: (Q,) / (G,) int labels (camids 0-based), -1 where unknown.
        q_self: (Q,) gallery row of each query to ignore (leave-one-out), or -1.
        block: queries per matrix product (bounds memory to block x G).

    Returns:
        ``(pos, neg)``, float32 arrays of equal length (one entry per counted query).
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


def calibrate_gallery(
    g_feats: np.ndarray,
    g_pids: np.ndarray,
    g_cams: np.ndarray,
    queries: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Calibrate the threshold of a gallery from its labels (see :func:`calibrate_threshold`).

    Args:
        g_feats: (G, D) unit features; g_pids, g_cams: (G,) int labels, -1 where unknown (camids 0-based).
        queries: ``(features (Q, D), pids (Q,), camids (Q,))`` of labelled queries, each searched against the
            whole gallery; ``None``: leave-one-out over the gallery's labelled items (at most
            :data:`MAX_LOO_QUERIES` of them), each a query against the others.

    Returns:
        The calibration dict, with ``source`` saying which queries were used.

    Raises:
        InputError: fewer than :data:`MIN_POSITIVES` queries have a true match on another camera.
    """
    if queries is not None:
        q_feats, q_pids, q_cams = queries
        pos, neg = open_set_scores(q_feats, q_pids, q_cams, g_feats, g_pids, g_cams)
        source = f"{len(q_feats)} queries"
    else:
        sel = np.flatnonzero(g_pids >= 0)
        if len(sel) > MAX_LOO_QUERIES:
            sel = np.sort(np.random.default_rng(0).choice(sel, MAX_LOO_QUERIES, replace=False))
        pos, neg = open_set_scores(g_feats[sel], g_pids[sel], g_cams[sel], g_feats, g_pids, g_cams, sel)
        source = f"leave-one-out over {len(sel)} labelled gallery items"
    if len(pos) < MIN_POSITIVES:
        raise InputError(
            f"cannot calibrate: only {len(pos)} queries have a true match on another camera "
            "(needs pid/camera labels, e.g. Market-style file names)"
        )
    return {**calibrate_threshold(pos, neg), "source": source}
