"""``reid_ssl export``: hand a checkpoint's backbone to torchreid, torchvision, ONNX, or a slim checkpoint."""

from __future__ import annotations

import argparse

from reid_ssl.cli.common import add_parser, existing_checkpoint, positive_int, print_json, wrap
from reid_ssl.cli.eval import add_checkpoint_args
from reid_ssl.fileio import check_new_file

DESCRIPTION = wrap(
    "torchreid: {'state_dict', 'arch', ...} for torchreid.utils.load_pretrained_weights; torchvision: a ResNet "
    "state dict without fc.* (load with strict=False); onnx: backbone + L2 normalisation, dynamic batch, "
    "preprocessing in the metadata; reid_ssl: the checkpoint without training state. All .pt outputs load "
    "with torch.load(weights_only=True)."
)


def register(sub: argparse._SubParsersAction) -> None:
    from reid_ssl.export import EXPORT_FORMATS

    x = add_parser(
        sub,
        "export",
        "write the backbone for torchreid, torchvision, ONNX, or as a slim checkpoint",
        DESCRIPTION,
        "example:\n  reid_ssl export --checkpoint C --to onnx --out model.onnx",
    )
    add_checkpoint_args(x, default=None)
    x.add_argument("--to", required=True, choices=EXPORT_FORMATS.names(), help=EXPORT_FORMATS.describe())
    x.add_argument("--out", required=True, help="output file (an existing one is replaced only with --overwrite)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    x.add_argument(
        "--opset",
        type=positive_int,
        help="onnx: opset version, 18 up to the newest the installed onnx package knows (default: the exporter's)",
    )
    x.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    checkpoint = existing_checkpoint(args.checkpoint)
    from reid_ssl.export import check_opset, export_checkpoint

    check_opset(args.to, args.opset)  # before the checkpoint is loaded: a wrong --opset fails in a second

    out = check_new_file(args.out, args.overwrite, inputs=[checkpoint])
    result = export_checkpoint(checkpoint, args.to, out, opset=args.opset)
    if args.json:
        print_json(result)
    else:
        print(f"exported {result['backbone']} ({args.to}) to {result['out']} ({result['bytes']:,} bytes)")
    return 0
