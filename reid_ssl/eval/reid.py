"""``reid_ssl eval`` on a re-ID dataset: checkpoint + dataset -> rank-k, mAP, mINP, JSON, CMC PNG, strips."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from reid_ssl.errors import DatasetLayoutError, ImageError, ResourceLimitError
from reid_ssl.eval.distances import distance_matrix, evaluate_features
from reid_ssl.eval.features import collapse_warning, embed_items, feature_spread
from reid_ssl.eval.figures import plot_cmc, ranked_strip
from reid_ssl.eval.metrics import CMC_RANKS, evaluate_rank
from reid_ssl.eval.rerank import rerank_distances
from reid_ssl.fileio import check_result_file, write_json

if TYPE_CHECKING:
    from reid_ssl.data.reid import ReidSplit
    from reid_ssl.embedder import Embedder

DENSE_LIMIT_BYTES = 1 << 30  # above a 1 GiB distance matrix, evaluate by streaming the gallery
FLIP_NOTE = "flip: feature = normalize(normalize(f(x)) + normalize(f(flip(x))))"
TIE_NOTE = "ties: at equal distance wrong matches rank before true matches (pessimistic)"


def _pick_queries(valid: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    idx = np.flatnonzero(valid)
    if count <= 0 or len(idx) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(idx, size=min(count, len(idx)), replace=False))


@dataclass
class _Embedded:
    """One subset after embedding: features of the readable images, their items, failures, cache hit."""

    features: Any  # (n_ok, D) float32, memory-mapped when cached
    items: list[tuple[str, int, int]]
    failures: list[dict[str, str]]
    cache_hit: bool

    def ids(self, col: int) -> np.ndarray:
        """Column 1 (pids) or 2 (camids) of the items, (n_ok,) int64."""
        return np.asarray([it[col] for it in self.items], dtype=np.int64)


# Fewer query identities than this and the scores are flagged: with 1 identity any ranking scores 100%.
MIN_QUERY_IDENTITIES = 5


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
    overwrite: bool = False,
) -> dict[str, Any]:
    """Evaluate a checkpoint on a re-ID benchmark; writes ``eval_<dataset>.json``, a CMC PNG and strips.

    Features come from the checkpoint's one Embedder (its preprocessing; :data:`FLIP_NOTE` with ``flip``).
    Galleries whose distance matrix would pass :data:`DENSE_LIMIT_BYTES` (SYSU-30k, MSMT17) are evaluated
    with :func:`~reid_ssl.eval.distances.evaluate_features` (``streaming=None`` decides; True/False forces).
    Gallery and query features are cached under ``<out_dir>/features/``.

    Args:
        checkpoint: reid_ssl checkpoint path.
        dataset, root, split_options: see :func:`reid_ssl.data.datasets.load_split`.
        out_dir: where the JSON, PNGs and feature cache go (default: the checkpoint's folder).
        rerank: k-reciprocal re-ranking (dense only; refused where it would not fit).
        strict: raise if any image fails to decode (default: report them in ``"failures"`` and evaluate the
            rest).
        overwrite: replace results of other options in ``out_dir``. Without it an earlier
            ``eval_<dataset>.json`` (and its CMC plot and strips) is replaced only by a run of the same checkpoint
            path, dataset, root and scoring options (``"options"`` in the JSON), checked before any work.

    Returns:
        The dict written to the JSON file (rank-1/5/10/20, mAP, mINP, CMC, counts, failures, warnings, files,
        timings).

    Raises:
        AlreadyExistsError: ``out_dir`` holds a result of other options and ``overwrite`` is off.
        CheckpointError, DatasetLayoutError: unusable checkpoint or dataset; ImageError: unreadable images with
        ``strict``; ResourceLimitError: re-ranking that would not fit.
    """
    from reid_ssl.data.datasets import load_split

    t_start = time.perf_counter()
    checkpoint = Path(checkpoint)
    split = load_split(dataset, root, **(split_options or {}))
    out = Path(out_dir) if out_dir is not None else checkpoint.resolve().parent
    options = {
        "checkpoint": str(checkpoint.resolve()), "dataset": dataset, "root": str(Path(split.root).resolve()),
        "split_options": split_options or {}, "metric": metric, "flip": flip, "rerank": rerank, "max_rank": max_rank,
    }  # fmt: skip
    check_result_file(out / f"eval_{dataset}.json", options, overwrite)
    embedder, model_info = _load_embedder(checkpoint, device, flip)
    out.mkdir(parents=True, exist_ok=True)

    # ---- features and metrics ------------------------------------------------------------------------
    seconds: dict[str, float] = {}
    sets = _embed_sets(embedder, split, dataset, out, cache, batch_size, num_workers, progress, seconds)
    _check_readable(dataset, sets, strict)
    q, g = sets["query"], sets["gallery"]
    topk = strip_topk if num_strips else 0
    metrics, ranked, use_stream = _metrics(q, g, metric, rerank, max_rank, streaming, topk, seconds)

    # ---- figures and the result ----------------------------------------------------------------------
    files = _figures(q, g, metrics, ranked, dataset, metric, rerank, num_strips, strip_topk, out)
    result: dict[str, Any] = {
        "dataset": dataset,
        "root": str(split.root),
        "checkpoint": str(checkpoint),
        **model_info,
        "flip": flip,
        "metric": metric,
        "rerank": rerank,
        "mode": "streaming" if use_stream else "dense",
        **_scores(metrics, q, g),
        **_diagnostics(checkpoint, sets, [*split.notes, TIE_NOTE] + ([FLIP_NOTE] if flip else []), cache),
        "files": files,
        "seconds": {**seconds, "total": round(time.perf_counter() - t_start, 3)},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "options": options,
    }
    write_json(files["json"], result)
    return result


def _load_embedder(checkpoint: Path, device: str | None, flip: bool) -> tuple[Embedder, dict[str, Any]]:
    """The checkpoint's Embedder and what the result records of it: backbone, sha256, fingerprint, preprocessing."""
    from reid_ssl.checkpoint import load_checkpoint
    from reid_ssl.embedder import Embedder, backbone_from_checkpoint

    ckpt = load_checkpoint(checkpoint)
    embedder = Embedder(backbone_from_checkpoint(ckpt), ckpt["preprocess"], ckpt["backbone"]["sha256"], device, flip)
    model = {
        "backbone": ckpt["backbone"]["name"],
        "backbone_sha256": ckpt["backbone"]["sha256"],
        "embedder_fingerprint": embedder.fingerprint,
        "preprocess": embedder.preprocess,
    }
    del ckpt  # training state (optimizer, heads) is not needed past this point
    return embedder, model


def _embed_sets(
    embedder: Embedder,
    split: ReidSplit,
    dataset: str,
    out: Path,
    cache: bool,
    batch_size: int,
    num_workers: int,
    progress: bool,
    seconds: dict[str, float],
) -> dict[str, _Embedded]:
    """Embed the query and gallery lists (cached under ``out/features``); records ``embed_<subset>`` in ``seconds``."""
    cache_dir = out / "features" if cache else None
    sets: dict[str, _Embedded] = {}
    for subset, items in (("query", split.query), ("gallery", split.gallery)):
        t0 = time.perf_counter()
        feats, ok, failed, hit = embed_items(
            embedder, [p for p, _, _ in items], cache_dir, f"{dataset}-{subset}", batch_size, num_workers, progress
        )
        seconds[f"embed_{subset}"] = round(time.perf_counter() - t0, 3)
        failures = [{"image": items[i][0], "reason": r} for i, r in failed]
        sets[subset] = _Embedded(feats, [items[i] for i in ok], failures, hit)
    return sets


def _check_readable(dataset: str, sets: dict[str, _Embedded], strict: bool) -> None:
    failures = [f for e in sets.values() for f in e.failures]
    if strict and failures:
        raise ImageError(
            f"{len(failures)} images could not be read (first: {failures[0]['reason']}); "
            "fix them or run without --strict"
        )
    for name, e in sets.items():
        if not e.items:
            raise DatasetLayoutError(f"{dataset}: no readable {name} image")


def _metrics(
    q: _Embedded,
    g: _Embedded,
    metric: str,
    rerank: bool,
    max_rank: int,
    streaming: bool | None,
    topk: int,
    seconds: dict[str, float],
) -> tuple[dict[str, Any], np.ndarray | _DenseRanking, bool]:
    """Metrics, what the strips need to rank a query's gallery, and whether they were streamed; times them."""
    t0 = time.perf_counter()
    dense_bytes = 4 * len(q.items) * len(g.items)
    stream = (dense_bytes > DENSE_LIMIT_BYTES) if streaming is None else streaming
    metrics, ranked = _dense_or_streamed(q, g, metric, rerank, max_rank, stream, topk)
    seconds["metrics"] = round(time.perf_counter() - t0, 3)
    return metrics, ranked, stream


def _dense_or_streamed(
    q: _Embedded, g: _Embedded, metric: str, rerank: bool, max_rank: int, stream: bool, topk: int
) -> tuple[dict[str, Any], np.ndarray | _DenseRanking]:
    """Metrics, dense or streamed, and what the strips need to rank a query's gallery."""
    qp, gp, qc, gc = q.ids(1), g.ids(1), q.ids(2), g.ids(2)
    qf = np.asarray(q.features)
    if stream:
        if rerank:
            raise ResourceLimitError(
                f"re-ranking needs the full distance matrix ({4 * len(qf) * len(gp) / 2**30:.1f} GiB for "
                f"{len(qf)} x {len(gp)}); run without --rerank"
            )
        metrics = evaluate_features(qf, g.features, qp, gp, qc, gc, metric=metric, max_rank=max_rank, topk=topk)
        metrics.pop("topk_distances", None)
        return metrics, metrics.pop("topk_indices", np.zeros((len(qf), 0), np.int64))
    gf = np.asarray(g.features)
    distmat = rerank_distances(qf, gf, metric) if rerank else distance_matrix(qf, gf, metric)
    return evaluate_rank(distmat, qp, gp, qc, gc, max_rank=max_rank), _DenseRanking(distmat, qp, gp, qc, gc)


@dataclass
class _DenseRanking:
    """Ranks a query's gallery from the full distance matrix (junk = same pid and camera, left out)."""

    distmat: np.ndarray
    qp: np.ndarray
    gp: np.ndarray
    qc: np.ndarray
    gc: np.ndarray

    def __getitem__(self, q: int) -> np.ndarray:
        junk = (self.gp == self.qp[q]) & (self.gc == self.qc[q])
        order = np.argsort(np.where(junk, np.inf, self.distmat[q]), kind="stable")
        return order[: int((~junk).sum())]


def _strips(q: _Embedded, g: _Embedded, ap: np.ndarray, ranked: Any, count: int, topk: int, folder: Path) -> list[str]:
    """Ranked-result strips (PNG) of ``count`` random valid queries; ``ranked[q]`` gives gallery rows in order."""
    paths = []
    for qi in _pick_queries(~np.isnan(ap), count):  # AP is NaN for skipped queries
        order = np.asarray(ranked[qi])
        order = order[order >= 0][:topk]
        name = f"q{qi:05d}_pid{q.items[qi][1]}.png"
        paths.append(str(ranked_strip(q.items[qi], [g.items[i] for i in order], folder / name)))
    return paths


def _figures(
    q: _Embedded,
    g: _Embedded,
    metrics: dict[str, Any],
    ranked: Any,
    dataset: str,
    metric: str,
    rerank: bool,
    num_strips: int,
    strip_topk: int,
    out: Path,
) -> dict[str, Any]:
    """The CMC plot and the ranked strips; returns the result's ``"files"`` (the JSON's path first)."""
    files: dict[str, Any] = {"json": str(out / f"eval_{dataset}.json")}
    label = f"{dataset} ({metric}{', re-ranked' if rerank else ''})"
    cmc = np.asarray(metrics["cmc"])
    files["cmc_png"] = str(plot_cmc({label: cmc}, out / f"cmc_{dataset}.png", title=f"CMC: {dataset}"))
    folder = out / f"ranked_{dataset}"
    files["strips"] = _strips(q, g, metrics["AP"], ranked, num_strips, strip_topk, folder)
    _remove_stale_strips(Path(files["json"]), folder, set(files["strips"]))
    return files


def _remove_stale_strips(result: Path, folder: Path, kept: set[str]) -> None:
    """Delete the strips the result being replaced listed and this run did not write again (a rerun with fewer
    ``--strips`` or other queries); only strip images of this dataset's folder, nothing else."""
    try:
        listed = json.loads(result.read_text()).get("files", {}).get("strips", [])
    except (OSError, ValueError, AttributeError):
        return
    for name in listed:
        path = Path(name)
        if str(path) not in kept and path.parent == folder and path.suffix == ".png" and path.name.startswith("q"):
            path.unlink(missing_ok=True)


def _scores(metrics: dict[str, Any], q: _Embedded, g: _Embedded) -> dict[str, Any]:
    """The result's rank-k, mAP, mINP, CMC and counts."""
    cmc = np.asarray(metrics["cmc"])
    return {
        **{f"rank{r}": (float(cmc[r - 1]) if r <= len(cmc) else None) for r in CMC_RANKS},
        "mAP": metrics["mAP"],
        "mINP": metrics["mINP"],
        "cmc": [float(c) for c in cmc],
        "num_query": len(q.items),
        "num_gallery": len(g.items),
        "num_valid_queries": metrics["num_valid_queries"],
        "num_query_ids": len(np.unique(q.ids(1))),
        "num_gallery_ids": len(np.unique(g.ids(1))),
    }


def _diagnostics(checkpoint: Path, sets: dict[str, _Embedded], notes: list[str], cache: bool) -> dict[str, Any]:
    """The result's failures, notes, gallery feature spread, collapse warning and cache hits."""
    g = sets["gallery"]
    warnings = [w for w in [collapse_warning(g.features, f"checkpoint {checkpoint}")] if w]
    identities = len(np.unique(sets["query"].ids(1)))
    if identities < MIN_QUERY_IDENTITIES:
        warnings.append(
            f"only {identities} query identit{'y' if identities == 1 else 'ies'}: rank-k and mAP say little (with one "
            "identity every top match can be right); use a split with more people, e.g. longer footage for "
            "`reid_ssl prepare video --split`"
        )
    return {
        "failures": {name: e.failures for name, e in sets.items()},
        "notes": notes,
        "feature_spread": feature_spread(g.features),
        "warnings": warnings,
        "cache": {name: e.cache_hit for name, e in sets.items()} if cache else None,
    }
