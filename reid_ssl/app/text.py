"""What the app's user reads: a result's caption, the match verdict, notes on short results, skipped files.

Camera ids are 0-based (file name ``..._c1...`` is camid 0, see :mod:`reid_ssl.data.market`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from reid_ssl.console import plural

if TYPE_CHECKING:
    from reid_ssl.index import GalleryIndex, SearchHit


def caption(hit: SearchHit) -> str:
    """``0.823 · pid 12 · camid 0 · frame 345`` (tracklet instead of pid where identities are tracklets)."""
    parts = [f"{hit.score:.3f}"]
    if hit.tracklet is not None:
        parts.append(f"tracklet {hit.tracklet}")
    elif hit.pid is not None:
        parts.append("junk" if hit.pid < 0 else f"pid {hit.pid}")
    if hit.camid is not None:
        parts.append(f"camid {hit.camid}")
    if hit.frame is not None:
        parts.append(f"frame {hit.frame}")
    if len(parts) == 1:
        parts.append(Path(hit.path).name)
    return " · ".join(parts)


def verdict(hits: Sequence[SearchHit], threshold: float | None) -> str:
    """The status line above the results: match, no match, or uncalibrated."""
    if not hits:
        return "No gallery item passed the filters."
    best = hits[0].score
    if threshold is None:
        return (
            f"Best score **{best:.3f}**. No no-match threshold is in use (this index has no calibrated threshold, "
            "or the slider is at 0), so every result is shown as a candidate."
        )
    above = sum(h.score >= threshold for h in hits)
    if best >= threshold:
        return (
            f"**Match**: best score {best:.3f} ≥ threshold {threshold:.3f}; {above} of {len(hits)} results "
            "are above it."
        )
    return (
        f"**No match**: nobody in the gallery scores above the threshold {threshold:.3f} (best "
        f"{best:.3f}). The nearest candidates are shown for reference."
    )


def shortfall(found: int, k: int, idx: GalleryIndex, camid: int | None) -> str:
    """A note when a search returned fewer than the ``k`` results asked for, with the likely reason."""
    if found >= k:
        return ""
    if idx.ntotal < k:
        why = f"the gallery holds only {plural(idx.ntotal, 'image')}"
    elif camid is not None:
        why = f"the others are from camid {camid}, which is excluded"
    else:
        why = "the approximate index visited too few of its lists (nprobe) to find more"
    return f" Showing {found} of the {k} results asked for: {why}."


def summary(problems: Sequence[tuple[str, str]], limit: int = 8) -> str:
    shown = "; ".join(f"{name}: {why}" for name, why in problems[:limit])
    more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
    return shown + more
