"""Tracklets -> training bags and Market-1501-layout retrieval splits (test and validation) of pseudo-identities.

Tracklets are split, never boxes, so no evaluation box is ever seen in training. Tracklets with at least
``min_test_len`` boxes, in id order (ids follow the first frame, so this is time order), are **test**
tracklets when their position is ``test_offset`` modulo ``test_every``; of the long tracklets left, every
``val_every``-th (from ``val_offset``) is a **validation** tracklet; every other tracklet with at least
``min_train_len`` boxes is a **training** bag. Recipes are chosen on validation and reported once on test.

Within a test or validation tracklet, its boxes in time order are cut into halves: the first ``ceil(n / 2)``
are camera ``c1`` (camid 0), the rest ``c2`` (camid 1). The halves are time windows, so the Market rule that
ignores gallery items with the query's pid and camid removes the near-duplicate neighbouring frames, and a
query must find its tracklet across time. ``queries_per_tracklet`` evenly spaced boxes of the first half are
queries; all other boxes form the gallery.

Caveat: tracklet ids are pseudo-identities. One person can own several tracklets, so a correct match to
another tracklet of the same person counts as wrong: rank-1 and mAP undercount true performance. Compare
methods with each other on such a split.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from reid_ssl.data.market import market_name
from reid_ssl.data.video.track import TrackBox

# subset -> folder of the written layout
LAYOUT = {
    "train": "market/bounding_box_train",
    "query": "market/query",
    "gallery": "market/bounding_box_test",
    "val_query": "market_val/query",
    "val_gallery": "market_val/bounding_box_test",
}


@dataclass(frozen=True)
class SplitProtocol:
    """How tracklets are assigned to train / validation / test (module docstring)."""

    min_train_len: int = 5
    min_test_len: int = 25
    test_every: int = 2
    test_offset: int = 0
    val_every: int = 2  # 0: no validation split
    val_offset: int = 0
    queries_per_tracklet: int = 8

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "camera_rule": "c1 = first ceil(n/2) boxes of a tracklet in time, c2 = the rest"}


@dataclass(frozen=True)
class SplitItem:
    """One crop of the split: where it goes and what it is."""

    box: TrackBox
    subset: str  # a key of LAYOUT
    camid: int  # 0 = first half of the tracklet in time ("c1" in file names), 1 = second half ("c2")

    @property
    def market_path(self) -> str:
        """Where the crop goes in the Market layouts, relative to the output folder."""
        return f"{LAYOUT[self.subset]}/{market_name(self.box.track, self.camid, self.box.frame)}"


def group_tracks(tracks: Iterable[TrackBox]) -> dict[int, list[TrackBox]]:
    """Boxes of each track id, in frame order."""
    groups: dict[int, list[TrackBox]] = {}
    for b in sorted(tracks, key=lambda b: (b.track, b.frame)):
        groups.setdefault(b.track, []).append(b)
    return groups


def split_tracklets(tracks: Iterable[TrackBox], protocol: SplitProtocol | None = None) -> list[SplitItem]:
    """Assign every box to a subset of :data:`LAYOUT` (the protocol of the module docstring).

    Returns:
        The split, sorted by (track, frame); boxes of train tracklets shorter than ``min_train_len`` are left out.
    """
    p = protocol or SplitProtocol()
    groups = group_tracks(tracks)
    long_ids = [k for k in sorted(groups) if len(groups[k]) >= p.min_test_len]
    test_ids = {k for i, k in enumerate(long_ids) if i % p.test_every == p.test_offset % p.test_every}
    rest = [k for k in long_ids if k not in test_ids]
    val_ids = {k for i, k in enumerate(rest) if p.val_every and i % p.val_every == p.val_offset % p.val_every}
    items = []
    for k, boxes in groups.items():
        n = len(boxes)
        first_half = math.ceil(n / 2)
        halves = [0 if i < first_half else 1 for i in range(n)]
        if k not in test_ids and k not in val_ids:
            if n >= p.min_train_len:
                items += [SplitItem(b, "train", c) for b, c in zip(boxes, halves, strict=True)]
            continue
        q = min(p.queries_per_tracklet, first_half)
        query_pos = {int((j + 0.5) * first_half / q) for j in range(q)}
        prefix = "val_" if k in val_ids else ""
        for i, b in enumerate(boxes):
            items.append(SplitItem(b, prefix + ("query" if i in query_pos else "gallery"), halves[i]))
    return items


def split_counts(items: list[SplitItem]) -> dict[str, int]:
    """Tracklets and crops per subset, for manifests."""
    counts: dict[str, int] = {}
    for subset, tracklets in (("train", ("train",)), ("test", ("query",)), ("val", ("val_query",))):
        counts[f"{subset}_tracklets"] = len({i.box.track for i in items if i.subset in tracklets})
    for subset in LAYOUT:
        counts[subset] = sum(i.subset == subset for i in items)
    return counts
