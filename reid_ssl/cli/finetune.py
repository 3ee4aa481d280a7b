"""``reid_ssl finetune``: supervised fine-tuning through torchreid's data manager and engine, then ``eval``."""

from __future__ import annotations

import argparse
import sys

from reid_ssl.cli.common import (
    add_parser,
    batch_size,
    existing_checkpoint,
    int_in,
    non_negative_float,
    positive_float,
    positive_int,
    print_json,
    wrap,
)
from reid_ssl.cli.eval import add_checkpoint_args, add_data_args, print_reid, split_options
from reid_ssl.data.datasets import REID_DATASETS

DESCRIPTION = wrap(
    "Fine-tune the checkpoint's backbone with torchreid's data manager and engine (softmax, or triplet + "
    "softmax), save it in reid_ssl's checkpoint format, then run `reid_ssl eval` on it."
)
EPILOG = "example:\n  reid_ssl finetune --checkpoint C --dataset market1501 --root data --loss triplet --epochs 60"


def register(sub: argparse._SubParsersAction) -> None:
    f = add_parser(
        sub,
        "finetune",
        "supervised fine-tuning on a labelled re-ID train split (torchreid engine), then eval",
        DESCRIPTION,
        EPILOG,
    )
    add_checkpoint_args(f)
    add_data_args(f, REID_DATASETS(), None)
    f.add_argument("--loss", choices=["softmax", "triplet"], default="softmax", help="default softmax")
    f.add_argument("--epochs", type=int_in(1, 100000), default=60, help="default 60")
    f.add_argument("--max-steps", type=positive_int, help="stop after N optimizer steps (smoke runs)")
    f.add_argument("--train-batch-size", type=batch_size, default=32, help="default 32")
    f.add_argument("--lr", type=positive_float, default=3.5e-4, help="Adam lr (default 3.5e-4)")
    f.add_argument("--weight-decay", type=non_negative_float, default=5e-4, help="default 5e-4")
    f.add_argument("--num-instances", type=int_in(1, 1024), default=4, help="triplet: images per identity (4)")
    f.add_argument("--margin", type=positive_float, default=0.3, help="triplet margin (default 0.3)")
    f.add_argument(
        "--seed", type=int, default=0, help="seed of the fine-tuning run (sampling, augmentation, head init)"
    )
    f.add_argument(
        "--out",
        help="output checkpoint (default <checkpoint dir>/finetune_<dataset>_<loss>/checkpoint.pt); an existing "
        "file is replaced only with --overwrite, the --checkpoint itself never",
    )
    f.add_argument("--overwrite", action="store_true", help="replace an existing --out and the eval results next to it")
    f.add_argument("--no-eval", dest="run_eval", action="store_false", help="skip the eval afterwards")
    f.add_argument("--strips", type=int_in(0, 1000), default=8, help="eval: ranked-result strips (default 8)")
    f.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    checkpoint = existing_checkpoint(args.checkpoint)
    log = None if args.json else (lambda line: print(line, file=sys.stderr))
    from reid_ssl.eval.finetune import finetune

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
        split_options=split_options(args),
        log=log,
        overwrite=args.overwrite,
    )
    if args.run_eval:
        from reid_ssl.eval.reid import evaluate_checkpoint

        result["eval"] = evaluate_checkpoint(
            result["checkpoint"],
            args.dataset,
            args.root,
            batch_size=args.batch_size,
            num_workers=args.workers,
            device=args.device,
            num_strips=args.strips,
            split_options=split_options(args),
            overwrite=args.overwrite,
        )
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
        print_reid(result["eval"], "eval of the fine-tuned checkpoint")
    return 0
