"""``reid_ssl train``: self-supervised pretraining into ``<train.out_dir>/checkpoint.pt``."""

from __future__ import annotations

import argparse
from pathlib import Path

from reid_ssl.cli.common import add_json_option, add_parser, print_json, print_table
from reid_ssl.console import is_main_process, setup_logging, show_progress

DESCRIPTION = """\
Pretrain a backbone without labels (truncated triplet, BYOL or SimCLR). With no arguments: the PETS09 CPU
default, i.e. the built-in defaults of reid_ssl/config.py, which configs/pets09_r18_cpu.yaml restates.
Writes <train.out_dir>/checkpoint.pt (every train.checkpoint_every_steps and every epoch, atomically),
metrics.jsonl, TensorBoard logs and loss_curve.png. A folder holding a checkpoint is never overwritten
silently: the same run continues (an interrupted run picks up where it stopped), a different one is refused
unless --overwrite."""

EPILOG = """\
examples:
  reid_ssl train
  reid_ssl train -c configs/smoke.yaml train.epochs=2 optim.lr=0.05   # after `make data`
  reid_ssl train --resume                       # continue <train.out_dir>/checkpoint.pt
  reid_ssl train --resume train.epochs=60       # continue a finished run for more epochs
  reid_ssl train --print-config                 # the resolved config as YAML
  torchrun --nproc_per_node 2 -m reid_ssl.cli train -c configs/imagenet_r50_paper.yaml"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "train", "self-supervised pretraining (truncated triplet, BYOL or SimCLR)", DESCRIPTION, EPILOG)
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
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh even if <train.out_dir> holds a checkpoint (by default a matching run continues and a "
        "different one is refused)",
    )
    p.add_argument("--no-eval", action="store_true", help="skip the per-epoch retrieval monitor")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_json_option(p, "the summary")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from reid_ssl.config import explicit_changes, load_config, to_yaml

    if isinstance(args.resume, str) and "=" in args.resume and not Path(args.resume).exists():
        # `--resume train.epochs=60`: argparse read the override as the optional checkpoint path
        args.overrides, args.resume = [args.resume, *args.overrides], True
    cfg = load_config(args.config, args.overrides)
    changes = explicit_changes(args.config, args.overrides) if args.resume else None
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    setup_logging(json=args.json, quiet=args.quiet)

    from reid_ssl.train import train
    from reid_ssl.train.monitor import monitor_for

    monitor = None if args.no_eval else monitor_for(cfg)
    progress = show_progress(json=args.json, quiet=args.quiet)
    summary = train(cfg, args.resume, monitor, progress, overwrite=args.overwrite, changes=changes)
    if not is_main_process():  # under torchrun only rank 0 reports
        return 0
    if args.json:
        print_json(summary)
    elif summary["already_finished"]:
        print(
            f"{summary['checkpoint']} already finished its {summary['steps']} steps ({summary['epochs']} epochs); "
            f"nothing to do. To train longer: train.epochs=<more than {summary['epochs']}> --resume; to start "
            "afresh: --overwrite or a new train.out_dir"
        )
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
        rule = summary["k_rule"]
        if "note" in rule:
            rows.append(("deputy window", rule["note"]))
        if "p_true_negative" in rule:
            rows.append(
                (
                    "deputy window",
                    f"ranks {rule['k_lo']}..{rule['k_hi']} (k={rule['k']}; {rule['identities']} identities, "
                    f"{rule['identities_source']}; P(rank {rule['k_lo']} is another identity) = "
                    f"{rule['p_true_negative']:.3f})",
                )
            )
        rows += [(f"monitor {k}", v) for k, v in summary["monitor"].items()]
        print_table(rows, "training done")
    return 0
