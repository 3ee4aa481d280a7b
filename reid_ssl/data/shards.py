"""WebDataset-style tar shards: pack any training source once, stream it to every rank and worker.

Writing (:func:`write_shards`, ``reid_ssl prepare shards``): the images of a source, their original bytes
unchanged, go into ``shard-000000.tar``, ``shard-000001.tar``... through ``webdataset.TarWriter``. Each sample is
``<key>.<ext>`` (the image) plus ``<key>.json`` (``{"bag", "path", "index"}``). A bag (tracklet) never spans two
shards, so bag positives can be drawn within a shard. ``manifest.json``, written last, lists every shard with
its sample count, bags and sha256: it is the commit point, and the only file a reader opens to plan an epoch.

Reading (:class:`ShardStream`, ``data.source=shards``): each epoch the shard order is a permutation fixed by
(seed, epoch); rank r of w takes shards r, r+w, ... and DataLoader worker k of n takes every n-th of those, so
every sample is read exactly once per epoch across all ranks and workers. A shard's samples are shuffled in
memory with a seed of (seed, epoch, shard), the "shuffle buffer" being the shard. Each sample carries its shard
and position, so the training loop can count what it trained on and a resumed run skips exactly that.
Ranks can end an epoch with different numbers of batches; the loop lets the early ones wait (DDP's ``join``).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from reid_ssl.data.image_list import ImageList
from reid_ssl.data.ssl_sources import bag_stats
from reid_ssl.errors import AlreadyExistsError, DatasetLayoutError, ImageError, MissingFileError
from reid_ssl.fileio import check_output_folder, sha256_file, write_json
from reid_ssl.images import decode_bytes

FORMAT = "reid_ssl.shards"
MANIFEST = "manifest.json"


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------


def write_shards(
    items: ImageList,
    out: str | Path,
    *,
    array: np.ndarray | None = None,
    samples_per_shard: int = 2000,
    source: dict[str, Any] | None = None,
    overwrite: bool = False,
    verify: bool = True,
    progress: Callable[[int], object] | None = None,
) -> dict[str, Any]:
    """Pack ``items`` into tar shards under ``out`` (module docstring); returns the manifest.

    Args:
        array: the in-memory images when ``items.in_memory`` (Fashion-MNIST), stored as PNG.
        samples_per_shard: a shard is closed at the first bag boundary after this many samples.
        source: what the images are (recorded in the manifest).
        verify: decode every image while packing (with the training decoder), so that truncated or corrupt files
            are listed in the manifest's ``unreadable`` and left out; without it only unreadable files are.

    Raises:
        AlreadyExistsError: ``out`` holds shards or other files (pass ``overwrite``, which replaces the folder).
        OSError: a write failed (nothing published).
    """
    import webdataset as wds

    out = Path(out)
    if (out / MANIFEST).is_file() and not overwrite:
        raise AlreadyExistsError(
            f"{out} already holds shards; pass --overwrite to replace them, or choose another --out"
        )
    check_output_folder(out, overwrite, lambda _: False, "shards")  # nothing of anyone else's is deleted unasked
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        shards: list[dict[str, Any]] = []
        unreadable: list[str] = []
        for number, members in enumerate(_shard_plan(items, samples_per_shard)):
            name = f"shard-{number:06d}.tar"
            written = 0
            with wds.TarWriter(str(tmp / name)) as sink:
                for i in members:
                    ext, data = _sample_bytes(items, int(i), array, unreadable, verify)
                    if data is None:
                        continue
                    written += 1
                    meta = {"bag": int(items.bags[i]), "index": int(i), "path": _rel(items, int(i))}
                    sink.write({"__key__": f"{int(i):010d}", ext: data, "json": json.dumps(meta).encode()})
                    if progress is not None:
                        progress(1)
            bags = np.unique(items.bags[members])
            shards.append(
                {"name": name, "samples": written, "bags": int((bags >= 0).sum()), "sha256": sha256_file(tmp / name)}
            )
        stats = bag_stats(items)
        manifest = {
            "format": FORMAT,
            "samples": sum(s["samples"] for s in shards),
            "bags": stats.bags,
            "bag_stats": {"bags": stats.bags, "max_cooccurring": stats.max_cooccurring},
            "shards": shards,
            "source": source or {},
            "unreadable": unreadable[:100],
            "num_unreadable": len(unreadable),
            "verified": verify,
            "seconds": round(time.perf_counter() - t0, 2),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json(tmp / MANIFEST, manifest)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _shard_plan(items: ImageList, per_shard: int) -> Iterator[np.ndarray]:
    """Runs of image positions, whole bags each, of about ``per_shard`` images (bag-less images one by one)."""
    ids, offsets, order = items.bag_members()
    units = [order[offsets[b] : offsets[b + 1]] for b in range(len(ids))]
    units += [np.array([i]) for i in np.flatnonzero(items.bags < 0)]
    current: list[np.ndarray] = []
    size = 0
    for unit in units:
        current.append(unit)
        size += len(unit)
        if size >= per_shard:
            yield np.concatenate(current)
            current, size = [], 0
    if current:
        yield np.concatenate(current)


def _rel(items: ImageList, i: int) -> str:
    return "" if items.in_memory else os.fsdecode(items.blob[items.starts[i] : items.ends[i]].tobytes())


def _sample_bytes(
    items: ImageList, i: int, array: np.ndarray | None, unreadable: list[str], verify: bool
) -> tuple[str, bytes | None]:
    """The image's original bytes and extension (in-memory rows as PNG); unreadable files (and, with ``verify``,
    files that do not decode completely) are listed and skipped."""
    if items.in_memory:
        assert array is not None, "in-memory items need their array"
        buf = io.BytesIO()
        Image.fromarray(array[i]).save(buf, format="PNG")
        return "png", buf.getvalue()
    path = items.path(i)
    assert path is not None
    try:
        data = path.read_bytes()
        if verify:
            decode_bytes(data, str(path))
    except OSError as e:
        unreadable.append(f"{path}: {e.strerror or e}")
        return "", None
    except ImageError as e:
        unreadable.append(str(e))
        return "", None
    ext = path.suffix.lower().lstrip(".") or "jpg"
    return ("jpg" if ext == "jpeg" else ext), data


def read_manifest(root: str | Path) -> dict[str, Any]:
    """A shard folder's manifest.

    Raises:
        MissingFileError: no ``manifest.json`` (not a shard folder, or writing did not finish).
        DatasetLayoutError: a manifest of another format, or a listed shard that is missing.
    """
    root = Path(root)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        raise MissingFileError(
            f"{root} holds no shards ({MANIFEST} missing): write them with `reid_ssl prepare shards`"
        ) from None
    except ValueError as e:
        raise DatasetLayoutError(f"{root / MANIFEST} is not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise DatasetLayoutError(f"{root / MANIFEST} is not a reid_ssl shard manifest")
    missing = [s["name"] for s in manifest["shards"] if not (root / s["name"]).is_file()]
    if missing:
        raise DatasetLayoutError(f"{root}: shards listed in the manifest are missing: {missing[:3]}")
    return manifest


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------


def assign_shards(
    num_shards: int, seed: int, epoch: int, rank: int, world: int, worker: int, workers: int
) -> list[int]:
    """The shards worker ``worker`` of rank ``rank`` reads in ``epoch``: disjoint, together all of them."""
    order = np.random.default_rng([seed, epoch]).permutation(num_shards)
    return order[rank::world][worker::workers].tolist()


class ShardStream(IterableDataset):
    """Two augmented views per sample, streamed from shards (module docstring).

    Yields ``(view_a, view_b, bad, shard, position, image)``; ``bad`` is a line per unreadable image that was
    replaced by another of the same shard ('' when none); ``image`` is the sample's position in the source
    list the shards were written from.

    Args:
        root: the shard folder.
        view_a, view_b: the two augmentation pipelines (PIL image -> tensor).
        bag_positives: the second view from another image of the same bag (within the shard).
        seed, rank, world_size: the run's seed and this process's place in it.
    """

    def __init__(
        self,
        root: str | Path,
        view_a: Callable[[Image.Image], torch.Tensor],
        view_b: Callable[[Image.Image], torch.Tensor],
        bag_positives: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.view_a, self.view_b, self.bag_positives = view_a, view_b, bag_positives
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.skip: dict[int, int] = {}

    @property
    def num_samples(self) -> int:
        return int(self.manifest["samples"])

    def set_epoch(self, epoch: int, consumed: dict[int, int] | None = None) -> None:
        """Read ``epoch`` next, skipping the first ``consumed[shard]`` samples of each shard (a resume)."""
        self.epoch, self.skip = epoch, dict(consumed or {})

    def samples_per_rank(self, epoch: int, skip: dict[int, int]) -> list[int]:
        """Samples every rank reads in ``epoch`` when the first ``skip[shard]`` of each shard are skipped."""
        shards = self.manifest["shards"]
        counts = []
        for rank in range(self.world_size):
            mine = assign_shards(len(shards), self.seed, epoch, rank, self.world_size, 0, 1)
            counts.append(sum(max(0, shards[s]["samples"] - skip.get(s, 0)) for s in mine))
        return counts

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, str, int, int, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = self.manifest["shards"]
        for shard in assign_shards(len(shards), self.seed, self.epoch, self.rank, self.world_size, worker, workers):
            if self.skip.get(shard, 0) >= shards[shard]["samples"]:
                continue  # trained on before a resume
            yield from self._shard(shard, shards[shard]["name"])

    def _shard(self, shard: int, name: str) -> Iterator[tuple[torch.Tensor, torch.Tensor, str, int, int, int]]:
        import webdataset as wds

        records = list(
            wds.WebDataset(
                str(self.root / name), shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
            )
        )
        order = np.random.default_rng([self.seed, self.epoch, shard]).permutation(len(records))
        bags: dict[int, list[int]] = {}
        metas = [json.loads(r["json"]) for r in records]
        for k, meta in enumerate(metas):
            bags.setdefault(meta["bag"], []).append(k)
        for position in range(self.skip.get(shard, 0), len(order)):
            k = int(order[position])
            partner = (
                _pick(bags[metas[k]["bag"]], (self.seed, self.epoch, shard, position))
                if self.bag_positives and metas[k]["bag"] >= 0
                else k
            )
            reasons: list[str] = []
            first = self._decode(records[k], name, reasons)
            second = first if partner == k else self._decode(records[partner], name, reasons)
            if first is None or second is None:  # replaced by a readable image of the same shard
                decoded = (self._decode(records[int(j)], name, []) for j in order)
                alt = next((im for im in decoded if im is not None), None)
                if alt is None:
                    continue
                first = second = alt
            yield self.view_a(first), self.view_b(second), "\n".join(reasons), shard, position, metas[k]["index"]

    @staticmethod
    def _decode(record: dict[str, Any], shard: str, reasons: list[str]) -> Image.Image | None:
        key = next((k for k in record if k not in ("json", "__key__", "__url__", "__local_path__")), None)
        name = f"{shard}/{record.get('__key__')}"
        if key is None:
            reasons.append(f"{name}: no image in the sample")
            return None
        try:
            return decode_bytes(record[key], name)
        except ImageError as e:
            reasons.append(str(e))
            return None


def _pick(members: list[int], key: tuple[int, ...]) -> int:
    """A member chosen by ``key`` alone, so a resumed epoch draws what the uninterrupted one would have."""
    return members[int(np.random.default_rng(list(key)).integers(len(members)))]
