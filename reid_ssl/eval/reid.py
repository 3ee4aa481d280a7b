"""``reid_ssl eval`` on a re-ID dataset: checkpoint + dataset -> rank-k, mAP, mINP, JSON, CMC PNG, strips."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from reid_ssl.errors import DatasetLayoutError, ImageError, ResourceLimitError
from reid_ssl.eval.distances import distance_matrix, evaluate_features
from reid_ssl.eval.features import collapse_warning, embed_items, feature_spread
from reid_ssl.eval.figures import plot_cmc, ranked_strip
from reid_ssl.eval.metrics import CMC_RANKS, evaluate_rank
from reid_ssl.eval.rerank import rerank_distances
from reid_ssl.fileio import write_json

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
    from reid_ssl.checkpoint import load_checkpoint
    from reid_ssl.data.datasets import load_split
    from reid_ssl.embedder import Embedder, backbone_from_checkpoint

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
        raise ImageError(
            f"{sum(map(len, failures.values()))} images could not be read "
            f"(first: {first['reason']}); fix them or run without --strict"
        )
    q_items, g_items = sets["query"]["items"], sets["gallery"]["items"]
    if not q_items or not g_items:
        raise DatasetLayoutError(f"{dataset}: no readable {'query' if not q_items else 'gallery'} image")
    qf = np.asarray(sets["query"]["features"])
    gf = sets["gallery"]["features"]
    warnings = [w for w in [collapse_warning(gf, f"checkpoint {checkpoint}")] if w]
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
        raise ResourceLimitError(
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
        "feature_spread": feature_spread(gf),
        "warnings": warnings,
        "cache": {s: sets[s]["cache_hit"] for s in sets} if cache else None,
        "files": files,
        "seconds": {**seconds, "total": round(time.perf_counter() - t_start, 3)},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(files["json"], result)
    return result
