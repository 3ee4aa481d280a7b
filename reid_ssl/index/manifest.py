"""What an index remembers about itself (``manifest.json``): format, embedder identity, index type, counts.

The embedder block pins the features: an index refuses an embedder with another fingerprint
(:func:`check_embedder`), because features of other weights or preprocessing are not comparable, and
:func:`load_recorded_embedder` loads the embedder it records.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from reid_ssl import __version__
from reid_ssl.errors import EmbedderMismatchError, InputError, MissingFileError
from reid_ssl.index import store
from reid_ssl.index.types import IndexSpec

if TYPE_CHECKING:
    from reid_ssl.embedder import Embedder


def embedder_info(embedder: Embedder, checkpoint: str | Path | None = None) -> dict[str, Any]:
    """What the index remembers about the embedder that built it (fingerprint, preprocessing, dim, flip)."""
    return {
        "fingerprint": embedder.fingerprint,
        "preprocess": dict(embedder.preprocess),
        "feature_dim": int(embedder.feature_dim),
        "flip": bool(getattr(embedder, "flip", True)),
        "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
    }


def new_manifest(info: dict[str, Any], requested: dict[str, Any]) -> dict[str, Any]:
    """The manifest of an empty index.

    Args:
        info: :func:`embedder_info`.
        requested: the ``index`` block's choices: ``requested`` type, ``factory_override``, ``nprobe_override``,
            ``ef_search_override``, ``use_gpu``, ``on_disk``; what was built (type, factory...) is filled in by
            each build.
    """
    built = {"type": None, "factory": None, "nprobe": None, "ef_search": None, "rerank": 1, "trained_on": 0}
    return {
        "format": store.FORMAT,
        "format_version": store.FORMAT_VERSION,
        "reid_ssl_version": __version__,
        "generation": 0,
        "created": store.now(),
        "updated": store.now(),
        "dim": int(info["feature_dim"]),
        "ntotal": 0,
        "next_id": 0,
        "embedder": info,
        "index": {**requested, **built},
        "roots": [],
        "queries": None,
        "calibration": None,
    }


def built_spec(manifest: dict[str, Any]) -> IndexSpec | None:
    """The spec of the FAISS index built now (``None`` before the first add)."""
    m = manifest["index"]
    if m["type"] is None:
        return None
    return IndexSpec(m["type"], m["factory"], m["nprobe"], m["ef_search"], m["rerank"], m["trained_on"])


def check_embedder(manifest: dict[str, Any], embedder: Embedder, where: Path | None, origin: str = "") -> None:
    """Raise :class:`EmbedderMismatchError` unless ``embedder`` is the one that built the index at ``where``.

    Args:
        origin: where ``embedder`` came from, for the message ("--checkpoint X", "the recorded checkpoint X");
            by default "the embedder in use".
    """
    info = manifest["embedder"]
    if embedder.fingerprint != info["fingerprint"]:
        raise EmbedderMismatchError(
            f"index {where or '(unsaved)'} was built by embedder {info['fingerprint'][:12]} "
            f"(checkpoint {info.get('checkpoint')}, preprocess {info['preprocess']}, flip {info.get('flip')}); "
            f"{origin or 'the embedder in use'} gives embedder {embedder.fingerprint[:12]} (preprocess "
            f"{embedder.preprocess}, flip {getattr(embedder, 'flip', '?')}). Features would not be comparable: "
            "use the original checkpoint or rebuild the index"
        )


def load_recorded_embedder(
    manifest: dict[str, Any], where: Path | None, checkpoint: str | Path | None = None, device: str = "auto"
) -> Embedder:
    """The embedder that built the index at ``where``: from ``checkpoint``, else from the checkpoint the
    manifest records, with the recorded test-time flip, checked against the fingerprint.

    Raises:
        InputError: no ``checkpoint`` given and none recorded.
        MissingFileError: the checkpoint file is gone (for a recorded one: says to pass a copy of it).
        EmbedderMismatchError: the checkpoint is not the one that built the index.
    """
    from reid_ssl.embedder import load_embedder

    ckpt = checkpoint or manifest["embedder"].get("checkpoint")
    if not ckpt:
        raise InputError(f"{where} does not record its checkpoint; pass --checkpoint")
    flip = bool(manifest["embedder"].get("flip", True))
    try:
        embedder = load_embedder(ckpt, device=device, flip=flip)
    except MissingFileError as e:
        if checkpoint:
            raise
        raise MissingFileError(
            f"{e} (the checkpoint that built {where}); pass --checkpoint with a copy of it"
        ) from None
    origin = (
        f"--checkpoint {checkpoint}"
        if checkpoint
        else f"the recorded checkpoint {ckpt}, which has changed since the index was built,"
    )
    check_embedder(manifest, embedder, where, origin)
    return embedder


def describe(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's facts for ``index info``: format, counts, type and parameters, embedder, dates."""
    m, ix, emb = manifest, manifest["index"], manifest["embedder"]
    return {
        "format_version": m.get("format_version"),
        "dim": int(m["dim"]),
        "next_id": m["next_id"],
        "index_type": ix["type"],
        "requested_type": ix["requested"],
        "factory": ix["factory"],
        "nprobe": ix["nprobe"],
        "ef_search": ix["ef_search"],
        "rerank": ix["rerank"],
        "on_disk": bool(ix.get("on_disk", False)),
        "trained_on": ix["trained_on"],
        "embedder_fingerprint": emb["fingerprint"],
        "checkpoint": emb.get("checkpoint"),
        "preprocess": emb["preprocess"],
        "flip": emb.get("flip"),
        "calibration": m.get("calibration"),
        "roots": m["roots"],
        "created": m["created"],
        "updated": m["updated"],
    }
