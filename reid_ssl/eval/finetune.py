"""Supervised fine-tuning of an SSL backbone on a labelled re-ID train split, through torchreid.

The LUPerson-style downstream protocol: the checkpoint's backbone becomes a torchreid ResNet
(:func:`reid_ssl.export.build_torchreid_model`, checked load), torchreid's ``ImageDataManager`` feeds the
train split (read by our loaders, registered as a torchreid dataset), and torchreid's engine computes the loss
and steps the optimizer: ``softmax`` (label-smoothed cross-entropy, ``ImageSoftmaxEngine``) or ``triplet``
(batch-hard triplet + cross-entropy with an identity sampler, ``ImageTripletEngine``). We drive the epochs
ourselves (``engine.forward_backward`` per batch) rather than ``engine.run``, which writes torchreid
checkpoints that do not load under torch >= 2.6 and evaluates with its printing evaluator. The result is saved
in our checkpoint format, so ``reid_ssl eval`` (and index, app) read it like any other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from reid_ssl.checkpoint import backbone_block, load_checkpoint, save_checkpoint
from reid_ssl.errors import DatasetLayoutError, InputError
from reid_ssl.fileio import check_new_file
from reid_ssl.images import check_images

FINETUNE_LOSSES = ("softmax", "triplet")
_REGISTERED = itertools.count()


def default_output(checkpoint: str | Path, dataset: str, loss: str) -> Path:
    """``<checkpoint folder>/finetune_<dataset>_<loss>/checkpoint.pt``."""
    return Path(checkpoint).resolve().parent / f"finetune_{dataset}_{loss}" / "checkpoint.pt"


@dataclass(frozen=True)
class FinetuneSettings:
    """What :func:`finetune` does; stored in the output checkpoint's config."""

    loss: str = "softmax"
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 3.5e-4
    weight_decay: float = 5e-4
    num_instances: int = 4
    margin: float = 0.3
    num_workers: int = 0
    seed: int = 0


def finetune(
    checkpoint: str | Path,
    dataset: str,
    root: str | Path | None = None,
    out: str | Path | None = None,
    loss: str = "softmax",
    epochs: int = 1,
    max_steps: int | None = None,
    batch_size: int = 32,
    lr: float = 3.5e-4,
    weight_decay: float = 5e-4,
    num_instances: int = 4,
    margin: float = 0.3,
    num_workers: int = 0,
    seed: int = 0,
    device: str | None = None,
    split_options: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Fine-tune the checkpoint's backbone on ``dataset``'s train split; save it as a reid_ssl checkpoint.

    Args:
        checkpoint: reid_ssl checkpoint (its preprocessing sets the input size and normalisation).
        dataset, root, split_options: see :func:`reid_ssl.data.datasets.load_split`; the split needs a train list.
        out: output checkpoint (default: :func:`default_output`).
        loss: ``"softmax"`` or ``"triplet"`` (triplet samples ``num_instances`` images per identity).
        max_steps: stop after this many optimizer steps (smoke runs), whatever ``epochs`` says.
        lr, weight_decay: Adam, torchreid's defaults for ResNet-50 fine-tuning; cosine decay per epoch.
        log: receives one progress line per epoch (and torchreid's own chatter).
        overwrite: replace an existing ``out`` (never ``checkpoint`` itself); checked before training.

    Returns:
        ``{"checkpoint", "steps", "epochs", "history", "num_train_images", "num_train_ids",
        "skipped_train_images", "seconds", ...}``. Train images that fail to decode are skipped and listed.

    Raises:
        InputError: unknown loss, fewer train images/identities than one batch needs, or ``out`` is
            ``checkpoint``. AlreadyExistsError: ``out`` exists and ``overwrite`` is off.
        DatasetLayoutError: no train list (SYSU-30k's test set).
    """
    from reid_ssl.data.datasets import load_split

    opt = FinetuneSettings(
        loss, epochs, max_steps, batch_size, lr, weight_decay, num_instances, margin, num_workers, seed
    )
    _check_settings(opt)
    out_path = check_new_file(
        out if out is not None else default_output(checkpoint, dataset, opt.loss), overwrite, inputs=[checkpoint]
    )
    t0 = time.perf_counter()
    ckpt = load_checkpoint(checkpoint)
    split = load_split(dataset, root, **(split_options or {}))
    bad = _readable_train(dataset, split, opt)
    use_gpu = device is not None and torch.device(device).type == "cuda"
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):
        dm = _data_manager(dataset, split, ckpt["preprocess"], opt, use_gpu)
    engine, model = _engine(ckpt, dm, opt, use_gpu)
    history, step, epoch = _train(engine, dm, opt, log or (lambda line: None))
    if chatter.getvalue() and log is not None:
        print(chatter.getvalue(), end="", file=sys.stderr)
    settings = _settings_record(dataset, split, opt, dm.num_train_pids, checkpoint, ckpt["backbone"]["sha256"])
    _save(out_path, ckpt, model, settings, step, epoch)
    return {
        "checkpoint": str(out_path),
        "steps": step,
        "epochs": epoch,
        "history": history,
        "num_train_images": len(split.train),
        "num_train_ids": dm.num_train_pids,
        "skipped_train_images": [{"image": str(p), "reason": r} for p, r in bad],
        "settings": settings,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _check_settings(opt: FinetuneSettings) -> None:
    """Refuse an unknown loss and non-positive epochs, batch size or step limit."""
    if opt.loss not in FINETUNE_LOSSES:
        raise InputError(f"unknown loss {opt.loss!r}; choose one of {list(FINETUNE_LOSSES)}")
    if opt.epochs < 1 or opt.batch_size < 1 or (opt.max_steps is not None and opt.max_steps < 1):
        raise InputError("epochs, batch_size and max_steps must be >= 1")


def _settings_record(
    dataset: str, split: Any, opt: FinetuneSettings, num_ids: int, parent: str | Path, parent_sha256: str
) -> dict[str, Any]:
    """What the output checkpoint's config and the result record of the run: data, settings, parent."""
    return {
        "dataset": dataset,
        "root": str(split.root),
        **dataclasses.asdict(opt),
        "optimizer": "adam",
        "scheduler": "cosine",
        "num_train_ids": num_ids,
        "parent_checkpoint": str(parent),
        "parent_sha256": parent_sha256,
    }


def _readable_train(dataset: str, split: Any, opt: FinetuneSettings) -> list[tuple[Path, str]]:
    """Drop unreadable train images from ``split`` (returned); refuse splits too small for one batch."""
    if not split.train:
        fix = (
            f"fine-tune on --dataset {dataset.removesuffix('-val')} (the validation split has no train list)"
            if dataset.endswith("-val")
            else "add the labelled train folder (e.g. bounding_box_train/); SYSU-30k's test set has none"
        )
        raise DatasetLayoutError(f"{dataset}: no train list under {split.root}: {fix}")
    good, bad = check_images(Path(p) for p, _, _ in split.train)
    readable = {str(p) for p in good}
    split.train = [item for item in split.train if item[0] in readable]
    num_ids = len({pid for _, pid, _ in split.train})
    per_batch = opt.batch_size // opt.num_instances
    if opt.loss == "triplet" and (opt.batch_size % opt.num_instances or num_ids < per_batch):
        raise InputError(
            f"triplet batches of {opt.batch_size} = {per_batch} identities x {opt.num_instances} images need "
            f"batch_size divisible by num_instances and at least {per_batch} train identities ({num_ids} here)"
        )
    if len(split.train) < opt.batch_size:
        raise InputError(
            f"{dataset}: {len(split.train)} readable train images, fewer than one batch of {opt.batch_size}; "
            "lower --batch-size"
        )
    return bad


def _data_manager(dataset: str, split: Any, pre: dict[str, Any], opt: FinetuneSettings, use_gpu: bool) -> Any:
    """torchreid's ImageDataManager over our lists (registered under a fresh name), sized by the checkpoint."""
    from reid_ssl.data.torchreid_bridge import import_torchreid, torchreid_dataset_class

    torchreid = import_torchreid()
    source = f"reid_ssl_finetune_{os.getpid()}_{next(_REGISTERED)}"
    torchreid.data.register_image_dataset(source, torchreid_dataset_class(dataset, split=split))
    return torchreid.data.ImageDataManager(
        root=str(split.root),
        sources=source,
        height=int(pre["height"]),
        width=int(pre["width"]),
        transforms=["random_flip"],
        norm_mean=list(pre["mean"]),
        norm_std=list(pre["std"]),
        use_gpu=use_gpu,
        batch_size_train=opt.batch_size,
        batch_size_test=opt.batch_size,
        workers=opt.num_workers,
        num_instances=opt.num_instances,
        train_sampler="RandomIdentitySampler" if opt.loss == "triplet" else "RandomSampler",
    )


def _engine(ckpt: dict[str, Any], dm: Any, opt: FinetuneSettings, use_gpu: bool) -> tuple[Any, torch.nn.Module]:
    """The torchreid model (checked load of our backbone), Adam + cosine, and the engine for ``opt.loss``."""
    from reid_ssl.data.torchreid_bridge import import_torchreid
    from reid_ssl.export import build_torchreid_model

    torchreid = import_torchreid()
    torch.manual_seed(opt.seed)
    model = build_torchreid_model(ckpt, num_classes=dm.num_train_pids, loss=opt.loss)
    if use_gpu:
        model = model.cuda()
    optimizer = torchreid.optim.build_optimizer(model, optim="adam", lr=opt.lr, weight_decay=opt.weight_decay)
    scheduler = torchreid.optim.build_lr_scheduler(optimizer, lr_scheduler="cosine", max_epoch=opt.epochs)
    common = {"scheduler": scheduler, "use_gpu": use_gpu, "label_smooth": True}
    if opt.loss == "softmax":
        return torchreid.engine.ImageSoftmaxEngine(dm, model, optimizer, **common), model
    engine = torchreid.engine.ImageTripletEngine(
        dm, model, optimizer, margin=opt.margin, weight_t=1.0, weight_x=1.0, **common
    )
    return engine, model


def _train(
    engine: Any, dm: Any, opt: FinetuneSettings, say: Callable[[str], None]
) -> tuple[list[dict[str, float]], int, int]:
    """Our epoch loop over ``engine.forward_backward``; returns (per-epoch mean losses, steps, epochs)."""
    history: list[dict[str, float]] = []
    step = epoch = 0
    for epoch in range(1, opt.epochs + 1):
        engine.set_model_mode("train")
        sums: dict[str, float] = {}
        batches = 0
        for batch in dm.train_loader:
            for key, value in engine.forward_backward(batch).items():
                sums[key] = sums.get(key, 0.0) + float(value)
            batches += 1
            step += 1
            if opt.max_steps is not None and step >= opt.max_steps:
                break
        engine.update_lr()
        means = {k: v / max(1, batches) for k, v in sums.items()}
        history.append({"epoch": epoch, "steps": batches, **means})
        say(f"epoch {epoch}/{opt.epochs}: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
        if opt.max_steps is not None and step >= opt.max_steps:
            break
    return history, step, epoch


def _save(
    path: Path, ckpt: dict[str, Any], model: torch.nn.Module, settings: dict[str, Any], step: int, epoch: int
) -> None:
    """The fine-tuned backbone (classifier dropped) in our checkpoint format, with the parent's preprocessing."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    block = backbone_block(ckpt["backbone"]["name"], int(ckpt["backbone"]["feature_dim"]), state)
    config = {"finetune": settings, "pretrain": ckpt.get("config", {})}
    save_checkpoint(
        path, {"backbone": block, "preprocess": ckpt["preprocess"], "config": config, "step": step, "epoch": epoch}
    )
