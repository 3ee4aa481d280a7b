"""Crash-safe file writes, JSON output and file digests shared by checkpoints, indexes, data sets, results and
the CLI.

No torch import here, so the index CLI stays light.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from reid_ssl.errors import AlreadyExistsError, InputError


def fsync_path(path: str | Path) -> None:
    """fsync a file or a folder (a folder's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the complete new one.

    A temp file in the same folder is written and fsynced, then renamed over ``path``, then the folder is
    fsynced. A failure (full disk, kill) leaves the old file untouched and no temp file behind.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from e
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _write_error(path, e) from e
        raise
    fsync_path(path.parent)


def _write_error(path: Path, e: OSError) -> OSError:
    """The same kind of OSError (errno kept), saying which file failed and that the old one is intact."""
    message = f"could not write {path} ({e.strerror or e}); the previous file, if any, is unchanged"
    return OSError(e.errno, message) if e.errno is not None else OSError(message)


# ---------------------------------------------------------------------------------------------------------
# The output contract: nothing that already exists is replaced without --overwrite
# ---------------------------------------------------------------------------------------------------------


def check_new_file(path: str | Path, overwrite: bool, option: str = "--out", inputs: Iterable[str | Path] = ()) -> Path:
    """The file output ``path`` if a command may write it: a new file, or an existing one with ``overwrite``.

    One home of the rule every command follows for a file the user names (or a default puts next to one):
    an existing file is replaced only with ``--overwrite``, and a file among ``inputs`` (what the command reads)
    never is. Call it before any expensive work.

    Raises:
        InputError: ``path`` is a folder, or is one of ``inputs``. AlreadyExistsError: ``path`` exists and
            ``overwrite`` is off.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"{option} {path} is a folder: give a file name, e.g. {path / 'model.pt'}")
    if not path.exists():
        return path
    for source in inputs:
        if Path(source).exists() and path.samefile(source):
            raise InputError(f"{option} {path} is the input {source} itself: write the result to another file")
    if not overwrite:
        raise AlreadyExistsError(
            f"{option} {path} already exists: choose another file, or pass --overwrite to replace it"
        )
    return path


def check_output_folder(
    folder: str | Path, overwrite: bool, ours: Callable[[Path], bool], what: str, option: str = "--out"
) -> Path:
    """The output folder ``folder`` if a command may write into it (the folder counterpart of
    :func:`check_new_file`).

    Allowed: a folder that does not exist or is empty, one that ``ours(folder)`` says holds this command's own
    (finished or unfinished) output, and any folder with ``overwrite``. A folder holding anything else (the
    user's photos, another command's output) is refused, so nothing in it is lost. ``what`` names the command's
    output in the message (e.g. ``"a prepare video output"``).

    Raises:
        InputError: ``folder`` is a file. AlreadyExistsError: a non-empty folder of someone else's without
            ``overwrite``.
    """
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{option} {folder} is a file: give a folder")
    if overwrite or not folder.exists() or ours(folder) or not any(folder.iterdir()):
        return folder
    raise AlreadyExistsError(
        f"{option} {folder} is not empty and does not hold {what}: choose a new or empty folder, or pass "
        "--overwrite to write into it (files of the same names are replaced)"
    )


def check_result_file(path: str | Path, options: Mapping[str, Any], overwrite: bool, option: str = "--out") -> None:
    """Allow rewriting the result file ``path`` only for the same ``options`` (an identical re-run) or with
    ``overwrite``; ``options`` are compared with the ``"options"`` the existing JSON records.

    Raises:
        AlreadyExistsError: ``path`` holds a result of other options (or of an older reid_ssl that did not
            record them), and ``overwrite`` is off.
    """
    path = Path(path)
    if overwrite or not path.exists():
        return
    try:
        old = json.loads(path.read_text()).get("options")
    except (OSError, ValueError, AttributeError):
        old = None
    new = to_jsonable(options)
    if old == new:
        return
    if isinstance(old, dict):
        diff = [
            f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
        ]
        why = "a result of other options (" + "; ".join(diff[:6]) + ")"
    else:
        why = "a result whose options are not recorded"
    raise AlreadyExistsError(
        f"{path} already holds {why}: pass {option} with another folder to keep both, or --overwrite to replace it"
    )


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types from numpy scalars/arrays, tuples, paths and dataclass-free containers.

    Non-finite floats become ``None`` (JSON has no NaN); anything else unknown becomes its ``str``. The one
    converter behind every ``--json`` output, result file and benchmark file.
    """
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return to_jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def json_text(obj: Any, indent: int | None = 2) -> str:
    """``obj`` as JSON text (via :func:`to_jsonable`: never a ``NaN``/``Infinity`` token, which is not JSON),
    ending with a newline; ``indent=None`` gives one line (a ``.jsonl`` record)."""
    return json.dumps(to_jsonable(obj), indent=indent, allow_nan=False) + "\n"


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON (see :func:`json_text`); returns the path."""
    atomic_write_bytes(path, json_text(obj).encode())
    return Path(path)


def require_file(path: str | Path, what: str, hint: str = "") -> Path:
    """``path`` as a :class:`Path` when it is an existing file; the one existence check for files users name.

    Args:
        what: what the file is, for the message ("checkpoint", "config file", "query image"...).
        hint: appended to the "not found" message (how to make or find the file).

    Raises:
        InputError: ``path`` is a folder ("... is a folder; expected a file").
        MissingFileError: nothing exists at ``path``.
    """
    from reid_ssl.errors import InputError, MissingFileError

    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder; expected a file: give the path of the {what} itself")
    if not path.is_file():
        raise MissingFileError(f"{what} not found: {path}{hint}")
    return path


def read_list_file(path: str | Path) -> list[tuple[int, str]]:
    """The entries of a text list (image lists, split files) as ``(line number, text)``, however it was written.

    Lists come from other machines and other systems, so: a UTF-8 byte-order mark is dropped; Windows (CRLF)
    and old Mac (CR) line ends are accepted; bytes that are not UTF-8 (e.g. Latin-1 names from an old NAS) are
    kept as the same bytes on disk (``surrogateescape``, like ``os.fsdecode``); blank lines and lines starting
    with ``#`` are skipped; surrounding whitespace is stripped.

    Raises:
        MissingFileError: no such file.
    """
    from reid_ssl.errors import MissingFileError

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MissingFileError(f"list file not found: {path}") from None
    text = data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", errors="surrogateescape")
    entries = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            entries.append((n, line))
    return entries


def list_path(root: Path, entry: str) -> Path:
    """``root / entry`` for a path read from a list; Windows separators are accepted when the file only exists
    with ``/`` (lists written on Windows), and an absolute entry is used as it is."""
    path = root / entry
    if "\\" in entry and not path.exists():
        alt = root / entry.replace("\\", "/")
        if alt.exists():
            return alt
    return path


def display(text: object) -> str:
    """``text`` safe to print anywhere: bytes that are not UTF-8 (kept as surrogates) shown as ``\\xNN``."""
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
