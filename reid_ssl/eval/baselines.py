"""Baselines that any learned backbone must beat, scored by the same evaluator as the models.

* **Colour histogram**: per-stripe HSV hue x saturation histograms of each crop (Hellinger embedding), the
  classic hand-made re-ID descriptor. On single-camera footage such as PETS09 clothing colour is a strong cue.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from reid_ssl.data.reid import read_market_dir
from reid_ssl.errors import DatasetLayoutError
from reid_ssl.eval.metrics import evaluate_rank
from reid_ssl.images import open_rgb


def hsv_histogram(image: np.ndarray, bins: tuple[int, int] = (16, 8)) -> np.ndarray:
    """L1-normalised hue x saturation histogram of a BGR image, flattened to ``bins[0] * bins[1]``."""
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
    hist = cv2.calcHist([hsv], [0, 1], None, list(bins), [0, 180, 0, 256]).reshape(-1).astype(np.float64)
    total = hist.sum()
    return hist / total if total > 0 else hist


def stripe_histogram_feature(image: np.ndarray, stripes: int = 3, bins: tuple[int, int] = (16, 8)) -> np.ndarray:
    """Hellinger embedding of per-stripe HSV histograms of a BGR crop, (stripes * bins[0] * bins[1],).

    The crop is cut into ``stripes`` horizontal bands; each band's hue x saturation histogram is
    L1-normalised, square-rooted and the bands are concatenated and divided by ``sqrt(stripes)``. The result
    has unit L2 norm and ``f_a @ f_b`` is the mean Bhattacharyya coefficient over bands, so ``1 - f_a @ f_b``
    ranks like the mean Bhattacharyya distance.
    """
    edges = np.linspace(0, image.shape[0], stripes + 1).round().astype(int)
    parts = [np.sqrt(hsv_histogram(image[a:b], bins)) for a, b in itertools.pairwise(edges)]
    return np.concatenate(parts) / math.sqrt(stripes)


def _histogram_features(folder: Path, stripes: int, bins: tuple[int, int]) -> tuple[np.ndarray, ...]:
    items = read_market_dir(folder)
    if not items:
        raise DatasetLayoutError(f"no images in {folder}")
    feats = []
    for path, _, _ in items:
        bgr = np.ascontiguousarray(np.asarray(open_rgb(path))[..., ::-1])  # the one decoder, as OpenCV's order
        feats.append(stripe_histogram_feature(bgr, stripes, bins))
    return np.stack(feats), np.asarray([p for _, p, _ in items]), np.asarray([c for _, _, c in items])


def histogram_baseline(market_root: Path, stripes: int = 3, bins: tuple[int, int] = (16, 8)) -> dict[str, Any]:
    """Colour-histogram re-ID baseline on a Market-1501-style folder (``query/``, ``bounding_box_test/``).

    Features: :func:`stripe_histogram_feature`; distance ``1 - f_q @ f_g``; metrics:
    :func:`reid_ssl.eval.metrics.evaluate_rank` (the evaluator every model is scored with).

    Returns:
        ``rank1``, ``rank5``, ``rank10``, ``mAP`` (fractions), ``num_query``, ``num_valid_query``,
        ``num_gallery``.
    """
    market_root = Path(market_root)
    qf, q_pids, q_cams = _histogram_features(market_root / "query", stripes, bins)
    gf, g_pids, g_cams = _histogram_features(market_root / "bounding_box_test", stripes, bins)
    r = evaluate_rank(1.0 - qf @ gf.T, q_pids, g_pids, q_cams, g_cams, max_rank=10)
    cmc = r["cmc"]
    return {
        "rank1": float(cmc[0]),
        "rank5": float(cmc[4]),
        "rank10": float(cmc[9]),
        "mAP": float(r["mAP"]),
        "num_query": len(q_pids),
        "num_valid_query": int(r["num_valid_queries"]),
        "num_gallery": len(g_pids),
    }
