"""Embedding image lists with an on-disk feature cache keyed by the embedder and the files."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reid_ssl.fileio import atomic_write_bytes, json_text

_EMBED_CHUNK = 8192  # images per embed_images call: bounded memory, rows go straight to the .npy file


def _list_key(fingerprint: str, paths: Sequence[str]) -> str:
    """Cache key: the embedder (weights + preprocessing + flip) and each file's path, size and mtime."""
    h = hashlib.sha256(fingerprint.encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(os.fsencode(p) + f"|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(os.fsencode(p) + b"|missing\n")
    return h.hexdigest()


def embed_items(
    embedder: Any,
    paths: Sequence[str],
    cache_dir: str | Path | None = None,
    tag: str = "features",
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, list[int], list[tuple[int, str]], bool]:
    """Embed image paths, reusing ``<cache_dir>/<tag>-<key>.npy`` when the same embedder saw the same files.

    Rows are written chunk by chunk into a memory-mapped ``.npy`` (SYSU-30k's gallery is ~3.9 GB at 2048-d)
    that is renamed into place only when complete; the JSON sidecar records which inputs failed to decode.

    Returns:
        (features (n_ok, D) float32, memory-mapped when cached; ok input indices; (index, reason) failures;
        whether the cache was hit).
    """
    target = meta_path = None
    if cache_dir is not None:
        key = _list_key(embedder.fingerprint, paths)
        target = Path(cache_dir) / f"{tag}-{key[:20]}.npy"
        meta_path = target.with_suffix(".json")
        if target.is_file() and meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
                feats = np.load(target, mmap_mode="r", allow_pickle=False)
                if meta.get("key") == key and feats.shape == (len(meta["ok"]), embedder.feature_dim):
                    return feats, list(meta["ok"]), [(int(i), str(r)) for i, r in meta["failures"]], True
            except (OSError, ValueError, KeyError):
                pass  # unreadable cache: embed again
        target.parent.mkdir(parents=True, exist_ok=True)
    n, dim = len(paths), embedder.feature_dim
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp") if target is not None else None
    feats = (
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
        if tmp
        else np.empty((n, dim), np.float32)
    )
    ok: list[int] = []
    failures: list[tuple[int, str]] = []
    try:
        for start in range(0, n, _EMBED_CHUNK):
            res = embedder.embed_images(
                paths[start : start + _EMBED_CHUNK],
                batch_size=batch_size,
                num_workers=num_workers,
                progress=progress,
                desc=f"embedding {tag}",
            )
            feats[len(ok) : len(ok) + len(res.ok)] = res.features
            ok += [start + i for i in res.ok]
            failures += [(start + i, reason) for i, reason in res.failures]
        if tmp is None or target is None or meta_path is None:
            return feats[: len(ok)], ok, failures, False
        if len(ok) < n:  # rare: some images failed; keep only the rows that exist
            full, feats = feats, None
            np.save(tmp.with_suffix(".part.npy"), full[: len(ok)])
            del full
            os.replace(tmp.with_suffix(".part.npy"), tmp)
        else:
            assert isinstance(feats, np.memmap)  # open_memmap above, since tmp is set
            feats.flush()
            del feats
        os.replace(tmp, target)
        meta = {
            "key": key,
            "tag": tag,
            "fingerprint": embedder.fingerprint,
            "num_inputs": n,
            "dim": dim,
            "ok": ok,
            "failures": failures,
        }
        atomic_write_bytes(meta_path, json_text(meta, indent=None).encode())
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
            tmp.with_suffix(".part.npy").unlink(missing_ok=True)
    return np.load(target, mmap_mode="r", allow_pickle=False), ok, failures, False


# Below this mean per-dimension standard deviation of unit features, every image gets (almost) the same
# feature: a collapsed or untrained-by-accident network. Healthy ResNet features on person crops measure
# 0.02-0.04 (512-d), random-init networks about 0.01.
COLLAPSE_SPREAD = 1e-3


def feature_spread(features: Any, sample: int = 10_000) -> float:
    """Mean per-dimension standard deviation of (up to ``sample``) L2-normalised features (N, D); 0 = collapse."""
    f = np.asarray(features[: min(len(features), sample)], dtype=np.float64)
    if len(f) < 2:
        return float("nan")
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    return float(f.std(axis=0).mean())


def collapse_warning(features: Any, what: str) -> str | None:
    """A warning when ``features`` have collapsed (:data:`COLLAPSE_SPREAD`), naming ``what`` produced them."""
    spread = feature_spread(features)
    if spread < COLLAPSE_SPREAD:
        return (
            f"{what} gives (almost) the same feature to every image (spread {spread:.2e} < {COLLAPSE_SPREAD:g}): "
            "the representation has collapsed, so every distance ties and these scores mean nothing; check the "
            "training log (target_std, pos_cos) and use an earlier or another checkpoint"
        )
    return None
