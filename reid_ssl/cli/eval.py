"""``reid_ssl eval``: a checkpoint's frozen features on a re-ID benchmark, or kNN / linear-probe classification."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from reid_ssl.cli.common import (
    DEFAULT_CHECKPOINT,
    add_json_option,
    add_parser,
    batch_size,
    choices_help,
    existing_checkpoint,
    int_in,
    non_negative_int,
    percent,
    positive_float,
    positive_int,
    print_json,
    workers,
    wrap,
)
from reid_ssl.console import show_progress
from reid_ssl.data.datasets import CLASSIFICATION_DATASETS, REID_DATASETS, default_root
from reid_ssl.errors import InputError

DESCRIPTION = wrap(
    "Evaluate a checkpoint's frozen features. Re-ID datasets: rank-1/5/10/20, mAP and mINP with torchreid's "
    "protocol; writes <out>/eval_<dataset>.json, cmc_<dataset>.png and ranked-result strips (ranked_<dataset>/, "
    "green = correct, red = wrong), and caches features under <out>/features/. Classification datasets: "
    "--protocol knn or linear, top-1/top-5, written to <out>/eval_<dataset>_<protocol>.json. Earlier "
    "results there are replaced only by a re-run with the same checkpoint, dataset and scoring options, or with "
    "--overwrite."
)
EPILOG = """\
examples:
  reid_ssl eval                                  # default PETS09 checkpoint
  reid_ssl eval --checkpoint C --dataset market1501 --root data
  reid_ssl eval --checkpoint C --dataset sysu30k --root /data/SYSU-30k --device cuda
  reid_ssl eval --checkpoint C --dataset fashion-mnist --protocol linear --limit-train 500"""


def add_checkpoint_args(p: argparse.ArgumentParser, default: str | None = DEFAULT_CHECKPOINT) -> None:
    """``--checkpoint`` (optional with a default, or required) and ``--json``."""
    p.add_argument(
        "--checkpoint",
        default=default,
        required=default is None,
        help="reid_ssl checkpoint" + (f" (default {default})" if default else ""),
    )
    add_json_option(p)


def add_data_args(p: argparse.ArgumentParser, names: tuple[str, ...], default: str | None) -> None:
    """``--dataset`` (choices from the dataset registry), ``--root`` and the embedding options."""
    p.add_argument(
        "--dataset",
        default=default,
        required=default is None,
        choices=names,
        metavar="NAME",
        help=choices_help(names, default),
    )
    roots = ", ".join(sorted({f"{default_root(n)} for {n}" for n in names if default_root(n) != "data"}))
    p.add_argument("--root", help=f"dataset folder or a parent of it (default: {roots}; else data)")
    p.add_argument("--cuhk03-labeled", action="store_true", help="cuhk03: labeled boxes instead of detected")
    p.add_argument("--cuhk03-classic", action="store_true", help="cuhk03: the classic 20 splits")
    p.add_argument("--split-id", type=non_negative_int, default=0, help="cuhk03: which split (default 0)")
    p.add_argument("--batch-size", type=batch_size, default=64, help="embedding batch size (default 64)")
    p.add_argument("--workers", type=workers, default=0, help="data-loading processes, 0..64 (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def split_options(args: argparse.Namespace) -> dict[str, Any]:
    """Dataset-specific options of :func:`reid_ssl.data.datasets.load_split` from the command line."""
    if args.dataset != "cuhk03":
        return {}
    return {"labeled": args.cuhk03_labeled, "classic": args.cuhk03_classic, "split_id": args.split_id}


def register(sub: argparse._SubParsersAction) -> None:
    e = add_parser(
        sub,
        "eval",
        "re-ID benchmark (rank-1/5/10/20, mAP, mINP) or kNN / linear-probe classification",
        DESCRIPTION,
        EPILOG,
    )
    add_checkpoint_args(e)
    add_data_args(e, REID_DATASETS() + CLASSIFICATION_DATASETS(), "pets09")
    e.add_argument(
        "--protocol",
        choices=["reid", "knn", "linear"],
        default=None,
        help="reid for re-ID datasets (their only protocol); knn or linear for classification datasets "
        "(default: reid for a re-ID dataset, knn for a classification one)",
    )
    e.add_argument("--out", help="output folder (default: the checkpoint's folder)")
    e.add_argument(
        "--overwrite",
        action="store_true",
        help="replace results of other options in --out (without it only a re-run of the same checkpoint, dataset "
        "and scoring options rewrites them)",
    )
    e.add_argument("--metric", choices=["cosine", "euclidean"], default="cosine", help="default cosine")
    e.add_argument(
        "--no-flip",
        dest="flip",
        action="store_false",
        help="no flip averaging (default re-ID: normalize(normalize(f) + normalize(f_flipped)))",
    )
    e.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking (refused where it would not fit)")
    e.add_argument("--max-rank", type=int_in(1, 10000), default=50, help="CMC length (default 50)")
    e.add_argument("--strips", type=int_in(0, 1000), default=8, help="ranked-result strips to draw (default 8)")
    e.add_argument("--strip-topk", type=int_in(1, 100), default=10, help="gallery images per strip (default 10)")
    e.add_argument(
        "--streaming",
        choices=["auto", "on", "off"],
        default="auto",
        help="stream the gallery instead of a distance matrix (auto: above 1 GiB)",
    )
    e.add_argument("--no-cache", dest="cache", action="store_false", help="do not cache features on disk")
    e.add_argument("--strict", action="store_true", help="fail if any image cannot be read")
    e.add_argument("--k", type=int_in(1, 100000), default=20, help="knn: neighbours (default 20)")
    e.add_argument("--temperature", type=positive_float, default=0.07, help="knn: weight temperature (0.07)")
    e.add_argument("--epochs", type=int_in(1, 100000), default=100, help="linear: epochs (default 100)")
    e.add_argument("--lr", type=positive_float, default=0.15, help="linear: base lr (default 0.15, the reference's)")
    e.add_argument("--limit-train", type=positive_int, help="classification: at most N train images per class")
    e.add_argument("--limit-test", type=positive_int, help="classification: at most N test images per class")
    e.set_defaults(handler=run)


def print_reid(result: dict[str, Any], title: str) -> None:
    """A re-ID result (see :func:`reid_ssl.eval.reid.evaluate_checkpoint`) for humans."""
    print(
        f"{title}: {result['dataset']} ({result['metric']}{', flip' if result['flip'] else ''}"
        f"{', re-ranked' if result['rerank'] else ''}, {result['mode']})"
    )
    print(
        f"  {result['num_query']} queries ({result['num_valid_queries']} with a true match), "
        f"{result['num_gallery']} gallery images"
    )
    for key in ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP"):
        print(f"  {key:<7} {percent(result[key])}")
    bad = {k: len(v) for k, v in result["failures"].items() if v}
    if bad:
        print(f"  warning: unreadable images left out: {bad} (listed in the JSON)", file=sys.stderr)
    for warning in result.get("warnings", []):
        print(f"  WARNING: {warning}", file=sys.stderr)
    for note in result["notes"]:
        if not note.startswith(("ties:", "flip:")):
            print(f"  note: {note}")
    files = result["files"]
    print(f"  wrote {files['json']}, {files['cmc_png']}, {len(files['strips'])} strips")


def run(args: argparse.Namespace) -> int:
    checkpoint = existing_checkpoint(args.checkpoint)
    classification = args.dataset in CLASSIFICATION_DATASETS()
    protocol = args.protocol or ("knn" if classification else "reid")
    if classification == (protocol == "reid"):
        raise InputError(
            f"--protocol {protocol} does not apply to {args.dataset} (re-ID datasets: reid; "
            f"{', '.join(CLASSIFICATION_DATASETS())}: knn or linear)"
        )
    progress = show_progress(json=args.json)
    if classification:
        result = _classification(args, checkpoint, protocol, progress)
    else:
        from reid_ssl.eval.reid import evaluate_checkpoint

        result = evaluate_checkpoint(
            checkpoint,
            args.dataset,
            args.root,
            out_dir=args.out,
            metric=args.metric,
            flip=args.flip,
            rerank=args.rerank,
            max_rank=args.max_rank,
            batch_size=args.batch_size,
            num_workers=args.workers,
            device=args.device,
            num_strips=args.strips,
            strip_topk=args.strip_topk,
            cache=args.cache,
            streaming={"auto": None, "on": True, "off": False}[args.streaming],
            strict=args.strict,
            progress=progress,
            split_options=split_options(args),
            overwrite=args.overwrite,
        )
    if args.json:
        print_json(result)
    elif classification:
        print(
            f"{protocol} on {args.dataset}: {result['num_train']} train / {result['num_test']} test images, "
            f"{result['num_classes']} classes"
        )
        print(f"  top1    {percent(result['top1'])}\n  top5    {percent(result['top5'])}")
        print(f"  wrote {result['json']}")
    else:
        print_reid(result, "eval")
    return 0


def _classification(args: argparse.Namespace, checkpoint: Path, protocol: str, progress: bool) -> dict[str, Any]:
    from reid_ssl.eval.classify import evaluate_classification
    from reid_ssl.fileio import check_result_file, write_json

    out = Path(args.out) if args.out else checkpoint.resolve().parent
    path = out / f"eval_{args.dataset}_{protocol}.json"
    keys = ("dataset", "root", "limit_train", "limit_test") + (
        ("k", "temperature") if protocol == "knn" else ("epochs", "lr")
    )
    options = {"checkpoint": str(checkpoint.resolve()), "protocol": protocol, **{k: getattr(args, k) for k in keys}}
    check_result_file(path, options, args.overwrite)
    result = evaluate_classification(
        checkpoint,
        args.dataset,
        args.root,
        protocol=protocol,
        limit_train=args.limit_train,
        limit_test=args.limit_test,
        k=args.k,
        temperature=args.temperature,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        num_workers=args.workers,
        flip=False,
        device=args.device,
        progress=progress,
    )
    result["json"], result["options"] = str(path), options
    write_json(path, result)
    return result
