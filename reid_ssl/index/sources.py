"""What to index: a data set name, a Market-1501-layout folder, any folder of images, or image files.

* A data set name with a re-ID split (``DATASETS[name].reid``, e.g. ``pets09``, ``market1501``) is read with
  :func:`reid_ssl.data.datasets.load_split`: the gallery is ``split.gallery``, the queries that calibrate the
  "no match" threshold are ``split.query``; pid, camid and junk handling are the dataset's (torchreid's).
* A folder with ``bounding_box_test/`` (Market-1501 layout) indexes every image under it and keeps the images of
  ``query/`` for calibration; any other folder is indexed recursively. Folders are walked by
  :func:`reid_ssl.images.iter_images`; files whose real path leaves the folder (symlinks out) are skipped and
  reported.
* pid / camid / frame come from Market-style file names (:func:`reid_ssl.data.market.parse_market_name`) where
  they match. Camera ids are 0-based: file name ``c1`` is camid 0.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from reid_ssl.data.datasets import DATA_ROOT, DATASETS, REID_DATASETS, load_split
from reid_ssl.data.market import parse_market_name
from reid_ssl.data.reid import ReidSplit
from reid_ssl.errors import DatasetLayoutError, InputError, MissingFileError
from reid_ssl.images import is_image_name, iter_images
from reid_ssl.index.sidecar import GalleryItem

MARKET_GALLERY = "bounding_box_test"
MARKET_QUERY = "query"

Skipped = tuple[str, str]  # (path, reason)


@dataclass
class GallerySource:
    """The images to index, the folders they live in, and where calibration queries come from.

    Attributes:
        items: gallery images, in index order.
        roots: resolved folders the index may show images from (the app reads images only under them).
        queries: labelled query images that calibrate the threshold (may be empty).
        skipped: ``(path, reason)`` of files that were found but are not indexed.
        pid_is_tracklet: the "identities" are tracklets (PETS09).
    """

    items: list[GalleryItem]
    roots: list[str]
    queries: list[GalleryItem] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    pid_is_tracklet: bool = False


def market_fields(name: str | Path, pid_is_tracklet: bool = False) -> dict[str, int | None] | None:
    """The :class:`GalleryItem` fields a Market-style file name gives: pid, camid (0-based), frame, tracklet.

    ``0002_c1s1_000451_03.jpg`` -> ``{"pid": 2, "camid": 0, "frame": 451, "tracklet": None}``; ``None`` when the
    name does not match. ``pid_is_tracklet`` marks data whose "identities" are tracklets (PETS09): then
    ``tracklet`` is the pid (for pids >= 0).
    """
    parsed = parse_market_name(name)
    if parsed is None:
        return None
    return {
        "pid": parsed.pid,
        "camid": parsed.camid,
        "frame": parsed.frame,
        "tracklet": parsed.pid if pid_is_tracklet and parsed.pid >= 0 else None,
    }


def _inside(path: Path, root: Path) -> tuple[str | None, Skipped | None]:
    """``(real path, None)``, or ``(None, (path, reason))`` when its real path leaves ``root`` (resolved)."""
    real = path.resolve()
    if not real.is_relative_to(root):
        return None, (str(path), f"symlink to {real}, outside the gallery folder {root}")
    return str(real), None


def folder_items(
    folder: str | Path, pid_is_tracklet: bool = False, source: str = "folder"
) -> tuple[list[GalleryItem], list[Skipped]]:
    """The images under ``folder`` (recursive, sorted), and the ones skipped because they lead outside it.

    Raises:
        MissingFileError: ``folder`` is not a folder.
    """
    root = Path(folder).resolve()
    items: list[GalleryItem] = []
    skipped: list[Skipped] = []
    for p in iter_images(folder):
        real, skip = _inside(p, root)
        if real is None:
            assert skip is not None  # _inside gives the reason with every None
            skipped.append(skip)
            continue
        items.append(GalleryItem(path=real, source=source, **(market_fields(p.name, pid_is_tracklet) or {})))
    return items, skipped


def path_items(paths: Iterable[str | Path], source: str = "cli") -> GallerySource:
    """Image files and folders (recursive) named by the user, as for ``index add``.

    Raises:
        MissingFileError: a path that does not exist.
    """
    out = GallerySource([], [])
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            got, skipped = folder_items(p, False, source)
            out.items += got
            out.skipped += skipped
            out.roots.append(str(p.resolve()))
        elif p.is_file():
            if not is_image_name(p.name):
                out.skipped.append((str(raw), "not an image file name"))
                continue
            real = p.resolve()
            out.items.append(GalleryItem(path=str(real), source=source, **(market_fields(p.name) or {})))
            out.roots.append(str(real.parent))
        else:
            raise MissingFileError(f"no such file or folder: {raw}")
    return out


# ---------------------------------------------------------------------------------------------------------
# Data sets
# ---------------------------------------------------------------------------------------------------------


def dataset_root(name: str, data_root: str | Path = DATA_ROOT) -> Path:
    """Where data set ``name`` lives when data sets live under ``data_root`` instead of ``data``.

    A dataset whose default root is ``data/<sub>`` (pets09: ``data/pets09``) is looked up in ``data_root/<sub>``.
    """
    default = Path(DATASETS[name].default_root)
    if default.parts[:1] == (DATA_ROOT,):
        return Path(data_root).joinpath(*default.parts[1:])
    return default


def _split(name: str, root: Path) -> ReidSplit:
    reid = DATASETS[name].reid
    if reid is not None and not root.is_dir():
        # load_split only says "not found"; the dataset's own loader says how to get it (pets09: reid_ssl prepare)
        reid(root)
    return load_split(name, root)


def _split_items(
    entries: Sequence[tuple[str, int, int]], root: Path, pid_is_tracklet: bool, source: str
) -> tuple[list[GalleryItem], list[Skipped]]:
    items: list[GalleryItem] = []
    skipped: list[Skipped] = []
    for path, pid, camid in entries:
        real, skip = _inside(Path(path), root)
        if real is None:
            assert skip is not None  # _inside gives the reason with every None
            skipped.append(skip)
            continue
        frame = (market_fields(path) or {}).get("frame")
        tracklet = pid if pid_is_tracklet and pid >= 0 else None
        items.append(GalleryItem(real, pid=pid, camid=camid, frame=frame, tracklet=tracklet, source=source))
    return items, skipped


def _common_folder(items: Sequence[GalleryItem]) -> list[str]:
    return [os.path.commonpath([os.path.dirname(it.path) for it in items])] if items else []


def dataset_source(name: str, data_root: str | Path = DATA_ROOT) -> GallerySource:
    """The gallery and query lists of a re-ID data set (see the module notes).

    Raises:
        UnknownNameError: not a dataset name; InputError: a dataset without a re-ID split.
        DatasetLayoutError: the dataset is missing or has the wrong layout (the message says how to get it).
    """
    spec = DATASETS[name]
    split = _split(name, dataset_root(name, data_root))
    root = split.root.resolve()
    items, skipped = _split_items(split.gallery, root, spec.pid_is_tracklet, "gallery")
    queries, q_skipped = _split_items(split.query, root, spec.pid_is_tracklet, "query")
    roots = _common_folder(items) + _common_folder(queries)
    return GallerySource(items, roots, queries, skipped + q_skipped, spec.pid_is_tracklet)


def market_folder_source(root: Path) -> GallerySource:
    """A folder in Market-1501 layout: every image of ``bounding_box_test/``; ``query/`` calibrates."""
    items, skipped = folder_items(root / MARKET_GALLERY, False, "gallery")
    src = GallerySource(items, [str((root / MARKET_GALLERY).resolve())], [], skipped)
    if (root / MARKET_QUERY).is_dir():
        src.queries, q_skipped = folder_items(root / MARKET_QUERY, False, "query")
        src.skipped += q_skipped
        src.roots.append(str((root / MARKET_QUERY).resolve()))
    return src


def gallery_source(images: str | Path, data_root: str | Path = DATA_ROOT) -> GallerySource:
    """Resolve ``index build --images``: a data set name, a Market-1501-layout folder, or any image folder.

    Args:
        images: a name of :func:`reid_ssl.data.datasets.REID_DATASETS`, or a folder.
        data_root: where data set names live (see :func:`dataset_root`).

    Raises:
        MissingFileError: neither a data set name nor an existing path (lists the data sets).
        InputError: a file, not a folder.
        DatasetLayoutError: a data set that is missing or malformed, or no image files under the folder.
    """
    name = str(images)
    if name in REID_DATASETS():
        src, where = dataset_source(name, data_root), Path(name)
    else:
        root = Path(images)
        if not root.exists():
            raise MissingFileError(f"no such image folder or data set: {name!r} (data sets: {list(REID_DATASETS())})")
        if not root.is_dir():
            raise InputError(f"--images must be a folder or a data set name, got the file {root}")
        if (root / MARKET_GALLERY).is_dir():
            src, where = market_folder_source(root), root / MARKET_GALLERY
        else:
            items, skipped = folder_items(root, False, "folder")
            src, where = GallerySource(items, [str(root.resolve())], [], skipped), root
    if not src.items:
        raise DatasetLayoutError(f"no image files under {where}")
    return src
