"""``reid_ssl train``: self-supervised pretraining into ``<train.out_dir>/checkpoint.pt``."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from reid_ssl.cli.common import add_json_option, add_parser, print_json, print_table
from reid_ssl.console import is_main_process, setup_logging, show_progress

DESCRIPTION = """\
Pretrain a backbone without labels (truncated triplet, BYOL or SimCLR). With no arguments: the PETS09 CPU
default, i.e. the built-in defaults of reid_ssl/config.py, which configs/pets09_r18_cpu.yaml restates.
Writes <train.out_dir>/checkpoint.pt (atomically, every train.checkpoint_every_steps steps, every
train.checkpoint_every_epochs epochs and at the end), metrics.jsonl, TensorBoard logs and loss_curve.png.
A folder holding a checkpoint is never overwritten silently: the same run continues (an interrupted run picks
up where it stopped), a different one is refused unless --overwrite. --resume CHECKPOINT continues that run
next to the checkpoint (a copied or moved run folder continues in place), or in train.out_dir=DIR when given;
it never replaces another checkpoint there unless --overwrite. --resume with nothing to resume is an error,
not a new run."""

EPILOG = """\
examples:
  reid_ssl train
  reid_ssl train -c configs/smoke.yaml train.epochs=2 optim.lr=0.05   # after `make data`
  reid_ssl train --resume                       # continue <train.out_dir>/checkpoint.pt
  reid_ssl train --resume runs/b/checkpoint.pt  # continue that run, writing into runs/b
  reid_ssl train --resume train.epochs=60       # continue a finished run for more epochs
  reid_ssl train --print-config                 # the resolved config as YAML (with --json: as JSON)
  torchrun --nproc_per_node 2 -m reid_ssl.cli train -c configs/imagenet_r50_paper.yaml"""


def register(sub: argparse._SubParsersAction) -> None:
    from reid_ssl.data.datasets import DATASETS, SSL_SOURCES

    sources = "\n".join(
        textwrap.fill(
            f"{n}: {DATASETS[n].description} (data.root default: {DATASETS[n].default_root})",
            100,
            initial_indent="  ",
            subsequent_indent="    ",
        )
        for n in SSL_SOURCES()
    )
    description = f"{DESCRIPTION}\n\ndata.source, one of (default pets09):\n{sources}"
    p = add_parser(sub, "train", "self-supervised pretraining (truncated triplet, BYOL or SimCLR)", description, EPILOG)
    p.add_argument("-c", "--config", help="YAML file with overrides of the defaults (reid_ssl/config.py)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides applied after --config")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue from <train.out_dir>/checkpoint.pt, or from the given checkpoint (writing next to it, or into "
        "train.out_dir=DIR given on the command line); an error when there is nothing to resume",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh even if <train.out_dir> holds a checkpoint (by default a matching run continues and a "
        "different one is refused); with --resume CHECKPOINT: replace another checkpoint in the output folder",
    )
    p.add_argument("--no-eval", action="store_true", help="skip the per-epoch retrieval monitor")
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config (YAML; JSON with --json) and exit"
    )
    add_json_option(p, "the summary")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from reid_ssl.config import explicit_changes, load_config, to_dict, to_yaml

    if isinstance(args.resume, str) and "=" in args.resume and not Path(args.resume).exists():
        # `--resume train.epochs=60`: argparse read the override as the optional checkpoint path
        args.overrides, args.resume = [args.resume, *args.overrides], True
    cfg = load_config(args.config, args.overrides)
    changes = explicit_changes(args.config, args.overrides) if args.resume else None
    if isinstance(args.resume, str) and changes and not any(o.startswith("train.out_dir=") for o in args.overrides):
        # --resume CHECKPOINT writes next to the checkpoint; only train.out_dir=DIR on the command line moves it
        # (a -c file's out_dir is where new runs of that recipe go, not where this one is)
        changes.get("train", {}).pop("out_dir", None)
    if args.print_config:
        print_json(to_dict(cfg)) if args.json else print(to_yaml(cfg), end="")
        return 0
    setup_logging(json=args.json, quiet=args.quiet)

    from reid_ssl.fileio import check_output_folder
    from reid_ssl.train import train
    from reid_ssl.train.monitor import monitor_for
    from reid_ssl.train.state import CHECKPOINT_NAME, holds_only_run_files

    if not args.resume and not (Path(cfg.train.out_dir) / CHECKPOINT_NAME).is_file():
        # a new run: never into a folder of someone else's files (a checkpoint there is plan_run's to judge)
        check_output_folder(cfg.train.out_dir, args.overwrite, holds_only_run_files, "a training run", "train.out_dir")

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
