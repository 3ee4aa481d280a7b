"""Re-ID dataset layouts -> lists of ``(img_path, pid, camid)`` for train / query / gallery.

The lists follow torchreid's contract (camid 0-based, see :mod:`reid_ssl.data.market`; Market/Duke junk images with
pid -1 dropped, as torchreid drops them; pid 0000 distractors kept as ordinary wrong matches), so numbers computed
on them are comparable with torchreid's. Each loader accepts the dataset folder itself or a parent holding it under
torchreid's folder name, and says which folder it expected and what it found when the layout does not match.

SYSU-30k (test set only) and PETS09 are also registered as torchreid image datasets
(:func:`reid_ssl.data.torchreid_bridge.register_torchreid_datasets`), so torchreid users can test on (and train
on) them by name. The loaders are registered, with the other dataset kinds, in :mod:`reid_ssl.data.datasets`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reid_ssl.data.market import JUNK_PID, parse_market_name
from reid_ssl.errors import DatasetLayoutError
from reid_ssl.fileio import read_list_file
from reid_ssl.images import list_images

Item = tuple[str, int, int]  # (img_path, pid, camid), torchreid's contract

SYSU_DISTRACTOR_DIR = "0000others"
SYSU_DISTRACTOR_PID = -1000  # SYSU-30k's test script: distractors are wrong matches, not junk
TRACKLET_NOTE = (
    "identities are tracklet ids: one person can own several tracklets, so a correct match to another "
    "tracklet of the same person counts as wrong; rank-1 and mAP undercount true performance."
)
_MARKET_DIRS = ("bounding_box_train", "query", "bounding_box_test")


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


def listing(folder: Path, limit: int = 8) -> str:
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
    raise DatasetLayoutError(f"{name}: expected {', '.join(required)} in {where}; found in {root}: {listing(root)}")


def read_market_dir(folder: str | Path, drop_junk: bool = True) -> list[Item]:
    """Items of one Market-1501-style folder (not recursive): names ``PPPP_cC...``, see :mod:`reid_ssl.data.market`.

    pid -1 (junk) images are dropped when ``drop_junk`` (torchreid does the same).

    Raises:
        DatasetLayoutError: a file name that does not start with ``<pid>_c<camera>``.
    """
    folder = Path(folder)
    items: list[Item] = []
    bad: list[str] = []
    for path in list_images(folder, recursive=False):
        name = parse_market_name(path.name)
        if name is None:
            bad.append(path.name)
            continue
        if name.pid == JUNK_PID and drop_junk:
            continue
        items.append((str(path), name.pid, name.camid))
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


# Where each dataset's folder may sit under ``--root`` / ``data.root`` (torchreid's folder names first), shared by
# the evaluation split and the unlabeled training source, so both accept the same roots.
MARKET1501_ROOTS = ("", "Market-1501-v15.09.15", "market1501", "market1501/Market-1501-v15.09.15")
DUKE_ROOTS = ("", "DukeMTMC-reID", "dukemtmc-reid", "dukemtmc-reid/DukeMTMC-reID")
MSMT17_VERSIONS = {"MSMT17_V1": ("train", "test"), "MSMT17_V2": ("mask_train_v2", "mask_test_v2")}


def train_folders(name: str) -> tuple[str, ...]:
    """The places, relative to the root, where ``name``'s training images may be (first existing one wins)."""
    if name == "market1501":
        return tuple(f"{c}/bounding_box_train".lstrip("/") for c in MARKET1501_ROOTS)
    if name == "dukemtmcreid":
        return tuple(f"{c}/bounding_box_train".lstrip("/") for c in DUKE_ROOTS)
    if name == "msmt17":
        return tuple(
            f"{parent}/{base}/{train}".replace("//", "/").strip("/")
            for parent in ("", "msmt17")
            for version, (train, _) in MSMT17_VERSIONS.items()
            for base in (version, "")
        )
    raise KeyError(name)


def load_market1501(root: Path) -> ReidSplit:
    """Market-1501: ``market1501/[Market-1501-v15.09.15/]{bounding_box_train,query,bounding_box_test}``."""
    return _market_split("market1501", root, MARKET1501_ROOTS, require_train=True)


def load_dukemtmcreid(root: Path) -> ReidSplit:
    """DukeMTMC-reID: ``dukemtmc-reid/DukeMTMC-reID/{bounding_box_train,query,bounding_box_test}``."""
    return _market_split("dukemtmcreid", root, DUKE_ROOTS, require_train=True)


def load_market_layout(root: Path) -> ReidSplit:
    """Any folder in Market-1501 layout (``query/``, ``bounding_box_test/``, optional ``bounding_box_train/``)."""
    return _market_split("market-layout", root, [""])


def load_tracklet_split(name: str, root: Path, folder: str, how: str) -> ReidSplit:
    """A retrieval split of pseudo-identities written by ``reid_ssl prepare`` (:mod:`reid_ssl.data.video.split`):
    ``<root>/market/`` (test) or ``<root>/market_val/`` (validation). ``how`` is the command that builds it."""
    # the output folder, or the split folder itself (only under its own name, so a test split is never read as
    # the validation split or the other way round)
    try:
        split = _market_split(name, root, [folder, ""] if Path(root).name == folder else [folder])
    except DatasetLayoutError as e:
        raise DatasetLayoutError(f"{e}; {_why_no_split(Path(root), folder, how)}") from None
    split.notes.append(f"{name}: {TRACKLET_NOTE}")
    return split


def _why_no_split(root: Path, folder: str, how: str) -> str:
    """What the ``prepare`` output at ``root`` says about its missing or empty ``folder`` split: never built
    (no output, or one prepared without ``--split``), or built but empty (too few tracklets)."""
    out = root.parent if root.name == folder else root
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return f"build it with: {how}"
    split = manifest.get("split") if isinstance(manifest, dict) else None
    if not isinstance(split, dict):
        return f"{out} was prepared without --split: prepare it again with --split ({how})"
    subset = "val" if folder.endswith("_val") else "test"
    tracks = (manifest.get("counts") or {}).get("tracks", "?")
    return (
        f"{out} was prepared with --split, but its footage gave {tracks} tracklet(s) and "
        f"{split.get(f'{subset}_tracklets', 0)} of them went to the {subset} split; prepare longer footage or more "
        "cameras"
    )


def _msmt_list(list_path: Path, image_dir: Path) -> list[Item]:
    items: list[Item] = []
    for lineno, line in read_list_file(list_path):
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
    for parent in (root, root / "msmt17"):
        for version, (train_name, test_name) in MSMT17_VERSIONS.items():
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
        f"{root}/msmt17/MSMT17_V1 or {root}/msmt17/MSMT17_V2; found in {root}: {listing(root)}"
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
            items += [(str(p), pid, _sysu_camid(p.name)) for p in list_images(folder / sub, recursive=False)]
        return items

    split = ReidSplit("sysu30k", base, [], read(base / "query", False), read(base / "gallery", True))
    _check_nonempty(split)
    split.notes.append("SYSU-30k's official metric is rank-1 (one true match per query, so mAP is about MRR)")
    if not (base / "gallery" / SYSU_DISTRACTOR_DIR).is_dir():
        split.notes.append(f"no gallery/{SYSU_DISTRACTOR_DIR}/ folder: evaluating without the distractors")
    return split


def relabel(items: Sequence[Item]) -> list[Item]:
    """Train items with pids mapped to 0..N-1 (sorted by original pid), as classifiers need."""
    mapping = {pid: i for i, pid in enumerate(sorted({pid for _, pid, _ in items}))}
    return [(path, mapping[pid], camid) for path, pid, camid in items]
