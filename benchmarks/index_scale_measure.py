"""Measuring helpers of ``benchmarks.bench_index_scale``: process memory, latency percentiles and recall, the
synthetic gallery with its exact top-k (:class:`Data`), a :class:`GalleryIndex` build with its seconds and memory,
the search-setting sweeps and their measurement, and the progress log."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import faiss
import numpy as np

from benchmarks.bench_index import clustered
from reid_ssl.index import GalleryIndex, GalleryItem, index_spec, omp_threads
from reid_ssl.index import gallery as gallery_module
from reid_ssl.index.factory import build_faiss
from reid_ssl.index.types import IndexSpec

K = 10
GB = 1024**3


def proc_memory() -> dict[str, int]:
    """This process's resident memory in bytes: total, peak (since the last :func:`reset_peak`), anonymous, file."""
    keys = {"VmRSS": "rss", "VmHWM": "peak", "RssAnon": "anon", "RssFile": "file"}
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in keys:
                out[keys[name]] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> None:
    """Reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0; ignored elsewhere)."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def pct(seconds: list[float]) -> dict[str, float]:
    """p50 / p99 / mean in milliseconds."""
    ms = np.asarray(seconds) * 1e3
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 4),
        "p99_ms": round(float(np.percentile(ms, 99)), 4),
        "mean_ms": round(float(ms.mean()), 4),
        "n": len(ms),
    }


def recall(got: np.ndarray, exact: np.ndarray) -> float:
    """Mean |top-k found ∩ exact top-k| / k over queries."""
    return round(float(np.mean([len(set(g[g >= 0]) & set(e)) / K for g, e in zip(got, exact, strict=True)])), 4)


def load() -> float:
    return round(os.getloadavg()[0], 2)


def info(dim: int) -> dict[str, Any]:
    return {"fingerprint": "bench", "preprocess": {}, "feature_dim": dim, "flip": True, "checkpoint": None}


def items(n: int, per_identity: int) -> list[GalleryItem]:
    return [GalleryItem(path=f"/gallery/{i:08d}.jpg", pid=i // per_identity, camid=i % 6) for i in range(n)]


def file_bytes(index: faiss.Index) -> int:
    """Bytes of the FAISS index as written to ``index.faiss`` (streamed to a temp file, not held in RAM)."""
    with tempfile.NamedTemporaryFile(suffix=".faiss") as f:
        faiss.write_index(index, f.name)
        return os.path.getsize(f.name)


@contextlib.contextmanager
def faiss_timings() -> Iterator[dict[str, float]]:
    """Record the train / add split of the FAISS build that a :class:`GalleryIndex` add runs."""
    timings: dict[str, float] = {}
    original = gallery_module.build_faiss

    def timed(spec: IndexSpec, vectors: np.ndarray, ids: np.ndarray) -> faiss.Index:
        timings["train_size"] = min(len(vectors), spec.train_size) if spec.train_size else 0
        return build_faiss(spec, vectors, ids, timings)

    gallery_module.build_faiss = timed
    try:
        yield timings
    finally:
        gallery_module.build_faiss = original


@dataclasses.dataclass
class Data:
    """A gallery, its queries (present / absent identities) and their exact top-k ids."""

    x: np.ndarray
    queries: dict[str, np.ndarray]
    exact: dict[str, np.ndarray]
    items: list[GalleryItem]
    seconds: dict[str, float]

    @property
    def all_queries(self) -> np.ndarray:
        return np.concatenate(list(self.queries.values()))


def make_data(n: int, dim: int, n_queries: int, per_identity: int, seed: int) -> Data:
    t = time.perf_counter()
    x, q_in, q_out = clustered(n, dim, n_queries, per_identity=per_identity, seed=seed)
    gen_s = time.perf_counter() - t
    t = time.perf_counter()
    queries = {"present": q_in, "absent": q_out}
    exact = {name: faiss.knn(q, x, K, metric=faiss.METRIC_INNER_PRODUCT)[1] for name, q in queries.items()}
    gt_s = time.perf_counter() - t
    top = np.sort(x[:200] @ x.T, axis=1)[:, ::-1]  # a gallery item's own row, then its neighbours
    return Data(
        x,
        queries,
        exact,
        items(n, per_identity),
        {
            "generate_s": round(gen_s, 1),
            "exact_search_s": round(gt_s, 1),
            "mean_cosine_at_rank": {r: round(float(top[:, r].mean()), 3) for r in (1, 5, 10, 50)},
        },
    )


def build(data: Data, index_type: str, factory: str | None = None, on_disk: bool = False) -> tuple[GalleryIndex, dict]:
    """A :class:`GalleryIndex` of the whole gallery, with its build seconds and memory."""
    n, dim = data.x.shape
    gc_collect()
    before = proc_memory()
    reset_peak()
    t = time.perf_counter()
    with faiss_timings() as split:
        idx = GalleryIndex.create(info(dim), index_type, factory=factory, on_disk=on_disk)
        idx.add(data.x, data.items)
    build_s = time.perf_counter() - t
    after = proc_memory()
    faiss_b = file_bytes(idx._index)
    spec = idx.spec
    return idx, {
        "type": index_type if not factory else f"{index_type} ({factory})",
        "registry_type": spec.type,
        "factory": spec.factory,
        "n": n,
        "dim": dim,
        "default": {"nprobe": spec.nprobe, "ef_search": spec.ef_search, "rerank": spec.rerank},
        "train_size": int(split.get("train_size", 0)),
        "build_s": round(build_s, 1),
        "train_s": round(split.get("train_s", 0.0), 1),
        "add_s": round(split.get("add_s", 0.0), 1),
        "other_s": round(build_s - split.get("train_s", 0.0) - split.get("add_s", 0.0), 1),
        "rss_delta_gb": round((after["rss"] - before["rss"]) / GB, 3),
        "peak_delta_gb": round((after["peak"] - before["rss"]) / GB, 3),
        "faiss_bytes": faiss_b,
        "faiss_bytes_per_vector": round(faiss_b / n, 1),
        "gallery_bytes_per_vector": round((faiss_b + n * (4 * dim + 8)) / n, 1),
        "load_average": load(),
    }


def gc_collect() -> None:
    import gc

    gc.collect()


@contextlib.contextmanager
def rerank_depth(idx: GalleryIndex, rerank: int | None) -> Iterator[None]:
    """Search with another re-rank depth (the manifest's, which ``search`` reads)."""
    if rerank is None:
        yield
        return
    before = idx.manifest["index"]["rerank"]
    idx.manifest["index"]["rerank"] = rerank
    try:
        yield
    finally:
        idx.manifest["index"]["rerank"] = before


def measure(idx: GalleryIndex, data: Data, settings: list[dict], args: argparse.Namespace) -> list[dict]:
    """Recall@10, batch throughput and single-query p50/p99 for each search setting of one index."""
    q = data.all_queries
    spec, kind = idx.spec, idx.index_type
    rows = []
    for setting in settings:
        kw = {k: v for k, v in setting.items() if k != "rerank"}
        with rerank_depth(idx, setting.get("rerank")):
            t = time.perf_counter()
            hits = idx.search(q, K, threads=args.threads, **kw)
            batch_s = time.perf_counter() - t
        got = np.array([[h.id for h in r] + [-1] * (K - len(r)) for r in hits])
        row = {"setting": setting, "load_average_start": load()}
        bounds = np.cumsum([0] + [len(v) for v in data.queries.values()])
        row["recall@10"] = {
            name: recall(got[a:b], data.exact[name])
            for name, a, b in zip(data.queries, bounds[:-1], bounds[1:], strict=True)
        }
        row["batch_qps"] = {f"{args.threads}_thread": round(len(q) / batch_s, 1)}
        rows.append(row)
    for i in range(5):  # warm-up
        idx.search(q[i], K)
    for r in range(args.rounds):  # interleaved rounds: drift of the shared machine's load shows between them
        for row, setting in zip(rows, settings, strict=True):
            kw = {k: v for k, v in setting.items() if k != "rerank"}
            params = kind.search_params(spec, None, kw.get("nprobe"), kw.get("ef_search"))
            lat, raw = [], []
            with rerank_depth(idx, setting.get("rerank")):
                depth = K * int(setting.get("rerank") or spec.rerank)
                for j in range(args.reps):
                    qi = q[(r * args.reps + j) % len(q)]
                    t = time.perf_counter()
                    idx.search(qi, K, **kw)
                    lat.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    with omp_threads(1):
                        idx._index.search(qi[None], depth, params=params)
                    raw.append(time.perf_counter() - t)
            row.setdefault("latency_rounds", []).append({**pct(lat), "load_average": load()})
            row.setdefault("_lat", []).extend(lat)
            row.setdefault("_raw", []).extend(raw)
    for row in rows:
        row["latency_1_thread"] = pct(row.pop("_lat"))
        row["faiss_only_latency_1_thread"] = pct(row.pop("_raw"))
    if args.batch_threads > args.threads:  # the default setting's batch throughput with more threads
        with omp_threads(args.batch_threads):
            t = time.perf_counter()
            idx.search(q, K, threads=args.batch_threads)
            rows[0]["batch_qps"][f"{args.batch_threads}_threads"] = round(len(q) / (time.perf_counter() - t), 1)
    return rows


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {load():.1f}] {text}", flush=True)


def show(entry: dict) -> None:
    for row in entry["settings"]:
        lat = row["latency_1_thread"]
        log(
            f"  {entry['type']:<28} {json.dumps(row['setting']):<32} recall@10 present/absent "
            f"{row['recall@10']['present']:.3f}/{row['recall@10']['absent']:.3f}  p50 {lat['p50_ms']:.2f} ms  "
            f"p99 {lat['p99_ms']:.2f} ms  batch {row['batch_qps']}"
        )


def current_default(entry: dict) -> dict:
    """The sweep row of the search setting reid_ssl uses by default now (the registry may have changed since
    the run; the sweeps cover the current defaults)."""
    spec = index_spec("auto", entry["n"], entry["dim"], factory=entry["factory"])  # the type claiming it
    want = {"nprobe": spec.nprobe, "ef_search": spec.ef_search, "rerank": spec.rerank}
    measured = entry["default"]
    for row in entry["settings"]:
        got = {**measured, **row["setting"]}
        if all(got.get(k) == v for k, v in want.items() if v is not None):
            return row
    return entry["settings"][0]


def nprobe_sweep(nlist: int, default: int | None) -> list[dict]:
    """The default first, then powers of two from 8 to nlist / 8."""
    values = [v for v in (8, 16, 32, 64, 128, 256, 512) if v <= max(nlist // 8, 8)]
    return [{"nprobe": v} for v in [default, *[v for v in values if v != default]] if v]
