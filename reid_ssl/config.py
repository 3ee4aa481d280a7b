"""Typed training configuration: the defaults live here, YAML files and ``key=value`` pairs override them.

One YAML section = one dataclass below. An unknown key, a wrong type or an invalid value is a
:class:`ConfigError` that names the key and lists the valid ones. The resolved config is saved in every
checkpoint (``dataclasses.asdict``), so a run can always be reproduced from its checkpoint alone.

**The defaults below are the CPU demo** that ``reid_ssl train`` runs with no arguments, from any folder;
``configs/pets09_r18_cpu.yaml`` restates them key for key (a test keeps the two equal). Choices of plug-in
names (data source, backbone, loss, optimizer) come from their registries; fixed enumerations are ``Literal``
types. The paper-scale settings are in ``configs/imagenet_r50_paper.yaml`` and ``configs/sysu30k_r50_paper.yaml``.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from reid_ssl.errors import ConfigError
from reid_ssl.overrides import apply_overrides, apply_yaml, parse_overrides, read_yaml

__all__ = ["Config", "ConfigError", "from_dict", "load_config", "parse_overrides", "to_dict", "to_yaml", "validate"]


@dataclass(frozen=True)
class DataConfig:
    """Where the unlabeled images come from. Labels never reach the SSL step."""

    source: str = "pets09"  # a dataset with training images: `reid_ssl train --help` lists them
    root: str = ""  # dataset folder; "" = the source's usual place (data/pets09 for pets09; `reid_ssl train --help`)
    # (for "list": the folder the listed paths are relative to)
    list_file: str = ""  # for source "list" (and optional for sysu30k: defaults to meta/train.txt)
    height: int = 64  # training crop size (H x W)
    width: int = 32
    # Preprocessing stored in the checkpoint, used by eval / index / app. 1.5x the training size: random
    # resized crops (mean scale ~0.54) show people larger in training than whole test crops do, so testing at
    # a higher resolution matches apparent object size ("FixRes", Touvron et al. 2019; README "Results").
    eval_height: int = 96
    eval_width: int = 48
    # "augment": two views of one image (the paper); "bag": the 2nd view from another image of the same bag; "auto":
    # "bag" when the bags are one person's tracklets (pets09, video, shards packed from them), else "augment"
    positives: Literal["augment", "bag", "auto"] = "auto"
    bad_images: Literal["skip", "fail"] = "skip"  # "skip" (counted and logged) or "fail"
    # DataLoader worker processes. 0 on the 2-core default: the decoded crops are cached in memory and augmented in
    # the training process; forked workers competing with the 2 torch threads cost more than they save
    # (benchmarks/bench_ceiling.py: 0.756 -> 0.816 of the ceiling with this and background checkpoints). Raise it
    # with more cores, a GPU, or images that do not fit the decode cache.
    num_workers: int = 0
    max_images: int = 0  # 0 = all; >0 keeps a deterministic subset (smoke tests, quick looks)


@dataclass(frozen=True)
class AugmentConfig:
    """The two views (docs/method.md, "Views"); view A / view B differ in blur and solarization.

    The defaults are the CPU re-ID recipe: BYOL's views (:data:`BYOL_AUGMENT`, the paper's) with the colour
    kept, i.e. no hue or saturation jitter and no greyscale, and crops of at least 30% of the person. Clothing
    colour is the strongest identity cue in pedestrian crops; views that differ in colour teach the network to
    ignore it (chosen on the PETS09 validation split: docs/results.md, section 1).
    """

    crop_scale: tuple[float, float] = (0.3, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333333)  # of the target aspect (W/H of the crop size)
    flip: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.0
    hue: float = 0.0
    grayscale: float = 0.0
    blur_a: float = 1.0
    blur_b: float = 0.1
    solarize_a: float = 0.0
    solarize_b: float = 0.2


# BYOL's views, as the paper and its reference code use them (the paper configs and the method comparisons).
BYOL_AUGMENT = AugmentConfig(crop_scale=(0.08, 1.0), saturation=0.2, hue=0.1, grayscale=0.2)


def augment_overrides(aug: AugmentConfig) -> list[str]:
    """Overrides ``augment.<field>=<value>`` that set every field of ``aug`` (for ``load_config``)."""
    return [f"augment.{k}={list(v) if isinstance(v, tuple) else v}" for k, v in dataclasses.asdict(aug).items()]


@dataclass(frozen=True)
class ModelConfig:
    """Online/target networks (docs/method.md, "The online/target pair")."""

    backbone: str = "resnet18"  # a name in reid_ssl.models.BACKBONES
    proj_hidden_dim: int = 4096
    proj_dim: int = 256
    pred_hidden_dim: int = 4096
    predictor: bool = True
    target: Literal["ema", "shared"] = "ema"  # "ema" (BYOL, truncated triplet) or "shared" (SimCLR)
    # random per-batch resize of each view (docs/method.md, "Views"); off in the CPU default: 64x32 crops shrunk
    # to 27x14 lose the person (the paper's configs turn it on at 224 px)
    multires: bool = False
    multires_online: tuple[int, int] = (96, 224)  # sizes relative to 224: factor s/224 scales H and W
    multires_target: tuple[int, int] = (128, 224)
    init: str = ""  # a reid_ssl checkpoint (or torchvision ResNet state dict) to load the backbone from
    sync_bn: bool = True  # convert BN to SyncBN when training on more than one process


@dataclass(frozen=True)
class LossConfig:
    """Loss and its hyperparameters (docs/method.md, "The truncated triplet loss" and "Choosing k")."""

    name: str = "truncated_triplet"  # a name in reid_ssl.losses.LOSSES
    # The deputy = mean of the negatives ranked k_lo..k_hi by similarity (1-based). k: "fixed" uses k_lo..k_hi as
    # given (the paper's 2..10); "auto" applies the paper's Bernoulli rule: k_lo = the smallest rank whose negative
    # is another identity with probability >= k_confidence, given the negatives per anchor and the number of
    # identities, and the window keeps its width (k_hi - k_lo). The CPU default is "auto": with ~20 people and 63
    # negatives per anchor the paper's rank 2 is another person with probability 0.17; the rule picks ranks 9-10.
    k: Literal["fixed", "auto"] = "auto"
    k_lo: int = 2
    k_hi: int = 10
    k_confidence: float = 0.99
    identities: int = 0  # identities in the training data, for k=auto; 0 = estimate from the bags (tracklets)
    gamma: float = 2.0
    margin: float = 100.0
    temperature: float = 0.2  # simclr only
    gather_negatives: bool = False  # DDP: use every rank's target embeddings as negatives (reference: off)


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and schedules. Learning rate = ``lr`` (not rescaled by batch size; see the configs)."""

    name: str = "sgd"  # a name in reid_ssl.optim.OPTIMIZERS
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

    epochs: int = 25  # the CPU default: chosen on the validation split (docs/results.md, section 1)
    batch_size: int = 64  # per process; negatives per anchor = batch_size - 1
    accumulate: int = 1  # micro-batches per optimizer step
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: Literal["none", "bf16", "fp16"] = "none"  # fp16 needs CUDA and uses a gradient scaler
    channels_last: bool = True
    compile: bool = False
    out_dir: str = "runs/pets09_r18"
    checkpoint_every_steps: int = 200
    # also at the end of every N-th epoch (0: only steps and the end). Not 1: on the 2-core default (an epoch is
    # ~15 s) a checkpoint every epoch cost 3-7% of the training rate (docs/results.md, section 10)
    checkpoint_every_epochs: int = 5
    log_every_steps: int = 10
    # rank-1/mAP on a retrieval split during training: "auto" = data.source's validation split when it has one
    # (pets09-val, video-val), else its own split; a re-ID dataset name (e.g. "market-layout" with eval_root);
    # "" = off
    eval_dataset: str = "auto"
    eval_root: str = ""  # default: data.root
    eval_every_epochs: int = 5
    max_steps: int = 0  # stop after this many optimizer steps (0 = full schedule); for smoke runs
    tensorboard: bool = True
    # audit: every process appends "epoch,image" for each image it trained on to <out_dir>/samples-rank<r>.csv
    # (image = the position in the source's list; with shards, the position the manifest's source had)
    sample_log: bool = False


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


def _registry_choices() -> dict[str, tuple[str, ...]]:
    """Plug-in names per config key, read from the registries (imported here: they pull in torch)."""
    from reid_ssl.data.datasets import SSL_SOURCES
    from reid_ssl.losses import LOSSES
    from reid_ssl.models import BACKBONES
    from reid_ssl.optim import OPTIMIZERS

    return {
        "data.source": SSL_SOURCES(),
        "model.backbone": BACKBONES.names(),
        "loss.name": LOSSES.names(),
        "optim.name": OPTIMIZERS.names(),
    }


def _literal_choices(cfg: Config) -> dict[str, tuple[Any, ...]]:
    """Fixed enumerations: every ``Literal`` field of every section."""
    out = {}
    for section in dataclasses.fields(cfg):
        hints = typing.get_type_hints(type(getattr(cfg, section.name)))
        for f in dataclasses.fields(getattr(cfg, section.name)):
            if typing.get_origin(hints[f.name]) is Literal:
                out[f"{section.name}.{f.name}"] = typing.get_args(hints[f.name])
    return out


def validate(cfg: Config) -> Config:
    """Check choices and ranges; raises :class:`ConfigError` naming the key. Every number must be finite
    (:mod:`reid_ssl.overrides` refuses inf and nan where values enter; this catches a Config built in code)."""
    flat, a = to_dict(cfg), cfg.augment
    for section, values in flat.items():
        for name, value in values.items():
            if any(
                isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])
            ):
                raise ConfigError(f"{section}.{name}={value!r}: expects a finite number")
    for key, choices in {**_registry_choices(), **_literal_choices(cfg)}.items():
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
        (
            0 < cfg.augment.crop_ratio[0] <= cfg.augment.crop_ratio[1],
            "augment.crop_ratio must be 0 < lo <= hi",
        ),
        (
            all(
                0 <= p <= 1
                for p in (a.flip, a.jitter_prob, a.grayscale, a.blur_a, a.blur_b, a.solarize_a, a.solarize_b)
            ),
            "augment.flip, jitter_prob, grayscale, blur_a/b and solarize_a/b are probabilities in [0, 1]",
        ),
        (
            min(a.brightness, a.contrast, a.saturation) >= 0 and 0 <= a.hue <= 0.5,
            "augment.brightness, contrast and saturation must be >= 0 and augment.hue in [0, 0.5]",
        ),
        (1 <= cfg.loss.k_lo <= cfg.loss.k_hi, "loss.k_lo and loss.k_hi need 1 <= k_lo <= k_hi"),
        (
            0 < cfg.loss.k_confidence < 1 and cfg.loss.identities >= 0,
            "loss.k_confidence in (0, 1), loss.identities >= 0",
        ),
        (cfg.loss.gamma > 0 and cfg.loss.temperature > 0, "loss.gamma and loss.temperature must be > 0"),
        (cfg.loss.margin >= 0, "loss.margin must be >= 0"),
        (cfg.optim.lr > 0 and cfg.optim.weight_decay >= 0, "optim.lr must be > 0 and weight_decay >= 0"),
        (
            0 <= cfg.optim.momentum < 1 and cfg.optim.trust_coefficient > 0,
            "optim.momentum must be in [0, 1) and optim.trust_coefficient > 0",
        ),
        (0 < cfg.optim.warmup_start_factor <= 1, "optim.warmup_start_factor must be in (0, 1]"),
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
        (cfg.train.eval_every_epochs >= 1, "train.eval_every_epochs must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if cfg.loss.name == "truncated_triplet" and cfg.loss.k == "fixed" and cfg.train.batch_size - 1 < cfg.loss.k_hi:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} gives {cfg.train.batch_size - 1} negatives per "
            f"anchor, fewer than loss.k_hi={cfg.loss.k_hi}"
        )
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file (if any) <- ``key=value`` overrides, then validated."""
    cfg = Config()
    if path:
        cfg = apply_yaml(cfg, Path(path))
    if overrides:
        cfg = apply_overrides(cfg, parse_overrides(overrides))
    return validate(cfg)


# Keys that decide only which files a run writes and how often (with train.out_dir: where), never what it learns
# or logs per step: benchmarks leave them out of a run's identity (benchmarks/runs.py).
FILE_CADENCE_KEYS = frozenset(
    {"train.checkpoint_every_steps", "train.checkpoint_every_epochs", "train.sample_log", "train.tensorboard"}
)

# Keys that may change when a run continues: they change how it is logged, watched, run or how long, not what
# it trains on or with. Any other difference makes `train` refuse to continue a checkpoint (train/state.py).
SAFE_ON_RESUME = FILE_CADENCE_KEYS | frozenset(
    {
        "train.epochs",
        "train.max_steps",
        "train.device",
        "train.compile",
        "train.channels_last",
        "train.log_every_steps",
        "train.eval_dataset",
        "train.eval_root",
        "train.eval_every_epochs",
        "data.num_workers",
        "data.bad_images",
    }
)


def config_diff(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """``{"section.key": (old value, new value)}`` for every key that differs."""
    a, b = to_dict(old), to_dict(new)
    return {f"{s}.{k}": (a[s][k], b[s][k]) for s in a for k in a[s] if a[s][k] != b[s][k]}


def apply_changes(cfg: Config, changes: dict[str, Any]) -> Config:
    """``cfg`` with nested overrides applied (as :func:`load_config` applies a YAML file), validated."""
    return validate(apply_overrides(cfg, changes))


def explicit_changes(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The overrides a user gave (a YAML file, then ``key=value`` pairs) as one nested dict, without defaults."""
    merged: dict[str, Any] = {}
    layers = [read_yaml(Path(path))] if path else []
    layers.append(parse_overrides(overrides or []))
    for layer in layers:
        for section, values in layer.items():
            if isinstance(values, dict) and isinstance(merged.get(section), dict):
                merged[section].update(values)
            else:
                merged[section] = values
    return merged


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from :func:`to_dict` output (e.g. the copy stored in a checkpoint)."""
    return validate(apply_overrides(Config(), data))


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what ``reid_ssl train --print-config`` prints)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples become lists), safe for YAML, JSON and ``torch.load(weights_only=True)``."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))
