"""The checkpoint contract: the only hand-off from training to eval, index and app.

A checkpoint is a plain dict of tensors and Python scalars/strings/lists/dicts, so
``torch.load(path, weights_only=True)`` reads it without unpickling code::

    {
      "format": "reid_ssl.checkpoint", "format_version": 1, "reid_ssl_version": "0.1.0",
      "backbone": {"name": "resnet18", "feature_dim": 512, "state_dict": {...}, "sha256": "..."},
      "preprocess": {"height": 128, "width": 64, "mean": [...], "std": [...], "interpolation": "bicubic"},
      "config": {...resolved config...},
      "step": int, "epoch": int,
      # training state, present in training checkpoints (dropped by `export`):
      "model": {...SSLModel state_dict...}, "optimizer": {...}, "scaler": {...} | None, "rng": {...},
    }

``backbone.state_dict`` holds the ONLINE backbone (method.md §2.9) with torchvision parameter names.
Writes are atomic: a temp file in the same folder, fsync, then ``os.replace``.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from reid_ssl import __version__
from reid_ssl.fileio import atomic_write_bytes

FORMAT = "reid_ssl.checkpoint"
FORMAT_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CheckpointError(ValueError):
    """A file that is not a usable reid_ssl checkpoint."""


def make_preprocess(
    height: int,
    width: int,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    interpolation: str = "bicubic",
) -> dict[str, Any]:
    """The preprocessing block every checkpoint carries (eval, index and app build their transform from it)."""
    return {
        "height": int(height),
        "width": int(width),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "interpolation": interpolation,
    }


MAX_SIDE = 4096  # largest input height/width a checkpoint may ask for (a crafted 10^6 x 10^6 would eat the RAM)
INTERPOLATIONS = ("bicubic", "bilinear")


def preprocess_problem(pre: Any) -> str | None:
    """Why a ``preprocess`` block is unusable or unsafe (``None`` when it is fine)."""
    if not isinstance(pre, dict):
        return "no preprocess block"
    for side in ("height", "width"):
        v = pre.get(side)
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_SIDE:
            return f"preprocess {side}={v!r} is not an integer in 1..{MAX_SIDE}"
    for key in ("mean", "std"):
        v = pre.get(key)
        ok = isinstance(v, (list, tuple)) and len(v) in (1, 3)
        ok = ok and all(isinstance(x, (int, float)) and math.isfinite(x) and (key == "mean" or x > 0) for x in v)
        if not ok:
            return f"preprocess {key}={v!r} is not 1 or 3 finite numbers" + (" > 0" if key == "std" else "")
    if pre.get("interpolation", "bicubic") not in INTERPOLATIONS:
        return f"preprocess interpolation={pre.get('interpolation')!r} is not one of {list(INTERPOLATIONS)}"
    return None


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Hash of a state dict's names, dtypes, shapes and values: the identity of a set of weights."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def backbone_block(name: str, feature_dim: int, state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The ``backbone`` entry: weights on CPU plus their hash."""
    sd = {k: v.detach().cpu().clone() for k, v in state_dict.items()}
    return {"name": name, "feature_dim": int(feature_dim), "state_dict": sd, "sha256": state_dict_sha256(sd)}


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Atomically save a checkpoint dict (adds the format header). Returns the path."""
    for key in ("backbone", "preprocess", "config"):
        if key not in payload:
            raise CheckpointError(f"checkpoint payload lacks {key!r}")
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, "reid_ssl_version": __version__, **payload}
    buf = io.BytesIO()
    torch.save(full, buf)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint with ``weights_only=True`` (no code in the file can run).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a reid_ssl checkpoint, a pickle that needs arbitrary code, or corrupt weights.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing them
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... depending on the damage
        # Quote only what was refused, never torch's advice to retry with weights_only=False.
        refused = re.search(r"Unsupported global: GLOBAL [\w.]+|Unsupported operand \d+", str(e))
        reason = refused.group(0) if refused else f"not a torch checkpoint, or damaged ({type(e).__name__})"
        raise CheckpointError(
            f"{path} is not a loadable reid_ssl checkpoint (the safe loader refused it: {reason}); "
            "reid_ssl never unpickles code from a checkpoint"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a reid_ssl checkpoint (no '{FORMAT}' header)")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {ckpt['format_version']}, newer than this "
            f"reid_ssl ({FORMAT_VERSION}); upgrade reid_ssl"
        )
    bb = ckpt.get("backbone")
    if not isinstance(bb, dict) or not {"name", "state_dict", "sha256"} <= set(bb):
        raise CheckpointError(f"{path} has no backbone block")
    if problem := preprocess_problem(ckpt.get("preprocess")):
        raise CheckpointError(f"{path}: {problem}")
    if state_dict_sha256(bb["state_dict"]) != bb["sha256"]:
        raise CheckpointError(f"{path}: backbone weights do not match their recorded sha256 (corrupt file?)")
    return ckpt
