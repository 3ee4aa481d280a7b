"""`reid_ssl index build`: embed a gallery folder or data set into a new index (resumable, torchrun-sharded)."""

from __future__ import annotations

import argparse
from typing import Any

from reid_ssl.cli.common import (
    add_batch_size_option,
    add_device_option,
    add_json_option,
    add_parser,
    int_in,
    positive_int,
    print_json,
    print_problems,
    print_table,
    workers,
    wrap,
)
from reid_ssl.console import show_progress
from reid_ssl.data.datasets import REID_DATASETS
from reid_ssl.index.sidecar import display_path
from reid_ssl.index.types import AUTO_FLAT_MAX, AUTO_IVF_FLAT_FLOATS, INDEX_TYPES, type_choices


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``index build``."""
    b = add_parser(
        sub,
        "build",
        "embed a gallery folder (or data set) into a new index (resumable)",
        wrap(
            "Embed every image of a folder (recursively) or of a re-ID data set's gallery with a checkpoint's "
            "embedder into a new index at --out, choose the FAISS index type, and calibrate the 'no match' "
            "threshold from Market-style file names. Resumable: a killed build continues from its last finished "
            "chunk. Runs under torchrun too (torchrun -m reid_ssl.cli index build ...): each rank embeds a shard "
            "and rank 0 merges them."
        ),
        """examples:
  reid_ssl index build --checkpoint runs/pets09_r18/checkpoint.pt --images pets09 --out runs/pets09_r18/gallery
  reid_ssl index build --checkpoint C --images crops/ --out IDX --type ivf-flat""",
    )
    b.add_argument("--checkpoint", required=True, help="reid_ssl checkpoint whose embedder fills the index")
    b.add_argument(
        "--images",
        required=True,
        help="a folder of images (recursive), a Market-1501-layout root (gallery = bounding_box_test, "
        f"query/ calibrates the threshold), or a data set name: {', '.join(REID_DATASETS())}",
    )
    b.add_argument("--out", required=True, help="index folder to create (new or empty; an unfinished build resumes)")
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
    add_batch_size_option(b)
    b.add_argument("--workers", type=workers, default=0, help="data loader worker processes, 0..64 (default 0)")
    add_device_option(b)
    b.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing index at --out, or build into a folder of other files",
    )
    b.add_argument("--no-calibrate", action="store_true", help="skip the 'no match' threshold calibration")
    add_json_option(b)
    b.set_defaults(handler=run_build)


def run_build(args: argparse.Namespace) -> int:
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
    if result.get("note"):
        print(f"note: {result['note']}")
    print_problems(result["failures"], "unreadable: ")
    print_problems(result["skipped"], "skipped: ")
