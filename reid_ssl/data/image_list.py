"""Training image lists without a Python object per image: paths as one byte buffer, bags as one array.

A corpus of SYSU-30k's size (29.6M images) as Python objects costs ~10 GB per process and minutes to build;
every DataLoader worker and every rank would hold its own copy (copy-on-write pages are touched by reference
counting). :class:`ImageList` keeps the same information in four numpy arrays: the relative paths, bytes as
the file system stores them (``os.fsencode``), concatenated in one buffer with start/end offsets, and one bag
id per image. Workers forked from the main process share these pages untouched.

List files are parsed with vectorised numpy (no per-line Python, no ``stat`` per line); folder scans read
each folder with one ``os.listdir`` call.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reid_ssl.errors import DatasetLayoutError, MissingFileError
from reid_ssl.images import IMAGE_EXTENSIONS

_EXTENSIONS = tuple(e.encode() for e in IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class SSLItem:
    """One training image: a file, or row ``index`` of an in-memory array (Fashion-MNIST); its bag or -1."""

    path: Path | None
    bag: int = -1
    index: int = -1


@dataclass
class ImageList:
    """N training images: ``root / path(i)``, or row ``i`` of an in-memory array when ``in_memory``.

    Attributes:
        root: the folder the relative paths start from (absolute entries ignore it).
        blob: (bytes,) uint8, the paths' bytes back to back.
        starts, ends: (N,) int64 offsets of image i's path in ``blob``.
        bags: (N,) int32 bag (tracklet, folder) of each image, -1 when unknown.
        in_memory: images are rows of an array (``blob`` is empty).
    """

    root: Path
    blob: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    bags: np.ndarray
    in_memory: bool = False

    def __len__(self) -> int:
        return len(self.bags)

    def path(self, i: int) -> Path | None:
        """The image's path (``None`` for in-memory images)."""
        if self.in_memory:
            return None
        return self.root / os.fsdecode(self.blob[self.starts[i] : self.ends[i]].tobytes())

    def __getitem__(self, i: int) -> SSLItem:
        i = int(i)
        return SSLItem(self.path(i), int(self.bags[i]), i if self.in_memory else -1)

    def __iter__(self) -> Iterator[SSLItem]:
        return (self[i] for i in range(len(self)))

    def subset(self, keep: np.ndarray) -> ImageList:
        """The images at positions ``keep`` (the path buffer is shared, not copied)."""
        keep = np.asarray(keep, np.int64)
        return ImageList(self.root, self.blob, self.starts[keep], self.ends[keep], self.bags[keep], self.in_memory)

    def bag_members(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Images grouped by bag, as CSR arrays: ``(bag ids, offsets, order)``; bag ``ids[b]`` holds images
        ``order[offsets[b]:offsets[b + 1]]``. Images without a bag are left out."""
        has = np.flatnonzero(self.bags >= 0)
        order = has[np.argsort(self.bags[has], kind="stable")]
        ids, first = np.unique(self.bags[order], return_index=True)
        return ids, np.append(first, len(order)).astype(np.int64), order

    @classmethod
    def from_paths(cls, paths: Sequence[str | Path], root: str | Path, bags: Sequence[int] | None = None) -> ImageList:
        """From a short Python list (tests, small sources); paths under ``root`` are stored relative to it."""
        root = Path(root)
        encoded = [os.fsencode(_relative(Path(p), root)) for p in paths]
        lengths = np.fromiter((len(b) for b in encoded), np.int64, len(encoded))
        ends = np.cumsum(lengths)
        blob = np.frombuffer(b"".join(encoded), np.uint8).copy() if encoded else np.zeros(0, np.uint8)
        bag_arr = np.full(len(encoded), -1, np.int32) if bags is None else np.asarray(bags, np.int32)
        return cls(root, blob, ends - lengths, ends, bag_arr)

    @classmethod
    def in_memory_rows(cls, n: int) -> ImageList:
        """``n`` rows of an in-memory image array, without bags."""
        return cls(
            Path("."),
            np.zeros(0, np.uint8),
            np.zeros(n, np.int64),
            np.zeros(n, np.int64),
            np.full(n, -1, np.int32),
            True,
        )


def _relative(path: Path, root: Path) -> Path:
    return path.relative_to(root) if path.is_relative_to(root) else path


def _is_image(name: bytes) -> bool:
    return not name.startswith(b".") and name.lower().endswith(_EXTENSIONS)


def scan_folder(root: str | Path, bags: bool = True) -> ImageList:
    """Every image under ``root`` (sorted, hidden files and folders skipped, symlinked folders not followed),
    each sub-folder holding images becoming one bag when ``bags``; images directly in ``root`` belong to no bag
    (-1): a flat folder is loose images, not one tracklet. One ``os.listdir`` per folder, no ``stat`` per file.

    Raises:
        MissingFileError: ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"image folder not found: {root}")
    base = os.fsencode(root)
    chunks: list[bytes] = []
    lengths: list[np.ndarray] = []
    loose = 0  # images directly in root
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(b"."))
        names = sorted(n for n in filenames if _is_image(n))
        if names:
            rel = os.path.relpath(dirpath, base)
            prefix = b"" if rel == b"." else rel + b"/"
            loose = len(names) if rel == b"." else loose
            chunks.append(b"".join(prefix + n for n in names))
            lengths.append(np.fromiter((len(prefix) + len(n) for n in names), np.int64, len(names)))
    per_image = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    ends = np.cumsum(per_image)
    blob = np.frombuffer(b"".join(chunks), np.uint8).copy() if chunks else np.zeros(0, np.uint8)
    counts = [len(x) for x in lengths]
    bag_ids = np.full(len(ends), -1, np.int32)
    if bags:
        skip = int(loose > 0)  # os.walk lists root first: its own images are chunk 0
        bag_ids[loose:] = np.repeat(np.arange(len(counts) - skip, dtype=np.int32), counts[skip:])
    return ImageList(root, blob, ends - per_image, ends, bag_ids)


def read_image_list(list_file: str | Path, root: str | Path, bags: bool = True) -> ImageList:
    """Image paths from a text list, one per line (first column; further columns such as labels are ignored),
    relative to ``root`` unless absolute; each entry's folder is its bag when ``bags`` (an entry without a folder,
    directly in ``root``, has no bag: -1).

    Parsed with vectorised numpy: a UTF-8 byte-order mark, CRLF or CR line ends, blank lines and ``#`` comments are
    handled, bytes that are not UTF-8 are kept as they are (the file system's own names), and nothing is
    ``stat``-ed. Lines of one folder are expected together (as in SYSU-30k's ``train.txt`` or ``find``
    output): a folder whose lines are scattered forms one bag per run of consecutive lines.

    Raises:
        MissingFileError: no list file. DatasetLayoutError: an entry that is not an image file name (file and
        line named).
    """
    list_file = Path(list_file)
    try:
        buf = np.fromfile(list_file, dtype=np.uint8)
    except FileNotFoundError:
        raise MissingFileError(f"list file not found: {list_file}") from None
    if buf[:3].tobytes() == b"\xef\xbb\xbf":
        buf = buf[3:]
    cr = np.flatnonzero(buf == 13)
    lone = cr[(cr + 1 >= len(buf)) | (buf[np.minimum(cr + 1, len(buf) - 1)] != 10)]
    buf[lone] = 10  # old Mac line ends (a CR alone) end lines too
    if len(buf) and buf[-1] != 10:
        buf = np.append(buf, np.uint8(10))
    ends_nl = np.flatnonzero(buf == 10)
    starts = np.concatenate([[0], ends_nl[:-1] + 1]).astype(np.int64)
    line_no = np.arange(1, len(starts) + 1)
    # the entry: from the first non-blank byte to the first blank after it (space, tab, CR)
    blank = (buf == 32) | (buf == 9) | (buf == 13) | (buf == 10)
    first = starts.copy()
    lead = np.flatnonzero(blank[np.minimum(starts, len(buf) - 1)] & (starts < ends_nl))
    for i in lead:  # rare: entries indented by blanks
        while first[i] < ends_nl[i] and blank[first[i]]:
            first[i] += 1
    blanks = np.flatnonzero(blank)
    stop = blanks[np.searchsorted(blanks, first)] if len(blanks) else ends_nl
    has_text = first < ends_nl
    keep = has_text & (buf[np.minimum(first, len(buf) - 1)] != ord("#"))
    first, stop, line_no = first[keep], stop[keep], line_no[keep]
    _check_extensions(buf, first, stop, line_no, list_file)
    root = Path(root)
    if len(first) and (buf[first[0] : stop[0]] == 92).any():  # written on Windows? one stat decides
        entry = os.fsdecode(buf[first[0] : stop[0]].tobytes())
        if not (root / entry).exists() and (root / entry.replace("\\", "/")).exists():
            buf = np.where(buf == 92, np.uint8(47), buf)
    bag_ids = _folder_runs(buf, first, stop) if bags else np.full(len(first), -1, np.int32)
    return ImageList(root, buf, first, stop, bag_ids)


def _words(buf: np.ndarray) -> np.ndarray:
    """The little-endian 8-byte word starting at every byte of ``buf`` (a strided view of a zero-padded copy), so
    that 8 bytes compare in one integer comparison."""
    padded = np.concatenate([buf, np.zeros(8, np.uint8)])
    return np.ndarray(shape=(len(buf),), dtype="<u8", buffer=padded, strides=(1,))


def _extension_keys(exts: tuple[bytes, ...], size: int) -> np.ndarray:
    """The extensions of ``size`` bytes as little-endian integers (how :func:`_check_extensions` reads them)."""
    return np.array([int.from_bytes(e, "little") for e in exts if len(e) == size], np.uint64)


def _check_extensions(buf: np.ndarray, first: np.ndarray, stop: np.ndarray, line_no: np.ndarray, name: Path) -> None:
    """Every entry ends with an image extension (its last 4 or 5 bytes, lower-cased, as one integer each)."""
    tail = np.zeros((len(first), 8), np.uint8)  # the last 5 bytes of each entry in columns 0..4, zeros after
    for k in range(1, 6):
        pos = stop - k
        ok = pos >= first
        tail[ok, 5 - k] = buf[pos[ok]]
    tail = np.where((tail >= 65) & (tail <= 90), tail + 32, tail)
    key5 = tail.view("<u8")[:, 0]
    key4 = key5 >> np.uint64(8)  # the last 4 bytes
    length = stop - first
    good = np.isin(key4, _extension_keys(_EXTENSIONS, 4)) & (length > 4)
    good |= np.isin(key5, _extension_keys(_EXTENSIONS, 5)) & (length > 5)
    if not good.all():
        bad = int(np.flatnonzero(~good)[0])
        entry = os.fsdecode(buf[first[bad] : stop[bad]].tobytes())
        raise DatasetLayoutError(f"{name}:{line_no[bad]}: {entry!r} is not an image file name")


def _folder_runs(buf: np.ndarray, first: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """A bag id per entry: consecutive entries with the same folder share one; an entry without a folder has none
    (-1)."""
    n = len(first)
    if n == 0:
        return np.zeros(0, np.int32)
    slashes = np.flatnonzero((buf == 47) | (buf == 92))
    if not len(slashes):  # bare file names: no folders, no bags
        return np.full(n, -1, np.int32)
    last = np.searchsorted(slashes, stop) - 1
    dir_end = np.where((last >= 0) & (slashes[np.maximum(last, 0)] >= first), slashes[np.maximum(last, 0)], first)
    length = dir_end - first
    same = np.zeros(n, bool)
    same[1:] = length[1:] == length[:-1]
    rows = np.flatnonzero(same & (length > 0))
    if len(rows):
        same[rows] = _equal_spans(_words(buf), first[rows], first[rows - 1], length[rows])
    foldered = length > 0
    ids = np.full(n, -1, np.int32)
    ids[foldered] = np.cumsum(~same[foldered]) - 1
    return ids


def _equal_spans(words: np.ndarray, a: np.ndarray, b: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Whether bytes ``[a, a + length)`` equal ``[b, b + length)``, row by row, 8 bytes per comparison (the last
    word of a span overlaps the one before; spans under 8 bytes are masked)."""
    equal = np.ones(len(a), bool)
    short = np.flatnonzero(length < 8)
    mask = (np.uint64(1) << (length[short].astype(np.uint64) * np.uint64(8))) - np.uint64(1)
    equal[short] = ((words[a[short]] ^ words[b[short]]) & mask) == 0
    todo = np.flatnonzero(length >= 8)
    offset = 0
    while len(todo):
        at = np.minimum(offset, length[todo] - 8)
        equal[todo] &= words[a[todo] + at] == words[b[todo] + at]
        offset += 8
        todo = todo[length[todo] > offset]
    return equal
