"""Every dataset reid_ssl knows, in one registry: :data:`DATASETS`.

A dataset entry says what the dataset can give:

* ``ssl``: unlabeled training images (``data.source`` in a config; ``reid_ssl train``);
* ``reid``: query / gallery (and train) lists of ``(img_path, pid, camid)`` (``reid_ssl eval``, ``finetune``,
  the training monitor, and ``index build --images <name>``, which indexes the gallery and calibrates with
  the queries);
* ``classification``: labelled train / test images (``reid_ssl eval --protocol knn|linear``).

Config validation and every command read their choices from here, so a new dataset layout is one loader
function (or a few) and one ``DATASETS.register`` call. Layouts, with a tree of each: datasets/README.md.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from reid_ssl.data import classification as cls
from reid_ssl.data import reid, ssl_sources
from reid_ssl.data.image_list import ImageList
from reid_ssl.errors import DatasetLayoutError, InputError
from reid_ssl.registry import Registry

if TYPE_CHECKING:
    from reid_ssl.config import DataConfig

DATA_ROOT = "data"


@dataclass(frozen=True)
class DatasetSpec:
    """What one dataset provides; ``None`` for what it does not.

    Attributes:
        description: one line for ``--help``.
        default_root: where ``--root`` / ``data.root`` points when not given.
        ssl: ``(root, data_config) -> ImageList``: unlabeled training images.
        array: ``root -> (N, H, W[, C]) uint8``: the in-memory images that ``SSLItem.index`` refers to.
        reid: ``(root, **options) -> ReidSplit``: re-ID evaluation lists.
        classification: ``(root, "train" | "test") -> LabeledSet``.
        pid_is_tracklet: the "identities" of ``reid`` are tracklets (no identity ground truth exists).
        how: the command that builds the dataset (named in "not found" errors), when reid_ssl can build it.
        stream: training images are streamed (tar shards) rather than listed: ``reid_ssl.train.feed`` reads them.
    """

    description: str
    default_root: str = DATA_ROOT
    ssl: Callable[[Path, DataConfig], ImageList] | None = None
    array: Callable[[Path], np.ndarray] | None = None
    reid: Callable[..., reid.ReidSplit] | None = None
    classification: Callable[[Path, str], cls.LabeledSet] | None = None
    pid_is_tracklet: bool = False
    how: str = ""  # the command that builds the dataset, when reid_ssl can build it
    stream: bool = False


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def _ssl_reid_train(name: str) -> Callable[[Path, DataConfig], ImageList]:
    return lambda root, data: ssl_sources.reid_train_source(name, root, reid.train_folders(name))


def _list_file(data: DataConfig) -> Path | None:
    return Path(data.list_file) if data.list_file else None


def _list_source(root: Path, data: DataConfig) -> ImageList:
    if not data.list_file:
        raise InputError("data.source=list needs data.list_file (a text file of image paths, one per line)")
    return ssl_sources.list_source(root, Path(data.list_file))


DATASETS.register(
    "folder",
    DatasetSpec(
        "any folder of images (recursive); sub-folders are bags", ssl=lambda r, d: ssl_sources.folder_source(r)
    ),
)
DATASETS.register(
    "list",
    DatasetSpec("a text file of image paths (data.list_file), relative to data.root", ssl=_list_source),
)
DATASETS.register(
    "imagenet",
    DatasetSpec(
        "ImageNet layout train/<class>/*, val/<class>/* (labels only for kNN / linear probe)",
        ssl=lambda r, d: ssl_sources.imagenet_source(r),
        classification=cls.image_folder_split,
    ),
)
DATASETS.register(
    "sysu30k",
    DatasetSpec(
        "SYSU-30k: train bags sysu_train_set_all/, test set sysu_test_set_all/ (1,000 queries, 478,730 distractors)",
        ssl=lambda r, d: ssl_sources.sysu30k_source(r, _list_file(d)),
        reid=reid.load_sysu30k,
    ),
)
DATASETS.register(
    "market1501",
    DatasetSpec(
        "Market-1501: bounding_box_train/, query/, bounding_box_test/",
        ssl=_ssl_reid_train("market1501"),
        reid=reid.load_market1501,
    ),
)
DATASETS.register(
    "dukemtmcreid",
    DatasetSpec(
        "DukeMTMC-reID: bounding_box_train/, query/, bounding_box_test/",
        ssl=_ssl_reid_train("dukemtmcreid"),
        reid=reid.load_dukemtmcreid,
    ),
)
DATASETS.register(
    "msmt17",
    DatasetSpec(
        "MSMT17 V1 or V2: train/, test/, list_{train,query,gallery}.txt",
        ssl=_ssl_reid_train("msmt17"),
        reid=reid.load_msmt17,
    ),
)
DATASETS.register(
    "cuhk03",
    DatasetSpec("CUHK03 as torchreid prepares it: images_{detected,labeled}/, splits_*.json", reid=reid.load_cuhk03),
)


def _tracklet_datasets(name: str, default_root: str, how: str, what: str) -> None:
    """``name`` (training bags + test split) and ``name-val`` (the validation split) of a ``prepare`` output."""
    DATASETS.register(
        name,
        DatasetSpec(
            f"{what}: train/<tracklet>/ bags, market/ test split of pseudo-identities (built by `{how}`)",
            default_root=default_root,
            ssl=lambda r, d: ssl_sources.bags_source(r, how),
            reid=lambda r, **o: reid.load_tracklet_split(name, r, "market", how),
            pid_is_tracklet=True,
            how=how,
        ),
    )
    DATASETS.register(
        f"{name}-val",
        DatasetSpec(
            f"the validation split of {name} (market_val/): choose recipes here, report on {name}",
            default_root=default_root,
            reid=lambda r, **o: reid.load_tracklet_split(f"{name}-val", r, "market_val", how),
            pid_is_tracklet=True,
            how=how,
        ),
    )


_tracklet_datasets("pets09", "data/pets09", "reid_ssl prepare pets09 --fetch", "PETS09-S2L1 tracklets")
_tracklet_datasets("video", "data/video", "reid_ssl prepare video VIDEO --out DIR --split", "your footage")
DATASETS.register(
    "market-layout",
    DatasetSpec(
        "any folder in Market-1501 layout: query/, bounding_box_test/ (optional bounding_box_train/)",
        reid=reid.load_market_layout,
    ),
)
DATASETS.register(
    "fashion-mnist",
    DatasetSpec(
        "Fashion-MNIST IDX files (Debian dataset-fashion-mnist); labels only for kNN / linear probe",
        default_root=cls.FASHION_MNIST_ROOT,
        ssl=lambda r, d: ssl_sources.fashion_mnist_source(r),
        array=ssl_sources.fashion_mnist_images,
        classification=cls.fashion_mnist_split,
    ),
)

DATASETS.register(
    "shards",
    DatasetSpec(
        "WebDataset-style tar shards of any source above, streamed to every process and worker",
        stream=True,
        how="reid_ssl prepare shards SOURCE --root DIR --out SHARDS",
    ),
)

SSL_SOURCES = partial(DATASETS.names, lambda s: s.ssl is not None or s.stream)
REID_DATASETS = partial(DATASETS.names, lambda s: s.reid is not None)
CLASSIFICATION_DATASETS = partial(DATASETS.names, lambda s: s.classification is not None)


def default_root(name: str) -> str:
    """Where ``--root`` points for dataset ``name`` when it is not given."""
    return DATASETS[name].default_root


def resolve_root(name: str, root: str | Path | None) -> Path:
    """``root``, or dataset ``name``'s usual folder when ``root`` is empty."""
    return Path(root if root not in (None, "") else default_root(name)).expanduser()


def resolve_positives(data: DataConfig, packed_from: str | None = None) -> str:
    """``data.positives`` with ``auto`` decided: ``bag`` when the source's bags are tracklets of one person (a
    dataset registered with ``pid_is_tracklet``: pets09, video; for ``shards``, ``packed_from`` names the source
    they were packed from), ``augment`` otherwise (a folder's sub-folders or SYSU-30k's bags may hold several
    people, ImageNet's folders are classes)."""
    if data.positives != "auto":
        return data.positives
    name = packed_from if DATASETS[data.source].stream else data.source
    return "bag" if name is not None and name in DATASETS and DATASETS[name].pid_is_tracklet else "augment"


def build_source(data: DataConfig) -> ImageList:
    """The unlabeled training items of ``data.source`` (a deterministic subset when ``data.max_images``).

    Raises:
        UnknownNameError: the source is not registered; InputError: it gives no training images.
        DatasetLayoutError: nothing usable under ``data.root``.
    """
    spec = DATASETS[data.source]
    if spec.ssl is None:
        if spec.stream:
            raise InputError(f"data.source={data.source!r} is streamed, not listed: the training loop reads it")
        raise InputError(f"dataset {data.source!r} has no training images; data.source is one of {list(SSL_SOURCES())}")
    root = resolve_root(data.source, data.root)
    items = spec.ssl(root, data)
    if data.max_images and len(items) > data.max_images:
        items = items.subset(np.array(sorted(random.Random(0).sample(range(len(items)), data.max_images))))
    if not items:
        raise DatasetLayoutError(f"no images found for data.source={data.source!r} under {root}")
    return items


def source_array(data: DataConfig) -> np.ndarray | None:
    """The in-memory images of ``data.source`` (Fashion-MNIST), or ``None`` for file-based sources."""
    spec = DATASETS[data.source]
    return spec.array(resolve_root(data.source, data.root)) if spec.array is not None else None


def load_split(name: str, root: str | Path | None = None, **options: Any) -> reid.ReidSplit:
    """Query / gallery / train lists of a re-ID dataset.

    Args:
        name: a dataset with re-ID lists (:func:`REID_DATASETS`).
        root: the dataset folder or a parent holding it (default: the dataset's ``default_root``).
        options: dataset-specific (cuhk03: ``labeled``, ``classic``, ``split_id``).

    Raises:
        UnknownNameError: unknown dataset name (lists the choices).
        DatasetLayoutError: missing root or wrong layout (names the expected folder and what was found).
    """
    spec = DATASETS[name]
    if spec.reid is None:
        raise InputError(f"dataset {name!r} has no re-ID split; choose one of {list(REID_DATASETS())}")
    path = resolve_root(name, root)
    if not path.is_dir():
        hint = f"; build it with: {spec.how}" if spec.how else ""
        raise DatasetLayoutError(f"{name}: dataset root {path} not found ({reid.listing(path)}){hint}")
    return spec.reid(path, **options)


def load_labeled(name: str, root: str | Path | None, split: str) -> cls.LabeledSet:
    """A classification dataset's ``train`` or ``test`` split (images and labels)."""
    spec = DATASETS[name]
    if spec.classification is None:
        raise InputError(f"dataset {name!r} has no class labels; choose one of {list(CLASSIFICATION_DATASETS())}")
    return spec.classification(resolve_root(name, root), split)
