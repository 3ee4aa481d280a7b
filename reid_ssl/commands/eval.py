"""`reid_ssl eval`, `reid_ssl finetune` and `reid_ssl export`: benchmark and hand over a checkpoint."""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reid_ssl.commands.common import USER_ERRORS, UserError, one_line, positive_int, print_json

DEFAULT_CHECKPOINT = "runs/pets09_r18/checkpoint.pt"
REID_NAMES = ("market1501", "dukemtmcreid", "msmt17", "cuhk03", "sysu30k", "pets09", "market-layout")
CLASS_NAMES = ("fashion-mnist", "imagenet")


def _wrap(text: str) -> str:
    """Fill a description to 100 columns (the parsers keep line breaks for their examples)."""
    return textwrap.fill(text, width=100)


def int_in(low: int, high: int) -> Callable[[str], int]:
    """argparse type: an integer in [low, high] (absurd values are refused, not attempted)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer in [{low}, {high}], got {value}")
        return value

    return parse


non_negative_int = int_in(0, 2**31 - 1)
BATCH = int_in(1, 4096)


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _common(p: argparse.ArgumentParser, checkpoint_default: str | None = DEFAULT_CHECKPOINT) -> None:
    p.add_argument(
        "--checkpoint",
        default=checkpoint_default,
        required=checkpoint_default is None,
        help="reid_ssl checkpoint" + (f" (default {checkpoint_default})" if checkpoint_default else ""),
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _data_args(p: argparse.ArgumentParser, names: tuple[str, ...], default: str | None) -> None:
    p.add_argument(
        "--dataset",
        default=default,
        required=default is None,
        choices=names,
        metavar="NAME",
        help=f"one of: {', '.join(names)}" + (f" (default {default})" if default else ""),
    )
    p.add_argument(
        "--root",
        help="dataset folder or a parent of it (default: data/pets09 for pets09, "
        "/usr/share/datasets/fashion-mnist for fashion-mnist, else data)",
    )
    p.add_argument("--cuhk03-labeled", action="store_true", help="cuhk03: labeled boxes instead of detected")
    p.add_argument("--cuhk03-classic", action="store_true", help="cuhk03: the classic 20 splits")
    p.add_argument("--split-id", type=non_negative_int, default=0, help="cuhk03: which split (default 0)")
    p.add_argument("--batch-size", type=BATCH, default=64, help="embedding batch size (default 64)")
    p.add_argument("--workers", type=int_in(0, 64), default=0, help="data-loading processes (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "eval",
        help="re-ID benchmark (rank-1/5/10/20, mAP, mINP) or kNN / linear-probe classification",
        description=_wrap(
            "Evaluate a checkpoint's frozen features. Re-ID datasets: rank-1/5/10/20, mAP and mINP with "
            "torchreid's protocol; writes <out>/eval_<dataset>.json, cmc_<dataset>.png and ranked-result strips "
            "(ranked_<dataset>/, green = correct, red = wrong), and caches features under <out>/features/. "
            "Classification (fashion-mnist, imagenet-layout folders): --protocol knn or linear, top-1/top-5, "
            "written to <out>/eval_<dataset>_<protocol>.json."
        ),
        epilog="examples:\n  reid_ssl eval                                  # default PETS09 checkpoint\n"
        "  reid_ssl eval --checkpoint C --dataset market1501 --root data\n"
        "  reid_ssl eval --checkpoint C --dataset sysu30k --root /data/SYSU-30k --device cuda\n"
        "  reid_ssl eval --checkpoint C --dataset fashion-mnist --protocol linear --limit-train 500",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(e)
    _data_args(e, REID_NAMES + CLASS_NAMES, "pets09")
    e.add_argument(
        "--protocol",
        choices=["reid", "knn", "linear"],
        default=None,
        help="reid for re-ID datasets (default), knn (default) or linear for classification",
    )
    e.add_argument("--out", help="output folder (default: the checkpoint's folder)")
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
    e.add_argument("--lr", type=positive_float, default=0.15, help="linear: base lr (default 0.15, method.md §6.1)")
    e.add_argument("--limit-train", type=positive_int, help="classification: at most N train images per class")
    e.add_argument("--limit-test", type=positive_int, help="classification: at most N test images per class")
    e.set_defaults(handler=run_eval)

    f = sub.add_parser(
        "finetune",
        help="supervised fine-tuning on a labelled re-ID train split (torchreid engine), then eval",
        description=_wrap(
            "Fine-tune the checkpoint's backbone with torchreid's data manager and engine (softmax, or "
            "triplet + softmax), save it in reid_ssl's checkpoint format, then run `reid_ssl eval` on it."
        ),
        epilog="example:\n  reid_ssl finetune --checkpoint C --dataset market1501 --root data --loss triplet "
        "--epochs 60",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(f)
    _data_args(f, REID_NAMES, None)
    f.add_argument("--loss", choices=["softmax", "triplet"], default="softmax", help="default softmax")
    f.add_argument("--epochs", type=int_in(1, 100000), default=60, help="default 60")
    f.add_argument("--max-steps", type=positive_int, help="stop after N optimizer steps (smoke runs)")
    f.add_argument("--train-batch-size", type=BATCH, default=32, help="default 32")
    f.add_argument("--lr", type=positive_float, default=3.5e-4, help="Adam lr (default 3.5e-4)")
    f.add_argument("--weight-decay", type=non_negative_float, default=5e-4, help="default 5e-4")
    f.add_argument("--num-instances", type=int_in(1, 1024), default=4, help="triplet: images per identity (4)")
    f.add_argument("--margin", type=positive_float, default=0.3, help="triplet margin (default 0.3)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", help="output checkpoint (default <checkpoint dir>/finetune_<dataset>_<loss>/checkpoint.pt)")
    f.add_argument("--no-eval", dest="run_eval", action="store_false", help="skip the eval afterwards")
    f.add_argument("--strips", type=int_in(0, 1000), default=8, help="eval: ranked-result strips (default 8)")
    f.set_defaults(handler=run_finetune)

    x = sub.add_parser(
        "export",
        help="write the backbone for torchreid, torchvision, ONNX, or as a slim checkpoint",
        description=_wrap(
            "torchreid: {'state_dict', 'arch', ...} for torchreid.utils.load_pretrained_weights; "
            "torchvision: a ResNet state dict without fc.* (load with strict=False); onnx: backbone + L2 "
            "normalisation, dynamic batch, preprocessing in the metadata; reid_ssl: the checkpoint without "
            "training state. All .pt outputs load with torch.load(weights_only=True)."
        ),
        epilog="example:\n  reid_ssl export --checkpoint C --to onnx --out model.onnx",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(x, checkpoint_default=None)
    x.add_argument("--to", required=True, choices=["torchreid", "torchvision", "onnx", "reid_ssl"])
    x.add_argument("--out", required=True, help="output file")
    x.add_argument("--opset", type=positive_int, help="onnx: opset version (default: the exporter's)")
    x.set_defaults(handler=run_export)


# ---------------------------------------------------------------------------------------------------------
# Handlers
# ---------------------------------------------------------------------------------------------------------


def _checkpoint(path: str) -> Path:
    p = Path(path)
    if not p.is_file():
        hint = " (train one with `reid_ssl train` or pass --checkpoint)" if path == DEFAULT_CHECKPOINT else ""
        raise UserError(f"checkpoint not found: {p}{hint}")
    return p


def _split_options(args: argparse.Namespace) -> dict[str, Any]:
    if args.dataset != "cuhk03":
        return {}
    return {"labeled": args.cuhk03_labeled, "classic": args.cuhk03_classic, "split_id": args.split_id}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:6.2f}%"


def _print_reid(result: dict[str, Any], title: str) -> None:
    print(
        f"{title}: {result['dataset']} ({result['metric']}{', flip' if result['flip'] else ''}"
        f"{', re-ranked' if result['rerank'] else ''}, {result['mode']})"
    )
    print(
        f"  {result['num_query']} queries ({result['num_valid_queries']} with a true match), "
        f"{result['num_gallery']} gallery images"
    )
    for key in ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP"):
        print(f"  {key:<7} {_pct(result[key])}")
    bad = {k: len(v) for k, v in result["failures"].items() if v}
    if bad:
        print(f"  warning: unreadable images left out: {bad} (listed in the JSON)", file=sys.stderr)
    for note in result["notes"]:
        if not note.startswith(("ties:", "flip:")):
            print(f"  note: {note}")
    files = result["files"]
    print(f"  wrote {files['json']}, {files['cmc_png']}, {len(files['strips'])} strips")


def _as_user_error(e: BaseException) -> UserError:
    return UserError(one_line(e))


def run_eval(args: argparse.Namespace) -> int:
    checkpoint = _checkpoint(args.checkpoint)
    classification = args.dataset in CLASS_NAMES
    protocol = args.protocol or ("knn" if classification else "reid")
    if classification == (protocol == "reid"):
        raise UserError(
            f"--protocol {protocol} does not apply to {args.dataset} (re-ID datasets: reid; "
            f"{', '.join(CLASS_NAMES)}: knn or linear)"
        )
    progress = sys.stderr.isatty() and not args.json
    try:
        if classification:
            result = _run_classification(args, checkpoint, protocol, progress)
        else:
            from reid_ssl.evaluate import evaluate_checkpoint

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
                split_options=_split_options(args),
            )
    except (*USER_ERRORS, MemoryError) as e:
        raise _as_user_error(e) from None
    if args.json:
        print_json(result)
    elif classification:
        print(
            f"{protocol} on {args.dataset}: {result['num_train']} train / {result['num_test']} test images, "
            f"{result['num_classes']} classes"
        )
        print(f"  top1    {_pct(result['top1'])}\n  top5    {_pct(result['top5'])}")
        print(f"  wrote {result['json']}")
    else:
        _print_reid(result, "eval")
    return 0


def _run_classification(args: argparse.Namespace, checkpoint: Path, protocol: str, progress: bool) -> dict[str, Any]:
    import json

    from reid_ssl.checkpoint import atomic_write_bytes
    from reid_ssl.classify import evaluate_classification

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
    out = Path(args.out) if args.out else checkpoint.resolve().parent
    path = out / f"eval_{args.dataset}_{protocol}.json"
    result["json"] = str(path)
    atomic_write_bytes(path, (json.dumps(result, indent=2) + "\n").encode())
    return result


def run_finetune(args: argparse.Namespace) -> int:
    checkpoint = _checkpoint(args.checkpoint)
    log = None if args.json else (lambda line: print(line, file=sys.stderr))
    try:
        from reid_ssl.finetune import finetune

        result = finetune(
            checkpoint,
            args.dataset,
            args.root,
            out=args.out,
            loss=args.loss,
            epochs=args.epochs,
            max_steps=args.max_steps,
            batch_size=args.train_batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            num_instances=args.num_instances,
            margin=args.margin,
            num_workers=args.workers,
            seed=args.seed,
            device=args.device,
            split_options=_split_options(args),
            log=log,
        )
        if args.run_eval:
            from reid_ssl.evaluate import evaluate_checkpoint

            result["eval"] = evaluate_checkpoint(
                result["checkpoint"],
                args.dataset,
                args.root,
                batch_size=args.batch_size,
                num_workers=args.workers,
                device=args.device,
                num_strips=args.strips,
                split_options=_split_options(args),
            )
    except (*USER_ERRORS, MemoryError) as e:
        raise _as_user_error(e) from None
    if args.json:
        print_json(result)
        return 0
    print(
        f"finetune ({args.loss}) on {args.dataset}: {result['steps']} steps, {result['epochs']} epochs, "
        f"{result['num_train_images']} images of {result['num_train_ids']} ids -> {result['checkpoint']}"
    )
    if result["skipped_train_images"]:
        print(f"  warning: {len(result['skipped_train_images'])} unreadable train images skipped", file=sys.stderr)
    if "eval" in result:
        _print_reid(result["eval"], "eval of the fine-tuned checkpoint")
    return 0


def run_export(args: argparse.Namespace) -> int:
    checkpoint = _checkpoint(args.checkpoint)
    from reid_ssl.export import export_checkpoint

    try:
        result = export_checkpoint(checkpoint, args.to, args.out, opset=args.opset)
    except USER_ERRORS as e:
        raise _as_user_error(e) from None
    if args.json:
        print_json(result)
    else:
        print(f"exported {result['backbone']} ({args.to}) to {result['out']} ({result['bytes']:,} bytes)")
    return 0
