"""Benchmark reid_ssl's evaluator against torchreid 0.2.5's, and time a SYSU-30k-scale streaming evaluation.

1. Market-sized: a random 3,368 x 15,913 float32 distance matrix with Market-1501's id structure (750 test
   identities, 2,798 distractors with pid 0, 6 cameras), no ties (each row is a permutation of distinct
   values, so both evaluators must agree exactly). Times ``reid_ssl.evaluate.evaluate_rank`` (best of
   ``--repeats``) and ``torchreid.metrics.evaluate_rank`` (its Python evaluator, the only one in PyPI 0.2.5),
   and reports the speed ratio and the largest CMC / mAP differences.
2. SYSU-30k-scale: 1,000 queries x 479,730 gallery features of 2,048 dimensions, L2-normalised, one true
   match per query (camera 1 vs 2) and 478,730 distractors (pid -1000), evaluated by
   ``reid_ssl.evaluate.evaluate_features`` (streamed gallery, exact). Feature generation is not timed.

Writes JSON (timings, ratio, differences, machine info, date). ``--smoke`` shrinks everything to seconds.

    python -m benchmarks.bench_evaluator --out benchmarks/results/evaluator.json
    python -m benchmarks.bench_evaluator --smoke
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc
from typing import Any

import numpy as np

from benchmarks.report import finish, header, write_result
from reid_ssl.data.torchreid_bridge import import_torchreid
from reid_ssl.eval.distances import evaluate_features
from reid_ssl.eval.metrics import default_threads, evaluate_rank


def market_like(
    num_query: int, num_gallery: int, num_ids: int, num_distractors: int, seed: int = 0
) -> tuple[np.ndarray, ...]:
    """A tie-free random float32 distance matrix with Market-1501's id/camera structure."""
    rng = np.random.default_rng(seed)
    ids = np.arange(1, num_ids + 1)
    q_pids, q_cams = rng.choice(ids, num_query), rng.integers(0, 6, num_query)
    g_pids = np.concatenate([np.zeros(num_distractors, np.int64), rng.choice(ids, num_gallery - num_distractors)])
    g_cams = rng.integers(0, 6, num_gallery)
    distmat = np.empty((num_query, num_gallery), np.float32)
    base = np.arange(num_gallery, dtype=np.float32) / num_gallery  # distinct values, exact in float32
    for i in range(num_query):
        distmat[i] = rng.permutation(base)
    return distmat, q_pids, g_pids, q_cams, g_cams


def best_of(fn: Any, repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def bench_market(size: tuple[int, int, int, int], repeats: int, torchreid_repeats: int) -> dict[str, Any]:
    distmat, qp, gp, qc, gc = market_like(*size)
    torchreid = import_torchreid()
    ours_s, ours = best_of(lambda: evaluate_rank(distmat, qp, gp, qc, gc, max_rank=50), repeats)
    ours_1t, _ = best_of(lambda: evaluate_rank(distmat, qp, gp, qc, gc, max_rank=50, num_threads=1), repeats)
    ref_s, (ref_cmc, ref_map) = best_of(
        lambda: torchreid.metrics.evaluate_rank(distmat, qp, gp, qc, gc, max_rank=50, use_metric_cuhk03=False),
        torchreid_repeats,
    )
    return {
        "shape": list(distmat.shape),
        "dtype": str(distmat.dtype),
        "num_query_ids": len(np.unique(qp)),
        "num_distractors": int((gp == 0).sum()),
        "ours_seconds": round(ours_s, 4),
        "ours_seconds_1_thread": round(ours_1t, 4),
        "threads": default_threads(),
        "torchreid_seconds": round(ref_s, 3),
        "torchreid_evaluator": "python (PyPI torchreid 0.2.5 ships no Cython build)",
        "speedup": round(ref_s / ours_s, 1),
        "max_abs_diff_cmc": float(np.abs(np.asarray(ref_cmc, np.float64) - ours["cmc"]).max()),
        "abs_diff_mAP": float(abs(ref_map - ours["mAP"])),
        "rank1": float(ours["cmc"][0]),
        "mAP": ours["mAP"],
        "mINP": ours["mINP"],
        "repeats": {"ours": repeats, "torchreid": torchreid_repeats},
    }


def sysu_like(num_query: int, num_gallery: int, dim: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Unit-norm query/gallery features; gallery row i < num_query is query i's true match: the query plus
    noise of norm 9 (cosine ~0.11, about the largest distractor similarity among 478,730 random 2048-d
    features, so the ranks are not trivial)."""
    rng = np.random.default_rng(seed)
    qf = rng.standard_normal((num_query, dim), dtype=np.float32)
    qf /= np.linalg.norm(qf, axis=1, keepdims=True)
    gf = np.empty((num_gallery, dim), np.float32)
    for start in range(0, num_gallery, 65536):
        block = rng.standard_normal((min(65536, num_gallery - start), dim), dtype=np.float32)
        gf[start : start + len(block)] = block
    gf[:num_query] = qf + (9.0 / np.sqrt(dim)) * gf[:num_query]
    gf /= np.linalg.norm(gf, axis=1, keepdims=True)
    q_pids = np.arange(num_query) + 28311
    g_pids = np.full(num_gallery, -1000, np.int64)
    g_pids[:num_query] = q_pids
    return qf, gf, q_pids, g_pids, np.full(num_query, 1), np.zeros(num_gallery, np.int64)


def bench_sysu(num_query: int, num_gallery: int, dim: int) -> dict[str, Any]:
    t = time.perf_counter()
    qf, gf, qp, gp, qc, gc = sysu_like(num_query, num_gallery, dim)
    gen = time.perf_counter() - t
    tracemalloc.start()  # numpy reports its buffers to tracemalloc: the evaluator's own working memory
    t = time.perf_counter()
    res = evaluate_features(qf, gf, qp, gp, qc, gc, metric="cosine", max_rank=50, topk=10)
    secs = time.perf_counter() - t
    working = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "num_query": num_query,
        "num_gallery": num_gallery,
        "dim": dim,
        "gallery_gib": round(gf.nbytes / 2**30, 2),
        "seconds": round(secs, 2),
        "generation_seconds_not_timed": round(gen, 1),
        "rank1": float(res["cmc"][0]),
        "rank10": float(res["cmc"][9]),
        "mAP": res["mAP"],
        "distance_matrix_avoided_gib": round(4 * num_query * num_gallery / 2**30, 2),
        "evaluator_working_memory_gib": round(working / 2**30, 2),
        "process_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (CI)")
    ap.add_argument("--out", help="JSON output (default benchmarks/results/evaluator.json; none with --smoke)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of our evaluator (best is reported)")
    ap.add_argument("--skip-sysu", action="store_true", help="only the Market-sized comparison")
    args = ap.parse_args(argv)
    if args.smoke:
        market, sysu, torchreid_repeats = (300, 1500, 80, 200), (200, 20000, 128), 1
    else:
        market, sysu, torchreid_repeats = (3368, 15913, 750, 2798), (1000, 479730, 2048), 1
    started = time.perf_counter()
    result = header("evaluator", args.smoke, torchreid=import_torchreid().__version__)
    result["market"] = bench_market(market, args.repeats, torchreid_repeats)
    m = result["market"]
    print(
        f"market {m['shape']}: ours {m['ours_seconds']:.3f} s ({m['ours_seconds_1_thread']:.3f} s on 1 thread),"
        f" torchreid {m['torchreid_seconds']:.2f} s, {m['speedup']}x; max |diff| CMC {m['max_abs_diff_cmc']:.2e},"
        f" mAP {m['abs_diff_mAP']:.2e}"
    )
    if not args.skip_sysu:
        result["sysu30k"] = bench_sysu(*sysu)
        s = result["sysu30k"]
        print(
            f"sysu30k {s['num_query']} x {s['num_gallery']} x {s['dim']}: {s['seconds']:.1f} s, "
            f"rank-1 {s['rank1']:.3f}, mAP {s['mAP']:.3f}, evaluator memory {s['evaluator_working_memory_gib']} GiB"
        )
    write_result(finish(result, started), args.out, args.smoke, "evaluator")
    return 0


if __name__ == "__main__":
    sys.exit(main())
