"""The online re-ID monitor: rank-1 / mAP of the current backbone on a retrieval split during training."""

from __future__ import annotations

from collections.abc import Callable

from reid_ssl.embedder import Embedder
from reid_ssl.evaluate import evaluate_features
from reid_ssl.reid_data import load_split


def retrieval_monitor(dataset: str, root: str, batch_size: int = 128) -> Callable[[Embedder], dict[str, float]]:
    """A callable that embeds the split's query and gallery and returns rank-1, rank-5, rank-10 and mAP.

    The split is read now, so a wrong layout fails before training starts, not after the first epoch.
    Images that fail to decode are counted in ``unreadable`` (never silently dropped).
    """
    split = load_split(dataset, root)

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
