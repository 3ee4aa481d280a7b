"""`reid_ssl index build|add|remove|search|info|calibrate`: the persistent FAISS gallery (reid_ssl/index/).

`index build` runs under torchrun too: each rank embeds a shard of the gallery (gloo on CPU, NCCL on GPU)
and rank 0 merges the shards into one index::

    torchrun --nproc_per_node 2 -m reid_ssl.cli index build --checkpoint C --images DIR --out IDX

Camera ids are 0-based everywhere (file name c1 = camid 0). Paths whose bytes are not UTF-8 are indexed as they
are and printed with \\xNN escapes (``--json`` keeps Python's surrogate escapes, which round-trip exactly).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from reid_ssl.cli.common import (
    DEFAULT_INDEX,
    int_in,
    non_negative_int,
    positive_int,
    print_json,
    print_table,
    workers,
)
from reid_ssl.console import show_progress
from reid_ssl.data.datasets import REID_DATASETS
from reid_ssl.errors import InputError, MissingFileError
from reid_ssl.index.sidecar import display_path
from reid_ssl.index.types import AUTO_FLAT_MAX, AUTO_IVF_FLAT_FLOATS, INDEX_TYPES, type_choices

MAX_K = 1000
MAX_BATCH = 4096


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``index`` and its actions to the top-level parser."""
    p = subparsers.add_parser(
        "index",
        help="build, update and search a persistent FAISS gallery index",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="index_command", metavar="<action>", required=True)
    _register_build(sub)
    _register_updates(sub)
    _register_search(sub)


def _register_build(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    b = sub.add_parser("build", help="embed a gallery folder (or data set) into a new index (resumable)")
    b.add_argument("--checkpoint", required=True, help="reid_ssl checkpoint whose embedder fills the index")
    b.add_argument(
        "--images",
        required=True,
        help="a folder of images (recursive), a Market-1501-layout root (gallery = bounding_box_test, "
        f"query/ calibrates the threshold), or a data set name: {', '.join(REID_DATASETS())}",
    )
    b.add_argument("--out", required=True, help="index folder to create")
    b.add_argument("--data-root", default="data", help="where data set names live (default: data)")
    b.add_argument(
        "--type",
        default="auto",
        choices=type_choices(),
        help=f"FAISS index type: auto = flat up to {AUTO_FLAT_MAX:,} images at 512-D ({2 * AUTO_FLAT_MAX:,} at 256-D), "
        f"ivf-flat up to {AUTO_IVF_FLAT_FLOATS // 512:,} at 512-D, ivf-opq above; "
        + "; ".join(f"{name} = {INDEX_TYPES.help(name)}" for name in INDEX_TYPES),
    )
    b.add_argument("--factory", help="explicit faiss.index_factory string (overrides --type's), e.g. IVF256,SQ8")
    b.add_argument("--nprobe", type=positive_int, help="IVF lists visited per query")
    b.add_argument(
        "--on-disk",
        action="store_true",
        help="serve the IVF inverted lists memory-mapped from the index folder instead of RAM (galleries bigger "
        "than RAM; an add or remove copies the lists into RAM while it runs)",
    )
    b.add_argument(
        "--chunk-size", type=int_in(1, 1_000_000), default=512, help="images per resumable chunk (default 512)"
    )
    b.add_argument("--batch-size", type=int_in(1, MAX_BATCH), default=64)
    b.add_argument("--workers", type=workers, default=0, help="data loader worker processes, 0..64 (default 0)")
    b.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1...")
    b.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
    b.add_argument("--no-calibrate", action="store_true", help="skip the 'no match' threshold calibration")
    b.add_argument("--json", action="store_true")
    b.set_defaults(handler=_build)


def _register_updates(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    a = sub.add_parser("add", help="embed more images and add them to an index")
    a.add_argument("paths", nargs="+", help="image files and/or folders (recursive)")
    a.add_argument("--index", default=DEFAULT_INDEX)
    a.add_argument("--checkpoint", help="default: the checkpoint that built the index")
    a.add_argument("--batch-size", type=int_in(1, MAX_BATCH), default=64)
    a.add_argument("--device", default="auto")
    a.add_argument("--allow-duplicates", action="store_true", help="add files whose path is already indexed")
    a.add_argument("--json", action="store_true")
    a.set_defaults(handler=_add)

    r = sub.add_parser("remove", help="remove items by id or by path prefix (ids of the rest never change)")
    r.add_argument("--index", default=DEFAULT_INDEX)
    r.add_argument("--ids", type=int, nargs="*", default=[])
    r.add_argument("--path-prefix", help="remove every item whose file lies under this path")
    r.add_argument("--json", action="store_true")
    r.set_defaults(handler=_remove)

    c = sub.add_parser("calibrate", help="(re)calibrate the 'no match' threshold from labelled data")
    c.add_argument("--index", default=DEFAULT_INDEX)
    c.add_argument("--queries", help="folder of Market-named query images; default: leave-one-out on the gallery")
    c.add_argument("--checkpoint", help="default: the checkpoint that built the index")
    c.add_argument("--device", default="auto")
    c.add_argument("--json", action="store_true")
    c.set_defaults(handler=_calibrate)


def _register_search(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("search", help="find the gallery items most similar to query images")
    s.add_argument("--query", required=True, nargs="+", help="query image file(s)")
    s.add_argument("--index", default=DEFAULT_INDEX)
    s.add_argument("-k", type=int_in(1, MAX_K), default=10)
    s.add_argument(
        "--exclude-camid",
        type=non_negative_int,
        metavar="CAMID",
        help="drop gallery items of this camera id, 0-based: file name c1 = camid 0",
    )
    s.add_argument("--nprobe", type=positive_int, help="IVF lists visited per query (default: the index's)")
    s.add_argument("--ef-search", type=positive_int, help="HNSW candidate list size (default: the index's)")
    s.add_argument("--checkpoint", help="default: the checkpoint that built the index")
    s.add_argument("--device", default="auto")
    s.add_argument("--json", action="store_true")
    s.set_defaults(handler=_search)

    i = sub.add_parser("info", help="size, type, embedder, calibration and statistics of an index")
    i.add_argument("--index", default=DEFAULT_INDEX)
    i.add_argument("--json", action="store_true")
    i.set_defaults(handler=_info)


# ---------------------------------------------------------------------------------------------------------
# Handlers
# ---------------------------------------------------------------------------------------------------------


def _embedder_for(idx: Any, checkpoint: str | None, device: str) -> Any:
    from reid_ssl.embedder import load_embedder

    ckpt = checkpoint or idx.manifest["embedder"].get("checkpoint")
    if not ckpt:
        raise InputError(f"{idx.path} does not record its checkpoint; pass --checkpoint")
    flip = bool(idx.manifest["embedder"].get("flip", True))
    try:
        embedder = load_embedder(ckpt, device=device, flip=flip)
    except MissingFileError as e:
        if checkpoint:
            raise
        raise MissingFileError(
            f"{e} (the checkpoint that built {idx.path}); pass --checkpoint with a copy of it"
        ) from None
    idx.check_embedder(embedder)
    return embedder


def _print_problems(problems: list[tuple[str, str]], label: str = "") -> None:
    """Up to 10 ``(path, reason)`` lines on standard error."""
    for path, reason in problems[:10]:
        print(f"  {label}{display_path(path)}: {reason}", file=sys.stderr)


def _build(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from reid_ssl.distributed import init_distributed, launched_world_size
    from reid_ssl.embedder import load_embedder
    from reid_ssl.index import BuildOptions, build_index, gallery_source

    rank, world, barrier, device = 0, 1, None, args.device
    if launched_world_size() > 1:  # under torchrun: one shard per rank
        d, dev = init_distributed(args.device, timeout=timedelta(hours=12))
        rank, world, barrier, device = d.rank, d.world_size, d.barrier, str(dev)
    try:
        source = gallery_source(args.images, args.data_root)
        embedder = load_embedder(args.checkpoint, device=device)
        opt = BuildOptions(
            index_type=args.type,
            factory=args.factory,
            nprobe=args.nprobe,
            on_disk=args.on_disk,
            chunk_size=args.chunk_size,
            batch_size=args.batch_size,
            num_workers=args.workers,
            overwrite=args.overwrite,
            progress=show_progress(json=args.json),
            calibrate=not args.no_calibrate,
        )
        result = build_index(
            embedder, source, args.out, opt, checkpoint=args.checkpoint, rank=rank, world_size=world, barrier=barrier
        )
    finally:
        if world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    if rank != 0:
        return 0
    if args.json:
        print_json(result)
    else:
        _print_build(result, world)
    return 0


def _print_build(result: dict[str, Any], world: int) -> None:
    from reid_ssl.index import describe_calibration

    cal = result["calibration"]
    chunks = result["chunks"]
    if world == 1:
        chunks = f"{chunks} ({result['embedded_chunks']} embedded now, {chunks - result['embedded_chunks']} resumed)"
    rows = [
        ("index", display_path(result["out"])),
        ("images", result["n_images"]),
        ("indexed", result["n_indexed"]),
        ("unreadable", result["n_failed"]),
        ("skipped (symlinks out)", result["n_skipped"]),
        ("type", f"{result['index_type']} ({result['factory']})"),
        ("inverted lists", "on disk (memory-mapped)" if result["lists_on_disk"] else "-"),
        ("chunks", chunks),
        ("ranks", world),
        ("no-match threshold", describe_calibration(cal) if isinstance(cal, dict) else (cal or "not calibrated")),
        ("seconds", result["seconds"]),
    ]
    print_table(rows, title="index built")
    _print_problems(result["failures"], "unreadable: ")
    _print_problems(result["skipped"], "skipped: ")


def _add(args: argparse.Namespace) -> int:
    import numpy as np

    from reid_ssl.index import GalleryIndex, path_items

    source = path_items(args.paths)
    items, skipped = source.items, list(source.skipped)
    snapshot = GalleryIndex.load(args.index)  # embed without holding the writer lock (the app may be adding too)
    embedder = _embedder_for(snapshot, args.checkpoint, args.device)
    if not args.allow_duplicates:
        known = snapshot.ids_for_paths([it.path for it in items])
        skipped += [(it.path, "already indexed") for it in items if it.path in known]
        items = [it for it in items if it.path not in known]
    progress = show_progress(json=args.json)
    res = embedder.embed_images([it.path for it in items], batch_size=args.batch_size, progress=progress)
    failures = [(items[i].path, reason) for i, reason in res.failures]
    with GalleryIndex.open_for_update(args.index) as idx:  # lock, newest generation, add, save
        idx.check_embedder(embedder)
        ok = [items[i] for i in res.ok]
        fresh = np.ones(len(ok), bool)
        if not args.allow_duplicates and idx.generation != snapshot.generation:  # someone added meanwhile
            known = idx.ids_for_paths([it.path for it in ok])
            fresh = np.array([it.path not in known for it in ok], bool)
            skipped += [(it.path, "already indexed") for it, f in zip(ok, fresh, strict=True) if not f]
        ids = idx.add(res.features[fresh], [it for it, f in zip(ok, fresh, strict=True) if f])
        if len(ids):
            idx.add_roots(*source.roots)
        ntotal = idx.ntotal
    result = {
        "index": args.index,
        "added": len(ids),
        "ids": ids.tolist(),
        "ntotal": ntotal,
        "failures": failures,
        "skipped": skipped,
    }
    if args.json:
        print_json(result)
    else:
        rows = [("index", display_path(args.index)), ("added", len(ids)), ("unreadable", len(failures))]
        print_table([*rows, ("skipped", len(skipped)), ("items now", ntotal)], title="index add")
        _print_problems(failures + skipped)
    return 1 if failures and not len(ids) else 0


def _remove(args: argparse.Namespace) -> int:
    from reid_ssl.index import GalleryIndex

    if not args.ids and not args.path_prefix:
        raise InputError("nothing to remove: give --ids and/or --path-prefix")
    with GalleryIndex.open_for_update(args.index) as idx:
        ids = list(args.ids)
        if args.path_prefix:
            ids += idx.ids_under(args.path_prefix)
        removed = idx.remove(ids)
        ntotal = idx.ntotal
    result = {"index": args.index, "requested": len(set(ids)), "removed": removed, "ntotal": ntotal}
    if args.json:
        print_json(result)
    else:
        rows = [("index", display_path(args.index)), ("removed", removed), ("not found", len(set(ids)) - removed)]
        print_table([*rows, ("items now", ntotal)], title="index remove")
    return 0


def shortfall_hint(short: Any, exclude_camid: int | None = None) -> str:
    """What the command line says when a query got fewer than ``-k`` results: the reason and the fix."""
    head = f"only {short.returned} of {short.k} results: {short.message}"
    if short.cause == "nprobe":
        return f"{head}; rerun with a larger --nprobe (now {short.current}; --nprobe {short.maximum} visits every list)"
    if short.cause == "ef_search":
        return f"{head}; rerun with a larger --ef-search (now {short.current}, e.g. --ef-search {2 * short.current})"
    if short.cause == "filters" and exclude_camid is not None:
        return f"{head}; without --exclude-camid every camera is searched"
    if short.cause == "gallery":
        return f"{head}; ask for fewer with -k, or add images with `reid_ssl index add`"
    return head


def _unused_settings(idx: Any, args: argparse.Namespace) -> list[str]:
    """Notes for search options that the index's type does not take (they change nothing)."""
    kind = idx.index_type
    notes = []
    for option, setting in (("--nprobe", "nprobe"), ("--ef-search", "ef_search")):
        if getattr(args, setting) is not None and kind is not None and kind.setting != setting:
            notes.append(f"note: {option} has no effect on a {kind.name} index")
    return notes


def _search(args: argparse.Namespace) -> int:
    from reid_ssl.index import GalleryIndex

    idx = GalleryIndex.load(args.index)
    for q in args.query:
        if not Path(q).is_file():
            raise MissingFileError(f"query image not found: {q}")
    embedder = _embedder_for(idx, args.checkpoint, args.device)
    res = embedder.embed_images(args.query, batch_size=min(64, len(args.query)))
    if res.failures:
        raise InputError("; ".join(reason for _, reason in res.failures))
    hits = idx.search(
        res.features, args.k, exclude_camid=args.exclude_camid, nprobe=args.nprobe, ef_search=args.ef_search
    )
    threshold = idx.threshold
    out = []
    for q, row in zip(args.query, hits, strict=True):
        best = row[0].score if row else None
        short = row.shortfall
        out.append(
            {
                "query": q,
                "match": None if threshold is None or best is None else best >= threshold,
                "returned": len(row),
                "shortfall": None
                if short is None
                else {**short.to_dict(), "hint": shortfall_hint(short, args.exclude_camid)},
                "results": [h.to_dict() for h in row],
            }
        )
    notes = _unused_settings(idx, args)
    if args.json:
        print_json({"index": args.index, "k": args.k, "threshold": threshold, "notes": notes, "queries": out})
        return 0
    for note in notes:
        print(note, file=sys.stderr)
    for q in out:
        _print_query(q, threshold)
    return 0


def _print_query(q: dict[str, Any], threshold: float | None) -> None:
    verdict = ""
    if q["match"] is not None:
        verdict = "  (match)" if q["match"] else f"  (NO MATCH: best score below the threshold {threshold:.3f})"
    print(f"{display_path(q['query'])}{verdict}")
    print(f"  {'rank':>4}  {'score':>6}  {'id':>7}  {'pid':>5}  {'camid':>5}  {'frame':>6}  path")
    for rank, h in enumerate(q["results"], 1):
        cells = [("" if h[c] is None else str(h[c])) for c in ("pid", "camid", "frame")]
        print(
            f"  {rank:>4}  {h['score']:>6.3f}  {h['id']:>7}  {cells[0]:>5}  {cells[1]:>5}  {cells[2]:>6}  "
            f"{display_path(h['path'])}"
        )
    if q["shortfall"] is not None:
        print(f"  {q['shortfall']['hint']}")


def _info(args: argparse.Namespace) -> int:
    from reid_ssl.index import GalleryIndex, describe_calibration

    info = GalleryIndex.load(args.index).info()
    if args.json:
        print_json(info)
        return 0
    cal = info["calibration"]
    threshold = describe_calibration(cal) + ("" if cal is None else f", AUC {cal['auc']:.2f}")
    preprocess = info["preprocess"]
    print_table(
        [
            ("path", display_path(info["path"])),
            ("generation", info["generation"]),
            ("items", info["ntotal"]),
            ("identities", info["identities"]),
            ("camids (0-based)", ", ".join(map(str, info["cameras"])) or "-"),
            ("dim", info["dim"]),
            ("type", f"{info['index_type']} ({info['factory']})"),
            ("nprobe / efSearch", f"{info['nprobe']} / {info['ef_search']}"),
            ("inverted lists", _lists_row(info)),
            ("checkpoint", display_path(info["checkpoint"] or "-")),
            ("embedder", info["embedder_fingerprint"][:16]),
            ("preprocess", f"{preprocess.get('height')}x{preprocess.get('width')}, flip {info['flip']}"),
            ("no-match threshold", threshold),
            ("bytes on disk", info["bytes_on_disk"]),
            ("updated", info["updated"]),
        ],
        title="gallery index",
    )
    return 0


def _lists_row(info: dict[str, Any]) -> str:
    """Where the inverted lists live: on disk (mapped), in RAM, or none (flat, HNSW)."""
    if info["lists_on_disk"]:
        return "on disk (memory-mapped)"
    if info["on_disk"]:
        return "on disk when the index has lists (none now)" if "IVF" not in str(info["factory"]) else "in RAM"
    return "in RAM" if "IVF" in str(info["factory"]) else "-"


def _calibrate(args: argparse.Namespace) -> int:
    from reid_ssl.index import GalleryIndex, folder_items

    with GalleryIndex.open_for_update(args.index) as idx:
        if args.queries:
            qdir = Path(args.queries)
            if not qdir.is_dir():
                raise MissingFileError(f"query folder not found: {qdir}")
            queries, _ = folder_items(qdir, False, "query")
            if not queries:
                raise InputError(f"no image files under {qdir}")
            embedder = _embedder_for(idx, args.checkpoint, args.device)
            res = embedder.embed_images([q.path for q in queries], progress=show_progress(json=args.json))
            cal = idx.calibrate(res.features, [queries[i] for i in res.ok])
        else:
            cal = idx.calibrate()
    if args.json:
        print_json(cal)
    else:
        print_table([(k, v) for k, v in cal.items()], title="no-match threshold")
    return 0
