"""The on-paper side of ``benchmarks.bench_index_scale``: the defaults by size (read from the library), the 10M
and 100M extrapolation from the measured per-vector costs and the FAISS guidelines (NOT measured), and the
recall / latency plot."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from benchmarks.index_scale_measure import GB, current_default
from reid_ssl.index import index_spec
from reid_ssl.index.sizing import ivf_nlist, pq_m

HNSW_LINKS = 32  # the library's HNSW32


def defaults_by_size(dim: int) -> list[dict]:
    """What ``--type auto`` builds at each size (read from the library, so the JSON always matches the code)."""
    rows = []
    for n in (10_000, 100_000, 1_000_000, 10_000_000, 100_000_000):
        spec = index_spec("auto", n, dim)
        rows.append({"n": n, **dataclasses.asdict(spec)})
    return rows


def extrapolate(result: dict, dim: int) -> dict:
    """10M and 100M per type on paper: FAISS guideline formulas scaled by this run's measured costs."""
    sections = result.get("sections", {})
    large = {e["type"]: e for name in ("large", "hnsw") for e in (sections.get(name) or {}).get("types", [])}
    small = {e["type"]: e for e in (sections.get("small") or {}).get("types", [])}
    if not large:
        return {"note": "needs the large section"}
    n0 = next(iter(large.values()))["n"]
    rows = []
    for n in (n0, 10_000_000, 100_000_000):
        nlist = ivf_nlist(n)
        m = pq_m(dim)
        for name, entry in large.items():
            if name == "hnsw":
                rows.append(extrapolate_hnsw(entry, n, dim))
            else:
                rows.append(extrapolate_type(name, entry, n, n0, nlist, m, dim))
    if "hnsw" in small:  # the method checked: HNSW from the small size to the measured large one
        rows.append({**extrapolate_hnsw(small["hnsw"], n0, dim), "check": "compare with the measured hnsw row"})
    return {
        "label": "EXTRAPOLATED ON PAPER, NOT MEASURED (except the rows at the measured size, which repeat it)",
        "assumptions": [
            "bytes per vector: Flat 4d (+8 id); IVF-Flat 4d + 8 per list entry; IVF-PQ m + 8; HNSW 4d + 2*M*4 "
            "(FAISS guidelines); plus what the library keeps besides FAISS: vectors.npy 4d (memory-mapped) and "
            "ids 8 (in RAM)",
            "nlist by the library's rule (power of two nearest 4 sqrt(N), at most 65536); training points per "
            "list as the library's rule says; k-means cost train_points * nlist * d * 2 * 10 iterations and "
            "assignment N * nlist * d * 2 FLOP at the FLOP rate measured at 1M",
            "latency: Flat linear in N; IVF at the same nprobe: quantizer (nlist * d) + scanned lists "
            "(nprobe * N / nlist entries), each term scaled from the 1M measurement; HNSW ~ log N",
            "recall at 10M/100M is not extrapolated: at the same nprobe the lists are longer and hold more "
            "near-ties; measure before relying on it",
        ],
        "rows": rows,
    }


def extrapolate_type(name: str, e: dict, n: int, n0: int, nlist: int, m: int, dim: int) -> dict:
    default = current_default(e)
    p50_0 = default["latency_1_thread"]["p50_ms"]
    row: dict[str, Any] = {"type": e["type"], "n": n, "measured": n == n0}
    if name == "flat":
        per_vector = 4 * dim + 8
        row.update(p50_ms=round(p50_0 * n / n0, 2), build_s=round(e["build_s"] * n / n0, 1))
    else:
        code = 4 * dim if name.startswith("ivf-flat") else m
        per_vector = code + 8
        nprobe = default["setting"].get("nprobe") or e["default"]["nprobe"]
        nlist0 = ivf_nlist(n0)
        # cost model: quantizer nlist*d + scan nprobe*(N/nlist)*code, fitted through the measured point
        work0 = nlist0 * dim * 4 + nprobe * (n0 / nlist0) * code
        work = nlist * dim * 4 + nprobe * (n / nlist) * code
        train_points = min(n, index_spec(name.split(" ")[0], n, dim).train_size)
        # k-means: 10 iterations over the training points; adding: one assignment of every vector
        train_rate = e["train_size"] * nlist0 / max(e["train_s"], 1e-6)  # point-lists per second, measured
        add_rate = n0 * nlist0 / max(e["add_s"], 1e-6)
        row.update(
            nlist=nlist,
            nprobe=nprobe,
            train_points=train_points,
            p50_ms=round(p50_0 * work / work0, 2),
            train_s=round(train_points * nlist / train_rate, 0),
            add_s=round(n * nlist / add_rate, 0),
            gflops_measured={
                "train": round(e["train_size"] * nlist0 * dim * 2 * 10 / max(e["train_s"], 1e-6) / 1e9, 1),
                "add": round(n0 * nlist0 * dim * 2 / max(e["add_s"], 1e-6) / 1e9, 1),
            },
        )
        row["build_s"] = round(row["train_s"] + row["add_s"], 0)
    row["faiss_gb"] = round(per_vector * n / GB, 2)
    row["library_ram_gb_serving"] = round((per_vector + 8) * n / GB, 2)  # + ids.npy; vectors.npy mapped
    row["vectors_npy_gb"] = round(4 * dim * n / GB, 2)
    return row


def extrapolate_hnsw(e: dict, n: int, dim: int) -> dict:
    n0 = e["n"]
    default = current_default(e)
    per_vector = 4 * dim + 2 * HNSW_LINKS * 4 + 8
    return {
        "type": "hnsw",
        "n": n,
        "measured": n == n0,
        "from_n": n0,
        "p50_ms": round(default["latency_1_thread"]["p50_ms"] * math.log(n) / math.log(n0), 2),
        "build_s": round(e["build_s"] * (n * math.log(n)) / (n0 * math.log(n0)), 0),
        "faiss_gb": round(per_vector * n / GB, 2),
        "library_ram_gb_serving": round((per_vector + 8) * n / GB, 2),
        "vectors_npy_gb": round(4 * dim * n / GB, 2),
    }


def plot(result: dict, path: Path) -> Path:
    """Recall@10 against single-query p50 latency, one line per type and size (present / absent identities)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.6), squeeze=False)
    for ax, which in zip(axes[0], ("absent", "present"), strict=True):
        for name, sec in (result.get("sections") or {}).items():
            for e in (sec or {}).get("types", []) if name in ("small", "large", "hnsw") else []:
                pts = sorted(
                    (s["latency_1_thread"]["p50_ms"], s["recall@10"][which], s["setting"])
                    for s in e["settings"]
                    if "rerank" not in s["setting"]
                )
                label = f"{e['type']} @ {e['n'] // 1000}k"
                line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label)[0]
                d = current_default(e)
                ax.plot([d["latency_1_thread"]["p50_ms"]], [d["recall@10"][which]], "*", ms=11, color=line.get_color())
        ax.set_xscale("log")
        ax.set_xlabel("single-query p50 latency, ms (1 thread; star = reid_ssl's default setting)")
        ax.set_ylabel(f"recall@10 vs exact ({which} identities)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("FAISS index types through GalleryIndex, synthetic re-ID features (shared 2-core CPU)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
