"""Start-up at SYSU-30k scale: time to the first batch and memory per DataLoader worker, 1M / 3M / 30M images.

The layout is SYSU-30k's (``sysu_train_set_all/<bag>/<image>.jpg`` plus ``meta/train.txt``, 10,000 images per
bag) made cheap: every bag folder is a symbolic link to one folder of 10,000 small JPEGs, so 30M listed paths
all open, and cost 3,000 links. Each size runs in a fresh process:

* ``after``: the training source as reid_ssl builds it now (:func:`reid_ssl.data.ssl_sources.sysu30k_source`:
  the list parsed into numpy arrays, nothing ``stat``-ed), wrapped in the two-view dataset and a DataLoader
  with ``--workers`` forked workers;
* ``before``: the reference it replaced, one ``Path`` and one item object per line and one ``exists()`` per
  line (reid_ssl up to commit 5da3576), in the same dataset and loader. Measured at the smaller sizes; its
  30M cost is extrapolated linearly (it is linear: the same work per line), and marked so.

Per run: seconds to build the source, to build the dataset, to the first batch; resident memory of the main
process before and after; per worker, after ``--batches`` batches, its proportional (PSS) and private memory
from ``/proc/<pid>/smaps_rollup`` (RSS counts the pages a forked worker shares with the main process; private
memory is what each worker adds, and grows when Python objects' reference counts touch shared pages).

    python -m benchmarks.bench_startup                       # 1M, 3M, 30M after; 1M, 3M before (~15 min)
    python -m benchmarks.bench_startup --smoke               # 20k images, both (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import REPO
from benchmarks.report import default_out, finish, header, markdown_table
from reid_ssl.fileio import write_json

PER_BAG = 10_000


def make_layout(root: Path, images: int) -> Path:
    """A SYSU-30k layout of ``images`` listed images (bags: links to one folder of ``PER_BAG`` JPEGs)."""
    from PIL import Image

    real = root.parent / "real_images"
    if not (real / f"{PER_BAG - 1:05d}.jpg").is_file():
        real.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(PER_BAG):
            img = np.repeat(rng.integers(0, 255, (2, 1, 3), dtype=np.uint8), [32, 32], axis=0).repeat(32, axis=1)
            Image.fromarray(img).save(real / f"{i:05d}.jpg", quality=90)
    bags = -(-images // PER_BAG)
    train = root / "sysu_train_set_all"
    train.mkdir(parents=True, exist_ok=True)
    (root / "meta").mkdir(exist_ok=True)
    names = [f"{i:05d}.jpg" for i in range(PER_BAG)]
    with open(root / "meta" / "train.txt", "w") as f:
        for b in range(bags):
            link = train / f"{b:010d}"
            if not link.exists():
                link.symlink_to(real, target_is_directory=True)
            n = min(PER_BAG, images - b * PER_BAG)
            f.write("".join(f"{b:010d}/{name}\n" for name in names[:n]))
    return root


# ----- the measured process -------------------------------------------------------------------------------


def _reference_source(root: Path) -> list[Any]:
    """The pre-change SYSU-30k source: one Path and one item per line, one ``exists()`` per line."""
    from reid_ssl.data.image_list import SSLItem

    train = root / "sysu_train_set_all"
    lines = [line.split()[0] for line in (root / "meta" / "train.txt").read_text().splitlines() if line.strip()]
    paths = [(train / ln) if (train / ln).exists() or not (root / ln).exists() else (root / ln) for ln in lines]
    bag_of: dict[Path, int] = {}
    return [SSLItem(p, bag_of.setdefault(p.parent, len(bag_of))) for p in paths]


class _ReferenceTwoView:
    """The pre-change dataset over such a list: the items list and a dict of bag -> list of positions."""

    def __init__(self, items: list[Any], view: Any) -> None:
        from collections import defaultdict

        self.items, self.view = items, view
        self.bags: dict[int, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            if item.bag >= 0:
                self.bags[item.bag].append(i)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Any, Any, str]:
        from reid_ssl.images import open_rgb

        img = open_rgb(self.items[i].path)
        return self.view(img), self.view(img), ""


def _memory(pid: int | str = "self") -> dict[str, float]:
    """Resident, proportional and private memory of a process, MB (Linux ``smaps_rollup``)."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0]) / 1024
    private = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return {"rss_mb": round(fields["Rss"], 1), "pss_mb": round(fields["Pss"], 1), "private_mb": round(private, 1)}


def measure(variant: str, root: Path, workers: int, batches: int) -> dict[str, Any]:
    """Build the source, the dataset and a loader; time the first batch; read every worker's memory."""
    import torch
    from torch.utils.data import DataLoader

    from reid_ssl.config import load_config
    from reid_ssl.data.augment import two_view_dataset, view_pair
    from reid_ssl.data.ssl_sources import sysu30k_source

    torch.set_num_threads(1)
    cfg = load_config(None, ["data.source=sysu30k", f"data.root={root}", "data.height=64", "data.width=32"])
    before = _memory()
    t0 = time.perf_counter()
    items = sysu30k_source(root) if variant == "after" else _reference_source(root)
    t_source = time.perf_counter() - t0
    after_source = _memory()
    if variant == "after":
        dataset = two_view_dataset(cfg.data, cfg.augment, items=items)
    else:
        dataset = _ReferenceTwoView(items, view_pair(cfg.data, cfg.augment)[0])
    t_dataset = time.perf_counter() - t0 - t_source
    loader = DataLoader(
        dataset, batch_size=64, shuffle=True, num_workers=workers, drop_last=True, persistent_workers=True
    )
    it = iter(loader)
    next(it)
    t_first = time.perf_counter() - t0
    for _ in range(batches - 1):
        next(it)
    pids = list(getattr(it, "_workers", []))
    worker_mem = [_memory(p.pid) for p in pids]
    main_mem = _memory()
    del it
    return {
        "variant": variant,
        "images": len(items),
        "source_s": round(t_source, 2),
        "dataset_s": round(t_dataset, 2),
        "first_batch_s": round(t_first, 2),
        "main_mb_before": before,
        "main_mb_after_source": after_source,
        "main_mb_after_batches": main_mem,
        "source_mb": round(after_source["rss_mb"] - before["rss_mb"], 1),
        "workers": worker_mem,
        "worker_private_mb": max((w["private_mb"] for w in worker_mem), default=None),
        "worker_pss_mb": max((w["pss_mb"] for w in worker_mem), default=None),
    }


# ----- the driver -----------------------------------------------------------------------------------------


def _child(variant: str, root: Path, workers: int, batches: int, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.bench_startup", "--child", variant, str(root), "--workers", str(workers),
           "--batches", str(batches)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} at {root}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _count(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1_000, "M": 1_000_000}.get(text[-1], 1)
    return int(float(text.rstrip("KM")) * scale)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", default="1M,3M,30M", help="listed images for 'after' (default 1M,3M,30M)")
    p.add_argument("--before-sizes", default="1M,3M", help="listed images for 'before' (default 1M,3M)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=20, help="batches read before the workers' memory is taken")
    p.add_argument("--work-dir", default="/tmp/reid_ssl_bench_startup")
    p.add_argument("--smoke", action="store_true", help="20k images, both variants (CI)")
    p.add_argument("--out", default=None)
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "ROOT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child[0], Path(args.child[1]), args.workers, args.batches)))
        return 0
    started = time.perf_counter()
    sizes = [20_000] if args.smoke else [_count(s) for s in args.sizes.split(",")]
    before_sizes = [20_000] if args.smoke else [_count(s) for s in args.before_sizes.split(",")]
    rows = []
    for n in sorted(set(sizes) | set(before_sizes)):
        root = make_layout(Path(args.work_dir) / f"sysu_{n}", n)
        for variant in ("before", "after"):
            if n in (before_sizes if variant == "before" else sizes):
                rows.append(_child(variant, root, args.workers, args.batches, timeout=3600))
                print(
                    json.dumps(
                        {
                            k: rows[-1][k]
                            for k in (
                                "variant",
                                "images",
                                "source_s",
                                "first_batch_s",
                                "source_mb",
                                "worker_private_mb",
                            )
                        }
                    ),
                    flush=True,
                )
    rows += _extrapolated(rows, max(sizes))
    result = header("startup", args.smoke)
    result.update(rows=rows, per_bag=PER_BAG, workers=args.workers, batches=args.batches)
    out = Path(args.out) if args.out else default_out("startup_smoke" if args.smoke else "startup")
    write_json(out, finish(result, started))
    cols = ["variant", "images", "source_s", "first_batch_s", "source_mb", "worker_pss_mb", "worker_private_mb"]
    print(markdown_table(rows, cols))
    return 0


def _extrapolated(rows: list[dict[str, Any]], target: int) -> list[dict[str, Any]]:
    """The 'before' row at ``target`` images, linear in the images from its largest measured size."""
    before = [r for r in rows if r["variant"] == "before"]
    if not before or max(r["images"] for r in before) >= target:
        return []
    last = max(before, key=lambda r: r["images"])
    f = target / last["images"]
    keys = ("source_s", "first_batch_s", "source_mb", "worker_private_mb", "worker_pss_mb")
    return [
        {
            "variant": "before (extrapolated)",
            "images": target,
            **{k: round(last[k] * f, 1) for k in keys if last[k] is not None},
        }
    ]


if __name__ == "__main__":
    raise SystemExit(main())
