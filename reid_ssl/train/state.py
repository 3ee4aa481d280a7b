"""Everything a run carries between processes and restarts: seeds and RNG states, the model it starts from,
the training checkpoint payload, and where a resume comes from."""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import re
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from reid_ssl.checkpoint import backbone_block, load_checkpoint, preprocess_from_config, read_backbone_weights
from reid_ssl.config import SAFE_ON_RESUME, Config, LossConfig, apply_changes, config_diff, from_dict, to_dict
from reid_ssl.data.ssl_sources import BagStats
from reid_ssl.distributed import Dist, all_values
from reid_ssl.errors import (
    AlreadyExistsError,
    CheckpointError,
    InputError,
    MissingFileError,
    ReidSslError,
    TrainingError,
)
from reid_ssl.losses import WINDOWED_LOSSES, prob_rank_k_true_negative
from reid_ssl.losses.krule import auto_window
from reid_ssl.models import SSLModel
from reid_ssl.models.backbones import feature_dim

CHECKPOINT_NAME = "checkpoint.pt"

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """RNG states as tensors / plain lists (loadable with weights_only=True)."""
    py = random.getstate()
    np_state = np.random.get_state()
    assert isinstance(np_state, tuple)  # the global RandomState is an MT19937: the legacy tuple
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], npst[1].numpy().astype(np.uint32), *npst[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_model(cfg: Config) -> SSLModel:
    m = cfg.model
    model = SSLModel(
        backbone=m.backbone,
        proj_hidden_dim=m.proj_hidden_dim,
        proj_dim=m.proj_dim,
        pred_hidden_dim=m.pred_hidden_dim,
        predictor=m.predictor,
        target=m.target,
        multires_online=m.multires_online if m.multires else None,
        multires_target=m.multires_target if m.multires else None,
    )
    if m.init:
        load_backbone_init(model, m.init)
    return model


def load_backbone_init(model: SSLModel, path: str) -> None:
    """Initialise online AND target backbone from a local weights file (:func:`read_backbone_weights`).

    Projector and predictor stay freshly initialised, as in the reference SYSU-30k run.

    Raises:
        CheckpointError: the file is not loadable, or its weights do not fit ``model.backbone``.
    """
    if not Path(path).is_file() and re.match(r"^(https?://|hf[-_]hub:|hf://|timm/|torchvision[./:]|imagenet$)", path):
        raise InputError(
            f"model.init={path!r} names weights to download; reid_ssl never downloads weights: fetch the file "
            "yourself (torchvision, timm, torchreid or reid_ssl format) and set model.init to its path"
        )
    try:
        sd, kind = read_backbone_weights(path, model.backbone.state_dict().keys())
    except ReidSslError as e:
        raise CheckpointError(f"model.init: {e}") from None
    missing, unexpected = model.backbone.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"model.init={path} ({kind}): weights do not fit {model.backbone_name} "
            f"(missing {missing[:4]}, unexpected {unexpected[:4]})"
        )
    if model.target_backbone is not None:
        model.target_backbone.load_state_dict(model.backbone.state_dict())


def autocast_context(amp: str, device: torch.device) -> AbstractContextManager[Any]:
    if amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def training_checkpoint(
    cfg: Config,
    model: SSLModel,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    step: int,
    epoch: int,
    feed_state: dict[str, Any],
    history: dict[str, Any],
) -> dict[str, Any]:
    """Everything a resume needs; ``feed_state`` says where in ``epoch`` the data stopped
    (:meth:`reid_ssl.train.feed.Feed.state`)."""
    return {
        "backbone": backbone_block(cfg.model.backbone, feature_dim(model.backbone), model.backbone.state_dict()),
        "preprocess": preprocess_from_config(cfg),
        "config": to_dict(cfg),
        "step": step,
        "epoch": epoch,
        "batch_in_epoch": int(feed_state.get("batch_in_epoch", 0)),
        "feed": feed_state,
        # the online backbone is already in "backbone"; store the rest of the pair once
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith("backbone.")},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(),
        "history": history,
    }


@dataclass
class RunPlan:
    """What :func:`plan_run` decided: the config to train with, and the checkpoint to continue (if any)."""

    cfg: Config
    checkpoint: dict[str, Any] | None = None  # the loaded training checkpoint to resume from
    source: Path | None = None  # where it came from
    changes: list[str] = field(default_factory=list)  # safe changes applied on resume, "key: old -> new"
    notes: list[str] = field(default_factory=list)  # lines for the log


RUN_FILES = ("metrics.jsonl", "metrics.csv", "loss_curve.png", "config.json", "tensorboard")


def holds_only_run_files(folder: Path) -> bool:
    """Whether ``folder`` holds nothing but what a training run writes (a run stopped before its first
    checkpoint, or one whose checkpoint was deleted): ``reid_ssl train`` may start a new run there without
    ``--overwrite``. (The command line checks this; :func:`~reid_ssl.train.loop.train` called from Python
    writes where it is told, next to the caller's own files.)"""
    return all(p.name in RUN_FILES or p.name.startswith((CHECKPOINT_NAME, "samples-rank")) for p in folder.iterdir())


def plan_run(cfg: Config, resume: bool | str, overwrite: bool, changes: dict[str, Any] | None = None) -> RunPlan:
    """Decide how a ``train`` call treats the checkpoint in ``cfg.train.out_dir`` (or the one ``resume`` names).

    * No checkpoint there, or ``overwrite`` (without ``resume``): a fresh run.
    * A checkpoint whose config matches ``cfg`` up to :data:`~reid_ssl.config.SAFE_ON_RESUME` keys (more epochs,
      logging, monitor, device, workers): that run continues, with those changes applied and logged. This is
      what makes an interrupted ``make demo`` continue where it stopped.
    * With ``resume`` and ``changes``: the stored config with only ``changes`` applied (the command line's
      ``-c`` file and ``key=value`` pairs), checked the same way. The run writes next to the checkpoint it
      resumes (a copied or moved run folder continues in place), or into ``train.out_dir`` when ``changes``
      name one; the ``train.out_dir`` stored in the checkpoint is only where the run was trained before.
    * Anything else that differs changes the run's meaning: refused, listing the differences and the way out.

    A run never replaces another checkpoint than the one it resumes (another run's, or a later step of a copy)
    unless ``overwrite``.

    Raises:
        MissingFileError: ``resume`` and no checkpoint where it points. InputError: ``resume=True`` with
            ``overwrite``. AlreadyExistsError: the output folder holds another checkpoint than the one resumed.
        CheckpointError: the checkpoint belongs to a different run, or cannot be read.
    """
    if resume is True and overwrite:
        raise InputError(
            "--resume continues the checkpoint in train.out_dir and --overwrite replaces it with a new run: pass "
            "one of them (--resume CHECKPOINT --overwrite continues CHECKPOINT into a train.out_dir it may replace)"
        )
    path = Path(cfg.train.out_dir) / CHECKPOINT_NAME if not isinstance(resume, str) else Path(resume)
    if resume and not path.is_file():
        how = "" if isinstance(resume, str) else ", or name the checkpoint: --resume PATH"
        raise MissingFileError(f"--resume: nothing to resume at {path}; drop --resume to start a new run{how}")
    if not resume and (overwrite or not path.is_file()):
        notes = [f"--overwrite: starting afresh; {path} will be replaced"] if overwrite and path.is_file() else []
        return RunPlan(cfg, notes=notes)
    ckpt = load_checkpoint(path)
    if "optimizer" not in ckpt or "rng" not in ckpt:
        raise CheckpointError(
            f"{path} holds no training state (an exported or fine-tuned checkpoint); pass a new train.out_dir, "
            "or --overwrite to replace it"
        )
    stored = from_dict(ckpt["config"])
    if resume and changes is not None:
        requested = apply_changes(stored, changes)
        named = "out_dir" in (changes.get("train") or {})
        out_dir = requested.train.out_dir if named else str(path.parent)
    else:
        requested, out_dir = cfg, cfg.train.out_dir
    # where the run writes is not part of what it trains: compare the configs as if both were here
    requested = dataclasses.replace(requested, train=dataclasses.replace(requested.train, out_dir=out_dir))
    diffs = config_diff(
        dataclasses.replace(stored, train=dataclasses.replace(stored.train, out_dir=out_dir)), requested
    )
    unsafe = [k for k in diffs if k not in SAFE_ON_RESUME]
    if unsafe:
        listed = "; ".join(f"{k}: {diffs[k][0]!r} -> {diffs[k][1]!r}" for k in unsafe[:8])
        more = f" (and {len(unsafe) - 8} more)" if len(unsafe) > 8 else ""
        way_out = "" if resume else " `--resume` to continue it with its own config,"
        raise CheckpointError(
            f"{path} holds a run whose config differs in what it trains: {listed}{more}. Use{way_out} a new "
            "train.out_dir, or --overwrite to replace it"
        )
    applied = [f"{k}: {diffs[k][0]!r} -> {diffs[k][1]!r}" for k in diffs]
    notes = [f"continuing {path} (step {ckpt['step']})"] + [f"changed on resume: {c}" for c in applied]
    if Path(out_dir).resolve() != Path(stored.train.out_dir).resolve():
        notes.append(f"writing to {out_dir} (the run was trained in {stored.train.out_dir} before)")
    target = Path(out_dir) / CHECKPOINT_NAME
    if target.exists() and not target.samefile(path):
        if not overwrite:
            raise AlreadyExistsError(
                f"{target} holds another checkpoint than the one resumed ({path}): resume into a new "
                "train.out_dir, or pass --overwrite to replace it"
            )
        notes.append(f"--overwrite: {target} will be replaced")
    return RunPlan(requested, ckpt, path, applied, notes)


def resolve_deputy_window(cfg: Config, stats: BagStats, negatives: int) -> tuple[LossConfig, dict[str, Any]]:
    """The ``loss`` section the loss is built from, with ``k: auto`` turned into a concrete window.

    Identities: ``loss.identities`` when set, else estimated from the bags as the geometric mean of a lower
    bound (the most bags seen at one time: different people) and an upper bound (the number of bags: one
    person each at most once), which minimises the worst-case ratio error within those bounds; the number of
    bags alone when the file names are not frame numbers. Returns the section and what was decided (logged and
    kept in the checkpoint's history).

    Fewer than two bags say nothing about how many people there are: a source without bags (a flat folder, a
    list of files without folders, ImageNet, a labeled re-ID set read without its labels, Fashion-MNIST) or with
    one bag only gives no estimate. ``k: auto`` there, without ``loss.identities``, keeps the configured
    ``k_lo..k_hi`` and says so in ``info["note"]`` (logged as a warning, and printed by ``reid_ssl train``).
    When no window of the configured width reaches ``loss.k_confidence`` (too few negatives for the number of
    identities), the best one is used and ``info["note"]`` says so too.
    """
    loss = cfg.loss
    info: dict[str, Any] = {"k": loss.k, "negatives": negatives}
    if loss.name not in WINDOWED_LOSSES:
        return loss, info
    identities, source = loss.identities, "loss.identities"
    if identities == 0:
        info.update(bags=stats.bags, max_cooccurring_bags=stats.max_cooccurring)
        if stats.bags >= 2 and stats.max_cooccurring:
            identities = max(1, round(math.sqrt(stats.bags * stats.max_cooccurring)))
            source = f"estimated: sqrt({stats.max_cooccurring} co-occurring bags x {stats.bags} bags)"
        elif stats.bags >= 2:
            identities, source = stats.bags, f"estimated: {stats.bags} bags"
    if identities == 0:
        if loss.k == "auto":
            found = "no bags" if not stats.bags else "a single bag"
            info["note"] = (
                f"loss.k=auto: data.source={cfg.data.source} has {found} (sub-folders or tracklets) to estimate the "
                f"number of identities from, so the configured deputy window {loss.k_lo}..{loss.k_hi} is used; set "
                "loss.identities=N to apply the Bernoulli rule, or loss.k=fixed to silence this"
            )
        return loss, info
    info.update(identities=identities, identities_source=source)
    if loss.k == "auto":
        k_lo, k_hi, p = auto_window(negatives, identities, loss.k_hi - loss.k_lo + 1, loss.k_confidence)
        loss = dataclasses.replace(loss, k_lo=k_lo, k_hi=k_hi)
        if p < loss.k_confidence:
            info["note"] = (
                f"loss.k=auto: with {negatives} negatives per anchor and {identities} identities no deputy window "
                f"of width {k_hi - k_lo + 1} reaches loss.k_confidence={loss.k_confidence}; using ranks "
                f"{k_lo}..{k_hi}, whose rank {k_lo} is another identity with P = {p:.3f}. Raise train.batch_size "
                "(more negatives), narrow the window (loss.k_lo/k_hi) or lower loss.k_confidence"
            )
    else:
        p = prob_rank_k_true_negative(negatives, identities, loss.k_lo)
    info.update(k_lo=loss.k_lo, k_hi=loss.k_hi, p_true_negative=p)
    return loss, info


def check_same_start(d: Dist, plan: RunPlan) -> None:
    """Every process must start from the same place (on several nodes, each reads ``train.out_dir`` itself).

    Raises:
        CheckpointError: some process found a checkpoint to continue and another did not (or another one).
    """
    here = None if plan.checkpoint is None else (str(plan.source), plan.checkpoint["step"])
    every = all_values(here, d)
    if any(e != every[0] for e in every):
        seen = "; ".join(
            f"process {r}: {f'step {e[1]} of {e[0]}' if e else 'no checkpoint'}" for r, e in enumerate(every)
        )
        raise CheckpointError(
            f"the processes of this job disagree about where to start ({seen}). train.out_dir "
            f"({plan.cfg.train.out_dir}) must be one folder that every node sees (a shared filesystem), or pass "
            "--resume PATH with a checkpoint every node can read"
        )


def place_model(
    cfg: Config, d: Dist, device: torch.device, resumed: dict[str, Any] | None, source: Path | None
) -> tuple[SSLModel, nn.Module, nn.parallel.DistributedDataParallel | None]:
    """The online/target pair (restored on resume), moved, wrapped for DDP and compiled as configured."""
    model = build_model(cfg)
    if resumed is not None:
        model.backbone.load_state_dict(resumed["backbone"]["state_dict"])
        model.load_state_dict(resumed["model"], strict=False)
        missing = [k for k in model.state_dict() if not k.startswith("backbone.") and k not in resumed["model"]]
        if missing:
            raise TrainingError(f"{source} does not fit this model: missing {missing[:4]}")
    if d.world_size > 1 and cfg.model.sync_bn:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif d.main:
            log.warning("model.sync_bn: PyTorch's SyncBatchNorm needs CUDA; on CPU each process keeps its own BN")
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    core: SSLModel = model
    wrapped: nn.Module = model
    ddp = None
    if d.world_size > 1:
        wrapped = ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.train.compile:
        # torch.compile's annotation says Callable; given a module it returns an OptimizedModule (nn.Module)
        wrapped = torch.compile(wrapped)  # type: ignore[assignment]
    return core, wrapped, ddp
