"""Index parameters by gallery size: IVF lists, lists visited per query, PQ sub-quantizers, HNSW settings.

The rules an :data:`~reid_ssl.index.types.INDEX_TYPES` entry applies to ``n`` vectors of dimension ``D``
(``python -m benchmarks.bench_index_scale``, results/bench_index_scale.json: synthetic re-ID features, 1M x
256-D, one thread of a shared 2-core AMD EPYC; recall@10 against exact search for queries of present / absent
identities, single-query p50):

``nlist`` = the power of two nearest 4 sqrt(n) (FAISS: 4..16 sqrt(n); 4096 at 1M), trained on
:data:`TRAIN_POINTS_PER_LIST` points per list; ``nprobe`` = :func:`default_nprobe` (128 of 4096 at 1M: recall
0.997 / 0.990 at 2.1 ms where 256 gave 1.000 / 0.999 at 3.8 ms and 64 gave 0.986 / 0.958).
"""

from __future__ import annotations

import math

HNSW_EF_CONSTRUCTION = 100  # 40 (FAISS's default) gave recall@10 0.88 on clustered data, 100 gave 0.99
HNSW_EF_SEARCH = 128
# k-means points per IVF list: FAISS recommends 30..256; 256 (the old value) trained IVF4096 on all of a 1M
# gallery, 4x the k-means time of 64 for recall@10 within 0.01 at 200k (benchmarks/bench_index_scale.py)
TRAIN_POINTS_PER_LIST = 64


def ivf_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: the power of two nearest 4*sqrt(n), with >= 39 training points each."""
    nlist = 2 ** round(math.log2(max(4 * math.sqrt(max(n, 1)), 1)))
    while nlist > 1 and n < 39 * nlist:
        nlist //= 2
    return int(min(nlist, 65536))


def default_nprobe(nlist: int) -> int:
    """Lists visited per query: 1/16 of them (at least 32; all of a small index) up to 64, then 64 up to 2048
    lists, then 1/32 of them (128 of 4096 at 1M vectors, 512 of 16384 at 10M).

    Measured (recall@10 present / absent identities): 100k, 1024 lists, 64: 1.000 / 0.993 (bench_index);
    200k, 2048 lists, 64: 0.998 / 0.964; 1M, 4096 lists, 128: 0.997 / 0.990 (bench_index_scale). Recall at a
    fixed nprobe held from 200k to 1M while the lists doubled; the 1/32 fraction beyond is the conservative
    extrapolation of that.
    """
    return min(nlist, max(32, min(nlist // 16, max(64, nlist // 32))))


def pq_m(dim: int) -> int:
    """PQ sub-quantizers: the largest divisor of ``dim`` that is <= dim/8 (512-D -> 64 bytes/vector)."""
    return next(m for m in range(max(dim // 8, 1), 0, -1) if dim % m == 0)


def pq_nbits(n: int) -> int:
    """Bits per PQ code: at most 8, and >= 39 training points per PQ centroid for ``n`` vectors."""
    return int(min(8, max(1, math.floor(math.log2(max(n, 2) / 39)))))
