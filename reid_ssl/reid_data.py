"""Re-ID dataset layouts -> lists of ``(img_path, pid, camid)`` for train / query / gallery.

The lists follow torchreid's contract (camid 0-based; Market/Duke junk images with pid -1 dropped, as torchreid
drops them; pid 0000 distractors kept as ordinary wrong matches), so numbers computed on them are comparable
with torchreid's. Each loader accepts the dataset folder itself or a parent holding it under torchreid's folder
name, and says which folder it expected and what it found when the layout does not match.

SYSU-30k (test set only) and PETS09 are also registered as torchreid image datasets
(:func:`register_torchreid_datasets`), so torchreid users can test on (and train on) them by name.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from reid_ssl.images import is_image_name, open_rgb

Item = tuple[str, int, int]  # (img_path, pid, camid), torchreid's contract

DEFAULT_ROOT = "data"
PETS09_ROOT = "data/pets09"
SYSU_DISTRACTOR_DIR = "0000others"
SYSU_DISTRACTOR_PID = -1000  # SYSU-30k's test script: distractors are wrong matches, not junk
PETS09_NOTE = (
    "PETS09 identities are tracklet ids: one person can own several tracklets, so a correct match to another "
    "tracklet of the same person counts as wrong; rank-1 and mAP undercount true performance."
)
_MARKET_NAME = re.compile(r"^([-\d]+)_c(\d+)")
_MARKET_DIRS = ("bounding_box_train", "query", "bounding_box_test")


class DatasetLayoutError(ValueError):
    """A dataset root that is missing or does not have the expected layout."""


@dataclass
class ReidSplit:
    """One re-ID benchmark split: three lists of ``(img_path, pid, camid)``."""

    name: str
    root: Path  # the folder the lists were read from
    train: list[Item]
    query: list[Item]
    gallery: list[Item]
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, dict[str, int]]:
        """Images, identities and cameras per subset."""
        return {
            name: {"images": len(items), "ids": len({p for _, p, _ in items}), "cameras": len({c for _, _, c in items})}
            for name, items in (("train", self.train), ("query", self.query), ("gallery", self.gallery))
        }


# ---------------------------------------------------------------------------------------------------------
# Layout helpers
# ---------------------------------------------------------------------------------------------------------


def _listing(folder: Path, limit: int = 8) -> str:
    """What a folder holds, for error messages."""
    if not folder.exists():
        return "the folder does not exist"
    if not folder.is_dir():
        return "it is a file, not a folder"
    names = sorted(os.listdir(folder))
    if not names:
        return "an empty folder"
    shown = ", ".join(n + ("/" if (folder / n).is_dir() else "") for n in names[:limit])
    return shown + (f", ... ({len(names)} entries)" if len(names) > limit else "")


def _find_root(name: str, root: Path, candidates: Sequence[str], required: Sequence[str]) -> Path:
    """The first of ``root/<candidate>`` that holds every ``required`` entry."""
    for cand in candidates:
        base = root / cand if cand else root
        if all((base / r).exists() for r in required):
            return base
    where = " or ".join(str(root / c) if c else str(root) for c in candidates)
    raise DatasetLayoutError(f"{name}: expected {', '.join(required)} in {where}; found in {root}: {_listing(root)}")


def _image_files(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (not recursive), sorted."""
    with os.scandir(folder) as it:
        return sorted(Path(e.path) for e in it if e.is_file() and is_image_name(e.name))


def read_market_dir(folder: str | Path, drop_junk: bool = True) -> list[Item]:
    """Items of one Market-1501-style folder: names ``PPPP_cC...`` (pid, 1-based camera).

    pid -1 (junk) images are dropped when ``drop_junk`` (torchreid does the same); camid becomes 0-based.

    Raises:
        DatasetLayoutError: a file name that does not start with ``<pid>_c<camera>``.
    """
    folder = Path(folder)
    items: list[Item] = []
    bad: list[str] = []
    for path in _image_files(folder):
        match = _MARKET_NAME.match(path.name)
        if match is None:
            bad.append(path.name)
            continue
        pid, cam = int(match.group(1)), int(match.group(2))
        if pid == -1 and drop_junk:
            continue
        items.append((str(path), pid, cam - 1))
    if bad:
        raise DatasetLayoutError(
            f"{folder}: {len(bad)} image names do not follow the Market-1501 pattern "
            f"<pid>_c<camera>... (e.g. {', '.join(bad[:3])})"
        )
    return items


def _market_split(name: str, root: Path, candidates: Sequence[str], require_train: bool = False) -> ReidSplit:
    required = list(_MARKET_DIRS if require_train else _MARKET_DIRS[1:])
    base = _find_root(name, root, candidates, [d + "/" for d in required])
    train_dir = base / "bounding_box_train"
    train = read_market_dir(train_dir) if train_dir.is_dir() else []
    split = ReidSplit(name, base, train, read_market_dir(base / "query"), read_market_dir(base / "bounding_box_test"))
    if not train_dir.is_dir():
        split.notes.append(f"no {train_dir.name}/ folder: the train list is empty")
    _check_nonempty(split)
    return split


def _check_nonempty(split: ReidSplit) -> None:
    for subset in ("query", "gallery"):
        if not getattr(split, subset):
            raise DatasetLayoutError(f"{split.name}: the {subset} list under {split.root} is empty")


# ---------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------


def load_market1501(root: Path) -> ReidSplit:
    """Market-1501: ``market1501/[Market-1501-v15.09.15/]{bounding_box_train,query,bounding_box_test}``."""
    cands = ["", "Market-1501-v15.09.15", "market1501", "market1501/Market-1501-v15.09.15"]
    return _market_split("market1501", root, cands, require_train=True)


def load_dukemtmcreid(root: Path) -> ReidSplit:
    """DukeMTMC-reID: ``dukemtmc-reid/DukeMTMC-reID/{bounding_box_train,query,bounding_box_test}``."""
    cands = ["", "DukeMTMC-reID", "dukemtmc-reid", "dukemtmc-reid/DukeMTMC-reID"]
    return _market_split("dukemtmcreid", root, cands, require_train=True)


def load_market_layout(root: Path) -> ReidSplit:
    """Any folder in Market-1501 layout (``query/``, ``bounding_box_test/``, optional ``bounding_box_train/``)."""
    return _market_split("market-layout", root, [""])


def load_pets09(root: Path) -> ReidSplit:
    """The PETS09-S2L1 retrieval split written by :mod:`reid_ssl.pets09` (``<root>/market/``)."""
    split = _market_split("pets09", root, ["market", ""])
    split.notes.append(PETS09_NOTE)
    return split


def _msmt_list(list_path: Path, image_dir: Path) -> list[Item]:
    items: list[Item] = []
    for lineno, line in enumerate(list_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        fields = Path(parts[0]).name.split("_") if parts else []
        if len(parts) != 2 or len(fields) < 3 or not parts[1].lstrip("-").isdigit() or not fields[2].isdigit():
            raise DatasetLayoutError(
                f"{list_path}:{lineno}: expected '<pid>/<pid>_<n>_<camera>_....jpg <pid>', got {line.strip()[:80]!r}"
            )
        items.append((str(image_dir / parts[0]), int(parts[1]), int(fields[2]) - 1))
    return items


def load_msmt17(root: Path) -> ReidSplit:
    """MSMT17 (V1 or V2): ``msmt17/MSMT17_V1/{train,test,list_train.txt,list_query.txt,list_gallery.txt}``
    (V2: ``mask_train_v2``, ``mask_test_v2``)."""
    versions = {"MSMT17_V1": ("train", "test"), "MSMT17_V2": ("mask_train_v2", "mask_test_v2")}
    for parent in (root, root / "msmt17"):
        for version, (train_name, test_name) in versions.items():
            for base in (parent / version, parent):
                if (base / "list_query.txt").is_file() and (base / test_name).is_dir():
                    test_dir = base / test_name
                    query = _msmt_list(base / "list_query.txt", test_dir)
                    gallery = (
                        _msmt_list(base / "list_gallery.txt", test_dir) if (base / "list_gallery.txt").is_file() else []
                    )
                    train_list = base / "list_train.txt"
                    train = _msmt_list(train_list, base / train_name) if train_list.is_file() else []
                    split = ReidSplit("msmt17", base, train, query, gallery)
                    _check_nonempty(split)
                    return split
    raise DatasetLayoutError(
        f"msmt17: expected list_query.txt, list_gallery.txt and test/ (V2: mask_test_v2/) in "
        f"{root}/msmt17/MSMT17_V1 or {root}/msmt17/MSMT17_V2; found in {root}: {_listing(root)}"
    )


def load_cuhk03(root: Path, labeled: bool = False, classic: bool = False, split_id: int = 0) -> ReidSplit:
    """CUHK03 as torchreid prepares it: ``cuhk03/{images_detected,images_labeled}/`` and
    ``splits_{new,classic}_{detected,labeled}.json`` (written by torchreid from the raw ``.mat`` files).

    The JSON files store absolute paths from the machine that converted them; paths that no longer exist are
    re-rooted to this folder's ``images_*`` directory.
    """
    kind = "labeled" if labeled else "detected"
    split_file = f"splits_{'classic' if classic else 'new'}_{kind}.json"
    base = _find_root("cuhk03", root, ["", "cuhk03"], [split_file, f"images_{kind}/"])
    try:
        splits = json.loads((base / split_file).read_text())
    except (OSError, ValueError) as e:
        raise DatasetLayoutError(f"cuhk03: cannot read {base / split_file}: {e}") from None
    if not isinstance(splits, list) or not 0 <= split_id < len(splits):
        raise DatasetLayoutError(
            f"cuhk03: {split_file} has {len(splits) if isinstance(splits, list) else 0} "
            f"splits; split_id {split_id} does not exist"
        )
    image_dir = base / f"images_{kind}"

    def reroot(items: Iterable[Sequence[Any]]) -> list[Item]:
        out = []
        for path, pid, camid in items:
            p = Path(path)
            out.append((str(p if p.is_file() else image_dir / p.name), int(pid), int(camid)))
        return out

    s = splits[split_id]
    split = ReidSplit("cuhk03", base, reroot(s["train"]), reroot(s["query"]), reroot(s["gallery"]))
    _check_nonempty(split)
    if not Path(split.query[0][0]).is_file():
        raise DatasetLayoutError(f"cuhk03: {split.query[0][0]} (from {split_file}) does not exist")
    return split


def _sysu_camid(name: str) -> int:
    """SYSU-30k camera: the first character after the first 'c' of the file name (0-based); -1 if none."""
    i = name.find("c")
    return int(name[i + 1]) - 1 if 0 <= i < len(name) - 1 and name[i + 1].isdigit() else -1


def load_sysu30k(root: Path) -> ReidSplit:
    """SYSU-30k test set: ``sysu_test_set_all/query/<id>/*.jpg`` (1,000) and ``gallery/<id>/*.jpg`` plus the
    ``gallery/0000others/`` distractors (pid -1000: wrong matches, not junk). No train list (test only)."""
    cands = ["", "sysu_test_set_all", "sysu30k", "sysu30k/sysu_test_set_all"]
    base = _find_root("sysu30k", root, cands, ["query/", "gallery/"])

    def read(folder: Path, distractors: bool) -> list[Item]:
        items: list[Item] = []
        with os.scandir(folder) as it:
            subdirs = sorted(e.name for e in it if e.is_dir())
        for sub in subdirs:
            if sub == SYSU_DISTRACTOR_DIR and distractors:
                pid = SYSU_DISTRACTOR_PID
            elif sub.isdigit():
                pid = int(sub)
            else:
                raise DatasetLayoutError(
                    f"sysu30k: {folder / sub} is not an identity folder (<digits>/"
                    + (f" or {SYSU_DISTRACTOR_DIR}/" if distractors else "")
                    + ")"
                )
            items += [(str(p), pid, _sysu_camid(p.name)) for p in _image_files(folder / sub)]
        return items

    split = ReidSplit("sysu30k", base, [], read(base / "query", False), read(base / "gallery", True))
    _check_nonempty(split)
    split.notes.append("SYSU-30k's official metric is rank-1 (one true match per query, so mAP is about MRR)")
    if not (base / "gallery" / SYSU_DISTRACTOR_DIR).is_dir():
        split.notes.append(f"no gallery/{SYSU_DISTRACTOR_DIR}/ folder: evaluating without the distractors")
    return split


REID_DATASETS: dict[str, Callable[..., ReidSplit]] = {
    "market1501": load_market1501,
    "dukemtmcreid": load_dukemtmcreid,
    "msmt17": load_msmt17,
    "cuhk03": load_cuhk03,
    "sysu30k": load_sysu30k,
    "pets09": load_pets09,
    "market-layout": load_market_layout,
}


def default_root(name: str) -> str:
    """Where ``--root`` points when it is not given."""
    return PETS09_ROOT if name == "pets09" else DEFAULT_ROOT


def load_split(name: str, root: str | Path | None = None, **options: Any) -> ReidSplit:
    """Query / gallery / train lists of a dataset from :data:`REID_DATASETS`.

    Args:
        name: dataset name.
        root: the dataset folder or a parent holding it (default: :func:`default_root`).
        options: dataset-specific (cuhk03: ``labeled``, ``classic``, ``split_id``).

    Raises:
        KeyError: unknown dataset name (lists the choices).
        DatasetLayoutError: missing root or wrong layout (names the expected folder and what was found).
    """
    if name not in REID_DATASETS:
        raise KeyError(f"unknown re-ID dataset {name!r}; choose one of {sorted(REID_DATASETS)}")
    path = Path(root if root is not None else default_root(name)).expanduser()
    if not path.is_dir():
        raise DatasetLayoutError(f"{name}: dataset root {path} not found ({_listing(path)})")
    return REID_DATASETS[name](path, **options)


def relabel(items: Sequence[Item]) -> list[Item]:
    """Train items with pids mapped to 0..N-1 (sorted by original pid), as classifiers need."""
    mapping = {pid: i for i, pid in enumerate(sorted({pid for _, pid, _ in items}))}
    return [(path, mapping[pid], camid) for path, pid, camid in items]


# ---------------------------------------------------------------------------------------------------------
# torchreid bridge
# ---------------------------------------------------------------------------------------------------------


def import_torchreid() -> ModuleType:
    """``import torchreid`` (PyPI 0.2.5), without its "Cython evaluation unavailable" warning.

    Use attribute access only (``torchreid.metrics.evaluate_rank``): ``from torchreid.utils import X`` fails
    on 0.2.5.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Cython evaluation.*")
        try:
            import torchreid
        except ImportError as e:
            raise ImportError(
                f"torchreid cannot be imported ({e}); PyPI torchreid 0.2.5 declares no "
                "dependencies: install scipy, gdown, opencv-python-headless and tensorboard"
            ) from e
    return torchreid


def torchreid_dataset_class(name: str, split: ReidSplit | None = None, **options: Any) -> type:
    """A ``torchreid.data.ImageDataset`` subclass that reads ``name`` with :func:`load_split`.

    With ``split`` the class serves those lists whatever root torchreid passes. Train pids are relabelled to
    0..N-1. A dataset without a train list (SYSU-30k) gets a one-image stub, because torchreid's ``Dataset``
    indexes ``train[0]``; training on it is meaningless. Images are opened with
    :func:`reid_ssl.images.open_rgb`, which raises on a corrupt file (torchreid's ``read_image`` retries
    forever).
    """
    if name not in REID_DATASETS:
        raise KeyError(f"unknown re-ID dataset {name!r}; choose one of {sorted(REID_DATASETS)}")
    torchreid = import_torchreid()
    base: type = torchreid.data.ImageDataset
    fixed = dict(options)

    def __init__(self: Any, root: str = "", **kwargs: Any) -> None:
        opts = dict(fixed)
        for key, ours in (("cuhk03_labeled", "labeled"), ("cuhk03_classic_split", "classic"), ("split_id", "split_id")):
            value = kwargs.pop(key, None)
            if name == "cuhk03" and value is not None and ours not in fixed:
                opts[ours] = value
        data = split if split is not None else load_split(name, root or None, **opts)
        train = relabel(data.train) or [(data.query[0][0], 0, data.query[0][2])]
        self.reid_ssl_split = data
        base.__init__(self, train, data.query, data.gallery, **kwargs)

    def __getitem__(self: Any, index: int) -> dict[str, Any]:
        img_path, pid, camid, dsetid = self.data[index]
        img = open_rgb(img_path)
        if self.transform is not None:
            img = self._transform_image(self.transform, self.k_tfm, img)
        return {"img": img, "pid": pid, "camid": camid, "impath": img_path, "dsetid": dsetid}

    cls_name = "ReidSsl" + "".join(part.capitalize() for part in re.split(r"[^a-zA-Z0-9]", name) if part)
    return type(
        cls_name,
        (base,),
        {
            "__init__": __init__,
            "__getitem__": __getitem__,
            "_junk_pids": [SYSU_DISTRACTOR_PID] if name == "sysu30k" else [0, -1],
        },
    )


def register_torchreid_datasets(names: Sequence[str] = ("sysu30k", "pets09"), prefix: str = "") -> list[str]:
    """Register datasets with ``torchreid.data.register_image_dataset`` under ``prefix + name``.

    Safe to call twice (a name torchreid already knows is left as it is). Returns the registered names.
    """
    torchreid = import_torchreid()
    registered = []
    for name in names:
        key = prefix + name
        try:
            torchreid.data.register_image_dataset(key, torchreid_dataset_class(name))
        except ValueError as e:
            if "already" not in str(e).lower() and "exist" not in str(e).lower():
                raise
        registered.append(key)
    return registered
