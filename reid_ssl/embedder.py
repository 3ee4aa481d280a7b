"""The one feature extractor that eval, index and app share, built from a checkpoint and nothing else.

Features are the frozen online backbone's global-average-pooled stage-4 map (docs/method.md, "SYSU-30k"), L2-normalised
float32, so cosine similarity, inner product and torchreid's ``"cosine"`` metric agree. With ``flip=True``
the feature is ``normalize(normalize(f(x)) + normalize(f(flip(x))))``: both views weigh the same. (The
SYSU-30k reference script computes ``normalize(normalize(f) + f_flip)``, which weighs the flipped view by
its raw norm; we do not reproduce that quirk.)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from tqdm import tqdm

from reid_ssl.checkpoint import load_checkpoint
from reid_ssl.distributed import resolve_device
from reid_ssl.errors import CheckpointError, ImageError
from reid_ssl.images import open_rgb
from reid_ssl.models import BACKBONES, build_backbone
from reid_ssl.models.backbones import feature_dim

_INTERPOLATION = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}


def eval_transform(preprocess: dict[str, Any]) -> T.Compose:
    """Resize to (height, width) without cropping, to tensor, normalise: the re-ID test transform (§3.5)."""
    interp = _INTERPOLATION[preprocess.get("interpolation", "bicubic")]
    return T.Compose(
        [
            T.Resize((int(preprocess["height"]), int(preprocess["width"])), interpolation=interp),
            T.ToTensor(),
            T.Normalize(preprocess["mean"], preprocess["std"]),
        ]
    )


@dataclass
class EmbedResult:
    """Features of the images that decoded, and the ones that did not (never dropped silently)."""

    features: np.ndarray  # (n_ok, D) float32, L2-normalised
    ok: list[int]  # indices into the input sequence, one per feature row
    failures: list[tuple[int, str]] = field(default_factory=list)  # (input index, reason)


class _ImageList(Dataset):
    def __init__(self, items: Sequence[str | Path | Image.Image], transform: T.Compose) -> None:
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        try:
            return self.transform(open_rgb(self.items[i])), i, ""
        except ImageError as e:
            return torch.zeros(0), i, str(e)


def _collate(batch: list[tuple[torch.Tensor, int, str]]) -> tuple[torch.Tensor | None, list[int], list]:
    good = [(x, i) for x, i, err in batch if not err]
    bad = [(i, err) for _, i, err in batch if err]
    x = torch.stack([x for x, _ in good]) if good else None
    return x, [i for _, i in good], bad


class Embedder:
    """Frozen backbone + the checkpoint's preprocessing -> L2-normalised features.

    Args:
        backbone: the network (put in eval mode here).
        preprocess: the checkpoint's ``preprocess`` block.
        backbone_sha256: hash of the backbone weights, part of :attr:`fingerprint`.
    """

    def __init__(
        self,
        backbone: torch.nn.Module,
        preprocess: dict[str, Any],
        backbone_sha256: str,
        device: str | torch.device | None = None,
        flip: bool = True,
    ) -> None:
        self.device = resolve_device(device)
        self.backbone = backbone.to(self.device).eval()
        self.preprocess = dict(preprocess)
        self.flip = flip
        self.transform = eval_transform(preprocess)
        self.feature_dim: int = feature_dim(backbone)
        blob = json.dumps({"backbone": backbone_sha256, "preprocess": self.preprocess, "flip": flip}, sort_keys=True)
        self.fingerprint: str = hashlib.sha256(blob.encode()).hexdigest()

    @torch.no_grad()
    def embed_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) preprocessed batch -> (N, D) unit-norm float32 features on CPU."""
        x = x.to(self.device, non_blocking=True)
        f = F.normalize(self.backbone(x).float(), dim=1)
        if self.flip:
            f = F.normalize(f + F.normalize(self.backbone(torch.flip(x, dims=[3])).float(), dim=1), dim=1)
        return f.cpu()

    def embed_images(
        self,
        images: Sequence[str | Path | Image.Image],
        batch_size: int = 64,
        num_workers: int = 0,
        progress: bool = False,
        desc: str = "embedding",
    ) -> EmbedResult:
        """Embed image paths or PIL images; unreadable ones are reported in ``failures``, not dropped."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        loader = DataLoader(
            _ImageList(images, self.transform),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=_collate,
        )
        feats: list[torch.Tensor] = []
        ok: list[int] = []
        failures: list[tuple[int, str]] = []
        with tqdm(total=len(images), desc=desc, unit="img", disable=not progress, leave=False) as bar:
            for x, idx, bad in loader:
                if x is not None:
                    feats.append(self.embed_tensor(x))
                    ok.extend(idx)
                failures.extend(bad)
                bar.update(len(idx) + len(bad))
        features = torch.cat(feats).numpy() if feats else np.zeros((0, self.feature_dim), np.float32)
        return EmbedResult(np.ascontiguousarray(features, dtype=np.float32), ok, failures)

    def embed_image(self, image: str | Path | Image.Image) -> np.ndarray:
        """One image -> (D,) feature. Raises :class:`ImageError` if it cannot be read."""
        return self.embed_tensor(self.transform(open_rgb(image)).unsqueeze(0))[0].numpy()


class EmbeddingHead(torch.nn.Module):
    """Backbone + L2 normalisation: (N, 3, H, W) preprocessed images -> (N, D) unit-norm features.

    The exported ONNX graph; it equals :meth:`Embedder.embed_tensor` with ``flip=False``.
    """

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(x), dim=1)


def backbone_from_checkpoint(ckpt: dict[str, Any]) -> torch.nn.Module:
    """Rebuild the online backbone stored in a loaded checkpoint (strict key match)."""
    bb = ckpt["backbone"]
    if bb["name"] not in BACKBONES:
        raise CheckpointError(f"checkpoint backbone {bb['name']!r} is not one of {sorted(BACKBONES)}")
    net = build_backbone(bb["name"])
    missing, unexpected = net.load_state_dict(bb["state_dict"], strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint weights do not fit a {bb['name']}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return net


def load_embedder(path: str | Path, device: str | torch.device | None = None, flip: bool = True) -> Embedder:
    """The embedder a checkpoint defines: its online backbone and its preprocessing, nothing else."""
    ckpt = load_checkpoint(path)
    return Embedder(backbone_from_checkpoint(ckpt), ckpt["preprocess"], ckpt["backbone"]["sha256"], device, flip)
