"""FAISS gallery benchmark: search latency (p50/p95) and recall@10 against exact search for every index type at
10k and 100k vectors, memory per vector, and the app's query latency (embed one crop + search).

    python -m benchmarks.bench_index                 # full run (~5 min on 2 cores), writes benchmarks/results/
    python -m benchmarks.bench_index --smoke         # seconds: tiny sizes, for CI
    python -m benchmarks.bench_index --checkpoint runs/pets09_r18/checkpoint.pt

Vectors are synthetic but shaped like a re-ID gallery (see `clustered`): 20 crops per identity, identities in
a low-rank appearance space so that impostors are close; recall@10 is reported for queries of gallery
identities and for queries of absent identities (near-ties: the hard case for approximate search).
Latencies are single queries (what the app does), median / 95th percentile over many repeats, because the
2 CPU cores here are shared with other work. The embedding latency does not depend on the weights, so a
random-init checkpoint is used unless one is given.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from benchmarks.machine import REPO
from benchmarks.report import finish, header, write_result
from reid_ssl.index import INDEX_TYPES, GalleryIndex, GalleryItem, omp_threads


def clustered(
    n: int, dim: int, n_queries: int, per_identity: int = 20, noise: float = 0.5, rank: int = 16, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A re-ID-shaped gallery of unit vectors: (gallery (n, dim), in-gallery queries, out-of-gallery queries).

    Identity centres lie in a ``rank``-dimensional "appearance" subspace, so impostors are close (mean cosine at
    rank 1/10/20/100: ~0.80/0.77/0.70/0.56, like re-ID features, unlike isotropic random vectors); every
    gallery vector and query is a separate noisy crop of an identity. In-gallery queries are crops of gallery
    identities; out-of-gallery queries are crops of new identities (their top 10 are near-ties: the hard case).
    """
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((rank, dim)).astype(np.float32) / np.sqrt(rank)
    n_ids = max(n // per_identity, 1)
    centres = rng.standard_normal((n_ids + n_queries, rank)).astype(np.float32) @ basis

    def crops(ids: np.ndarray) -> np.ndarray:
        v = centres[ids] + noise * rng.standard_normal((len(ids), dim)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    return (
        crops(rng.integers(0, n_ids, n)),
        crops(rng.integers(0, n_ids, n_queries)),
        crops(n_ids + np.arange(n_queries)),
    )


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": round(float(np.median(ms)), 4), "p95_ms": round(float(np.percentile(ms, 95)), 4)}


def bench_type(
    name: str, x: np.ndarray, queries: dict[str, np.ndarray], repeats: int, k: int
) -> tuple[dict, GalleryIndex]:
    info = {"fingerprint": "bench", "preprocess": {}, "feature_dim": x.shape[1], "flip": True, "checkpoint": None}
    idx = GalleryIndex.create(info, name)
    t0 = time.perf_counter()
    idx.add(x, [GalleryItem(path=f"/gallery/{i:07d}.jpg", pid=i // 20, camid=i % 2 + 1) for i in range(len(x))])
    build_s = time.perf_counter() - t0
    recall = {}
    for label, q in queries.items():
        _, exact = idx.search_exact(q, k)
        got = [[h.id for h in row] for row in idx.search(q, k)]
        recall[label] = round(float(np.mean([len(set(g) & set(e)) / k for g, e in zip(got, exact, strict=True)])), 4)
    q = np.concatenate(list(queries.values()))
    for i in range(5):  # warm-up
        idx.search(q[i], k)
    lat, raw = [], []
    params = idx.index_type.search_params(idx.spec, None)
    for r in range(repeats):
        qi = q[r % len(q)]
        t = time.perf_counter()
        idx.search(qi, k)
        lat.append(time.perf_counter() - t)
        t = time.perf_counter()
        with omp_threads(1):
            idx._index.search(qi[None], k * int(idx.manifest["index"]["rerank"] or 1), params=params)
        raw.append(time.perf_counter() - t)
    spec = idx.spec
    ram = len(faiss.serialize_index(idx._index)) / len(x)
    row = {
        "type": name,
        "n": len(x),
        "dim": x.shape[1],
        "factory": spec.factory,
        "nprobe": spec.nprobe,
        "ef_search": spec.ef_search,
        "rerank": spec.rerank,
        "build_s": round(build_s, 2),
        f"recall@{k}": recall,
        "search": percentiles(lat),
        "faiss_search": percentiles(raw),
        "index_bytes_per_vector": round(ram, 1),
    }
    return row, idx


def disk_per_vector(idx: GalleryIndex) -> dict[str, float]:
    """Bytes per item of each file of a saved generation."""
    with tempfile.TemporaryDirectory() as d:
        idx.save(Path(d) / "idx")
        gen = next((Path(d) / "idx").glob("gen-*"))
        return {p.name: round(p.stat().st_size / idx.ntotal, 1) for p in sorted(gen.iterdir())}


def bench_embed(checkpoint: str | None, idx: GalleryIndex | None, repeats: int, both_threads: bool = True) -> dict:
    """Latency of what one app query costs: decode + preprocess + backbone (with flip) + index search."""
    import torch

    from reid_ssl.embedder import load_embedder

    tmp = None
    if checkpoint is None:
        from reid_ssl.checkpoint import backbone_block, make_preprocess, save_checkpoint
        from reid_ssl.models import build_backbone

        tmp = tempfile.TemporaryDirectory()
        net = build_backbone("resnet18")
        checkpoint = str(
            save_checkpoint(
                Path(tmp.name) / "random_r18.pt",
                {
                    "backbone": backbone_block("resnet18", net.feature_dim, net.state_dict()),
                    "preprocess": make_preprocess(128, 64),
                    "config": {},
                    "step": 0,
                    "epoch": 0,
                },
            )
        )
    embedder = load_embedder(checkpoint, device="cpu")
    if idx is None or idx.dim != embedder.feature_dim:  # --smoke benchmarks 64-D vectors: search a 512-D gallery
        x, _, _ = clustered(2000, embedder.feature_dim, 1)
        info = {"fingerprint": "bench", "preprocess": {}, "feature_dim": x.shape[1], "flip": True, "checkpoint": None}
        idx = GalleryIndex.create(info, "flat")
        idx.add(x, [GalleryItem(path=f"/gallery/{i:07d}.jpg") for i in range(len(x))])
    crops = sorted((REPO / "data" / "pets09" / "market" / "query").glob("*.jpg"))
    if crops:
        query, source = crops[0], "PETS09 query crop"
    else:
        from PIL import Image

        query = Path(tempfile.mkdtemp()) / "q.jpg"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 64, 3), np.uint8)).save(query)
        source = "random 128x64 image"
    out = {
        "checkpoint": "random-init resnet18, 128x64" if tmp else checkpoint,
        "preprocess": embedder.preprocess,
        "flip": embedder.flip,
        "query": source,
        "index": f"{idx.spec.type} ({idx.spec.factory}), {idx.ntotal} vectors",
        "by_torch_threads": {},
    }
    default_threads = torch.get_num_threads()
    for threads in sorted({1, default_threads} if both_threads else {1}):  # the app uses 1 (`reid_ssl app --threads`)
        torch.set_num_threads(threads)
        for _ in range(3):
            embedder.embed_image(query)
        emb, total = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            f = embedder.embed_image(query)
            t1 = time.perf_counter()
            idx.search(f, 10)
            total.append(time.perf_counter() - t)
            emb.append(t1 - t)
        out["by_torch_threads"][threads] = {"embed": percentiles(emb), "embed_plus_search": percentiles(total)}
    torch.set_num_threads(default_threads)
    if tmp:
        tmp.cleanup()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--dim", type=int, default=512, help="feature size (resnet18: 512)")
    p.add_argument("--types", nargs="+", default=sorted(INDEX_TYPES), choices=sorted(INDEX_TYPES))
    p.add_argument("--queries", type=int, default=200, help="queries for recall (each: in and out of the gallery)")
    p.add_argument("--repeats", type=int, default=300, help="single-query searches timed per index")
    p.add_argument("--embed-repeats", type=int, default=50)
    p.add_argument("--checkpoint", help="embedder for the query-latency row (default: random-init resnet18)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and repeats: runs in seconds (CI)")
    p.add_argument("--out", help="JSON results (default: benchmarks/results/bench_index.json; none with --smoke)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    report = header(
        "index", args.smoke, faiss=faiss.__version__, faiss_omp_threads=faiss.omp_get_max_threads(),
        faiss_gpus=faiss.get_num_gpus(),
    )  # fmt: skip
    if args.smoke:
        args.sizes, args.dim, args.queries, args.repeats, args.embed_repeats = [2000], 64, 50, 30, 5
    k = 10
    results, memory, biggest = [], {}, None
    for n in args.sizes:
        x, q_in, q_out = clustered(n, args.dim, args.queries)
        queries = {"in_gallery": q_in, "out_of_gallery": q_out}
        for name in args.types:
            row, idx = bench_type(name, x, queries, args.repeats, k)
            results.append(row)
            print(
                f"{name:>9} n={n:>7}  {row['factory']:<18} build {row['build_s']:>6.1f}s  recall@10 in/out "
                f"{row[f'recall@{k}']['in_gallery']:.3f}/{row[f'recall@{k}']['out_of_gallery']:.3f}  search p50 "
                f"{row['search']['p50_ms']:.3f} ms  p95 "
                f"{row['search']['p95_ms']:.3f} ms  ({row['index_bytes_per_vector']:.0f} B/vector in RAM)",
                flush=True,
            )
            if n == min(args.sizes):
                memory[name] = disk_per_vector(idx)
            if n == max(args.sizes) and name == ("ivf-flat" if "ivf-flat" in args.types else args.types[0]):
                biggest = idx
            elif idx is not biggest:
                del idx
    embed = bench_embed(args.checkpoint, biggest, args.embed_repeats, both_threads=not args.smoke)
    for threads, row in embed["by_torch_threads"].items():
        print(
            f"query latency, {threads} torch thread(s), embed + search on {embed['index']}: p50 "
            f"{row['embed_plus_search']['p50_ms']:.1f} ms, p95 {row['embed_plus_search']['p95_ms']:.1f} ms "
            f"(embed alone p50 {row['embed']['p50_ms']:.1f} ms)"
        )
    report.update(
        {
            "config": {k_: v for k_, v in vars(args).items() if k_ != "out"},
            "k": k,
            "results": results,
            "disk_bytes_per_vector": memory,
            "query_latency": embed,
            "note": "latencies: single queries, median/95th percentile over repeats on shared CPU cores",
        }
    )
    write_result(finish(report, started), args.out, args.smoke, "bench_index")
    return 0


if __name__ == "__main__":
    sys.exit(main())
