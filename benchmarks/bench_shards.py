"""Loader throughput: tar shards against one file per image, on the same >= 100k small JPEGs, in one run.

Writes ``--images`` distinct 128x64 JPEG "person" crops in bags of 50 (one folder each), packs them with
``reid_ssl prepare shards``' writer, then reads them through the training loop's two feeds with the default
CPU recipe's data settings (64x32 views, both augmentation pipelines, batch 64, ``--workers`` loader workers):

* ``files``: :class:`reid_ssl.train.feed.FileFeed` (random access, one ``open`` per image);
* ``shards``: :class:`reid_ssl.train.feed.ShardFeed` (sequential tar reads, in-shard shuffle).

Images per second to the training step (decode + both views + collation, no model) over ``--batches`` batches,
the two variants alternating for ``--repeats`` rounds, so the ratio shards/files is taken under the same load.
With ``--cold`` the page cache is dropped before every measurement (needs root: it is recorded whether it
was), which is what a first epoch over a corpus larger than memory sees; warm-cache numbers are the default.

    python -m benchmarks.bench_shards                  # 100k images, ~10 min on 2 cores
    python -m benchmarks.bench_shards --cold
    python -m benchmarks.bench_shards --smoke          # 2k images (CI)
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import default_out, finish, header, markdown_table
from reid_ssl.fileio import write_json

BAG = 50


def make_images(root: Path, n: int) -> Path:
    """``n`` distinct 128x64 JPEGs (colour blocks and noise), ``BAG`` per folder; kept across runs."""
    from PIL import Image

    done = root / ".complete"
    if done.is_file() and int(done.read_text()) == n:
        return root
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"bag{i // BAG:06d}"
        if i % BAG == 0:
            folder.mkdir(parents=True, exist_ok=True)
        top, bottom = rng.integers(0, 255, (2, 3))
        img = np.empty((128, 64, 3), np.float32)
        img[:64], img[64:] = top, bottom
        img += rng.normal(0, 20, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i % BAG:04d}.jpg", quality=90)
    done.write_text(str(n))
    return root


def drop_page_cache() -> bool:
    """Drop the kernel's page cache (root only); whether it was dropped."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def images_per_second(source: str, root: Path, batches: int, workers: int) -> dict[str, Any]:
    """Read ``batches`` batches through the training feed for ``source`` (folder or shards)."""
    import torch

    from reid_ssl.config import load_config
    from reid_ssl.distributed import Dist
    from reid_ssl.train.feed import build_feed

    cfg = load_config(
        None, [f"data.source={source}", f"data.root={root}", f"data.num_workers={workers}", "train.batch_size=64"]
    )
    t0 = time.perf_counter()
    feed = build_feed(cfg, Dist(), torch.device("cpu"))
    feed.smallest_batch(19)
    feed.start(0, {})
    setup = time.perf_counter() - t0
    seen, t_first = 0, None
    t0 = time.perf_counter()
    for k, (v1, _, _, _) in enumerate(feed):
        seen += v1.shape[0]
        if t_first is None:
            t_first = time.perf_counter() - t0
        if k + 1 >= batches:
            break
    seconds = time.perf_counter() - t0
    return {"source": source, "images": seen, "seconds": round(seconds, 2), "setup_s": round(setup, 2),
            "first_batch_s": round(t_first or 0.0, 2), "img_per_s": round(seen / seconds, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--batches", type=int, default=300, help="batches of 64 per measurement (default 300)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cold", action="store_true", help="drop the page cache before each measurement (root)")
    p.add_argument("--work-dir", default="/tmp/reid_ssl_bench_shards")
    p.add_argument("--smoke", action="store_true", help="2,000 images, 10 batches, one round (CI)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.images, args.batches, args.repeats = 2_000, 10, 1
    started = time.perf_counter()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = Path(args.work_dir)
    t0 = time.perf_counter()
    images = make_images(work / f"images_{args.images}", args.images)
    make_s = time.perf_counter() - t0
    from reid_ssl.data.image_list import scan_folder
    from reid_ssl.data.shards import write_shards

    shards = work / f"shards_{args.images}"
    t0 = time.perf_counter()
    manifest = write_shards(scan_folder(images), shards, overwrite=True)
    pack_s = time.perf_counter() - t0
    rows, dropped = [], []
    for r in range(args.repeats):
        for source, root in (("folder", images), ("shards", shards)):
            if args.cold:
                dropped.append(drop_page_cache())
            rows.append({"round": r, **images_per_second(source, root, args.batches, args.workers)})
            print(rows[-1], flush=True)
    ratios = [rows[i + 1]["img_per_s"] / rows[i]["img_per_s"] for i in range(0, len(rows), 2)]
    result = header("shards", args.smoke)
    result.update(
        images=args.images, batches=args.batches, workers=args.workers, cold=args.cold,
        page_cache_dropped=all(dropped) if dropped else None, make_images_s=round(make_s, 1),
        pack_s=round(pack_s, 1), pack_img_per_s=round(args.images / pack_s, 1), shards=len(manifest["shards"]),
        shard_bytes=sum((shards / s["name"]).stat().st_size for s in manifest["shards"]),
        rows=rows, ratio_shards_over_files=[round(x, 3) for x in ratios],
        ratio_median=round(float(np.median(ratios)), 3),
    )  # fmt: skip
    suffix = "_cold" if args.cold else ""
    out = Path(args.out) if args.out else default_out(f"shards{suffix}_smoke" if args.smoke else f"shards{suffix}")
    write_json(out, finish(result, started))
    print(markdown_table(rows, ["round", "source", "images", "img_per_s", "first_batch_s", "setup_s"]))
    print(f"shards / files: {result['ratio_median']}x (median of {len(ratios)} rounds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
