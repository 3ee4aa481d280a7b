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

``backbone.state_dict`` holds the ONLINE backbone with torchvision parameter names. Writes are atomic: a temp
file in the same folder, fsync, then ``os.replace``. This module is also the one place that reads foreign
weight files (:func:`safe_torch_load`) and maps their key names (:func:`backbone_state_dict`).
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import warnings
from collections.abc import Collection, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from reid_ssl import __version__
from reid_ssl.errors import CheckpointError
from reid_ssl.fileio import atomic_write_bytes, require_file

if TYPE_CHECKING:
    from reid_ssl.config import Config

FORMAT = "reid_ssl.checkpoint"
FORMAT_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def preprocess_from_config(cfg: Config) -> dict[str, Any]:
    """The preprocessing a run's checkpoints carry: ``data.eval_height`` x ``data.eval_width`` (the one place
    that derives it from a config)."""
    return make_preprocess(cfg.data.eval_height, cfg.data.eval_width)


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
        ok = (
            isinstance(v, (list, tuple))
            and len(v) in (1, 3)
            and all(isinstance(x, (int, float)) and math.isfinite(x) and (key == "mean" or x > 0) for x in v)
        )
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


class BackgroundSaver:
    """Checkpoints written on a background thread, one at a time, so that training goes on meanwhile.

    :meth:`save` copies the payload's tensors (training then changes the live ones in place), and hands the copy
    to a thread that serializes it and writes it with :func:`save_checkpoint` (atomic, fsynced). A save first
    waits for the previous one; :meth:`wait` returns when the last one is on disk and re-raises its error, if any.
    Training then pays for the copy, not for serializing and fsyncing the file (a CPU-default checkpoint is 189 MB).
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reid_ssl-checkpoint")
        self._pending: Future[Path] | None = None

    def save(self, path: str | Path, payload: Mapping[str, Any]) -> None:
        self.wait()
        self._pending = self._pool.submit(save_checkpoint, path, _copy_tensors(payload))

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the last save, then stop the thread."""
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def _copy_tensors(value: Any) -> Any:
    """``value`` with every tensor in its dicts, lists and tuples copied (detached, on the CPU)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, Mapping):
        return {k: _copy_tensors(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(_copy_tensors(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_copy_tensors(v) for v in value)
    return value


def safe_torch_load(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain Python values only, never code.

    Raises:
        MissingFileError: no such file.
        CheckpointError: not a torch file, damaged, or a pickle that would need arbitrary code (the message quotes
            what was refused, never torch's advice to retry unsafely).
    """
    path = require_file(path, what)
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing them
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... depending on the damage
        refused = re.search(r"Unsupported global: GLOBAL [\w.]+|Unsupported operand \d+", str(e))
        reason = refused.group(0) if refused else f"not a torch checkpoint, or damaged ({type(e).__name__})"
        raise CheckpointError(
            f"{path} is not a loadable {what} (the safe loader refused it: {reason}); "
            "reid_ssl never unpickles code from a weights file"
        ) from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a reid_ssl checkpoint with :func:`safe_torch_load` (no code in the file can run).

    Raises:
        MissingFileError: no such file.
        CheckpointError: not a reid_ssl checkpoint, a pickle that needs arbitrary code, or corrupt weights.
    """
    path = Path(path)
    ckpt = safe_torch_load(path, "reid_ssl checkpoint")
    if map_location != "cpu":
        ckpt = _to_device(ckpt, torch.device(map_location))
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
    bad = [k for k, v in bb["state_dict"].items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(
            f"{path}: {len(bad)} backbone tensors hold NaN or infinite weights (e.g. {bad[0]}): the run diverged "
            "before this checkpoint was written, or it was damaged; use an earlier checkpoint"
        )
    return ckpt


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------------------
# Foreign weights: key names of torchvision, torchreid, timm, DDP, torch.compile, SSL wrappers
# ---------------------------------------------------------------------------------------------------------

# Wrapper prefixes (DDP, torch.compile) stripped everywhere, then the module prefix that holds the backbone.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
BACKBONE_PREFIXES = ("backbone.", "online.backbone.", "online.", "encoder.", "model.")
CLASSIFIER_PREFIXES = ("classifier.", "fc.", "head.")


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def backbone_state_dict(
    state_dict: Mapping[str, torch.Tensor], expected: Collection[str] | None = None
) -> dict[str, torch.Tensor]:
    """Backbone weights under the backbone's own parameter names, from a state dict with wrapper prefixes.

    ``module.``/``_orig_mod.`` are stripped from every key; if keys live under a backbone prefix
    (``backbone.``, ``online.``, ...; e.g. a whole SSL model with projector and target), only those are kept,
    prefix removed. Classifier keys (``fc.*``, ``classifier.*``, ``head.*``) are dropped unless ``expected``
    (the receiving network's keys) has them: OSNet's ``fc`` is its embedding layer, ResNet's its classifier.
    """
    sd = {_strip(k, WRAPPER_PREFIXES): v for k, v in state_dict.items()}
    for prefix in BACKBONE_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    keep = set(expected or ())
    return {k: v for k, v in sd.items() if k in keep or not k.startswith(CLASSIFIER_PREFIXES)}


def read_backbone_weights(
    path: str | Path, expected: Collection[str] | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """Backbone weights from a local file: a reid_ssl checkpoint, or a plain state dict (torchvision, timm,
    torchreid's ``{"state_dict": ...}``), read with :func:`safe_torch_load`.

    Args:
        expected: the receiving backbone's keys (classifier-named keys it has are kept, see
            :func:`backbone_state_dict`).

    Returns:
        (state dict under the backbone's parameter names, a short description of the source format).

    Raises:
        MissingFileError, CheckpointError: no such file, not loadable, or no tensors inside.
    """
    raw = safe_torch_load(path, "weights file")
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        return load_checkpoint(path)["backbone"]["state_dict"], "reid_ssl checkpoint"
    sd = raw.get("state_dict", raw.get("model", raw)) if isinstance(raw, dict) else raw
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors (nor a reid_ssl checkpoint)")
    return backbone_state_dict(sd, expected), "state dict"
