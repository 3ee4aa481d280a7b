"""Hand a checkpoint's backbone to other tools: torchreid, torchvision, ONNX, or a slim reid_ssl checkpoint.

Every format holds plain tensors and strings, so ``torch.load(path, weights_only=True)`` reads the ``.pt``
files. :func:`build_torchreid_model` is the checked bridge: torchreid's own ``load_pretrained_weights`` keeps
random weights for every key it cannot match and only warns; here anything but a missing classifier fails.
Formats are registered in :data:`EXPORT_FORMATS` (this module imports torch only when a writer runs).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from reid_ssl.errors import CheckpointError, InputError
from reid_ssl.fileio import atomic_write_bytes
from reid_ssl.registry import Registry

Writer = Callable[[dict[str, Any], Path, "int | None"], None]
EXPORT_FORMATS: Registry[Writer] = Registry("export format")

# torch's ONNX exporter implements its operators from this opset on; a lower one needs ONNX's version converter,
# which fails on common layers (ReduceMean's axes) and then keeps 18, so it is refused up front
LOWEST_ONNX_OPSET = 18


def onnx_opset_range() -> tuple[int, int]:
    """The opsets ``export --to onnx --opset`` can write: from :data:`LOWEST_ONNX_OPSET` to the newest the
    installed ``onnx`` package knows."""
    from onnx import defs

    return LOWEST_ONNX_OPSET, int(defs.onnx_opset_version())


def check_opset(to: str, opset: int | None) -> None:
    """Refuse an ``opset`` that the export to format ``to`` cannot honour, before anything is written.

    Raises:
        InputError: ``opset`` given for another format than onnx, or outside :func:`onnx_opset_range`.
    """
    if opset is None:
        return
    if to != "onnx":
        raise InputError(f"--opset {opset} applies to --to onnx only, not --to {to}: leave it out")
    lo, hi = onnx_opset_range()
    if not lo <= opset <= hi:
        raise InputError(f"--opset {opset}: the ONNX exporter writes opsets {lo}..{hi}; choose one of them")


def _checkpoint_dict(checkpoint: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    from reid_ssl.checkpoint import load_checkpoint

    if isinstance(checkpoint, (str, Path)):
        return load_checkpoint(checkpoint)
    if "backbone" not in checkpoint or not isinstance(checkpoint["backbone"], Mapping):
        raise CheckpointError("expected a reid_ssl checkpoint (path or loaded dict with a 'backbone' block)")
    return dict(checkpoint)


def build_torchreid_model(
    checkpoint: str | Path | Mapping[str, Any], num_classes: int = 1, loss: str = "softmax"
) -> Any:
    """The torchreid model of the checkpoint's architecture, carrying its weights.

    ``torchreid.models.build_model(arch, num_classes, loss, pretrained=False)`` with the backbone's
    ``torchreid_arch`` (:data:`reid_ssl.models.BACKBONES`), then a load that must match every backbone tensor:
    the classifier (``classifier.*``, sized by ``num_classes``) is the only thing allowed to stay random.

    Raises:
        CheckpointError: the backbone has no torchreid counterpart, or any key other than the classifier's is
            missing, unexpected or of the wrong shape.
    """
    from reid_ssl.checkpoint import backbone_state_dict
    from reid_ssl.data.torchreid_bridge import import_torchreid
    from reid_ssl.models import BACKBONES

    ckpt = _checkpoint_dict(checkpoint)
    name = ckpt["backbone"]["name"]
    arch = BACKBONES[name].torchreid_arch if name in BACKBONES else None
    if arch is None:
        with_arch = [n for n, spec in BACKBONES.items() if spec.torchreid_arch]
        raise CheckpointError(f"backbone {name!r} has no torchreid counterpart (those that do: {with_arch})")
    torchreid = import_torchreid()
    with contextlib.redirect_stdout(io.StringIO()):
        model = torchreid.models.build_model(arch, num_classes=num_classes, loss=loss, pretrained=False)
    sd = backbone_state_dict(ckpt["backbone"]["state_dict"], model.state_dict().keys())
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise CheckpointError(
            f"checkpoint weights do not fit torchreid's {arch}: {' '.join(str(e).split())[:300]}"
        ) from None
    missing = [k for k in missing if not k.startswith("classifier.")]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint weights do not fit torchreid's {arch}: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {list(unexpected)[:5]}"
        )
    return model


def _save_tensors(obj: Mapping[str, Any], out: Path) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(dict(obj), buf)
    atomic_write_bytes(out, buf.getvalue())


@EXPORT_FORMATS.register("torchreid", help="{state_dict, arch, ...} for torchreid.utils.load_pretrained_weights")
def _to_torchreid(ckpt: dict[str, Any], out: Path, opset: int | None) -> None:
    model = build_torchreid_model(ckpt)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    payload = {
        "state_dict": state,
        "arch": ckpt["backbone"]["name"],
        "feature_dim": int(ckpt["backbone"]["feature_dim"]),
        "preprocess": json.dumps(ckpt["preprocess"], sort_keys=True),
        "source_sha256": ckpt["backbone"]["sha256"],
    }
    _save_tensors(payload, out)


@EXPORT_FORMATS.register("torchvision", help="a plain state dict of the backbone, no classifier (strict=False)")
def _to_torchvision(ckpt: dict[str, Any], out: Path, opset: int | None) -> None:
    from reid_ssl.checkpoint import backbone_state_dict

    sd = ckpt["backbone"]["state_dict"]
    _save_tensors(backbone_state_dict(sd, sd.keys()), out)


@EXPORT_FORMATS.register("onnx", help="backbone + L2 normalisation, dynamic batch; preprocessing in the metadata")
def _to_onnx(ckpt: dict[str, Any], out: Path, opset: int | None) -> None:
    import onnx
    import torch

    from reid_ssl.embedder import EmbeddingHead, backbone_from_checkpoint

    pre = ckpt["preprocess"]
    model = EmbeddingHead(backbone_from_checkpoint(ckpt)).eval()
    example = torch.zeros(2, 3, int(pre["height"]), int(pre["width"]))
    tmp = out.with_name(f".{out.name}.export")
    kwargs: dict[str, Any] = {"opset_version": opset} if opset else {}
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints progress lines
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            input_names=["images"],
            output_names=["features"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}},
            dynamo=True,
            external_data=False,
            verbose=False,
            **kwargs,
        )
    try:
        proto = onnx.load(str(tmp))
    finally:
        tmp.unlink(missing_ok=True)
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset and written != opset:  # the exporter falls back to its own opset when a conversion fails
        raise InputError(
            f"--opset {opset}: the ONNX exporter could not convert this model to opset {opset} (it produced "
            f"{written}); nothing was written to {out}. Choose another --opset, or leave it out"
        )
    meta = {
        "reid_ssl.backbone": ckpt["backbone"]["name"],
        "reid_ssl.sha256": ckpt["backbone"]["sha256"],
        "reid_ssl.preprocess": json.dumps(pre, sort_keys=True),
        "reid_ssl.output": "L2-normalised global-average-pooled backbone feature; input is the "
        "preprocessed image (resize to height x width, ToTensor, Normalize(mean, std))",
    }
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    atomic_write_bytes(out, proto.SerializeToString())


@EXPORT_FORMATS.register("reid_ssl", help="the checkpoint without training state (optimizer, heads, RNG)")
def _to_reid_ssl(ckpt: dict[str, Any], out: Path, opset: int | None) -> None:
    from reid_ssl.checkpoint import save_checkpoint

    keep = ("backbone", "preprocess", "config", "step", "epoch")
    save_checkpoint(out, {k: ckpt[k] for k in keep if k in ckpt})


def export_checkpoint(checkpoint: str | Path, to: str, out: str | Path, opset: int | None = None) -> dict[str, Any]:
    """Write the checkpoint's backbone in format ``to`` (a name in :data:`EXPORT_FORMATS`); returns what was
    written (format, path, bytes, backbone name, sha256, preprocess).

    Raises:
        UnknownNameError: unknown format; CheckpointError: the checkpoint cannot be read or converted.
        InputError: an ``opset`` that format ``to`` cannot write (:func:`check_opset`).
    """
    from reid_ssl.checkpoint import load_checkpoint

    writer = EXPORT_FORMATS[to]
    check_opset(to, opset)
    out = Path(out)
    ckpt = load_checkpoint(checkpoint)
    writer(ckpt, out, opset)
    return {
        "format": to,
        "out": str(out),
        "bytes": out.stat().st_size,
        "backbone": ckpt["backbone"]["name"],
        "sha256": ckpt["backbone"]["sha256"],
        "preprocess": ckpt["preprocess"],
    }
