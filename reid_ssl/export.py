"""Hand a checkpoint's backbone to other tools: torchreid, torchvision, ONNX, or a slim reid_ssl checkpoint.

Every format holds plain tensors and strings, so ``torch.load(path, weights_only=True)`` reads the ``.pt``
files. :func:`build_torchreid_model` is the checked bridge: torchreid's own ``load_pretrained_weights`` keeps
random weights for every key it cannot match and only warns; here anything but a missing classifier fails.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from reid_ssl.checkpoint import CheckpointError, atomic_write_bytes, load_checkpoint, save_checkpoint
from reid_ssl.embedder import backbone_from_checkpoint
from reid_ssl.models import BACKBONES

EXPORT_FORMATS = ("torchreid", "torchvision", "onnx", "reid_ssl")
# Wrapper prefixes (DDP, torch.compile) stripped everywhere, then the module prefix that holds the backbone.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
BACKBONE_PREFIXES = ("backbone.", "online.backbone.", "online.", "encoder.", "model.")
CLASSIFIER_PREFIXES = ("classifier.", "fc.")


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def backbone_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Torchvision-named backbone weights from a state dict with wrapper/module prefixes.

    ``module.``/``_orig_mod.`` are stripped from every key; if keys live under a backbone prefix
    (``backbone.``, ``online.``, ...; e.g. a whole SSL model with projector and target), only those are kept,
    prefix removed; a torchvision classifier (``fc.*``) is dropped.
    """
    sd = {_strip(k, WRAPPER_PREFIXES): v for k, v in state_dict.items()}
    for prefix in BACKBONE_PREFIXES:
        if any(k.startswith(prefix + "conv1.") for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    return {k: v for k, v in sd.items() if not k.startswith(CLASSIFIER_PREFIXES)}


def _checkpoint_dict(checkpoint: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(checkpoint, (str, Path)):
        return load_checkpoint(checkpoint)
    if "backbone" not in checkpoint or not isinstance(checkpoint["backbone"], Mapping):
        raise CheckpointError("expected a reid_ssl checkpoint (path or loaded dict with a 'backbone' block)")
    return dict(checkpoint)


def build_torchreid_model(
    checkpoint: str | Path | Mapping[str, Any], num_classes: int = 1, loss: str = "softmax"
) -> nn.Module:
    """The torchreid ResNet matching the checkpoint's backbone, carrying its weights.

    ``torchreid.models.build_model(name, num_classes, loss, pretrained=False)``, then a load that must match
    every backbone tensor: the classifier (``classifier.*``, sized by ``num_classes``) is the only thing
    allowed to stay random.

    Raises:
        CheckpointError: the backbone is not a torchreid architecture, or any key other than the classifier's
            is missing, unexpected or of the wrong shape.
    """
    from reid_ssl.reid_data import import_torchreid

    ckpt = _checkpoint_dict(checkpoint)
    name = ckpt["backbone"]["name"]
    torchreid = import_torchreid()
    if name not in BACKBONES:
        raise CheckpointError(f"backbone {name!r} has no torchreid counterpart (supported: {sorted(BACKBONES)})")
    with contextlib.redirect_stdout(io.StringIO()):  # torchreid's model zoo names match ours
        model = torchreid.models.build_model(name, num_classes=num_classes, loss=loss, pretrained=False)
    sd = backbone_state_dict(ckpt["backbone"]["state_dict"])
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise CheckpointError(
            f"checkpoint weights do not fit torchreid's {name}: {' '.join(str(e).split())[:300]}"
        ) from None
    missing = [k for k in missing if not k.startswith("classifier.")]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint weights do not fit torchreid's {name}: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {list(unexpected)[:5]}"
        )
    return model


class EmbeddingHead(nn.Module):
    """Backbone + L2 normalisation: (N, 3, H, W) preprocessed images -> (N, D) unit-norm features.

    The exported graph of ``--to onnx``; it equals :meth:`reid_ssl.embedder.Embedder.embed_tensor` with
    ``flip=False``.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(x), dim=1)


def _save_tensors(obj: Mapping[str, Any], out: Path) -> None:
    buf = io.BytesIO()
    torch.save(dict(obj), buf)
    atomic_write_bytes(out, buf.getvalue())


def _export_onnx(ckpt: dict[str, Any], out: Path, opset: int | None) -> None:
    import onnx

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


def export_checkpoint(checkpoint: str | Path, to: str, out: str | Path, opset: int | None = None) -> dict[str, Any]:
    """Write the checkpoint's backbone in another format; returns what was written.

    Formats:
        * ``torchreid``: ``{"state_dict": <torchreid ResNet keys, no classifier>, "arch", "feature_dim",
          "preprocess" (JSON string), "source_sha256"}``; ``torchreid.utils.load_pretrained_weights`` reads it.
        * ``torchvision``: a plain torchvision ResNet state dict without ``fc.*``: load it with
          ``strict=False`` (only ``fc.weight``/``fc.bias`` are missing).
        * ``onnx``: :class:`EmbeddingHead` with a dynamic batch axis; the preprocessing is in the metadata.
        * ``reid_ssl``: the checkpoint without training state (optimizer, heads, RNG).
    """
    if to not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {to!r}; choose one of {list(EXPORT_FORMATS)}")
    out = Path(out)
    ckpt = load_checkpoint(checkpoint)
    name, sd = ckpt["backbone"]["name"], ckpt["backbone"]["state_dict"]
    if to == "torchreid":
        model = build_torchreid_model(ckpt)
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
        _save_tensors(
            {
                "state_dict": state,
                "arch": name,
                "feature_dim": int(ckpt["backbone"]["feature_dim"]),
                "preprocess": json.dumps(ckpt["preprocess"], sort_keys=True),
                "source_sha256": ckpt["backbone"]["sha256"],
            },
            out,
        )
    elif to == "torchvision":
        _save_tensors(backbone_state_dict(sd), out)
    elif to == "onnx":
        _export_onnx(ckpt, out, opset)
    else:
        keep = ("backbone", "preprocess", "config", "step", "epoch")
        save_checkpoint(out, {k: ckpt[k] for k in keep if k in ckpt})
    return {
        "format": to,
        "out": str(out),
        "bytes": out.stat().st_size,
        "backbone": name,
        "sha256": ckpt["backbone"]["sha256"],
        "preprocess": ckpt["preprocess"],
    }
