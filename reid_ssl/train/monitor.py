"""The online re-ID monitor: rank-1 / mAP of the current backbone on a retrieval split during training."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from reid_ssl.data.datasets import DATASETS, load_split
from reid_ssl.embedder import Embedder
from reid_ssl.errors import DatasetLayoutError
from reid_ssl.eval.distances import evaluate_features

if TYPE_CHECKING:
    from reid_ssl.config import Config

Monitor = Callable[[Embedder], dict[str, float]]

log = logging.getLogger(__name__)


def retrieval_monitor(dataset: str, root: str | None, batch_size: int = 128) -> Monitor:
    """A callable that embeds the split's query and gallery and returns rank-1, rank-5, rank-10 and mAP.

    The split is read now, so a wrong layout fails before training starts, not after the first epoch.
    Images that fail to decode are counted in ``unreadable`` (never silently dropped).
    """
    split = load_split(dataset, root or None)

    def monitor(embedder: Embedder) -> dict[str, float]:
        q = embedder.embed_images([p for p, _, _ in split.query], batch_size=batch_size)
        g = embedder.embed_images([p for p, _, _ in split.gallery], batch_size=batch_size)
        qi = [split.query[i] for i in q.ok]
        gi = [split.gallery[i] for i in g.ok]
        r = evaluate_features(
            q.features,
            g.features,
            [x[1] for x in qi],
            [x[1] for x in gi],
            [x[2] for x in qi],
            [x[2] for x in gi],
            max_rank=10,
        )
        return {
            "rank1": float(r["cmc"][0]),
            "rank5": float(r["cmc"][4]),
            "rank10": float(r["cmc"][9]),
            "mAP": float(r["mAP"]),
            "unreadable": float(len(q.failures) + len(g.failures)),
        }

    return monitor


def monitor_for(cfg: Config) -> Monitor | None:
    """The monitor ``train.eval_dataset`` asks for, on ``train.eval_root`` (default ``data.root``).

    ``auto``: the training source's validation split when it has one on disk (``pets09-val``, ``video-val``),
    else its own retrieval split (its test split, said in the log), else none; a dataset name: that split;
    ``""``: none.

    Raises:
        DatasetLayoutError: a named split is not there (read now, so training does not fail at its first epoch).
    """
    name, root = cfg.train.eval_dataset, cfg.train.eval_root or cfg.data.root
    if name != "auto":
        return retrieval_monitor(name, root) if name else None
    for candidate in (f"{cfg.data.source}-val", cfg.data.source):
        if candidate not in DATASETS or DATASETS[candidate].reid is None:
            continue
        try:
            monitor = retrieval_monitor(candidate, root)
        except DatasetLayoutError as e:
            log.info("train.eval_dataset=auto: no %s split (%s)", candidate, e)
            continue
        if not candidate.endswith("-val"):
            log.info("train.eval_dataset=auto: monitoring %s, its test split (no validation split found)", candidate)
        return monitor
    return None
