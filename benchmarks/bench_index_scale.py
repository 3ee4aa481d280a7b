"""Galleries of millions: every index type at >= 1M vectors, the defaults by size, and lists served from disk.

    python -m benchmarks.bench_index_scale                       # full run (~50 min on 2 shared cores)
    python -m benchmarks.bench_index_scale --sections small      # one section; the others stay in the JSON
    python -m benchmarks.bench_index_scale --smoke --out /tmp/s.json   # seconds (tests/benchmarks)

Features are synthetic but shaped like a re-ID gallery (``benchmarks.bench_index.clustered``): identities of
``--per-identity`` crops each in a low-rank appearance space (cosine ~0.8 within an identity, close impostors),
and queries of present identities and of absent ones (their top 10 are near-ties: the hard case for approximate
search). Recall@10 is against exact search computed once with FAISS directly (``faiss.knn``); everything else
goes through the library's own :class:`GalleryIndex`, i.e. what users get (normalisation, the item table,
re-ranking and metadata lookups included in the latencies).

Sections (each stamped with its own date and load average; ``--sections`` reruns some and keeps the rest):

* ``small`` (``--small-n``, 200k): the IVF training-set size and list count study behind the defaults (FAISS
  directly on the library's ``build_faiss``), exact Flat, and HNSW measured first at this size (the
  extrapolation table checks its 200k -> 1M extrapolation against the measured 1M build).
* ``large`` (``--n``, 1M x 256-d): Flat, IVF-Flat, IVF-PQ and IVF-OPQ: build (train + add) seconds, RSS
  delta and peak, the FAISS index's own bytes, recall@10 and single-query p50/p99 (1 thread, ``--rounds``
  interleaved rounds so that load drift shows) for a sweep of nprobe (and re-rank depth), batch throughput.
* ``hnsw``: the same for HNSW at ``--n`` (its build took 17 min at 1M here, hence a section of its own).
* ``ondisk``: the 1M IVF-Flat index saved, then served by fresh processes with its lists in RAM or
  memory-mapped (``--on-disk``; cold page cache after ``POSIX_FADV_DONTNEED``, FAISS prefetch on and off, and
  warm), ``--rounds`` times in turn, at reid_ssl's default nprobe: RSS (anonymous and file pages), load time,
  latency, recall.
* ``extrapolation`` (always): 10M and 100M on paper from the measured per-vector costs and the FAISS
  guidelines (bytes per vector, nlist ~ 4..16 sqrt(N), 30..256 training points per list): NOT measured.

Threads: FAISS's OpenMP and BLAS pools are sized when it loads, and on these 2 shared, oversubscribed cores
two spinning threads made k-means 1.5x slower and PQ training 7x slower than one; the benchmark therefore
re-executes itself with ``OMP_NUM_THREADS=--threads`` (default 1) and records it. Batch throughput is also
measured with 2 OpenMP threads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from benchmarks.index_scale_extrapolate import defaults_by_size, extrapolate, plot
from benchmarks.index_scale_measure import (
    GB,
    Data,
    K,
    build,
    load,
    log,
    make_data,
    measure,
    nprobe_sweep,
    pct,
    proc_memory,
    recall,
    show,
)
from reid_ssl.index import GalleryIndex, omp_threads, ondisk
from reid_ssl.index.factory import build_faiss
from reid_ssl.index.sizing import default_nprobe, ivf_nlist
from reid_ssl.index.types import IndexSpec

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("small", "large", "ondisk", "hnsw")
LARGE_TYPES = ("flat", "ivf-flat", "ivf-pq", "ivf-opq")


# ---------------------------------------------------------------------------------------------------------
# Sections, the --serve process, the command line
# ---------------------------------------------------------------------------------------------------------


def section_small(args: argparse.Namespace, progress: Callable[[dict], None]) -> dict:
    """200k: the IVF training study, Flat and HNSW (whose 1M build is extrapolated from here)."""
    n, dim = args.small_n, args.dim
    log(f"small: {n} x {dim} gallery, {2 * args.queries} queries")
    data = make_data(n, dim, args.queries, args.per_identity, seed=1)
    out: dict[str, Any] = {"n": n, "dim": dim, "data": data.seconds, "train_study": train_study(data, args)}
    out["types"] = []
    progress(out)
    for name in ("flat", "hnsw"):
        idx, entry = build(data, name)
        log(f"  built {name} in {entry['build_s']} s")
        default = idx.spec.ef_search
        sweep = [{}] if name == "flat" else [{"ef_search": v} for v in [default, 16, 32, 64, 256] if v]
        entry["settings"] = measure(idx, data, sweep, args)
        out["types"].append(entry)
        show(entry)
        del idx
        progress(out)
    return out


def train_study(data: Data, args: argparse.Namespace) -> list[dict]:
    """IVF-Flat at one size: recall@10 and latency against nlist and training points per list."""
    n = len(data.x)
    ids = np.arange(n, dtype=np.int64)
    q = data.all_queries
    rule = ivf_nlist(n)
    variants = [(rule // 2, 64), (rule, 32), (rule, 64), (rule, 256), (rule * 2, 64)]
    variants = list(dict.fromkeys((nlist, min(per_list * nlist, n) // nlist) for nlist, per_list in variants))
    rows = []
    for nlist, per_list in variants:
        spec = IndexSpec("ivf-flat", f"IVF{nlist},Flat", nprobe=default_nprobe(nlist), train_size=per_list * nlist)
        timings: dict[str, float] = {}
        index = build_faiss(spec, data.x, ids, timings)
        row = {
            "nlist": nlist,
            "train_points_per_list": round(min(n, per_list * nlist) / nlist, 1),
            "train_s": round(timings["train_s"], 1),
            "add_s": round(timings["add_s"], 1),
            "by_nprobe": [],
        }
        for nprobe in (8, 16, 32, 64, 128):
            params = faiss.SearchParametersIVF(nprobe=nprobe)
            with omp_threads(args.threads):
                _, got = index.search(q, K, params=params)
            lat = []
            with omp_threads(1):
                for j in range(args.reps):
                    t = time.perf_counter()
                    index.search(q[j % len(q)][None], K, params=params)
                    lat.append(time.perf_counter() - t)
            half = len(data.queries["present"])
            row["by_nprobe"].append(
                {
                    "nprobe": nprobe,
                    "recall@10": {
                        "present": recall(got[:half], data.exact["present"]),
                        "absent": recall(got[half:], data.exact["absent"]),
                    },
                    "faiss_latency_1_thread": pct(lat),
                }
            )
        log(
            f"  study IVF{nlist} x {row['train_points_per_list']} pts/list: train {row['train_s']} s, "
            + ", ".join(f"np{r['nprobe']} {r['recall@10']['absent']:.3f}" for r in row["by_nprobe"])
        )
        rows.append(row)
        del index
    return rows


def section_large(
    args: argparse.Namespace, work: Path | None, progress: Callable[[dict], None], kept: dict | None = None
) -> dict:
    """1M: Flat, IVF-Flat, IVF-PQ and OPQ through GalleryIndex; the IVF-Flat is saved for ``ondisk``.

    ``--types`` measures some of them; ``kept`` (the previous JSON's large section, same size) keeps the others'
    entries, each with its own date and load average.
    """
    n, dim = args.n, args.dim
    data = large_data(args)
    body: dict[str, Any] = {"n": n, "dim": dim, "data": data.seconds, "types": [], "saved": None}
    if kept and (kept.get("n"), kept.get("dim")) == (n, dim):
        body["types"] = [e for e in kept.get("types", []) if e["type"] not in args.types]
        body["saved"] = kept.get("saved") if "ivf-flat" not in args.types else None
    for name in [t for t in LARGE_TYPES if t in args.types]:
        idx, entry = build(data, name, on_disk=name == "ivf-flat")
        entry["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        log(f"  built {entry['type']} in {entry['build_s']} s (train {entry['train_s']} s, add {entry['add_s']} s)")
        spec = idx.spec
        sweep = [{}]
        if spec.nprobe:
            sweep = nprobe_sweep(faiss.extract_index_ivf(idx._index).nlist, spec.nprobe)
            if spec.rerank > 1:  # the PQ types: re-ranking depth against nprobe
                depths = sorted({8, 32} - {spec.rerank})
                sweep += [{"nprobe": p, "rerank": r} for r in depths for p in (32, 128, 256)]
        entry["settings"] = measure(idx, data, sweep, args)
        body["types"] = sorted([*body["types"], entry], key=lambda e: LARGE_TYPES.index(e["type"]))
        show(entry)
        if name == "ivf-flat" and work is not None:
            body["saved"] = save_for_serving(idx, data, work)
        del idx
        progress(body)
    return body


def section_hnsw(args: argparse.Namespace) -> dict:
    """HNSW at the large size: the slowest build (17 min at 1M here), so a section of its own."""
    data = large_data(args)
    idx, entry = build(data, "hnsw")
    log(f"  built hnsw in {entry['build_s']} s")
    entry["settings"] = measure(idx, data, [{"ef_search": v} for v in (idx.spec.ef_search, 16, 32, 64, 256)], args)
    show(entry)
    return {"n": args.n, "dim": args.dim, "types": [entry]}


_DATA: dict[tuple, Data] = {}


def large_data(args: argparse.Namespace) -> Data:
    """The large gallery, made once per run (the large and hnsw sections share it)."""
    key = (args.n, args.dim, args.queries, args.per_identity)
    if key not in _DATA:
        log(f"large: {args.n} x {args.dim} gallery, {2 * args.queries} queries")
        _DATA[key] = make_data(args.n, args.dim, args.queries, args.per_identity, seed=0)
    return _DATA[key]


def save_for_serving(idx: GalleryIndex, data: Data, work: Path) -> dict:
    """Save the index twice (lists on disk / in RAM; the second save links the first's index.faiss)."""
    t = time.perf_counter()
    idx.save(work / "disk")
    save_s = time.perf_counter() - t
    idx.manifest["index"]["on_disk"] = False
    idx.save(work / "ram")
    np.save(work / "queries.npy", data.all_queries)
    np.save(work / "exact.npy", np.concatenate(list(data.exact.values())))
    log(f"  saved the ivf-flat index for serving in {save_s:.1f} s")
    return {"save_s": round(save_s, 1), "bytes_on_disk": GalleryIndex.load(work / "disk").info()["bytes_on_disk"]}


def section_ondisk(args: argparse.Namespace, work: Path) -> dict:
    """Fresh processes serve the saved 1M IVF-Flat with its lists in RAM or mapped from disk."""
    runs = [
        ("lists in RAM (default)", "ram", "warm", None),
        ("on disk, cold cache, prefetch off", "disk", "cold", 0),
        ("on disk, cold cache, FAISS prefetch (32 threads)", "disk", "cold", 32),
        ("on disk, warm cache", "disk", "warm", 0),
    ]
    out = []
    for repeat, (label, folder, cache, prefetch) in [(r, run) for r in range(args.rounds) for run in runs]:
        cmd = [sys.executable, "-m", "benchmarks.bench_index_scale", "--serve", str(work / folder)]
        cmd += ["--serve-cache", cache, "--reps", str(args.reps * args.rounds)]
        if prefetch is not None:
            cmd += ["--serve-prefetch", str(prefetch)]
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True, timeout=1800)
        row = {"label": label, "repeat": repeat, **json.loads(res.stdout.strip().splitlines()[-1])}
        out.append(row)
        log(
            f"  {label}: RSS after load {row['after_load']['rss_gb']} GB (anon {row['after_load']['anon_gb']}), "
            f"after queries {row['after_queries']['rss_gb']} GB (anon {row['after_queries']['anon_gb']}); "
            f"p50 {row['latency']['p50_ms']} ms p99 {row['latency']['p99_ms']} ms; recall {row['recall@10']}"
        )
    return {"runs": out}


def serve(args: argparse.Namespace) -> int:
    """``--serve FOLDER``: load an index, answer the saved queries one by one, print memory and latency (JSON)."""
    folder = Path(args.serve)
    gen = folder / (folder / "CURRENT").read_text().strip()
    if args.serve_cache == "cold":  # drop the files' pages from the page cache (clean pages; no privilege needed)
        for name in ("index.faiss", "vectors.npy"):
            fd = os.open(gen / name, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    if args.serve_prefetch is not None:
        ondisk.PREFETCH_THREADS = args.serve_prefetch
    queries = np.load(folder.parent / "queries.npy")
    exact = np.load(folder.parent / "exact.npy")

    def mem() -> dict[str, float]:
        m = proc_memory()
        return {f"{k}_gb": round(v / GB, 3) for k, v in m.items()}

    start = mem()
    t = time.perf_counter()
    idx = GalleryIndex.load(folder)
    load_s = time.perf_counter() - t
    after_load = mem()
    nprobe = default_nprobe(faiss.extract_index_ivf(idx._index).nlist)  # reid_ssl's default now
    if args.serve_cache == "warm":
        for qi in queries:
            idx.search(qi, K, nprobe=nprobe)
    lat, got = [], []
    for j in range(args.reps):
        qi = queries[j % len(queries)]
        t = time.perf_counter()
        hits = idx.search(qi, K, nprobe=nprobe)[0]
        lat.append(time.perf_counter() - t)
        if j < len(queries):
            got.append([h.id for h in hits] + [-1] * (K - len(hits)))
    result = {
        "lists_on_disk": idx.lists_on_disk,
        "prefetch_threads": ondisk.PREFETCH_THREADS if idx.lists_on_disk else None,
        "cache": args.serve_cache,
        "nprobe": nprobe,
        "load_s": round(load_s, 2),
        "at_start": start,
        "after_load": after_load,
        "after_queries": mem(),
        "latency": pct(lat),
        "first_10_queries": pct(lat[:10]),
        "recall@10": recall(np.array(got), exact[: len(got)]),
        "load_average": load(),
    }
    print(json.dumps(result))
    return 0


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="gallery size of the large section")
    p.add_argument("--small-n", type=int, default=200_000, help="gallery size of the small section (and HNSW)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--per-identity", type=int, default=8, help="gallery crops per identity")
    p.add_argument("--queries", type=int, default=250, help="queries of present and of absent identities, each")
    p.add_argument("--reps", type=int, default=100, help="single queries timed per round and setting")
    p.add_argument("--rounds", type=int, default=2, help="interleaved latency rounds")
    p.add_argument("--threads", type=int, default=1, help="FAISS threads for builds and batches (OMP_NUM_THREADS)")
    p.add_argument("--batch-threads", type=int, default=2, help="threads of the extra batch-throughput run")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument(
        "--types",
        default=",".join(LARGE_TYPES),
        help=f"the large section's index types (comma list of {', '.join(LARGE_TYPES)}); the JSON keeps the others'",
    )
    p.add_argument("--work-dir", help="where the ondisk section saves its 1M index (default: a temp dir, removed)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: seconds (CI)")
    p.add_argument("--out", help="JSON (default benchmarks/results/bench_index_scale.json; none with --smoke)")
    p.add_argument("--serve", help=argparse.SUPPRESS)  # internal: the ondisk section's serving process
    p.add_argument("--serve-cache", choices=("cold", "warm"), default="warm", help=argparse.SUPPRESS)
    p.add_argument("--serve-prefetch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.types = [t for t in args.types.split(",") if t]
    if set(args.types) - set(LARGE_TYPES):
        p.error(f"unknown --types {sorted(set(args.types) - set(LARGE_TYPES))}; choose from {', '.join(LARGE_TYPES)}")
    if args.smoke:
        args.n, args.small_n, args.dim, args.queries, args.reps, args.rounds = 4000, 3000, 32, 20, 20, 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.serve:
        return serve(args)
    if os.environ.get("OMP_NUM_THREADS") != str(args.threads):  # pools are sized at load: re-execute
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        cmd = [sys.executable, "-m", "benchmarks.bench_index_scale", *(sys.argv[1:] if argv is None else argv)]
        return subprocess.run(cmd, env=env, cwd=REPO, check=False).returncode
    from benchmarks.report import finish, header, out_path, png_path
    from reid_ssl.fileio import write_json

    started = time.perf_counter()
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    out = out_path(args.out, args.smoke, "bench_index_scale")
    previous = json.loads(out.read_text()) if out and out.is_file() else {}
    result = {**header("index_scale", args.smoke), "threads": args.threads, "omp_num_threads_env": args.threads}
    result["config"] = {k: v for k, v in vars(args).items() if not k.startswith("serve") and k != "out"}
    result["sections"] = dict(previous.get("sections") or {})
    with contextlib.ExitStack() as stack:
        work = Path(args.work_dir) if args.work_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        if "ondisk" in sections and "large" in sections and "ivf-flat" not in args.types:
            raise SystemExit("the ondisk section serves the large section's IVF-Flat: add ivf-flat to --types")
        for name in sections:
            if name == "ondisk" and "large" not in sections and not (work / "disk" / "CURRENT").is_file():
                raise SystemExit(
                    "the ondisk section serves the index that the large section saves: run both, or "
                    "give the --work-dir of a run that did"
                )
            stamp = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_average_start": list(os.getloadavg())}
            t = time.perf_counter()

            def progress(body: dict, name: str = name, stamp: dict = stamp, t: float = t) -> None:
                """Store the section so far and write the JSON: a killed run keeps what it measured."""
                done = {"seconds": round(time.perf_counter() - t, 1), "load_average_end": list(os.getloadavg())}
                result["sections"][name] = {**stamp, **done, **body}
                result["defaults_by_size"] = defaults_by_size(args.dim)
                result["extrapolation"] = extrapolate(result, args.dim)
                if out:
                    write_json(out, finish(dict(result), started))

            if name == "small":
                progress(section_small(args, progress))
            elif name == "large":
                kept = (previous.get("sections") or {}).get("large")
                progress(section_large(args, work if "ondisk" in sections else None, progress, kept))
            elif name == "hnsw":
                progress(section_hnsw(args))
            else:
                progress(section_ondisk(args, work))
    result = finish(result, started)
    if out:
        write_json(out, result)
        plot(result, png_path(out))
        log(f"wrote {out} and {png_path(out).name}")
    elif args.smoke:
        plot(result, Path(tempfile.mkdtemp()) / "smoke.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
