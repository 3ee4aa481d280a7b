"""`reid_ssl train`, `reid_ssl k-rule` and `reid_ssl prepare`: everything up to a pretrained checkpoint."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from reid_ssl.commands.common import UserError, print_json, print_table

DEFAULT_CONFIG = "configs/pets09_r18_cpu.yaml"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="self-supervised pretraining (truncated triplet, BYOL or SimCLR)",
        description="Pretrain a backbone without labels. With no arguments: the PETS09 CPU default "
        f"({DEFAULT_CONFIG} if it exists, else the built-in defaults, which are the same).",
        epilog="examples:\n  reid_ssl train\n  reid_ssl train -c configs/smoke.yaml train.epochs=2 optim.lr=0.1\n"
        "  reid_ssl train --resume                       # continue runs/<name>/checkpoint.pt\n"
        "  torchrun --nproc_per_node 2 -m reid_ssl.cli train -c configs/imagenet_r50_paper.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-c", "--config", help="YAML file with overrides of the defaults (reid_ssl/config.py)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides applied after --config")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue from <train.out_dir>/checkpoint.pt, or from the given checkpoint",
    )
    p.add_argument("--no-eval", action="store_true", help="skip the per-epoch retrieval monitor")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run_train)

    k = sub.add_parser(
        "k-rule",
        help="Bernoulli rule: is the rank-k negative a true negative? (method.md §1.16)",
        description="For X ~ Binomial(negatives, 1/classes) same-identity 'negatives' in a batch, print "
        "P(X < k): the probability that the negative ranked k by similarity belongs to another identity.",
    )
    k.add_argument("--negatives", type=int, required=True, help="negatives per anchor (batch size - 1)")
    k.add_argument("--classes", type=int, required=True, help="number of classes / identities in the data")
    k.add_argument("--max-k", type=int, default=10, help="largest k to print (default 10)")
    k.add_argument("--confidence", type=float, default=0.99, help="report the smallest k reaching this")
    k.add_argument("--json", action="store_true", help="print JSON")
    k.set_defaults(handler=run_k_rule)

    prep = sub.add_parser(
        "prepare",
        help="build a dataset: pets09 (real pedestrian crops from the PETS09-S2L1 video)",
        description="pets09: find vtest.avi (or fetch it from Debian's opencv-doc package with --fetch), crop "
        "the committed person tracks, write unlabeled training crops (train/<tracklet>/) and a Market-1501 "
        "layout retrieval split (market/).",
    )
    prep.add_argument("dataset", choices=["pets09"])
    prep.add_argument("--video", help="path to vtest.avi (default: data/vtest.avi, then the opencv-doc path)")
    prep.add_argument("--fetch", action="store_true", help="download vtest.avi from the Debian package if missing")
    prep.add_argument("--out", default="data/pets09", help="output folder (default data/pets09)")
    prep.add_argument("--json", action="store_true", help="print the manifest as JSON")
    prep.set_defaults(handler=run_prepare)


def _setup_logging(quiet: bool = False) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s")


def run_train(args: argparse.Namespace) -> int:
    from reid_ssl.config import ConfigError, load_config, to_dict

    config_path = args.config
    if config_path is None and Path(DEFAULT_CONFIG).is_file():
        config_path = DEFAULT_CONFIG
    try:
        cfg = load_config(config_path, args.overrides)
    except ConfigError as e:
        raise UserError(str(e)) from None
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    _setup_logging(args.quiet or args.json)

    from reid_ssl.data import LayoutError
    from reid_ssl.train import train

    monitor = None
    if cfg.train.eval_dataset and not args.no_eval:
        from reid_ssl.monitor import retrieval_monitor

        monitor = retrieval_monitor(cfg.train.eval_dataset, cfg.train.eval_root or cfg.data.root)
    try:
        summary = train(cfg, resume=args.resume, monitor=monitor, progress=not (args.quiet or args.json))
    except LayoutError as e:
        raise UserError(str(e)) from None
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    if args.json:
        print_json(summary)
    else:
        rows = [
            ("checkpoint", summary["checkpoint"]),
            ("steps", summary["steps"]),
            ("epochs", summary["epochs"]),
            ("final loss", summary["loss"]),
            ("images/s", summary["images_per_second"]),
            ("seconds", summary["seconds"]),
            ("bad images skipped", summary["bad_images"]),
        ]
        rows += [(f"monitor {k}", v) for k, v in summary["monitor"].items()]
        print_table(rows, "training done")
    return 0


def run_k_rule(args: argparse.Namespace) -> int:
    from reid_ssl.losses import prob_rank_k_true_negative, smallest_safe_k

    if args.negatives < 1 or args.classes < 1 or args.max_k < 1 or not 0 < args.confidence < 1:
        raise UserError("--negatives, --classes and --max-k must be >= 1 and 0 < --confidence < 1")
    n, c = args.negatives, args.classes
    table = [{"k": k, "p_true_negative": prob_rank_k_true_negative(n, c, k)} for k in range(1, args.max_k + 1)]
    result = {
        "negatives": n,
        "classes": c,
        "expected_false_negatives": n / c,
        "table": table,
        "smallest_k": smallest_safe_k(n, c, args.confidence),
        "confidence": args.confidence,
    }
    if args.json:
        print_json(result)
        return 0
    print(f"negatives per anchor N-1 = {n}, classes C = {c}, expected same-class negatives = {n / c:.3f}")
    print("   k   P(rank-k negative is a true negative)")
    for row in table:
        print(f"{row['k']:>4}   {row['p_true_negative']:.3f}")
    print(f"smallest k with P >= {args.confidence}: {result['smallest_k']}")
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    _setup_logging(args.json)
    from reid_ssl import pets09

    try:
        video = pets09.find_video(args.video)
    except FileNotFoundError:
        if not args.fetch:
            raise
        video = pets09.fetch_video(Path("data/vtest.avi") if args.video is None else Path(args.video))
    manifest = pets09.build_pets09(video, Path(args.out))
    if args.json:
        print_json(manifest)
    else:
        print_table(
            [(k, v) for k, v in manifest.items() if not isinstance(v, (dict, list))], f"PETS09 data ready in {args.out}"
        )
    return 0
