"""`reid_ssl index search|info`: query an index and describe it (read-only: no lock is taken).

``search`` prints each query's ranked results, the "no match" verdict against the calibrated threshold, and
when fewer than ``-k`` results came back, why and which option finds more (:func:`shortfall_hint`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from reid_ssl.cli.common import (
    add_device_option,
    add_index_option,
    add_json_option,
    add_parser,
    int_in,
    non_negative_int,
    positive_int,
    print_json,
    print_table,
    wrap,
)
from reid_ssl.errors import InputError
from reid_ssl.fileio import require_file
from reid_ssl.index.sidecar import display_path

MAX_K = 1000


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``index search`` and ``index info``."""
    s = add_parser(
        sub,
        "search",
        "find the gallery items most similar to query images",
        wrap(
            "Embed each query image with the index's own embedder and print its -k most similar gallery items, "
            "best first, with the 'no match' verdict against the calibrated threshold; when fewer than -k come "
            "back, why and which option finds more. Read-only: no lock is taken."
        ),
        """examples:
  reid_ssl index search --query crop.jpg
  reid_ssl index search --index IDX --query q1.jpg q2.jpg -k 20 --exclude-camid 0 --json""",
    )
    s.add_argument("--query", required=True, nargs="+", help="query image file(s)")
    add_index_option(s)
    s.add_argument("-k", type=int_in(1, MAX_K), default=10, help=f"matches per query, 1..{MAX_K} (default 10)")
    s.add_argument(
        "--exclude-camid",
        type=non_negative_int,
        metavar="CAMID",
        help="drop gallery items of this camera id, 0-based: file name c1 = camid 0",
    )
    s.add_argument("--nprobe", type=positive_int, help="IVF lists visited per query (default: the index's)")
    s.add_argument("--ef-search", type=positive_int, help="HNSW candidate list size (default: the index's)")
    s.add_argument("--checkpoint", help="default: the checkpoint that built the index")
    add_device_option(s)
    add_json_option(s)
    s.set_defaults(handler=run_search)

    i = add_parser(
        sub,
        "info",
        "size, type, embedder, calibration and statistics of an index",
        wrap(
            "Describe an index: its size, FAISS type and parameters, the embedder (checkpoint, preprocessing) "
            "that built it, the 'no match' calibration, and counts of identities, cameras and sources."
        ),
        "examples:\n  reid_ssl index info\n  reid_ssl index info --index IDX --json",
    )
    add_index_option(i)
    add_json_option(i)
    i.set_defaults(handler=run_info)


# ---------------------------------------------------------------------------------------------------------
# index search
# ---------------------------------------------------------------------------------------------------------


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


def run_search(args: argparse.Namespace) -> int:
    from reid_ssl.images import image_crop_problem
    from reid_ssl.index import GalleryIndex
    from reid_ssl.index.manifest import load_recorded_embedder

    idx = GalleryIndex.load(args.index)
    for q in args.query:
        require_file(q, "query image")
        if reason := image_crop_problem(q):
            raise InputError(f"{q}: {reason}")
    embedder = load_recorded_embedder(idx.manifest, idx.path, args.checkpoint, args.device)
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


# ---------------------------------------------------------------------------------------------------------
# index info
# ---------------------------------------------------------------------------------------------------------


def run_info(args: argparse.Namespace) -> int:
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
