"""Building an index from images: chunked, resumable, shardable over torchrun ranks.

The gallery list is cut into chunks of ``chunk_size`` images. Chunk ``c`` is embedded by rank
``c % world_size`` and written atomically to ``OUT/.build/chunk-{c:06d}.npz`` (features, the rows that decoded,
the failures with their reasons; no pickle). A rerun of the same build (same images, embedder and chunk size,
checked by the digest in ``.build/plan.json``) skips finished chunks, so a killed build redoes at most one chunk
per rank. After a barrier rank 0 merges the chunks in gallery order (ids do not depend on the number of ranks),
trains and publishes the index, calibrates the "no match" threshold when labels allow, and removes ``.build``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from reid_ssl.errors import AlreadyExistsError, DatasetLayoutError, InputError
from reid_ssl.fileio import atomic_write_bytes, check_output_folder, json_text
from reid_ssl.index import store
from reid_ssl.index.gallery import GalleryIndex
from reid_ssl.index.manifest import embedder_info
from reid_ssl.index.sidecar import GalleryItem
from reid_ssl.index.sources import GallerySource
from reid_ssl.index.types import AUTO, INDEX_TYPES

if TYPE_CHECKING:
    from reid_ssl.embedder import Embedder

BUILD_FORMAT = "reid_ssl.index-build"
MAX_LISTED = 50  # failures and skipped files listed in the result (all are counted)


@dataclass
class BuildOptions:
    """How :func:`build_index` embeds and stores a gallery.

    Attributes:
        index_type: an :data:`~reid_ssl.index.types.INDEX_TYPES` name or ``auto``.
        factory: an explicit ``faiss.index_factory`` string (overrides the type's).
        nprobe: IVF lists visited per query (default: the type's).
        on_disk: serve the IVF lists memory-mapped from disk (galleries bigger than RAM).
        chunk_size: images per resumable unit; a killed build redoes at most one chunk per rank.
        batch_size, num_workers: the embedder's data loading.
        overwrite: replace an existing index at the output folder.
        progress: show a progress bar.
        calibrate: calibrate the "no match" threshold after the build.
    """

    index_type: str = "auto"
    factory: str | None = None
    nprobe: int | None = None
    on_disk: bool = False
    chunk_size: int = 512
    batch_size: int = 64
    num_workers: int = 0
    overwrite: bool = False
    progress: bool = False
    calibrate: bool = True


# ---------------------------------------------------------------------------------------------------------
# Chunks and the plan
# ---------------------------------------------------------------------------------------------------------


def chunk_path(build: Path, c: int) -> Path:
    """The file of chunk ``c`` in the build folder."""
    return build / f"chunk-{c:06d}.npz"


def write_chunk(path: Path, features: np.ndarray, ok: list[int], failures: list[tuple[int, str]]) -> None:
    """Atomically write one chunk: (n_ok, D) features, their rows in the chunk, and (row, reason) failures."""
    buf = io.BytesIO()
    np.savez(
        buf, features=features.astype(np.float32), ok=np.asarray(ok, np.int64), failures=np.array(json.dumps(failures))
    )
    atomic_write_bytes(path, buf.getvalue())


def read_chunk(path: Path, dim: int) -> tuple[np.ndarray, np.ndarray, list] | None:
    """``(features, ok rows, failures)`` of a finished chunk, or ``None`` when it is missing or unusable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            feats, ok, failures = z["features"], z["ok"], json.loads(str(z["failures"]))
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None  # missing or damaged chunk (cannot happen with atomic writes, but then: redo it)
    if feats.ndim != 2 or feats.shape[1] != dim or len(feats) != len(ok):
        return None
    return feats, ok, failures


def _chunk(source: GallerySource, opt: BuildOptions, c: int) -> list[GalleryItem]:
    return source.items[c * opt.chunk_size : (c + 1) * opt.chunk_size]


def _plan_digest(fingerprint: str, source: GallerySource, opt: BuildOptions) -> str:
    """What makes finished chunks reusable: the embedder, the chunk size and the gallery list."""
    plan = {
        "format": BUILD_FORMAT,
        "fingerprint": fingerprint,
        "chunk_size": opt.chunk_size,
        "items": [dataclasses.asdict(it) for it in source.items],
    }
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def _start_plan(build: Path, digest: str, n_items: int, chunk_size: int) -> bool:
    """Rank 0: keep the chunks of an unfinished build of the same plan, else start afresh.

    Returns:
        Whether an unfinished build of another plan was discarded.
    """
    plan = build / "plan.json"
    discarded = False
    if plan.is_file():
        try:
            same = json.loads(plan.read_text()).get("digest") == digest
        except (OSError, json.JSONDecodeError):
            same = False
        if not same:
            shutil.rmtree(build)
            discarded = True
    build.mkdir(parents=True, exist_ok=True)
    if not plan.is_file():
        record = {"digest": digest, "n_items": n_items, "chunk_size": chunk_size, "created": store.now()}
        atomic_write_bytes(plan, json_text(record, indent=None).encode())
    return discarded


# ---------------------------------------------------------------------------------------------------------
# Embedding and merging
# ---------------------------------------------------------------------------------------------------------


def _embed_chunks(
    embedder: Embedder, source: GallerySource, build: Path, opt: BuildOptions, rank: int, world_size: int
) -> tuple[list[int], list[int]]:
    """Embed this rank's unfinished chunks. Returns (this rank's chunks, the ones embedded now)."""
    from tqdm import tqdm

    n_chunks = math.ceil(len(source.items) / opt.chunk_size)
    mine = [c for c in range(n_chunks) if c % world_size == rank]
    todo = [c for c in mine if read_chunk(chunk_path(build, c), embedder.feature_dim) is None]
    total = sum(len(_chunk(source, opt, c)) for c in mine)
    done = total - sum(len(_chunk(source, opt, c)) for c in todo)
    desc = f"index build (rank {rank})" if world_size > 1 else "index build"
    with tqdm(total=total, initial=done, desc=desc, unit="img", disable=not opt.progress) as bar:
        for c in todo:
            chunk = _chunk(source, opt, c)
            res = embedder.embed_images(
                [it.path for it in chunk], batch_size=opt.batch_size, num_workers=opt.num_workers
            )
            write_chunk(chunk_path(build, c), res.features, res.ok, res.failures)
            bar.update(len(chunk))
    return mine, todo


def _merge_chunks(
    build: Path, source: GallerySource, opt: BuildOptions, dim: int, world_size: int
) -> tuple[np.ndarray, list[GalleryItem], list[tuple[str, str]]]:
    """Rank 0: every chunk in gallery order -> (features (n, D), their items, (path, reason) failures)."""
    feats: list[np.ndarray] = []
    items: list[GalleryItem] = []
    failures: list[tuple[str, str]] = []
    n_chunks = math.ceil(len(source.items) / opt.chunk_size)
    for c in range(n_chunks):
        got = read_chunk(chunk_path(build, c), dim)
        if got is None:
            raise RuntimeError(
                f"chunk {c} of {n_chunks} is missing: rank {c % world_size} did not finish "
                "(run the same command again: finished chunks are kept)"
            )
        f, ok, fails = got
        chunk = _chunk(source, opt, c)
        feats.append(f)
        items.extend(chunk[int(i)] for i in ok)
        failures.extend((chunk[int(i)].path, reason) for i, reason in fails)
    features = np.concatenate(feats) if feats else np.zeros((0, dim), np.float32)
    if not len(features):
        raise DatasetLayoutError(f"none of the {len(source.items)} images could be read: {failures[:3]}")
    return features, items, failures


def _calibrate_for_build(
    idx: GalleryIndex, embedder: Embedder, source: GallerySource, opt: BuildOptions
) -> dict[str, Any] | str:
    """Queries when the source has them (Market layout), else leave-one-out; a reason string if impossible."""
    try:
        if source.queries:
            res = embedder.embed_images(
                [q.path for q in source.queries], batch_size=opt.batch_size, num_workers=opt.num_workers
            )
            idx.manifest["queries"] = str(Path(source.queries[0].path).parent)
            return idx.calibrate(res.features, [source.queries[i] for i in res.ok])
        return idx.calibrate()
    except ValueError as e:
        return f"not calibrated: {e}"


def _summary(
    idx: GalleryIndex, source: GallerySource, out: Path, failures: list[tuple[str, str]], n_chunks: int, **extra: Any
) -> dict[str, Any]:
    """Rank 0's result: counts, the first failures and skipped files, chunks, the index type, the threshold, and a
    ``note`` when the requested type could not be built yet (too few vectors to train it)."""
    ix = idx.manifest["index"]
    note = None
    if ix["requested"] not in (AUTO, ix["type"]) and not ix["factory_override"]:
        need = INDEX_TYPES[ix["requested"]].min_train
        note = (
            f"{ix['requested']} needs at least {need:,} images to train; this gallery has {idx.ntotal:,}, so the "
            f"index stays exact ({ix['type']}) until an `index add` brings it to {need:,}, which rebuilds it as "
            f"{ix['requested']}"
        )
    return {
        "out": str(out),
        "n_images": len(source.items),
        "n_indexed": idx.ntotal,
        "n_failed": len(failures),
        "failures": failures[:MAX_LISTED],
        "skipped": source.skipped[:MAX_LISTED],
        "n_skipped": len(source.skipped),
        "chunks": n_chunks,
        **extra,
        "index_type": ix["type"],
        "requested_type": ix["requested"],
        "note": note,
        "factory": ix["factory"],
        "lists_on_disk": idx.lists_on_disk,
        "threshold": idx.threshold,
    }


def _publish(
    idx: GalleryIndex,
    embedder: Embedder,
    source: GallerySource,
    opt: BuildOptions,
    build: Path,
    out: Path,
    lock: store.WriterLock | None,
    world_size: int,
) -> tuple[list[tuple[str, str]], dict[str, Any] | str | None]:
    """Rank 0: merge the chunks into ``idx``, calibrate it, publish it at ``out``; (failures, calibration)."""
    features, items, failures = _merge_chunks(build, source, opt, embedder.feature_dim, world_size)
    idx.add(features, items)
    idx.add_roots(*source.roots)
    calibration = _calibrate_for_build(idx, embedder, source, opt) if opt.calibrate else None
    # publish on top of whatever is there (--overwrite), under the lock we already hold
    idx.path, idx._base_generation, idx._lock = out, store.current_generation(out), lock
    idx.save(out)
    shutil.rmtree(build, ignore_errors=True)
    return failures, calibration


# ---------------------------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------------------------


def _check_output(out: Path, overwrite: bool) -> None:
    """Refuse an output that is a file, that holds an index, or other files (not an unfinished build of ours),
    without ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file; an index is a folder: choose another output")
    if store.is_index(out) and not overwrite:
        raise AlreadyExistsError(
            f"{out} already holds an index: add to it with `reid_ssl index add`, or rebuild with --overwrite"
        )
    check_output_folder(out, overwrite, lambda p: (p / store.BUILD_DIR).is_dir(), "an index or an unfinished build")


def build_index(
    embedder: Embedder,
    source: GallerySource,
    out: str | Path,
    options: BuildOptions | None = None,
    *,
    checkpoint: str | Path | None = None,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Embed a gallery in resumable chunks and publish it as an index at ``out`` (see the module notes).

    Args:
        embedder: the embedder whose features fill the index.
        source: what to index (:func:`~reid_ssl.index.sources.gallery_source`).
        out: the index folder.
        checkpoint: recorded in the manifest, so later commands find the embedder.
        rank, world_size, barrier: this process's rank, the number of ranks and a barrier across them.

    Returns:
        Rank 0: a summary (counts, failures and skipped files, chunks, type, threshold, seconds); other ranks
        their own chunk counts.

    Raises:
        AlreadyExistsError: ``out`` holds an index and ``overwrite`` is off; InputError: ``out`` is a file.
        UnknownNameError, InputError: an unknown index type or a factory FAISS cannot build (before embedding).
        InputError: the ranks were given different galleries.
        DatasetLayoutError: none of the images could be read.
    """
    opt = options or BuildOptions()
    out = Path(out)
    barrier = barrier or (lambda: None)
    t0 = time.time()
    _check_output(out, opt.overwrite)
    info = embedder_info(embedder, checkpoint)
    # checks type, factory and on_disk before any work
    idx = GalleryIndex.create(info, opt.index_type, factory=opt.factory, nprobe=opt.nprobe, on_disk=opt.on_disk)
    build = out / store.BUILD_DIR
    digest = _plan_digest(info["fingerprint"], source, opt)
    lock = store.WriterLock(out).acquire() if rank == 0 else None
    try:
        discarded = _start_plan(build, digest, len(source.items), opt.chunk_size) if rank == 0 else False
        barrier()
        if json.loads((build / "plan.json").read_text()).get("digest") != digest:
            raise InputError(f"rank {rank}: the gallery list differs from rank 0's (the same --images on every rank?)")
        mine, todo = _embed_chunks(embedder, source, build, opt, rank, world_size)
        barrier()
        if rank != 0:
            barrier()  # wait until rank 0 published
            return {"rank": rank, "chunks": len(mine), "embedded_chunks": len(todo)}
        failures, calibration = _publish(idx, embedder, source, opt, build, out, lock, world_size)
        n_chunks = math.ceil(len(source.items) / opt.chunk_size)
        result = _summary(
            idx,
            source,
            out,
            failures,
            n_chunks,
            resumed_chunks=n_chunks - len(todo) if world_size == 1 else None,
            embedded_chunks=len(todo),
            discarded_unfinished_build=discarded,
            world_size=world_size,
        )
        result.update(calibration=calibration, seconds=round(time.time() - t0, 2))
        barrier()
        return result
    finally:
        if lock is not None:
            lock.release()
