"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) through torchreid, guarded by a memory estimate."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from reid_ssl.errors import ResourceLimitError
from reid_ssl.eval.distances import distance_matrix

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
        raise ResourceLimitError(
            f"k-reciprocal re-ranking of {len(qf)} queries + {len(gf)} gallery images needs "
            f"~{need / 2**30:.1f} GiB ({RERANK_BYTES_PER_CELL} bytes x {n}^2), only "
            f"{have / 2**30:.1f} GiB available; run without --rerank"
        )
    from reid_ssl.data.torchreid_bridge import import_torchreid

    torchreid = import_torchreid()
    qg, qq, gg = (distance_matrix(a, b, metric) for a, b in ((qf, gf), (qf, qf), (gf, gf)))
    if metric == "cosine":  # torchreid squares the distances; keep them non-negative
        for d in (qg, qq, gg):
            np.maximum(d, 0.0, out=d)
    return np.asarray(torchreid.utils.re_ranking(qg, qq, gg, k1=k1, k2=k2, lambda_value=lambda_value), dtype=np.float32)
