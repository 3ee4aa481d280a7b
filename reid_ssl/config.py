"""Typed training configuration: the defaults live here, YAML files and ``key=value`` pairs override them.

One YAML section = one dataclass below. An unknown key, a wrong type or an invalid value is a
:class:`ConfigError` that names the key and lists the valid ones. The resolved config is saved in every
checkpoint (``dataclasses.asdict``), so a run can always be reproduced from its checkpoint alone.

The defaults are the CPU demo (``configs/pets09_r18_cpu.yaml`` only restates them): a ResNet-18 on
128x64 crops of the PETS09-S2L1 pedestrian video, the paper's loss and EMA schedule, SGD sized for 2 cores.
The paper-scale settings are in ``configs/imagenet_r50_paper.yaml`` and ``configs/sysu30k_r50_paper.yaml``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration key or value."""


@dataclass(frozen=True)
class DataConfig:
    """Where the unlabeled images come from. Labels never reach the SSL step."""

    source: str = (
        "pets09"  # folder | list | imagenet | sysu30k | market1501 | dukemtmcreid | msmt17 | pets09 | fashion_mnist
    )
    root: str = "data/pets09"  # dataset root (for "list": the folder the listed paths are relative to)
    list_file: str = ""  # for source "list" (and optional for sysu30k: defaults to meta/train.txt)
    height: int = 64  # training crop size (H x W)
    width: int = 32
    # Preprocessing stored in the checkpoint, used by eval / index / app. 1.5x the training size: random
    # resized crops (mean scale ~0.54) show people larger in training than whole test crops do, so testing at
    # a higher resolution matches apparent object size ("FixRes", Touvron et al. 2019; README "Results").
    eval_height: int = 96
    eval_width: int = 48
    positives: str = "augment"  # "augment": two views of one image (paper); "bag": 2nd view from the same bag/tracklet
    bad_images: str = "skip"  # "skip" (counted and logged) or "fail"
    num_workers: int = 2
    max_images: int = 0  # 0 = all; >0 keeps a deterministic subset (smoke tests, quick looks)


@dataclass(frozen=True)
class AugmentConfig:
    """The BYOL augmentation pair (method.md §2.7); view A / view B differ in blur and solarization."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333333)  # of the target aspect (W/H of the crop size)
    flip: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale: float = 0.2
    blur_a: float = 1.0
    blur_b: float = 0.1
    solarize_a: float = 0.0
    solarize_b: float = 0.2


@dataclass(frozen=True)
class ModelConfig:
    """Online/target networks (method.md §1.1, §2.1-2.3)."""

    backbone: str = "resnet18"  # resnet18 | resnet34 | resnet50 | resnet18_small (3x3 stem for tiny images)
    proj_hidden_dim: int = 4096
    proj_dim: int = 256
    pred_hidden_dim: int = 4096
    predictor: bool = True
    target: str = "ema"  # "ema" (BYOL, truncated triplet) or "shared" (SimCLR)
    multires: bool = True  # random per-batch resize of each view (method.md §1.3)
    multires_online: tuple[int, int] = (96, 224)  # sizes relative to 224: factor s/224 scales H and W
    multires_target: tuple[int, int] = (128, 224)
    init: str = ""  # a reid_ssl checkpoint (or torchvision ResNet state dict) to load the backbone from
    sync_bn: bool = True  # convert BN to SyncBN when training on more than one process


@dataclass(frozen=True)
class LossConfig:
    """Loss and its hyperparameters (method.md §1.8-1.9, §1.16)."""

    name: str = "truncated_triplet"  # truncated_triplet | median_triplet | byol | simclr
    k_lo: int = 2  # deputy = mean of the negatives ranked k_lo..k_hi by similarity (1-based)
    k_hi: int = 10
    gamma: float = 2.0
    margin: float = 100.0
    temperature: float = 0.2  # simclr only
    gather_negatives: bool = False  # DDP: use every rank's target embeddings as negatives (reference: off)
    assumed_identities: int = 0  # for the logged Bernoulli check of k (method.md §1.16); 0 = skip


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and schedules. Learning rate = ``lr`` (not rescaled by batch size; see the configs)."""

    name: str = "sgd"  # lars | sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-5
    trust_coefficient: float = 0.001  # LARS eta
    warmup_epochs: float = 1.0
    warmup_start_factor: float = 1e-4  # warm-up starts at lr * this (reference: 1e-4)
    ema_start: float = 0.99  # target momentum m0, cosine schedule to ema_end over the optimizer steps
    ema_end: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    """The loop: length, batch, precision, checkpoints, logging."""

    epochs: int = 35
    batch_size: int = 64  # per process; negatives per anchor = batch_size - 1
    accumulate: int = 1  # micro-batches per optimizer step
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "none"  # none | bf16 | fp16 (fp16 needs CUDA and uses a gradient scaler)
    channels_last: bool = True
    compile: bool = False
    out_dir: str = "runs/pets09_r18"
    checkpoint_every_steps: int = 200
    checkpoint_every_epochs: int = 1  # also at the end of every N-th epoch (0: only steps and the end)
    log_every_steps: int = 10
    eval_dataset: str = ""  # e.g. "pets09": rank-1/mAP each epoch on that retrieval split ("" = off)
    eval_root: str = ""
    eval_every_epochs: int = 1
    max_steps: int = 0  # stop after this many optimizer steps (0 = full schedule); for smoke runs
    tensorboard: bool = True


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---------------------------------------------------------------------------------------------------------
# Validation of values that types alone cannot check
# ---------------------------------------------------------------------------------------------------------

_CHOICES = {
    "data.source": (
        "folder",
        "list",
        "imagenet",
        "sysu30k",
        "market1501",
        "dukemtmcreid",
        "msmt17",
        "pets09",
        "fashion_mnist",
    ),
    "data.positives": ("augment", "bag"),
    "data.bad_images": ("skip", "fail"),
    "model.backbone": ("resnet18", "resnet34", "resnet50", "resnet18_small"),
    "model.target": ("ema", "shared"),
    "loss.name": ("truncated_triplet", "median_triplet", "byol", "simclr"),
    "optim.name": ("lars", "sgd", "adamw"),
    "train.amp": ("none", "bf16", "fp16"),
}


def validate(cfg: Config) -> Config:
    """Check choices and ranges; raises :class:`ConfigError` naming the key."""
    flat = to_dict(cfg)
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        if flat[section][name] not in choices:
            raise ConfigError(f"{key}={flat[section][name]!r} is not one of {list(choices)}")
    checks = [
        (cfg.data.height >= 16 and cfg.data.width >= 8, "data.height/width must be at least 16x8"),
        (
            cfg.data.eval_height >= 16 and cfg.data.eval_width >= 8,
            "data.eval_height/eval_width must be >= 16x8",
        ),
        (
            cfg.data.num_workers >= 0 and cfg.data.max_images >= 0,
            "data.num_workers and data.max_images must be >= 0",
        ),
        (
            0 < cfg.augment.crop_scale[0] <= cfg.augment.crop_scale[1] <= 1,
            "augment.crop_scale must be 0 < lo <= hi <= 1",
        ),
        (1 <= cfg.loss.k_lo <= cfg.loss.k_hi, "loss.k_lo and loss.k_hi need 1 <= k_lo <= k_hi"),
        (cfg.loss.gamma > 0 and cfg.loss.temperature > 0, "loss.gamma and loss.temperature must be > 0"),
        (cfg.optim.lr > 0 and cfg.optim.weight_decay >= 0, "optim.lr must be > 0 and weight_decay >= 0"),
        (
            0 <= cfg.optim.ema_start <= cfg.optim.ema_end <= 1,
            "optim.ema_start/ema_end need 0 <= start <= end <= 1",
        ),
        (cfg.optim.warmup_epochs >= 0, "optim.warmup_epochs must be >= 0"),
        (
            cfg.train.epochs >= 1 and cfg.train.batch_size >= 2,
            "train.epochs must be >= 1 and batch_size >= 2",
        ),
        (cfg.train.accumulate >= 1 and cfg.train.max_steps >= 0, "train.accumulate >= 1 and max_steps >= 0"),
        (
            cfg.train.checkpoint_every_steps >= 1
            and cfg.train.log_every_steps >= 1
            and cfg.train.checkpoint_every_epochs >= 0,
            "train.checkpoint_every_steps and log_every_steps must be >= 1",
        ),
        (
            cfg.model.target == "ema" or cfg.loss.name == "simclr",
            f"model.target='shared' only makes sense with loss.name='simclr', not {cfg.loss.name!r}",
        ),
        (cfg.data.source != "list" or bool(cfg.data.list_file), "data.source='list' needs data.list_file"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if cfg.loss.name in ("truncated_triplet", "median_triplet") and cfg.train.batch_size - 1 < cfg.loss.k_hi:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} gives {cfg.train.batch_size - 1} negatives per "
            f"anchor, fewer than loss.k_hi={cfg.loss.k_hi}"
        )
    return cfg


# ---------------------------------------------------------------------------------------------------------
# Merging overrides into the typed defaults
# ---------------------------------------------------------------------------------------------------------


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML / command-line value to the field's type, or raise ConfigError."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        args = typing.get_args(annotation)
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key} expects a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: optional fields are not supported")  # none exist; keep the rule simple
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key} expects true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} expects an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} expects an integer, got {value!r}") from None
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} expects a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} expects a number, got {value!r}") from None
    if annotation is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} expects a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported field type {annotation!r}")


def _apply(obj: Any, overrides: dict[str, Any], prefix: str = "") -> Any:
    """A copy of dataclass ``obj`` with ``overrides`` (nested dicts) applied; unknown keys are errors."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"section {prefix.rstrip('.') or '<root>'} must be a mapping, got {overrides!r}")
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key {full!r}; valid keys here: {', '.join(sorted(fields))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            changes[key] = _apply(current, value, f"{full}.")
        else:
            changes[key] = _coerce(value, hints[key], full)
    return dataclasses.replace(obj, **changes)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["optim.lr=0.1", "train.epochs=3"]`` -> nested dict; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not of the form section.key=value")
        key, raw = pair.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"override key {key!r} must be section.key (e.g. optim.lr)")
        value = yaml.safe_load(raw) if raw.strip() else ""
        nested.setdefault(parts[0], {})[parts[1]] = value
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file (if any) <- ``key=value`` overrides, then validated."""
    cfg = Config()
    if path:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
        cfg = _apply(cfg, data)
    if overrides:
        cfg = _apply(cfg, parse_overrides(overrides))
    return validate(cfg)


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from :func:`to_dict` output (e.g. the copy stored in a checkpoint)."""
    return validate(_apply(Config(), data))


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples become lists), safe for YAML, JSON and ``torch.load(weights_only=True)``."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))
