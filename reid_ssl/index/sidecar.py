"""The SQLite item table of an index: one row per stable id, data only (never pickle).

Columns: ``id, path, pid, camid, frame, tracklet, source, added``. ``camid`` is 0-based (file name ``c1`` is
camid 0, see :mod:`reid_ssl.data.market`); ``added`` is a Unix time in seconds.

Paths are stored faithfully. A path is a Python ``str`` as the OS gives it: bytes of a file name that are not
UTF-8 (a Latin-1 ``caf\\xe9.jpg``) appear as surrogate escapes (:func:`os.fsdecode`). SQLite text must be
UTF-8, so such a path is stored as a BLOB of its raw bytes (:func:`os.fsencode`) and read back with
:func:`os.fsdecode`: every path round-trips to the same ``str``, which opens the same file. Show paths to
people with :func:`display_path`.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reid_ssl.errors import IndexFormatError, UnknownNameError
from reid_ssl.fileio import fsync_path

COLUMNS = ("id", "path", "pid", "camid", "frame", "tracklet", "source", "added")
_SCHEMA = """
CREATE TABLE items (id INTEGER PRIMARY KEY, path TEXT NOT NULL, pid INTEGER, camid INTEGER, frame INTEGER,
                    tracklet INTEGER, source TEXT, added REAL NOT NULL);
CREATE INDEX items_camid ON items(camid);
CREATE INDEX items_path ON items(path);
"""
_BATCH = 900  # SQLite's bound-parameter limit is 999


@dataclass(frozen=True)
class GalleryItem:
    """What the sidecar stores per image; unknown fields stay ``None``.

    Attributes:
        path: the image file (absolute once indexed; may hold surrogate escapes, see the module notes).
        pid: identity (-1 junk, 0 distractor in Market-style data).
        camid: 0-based camera id (file name ``c1`` = camid 0).
        frame: frame number in the camera's video.
        tracklet: tracklet id where "identities" are tracklets (PETS09).
        source: where the item came from ("gallery", "folder", "cli", "upload"...).
    """

    path: str
    pid: int | None = None
    camid: int | None = None
    frame: int | None = None
    tracklet: int | None = None
    source: str | None = None


def encode_path(path: str) -> str | bytes:
    """The value stored for ``path``: the ``str`` itself when it is valid UTF-8, else its raw bytes."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path)


def decode_path(value: str | bytes) -> str:
    """The path ``str`` back from a stored value (:func:`encode_path`'s inverse)."""
    return os.fsdecode(value) if isinstance(value, bytes) else value


def display_path(path: str | Path) -> str:
    """``path`` printable anywhere: bytes that are not UTF-8 shown as ``\\xe9`` escapes (``caf\\xe9.jpg``)."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _row(values: Sequence[Any]) -> dict[str, Any]:
    row = dict(zip(COLUMNS, values, strict=True))
    row["path"] = decode_path(row["path"])
    return row


class Sidecar:
    """The item table: an in-memory copy while an index is modified, the immutable file while it is only read.

    Thread-safe: every access holds one lock (searches of the app run in threads).
    """

    def __init__(self, db: sqlite3.Connection, mutable: bool) -> None:
        self._db = db
        self._mutable = mutable
        self._lock = threading.Lock()

    @classmethod
    def new(cls) -> Sidecar:
        """An empty, in-memory table."""
        db = sqlite3.connect(":memory:", check_same_thread=False)
        db.executescript(_SCHEMA)
        return cls(db, mutable=True)

    @classmethod
    def open_readonly(cls, path: Path) -> Sidecar:
        """Open a published generation's ``items.sqlite`` (immutable: no locking needed).

        Raises:
            IndexFormatError: not a SQLite file, or other columns than :data:`COLUMNS`.
        """
        # a URI, percent-encoded from the raw bytes: '?', '#', '%' and non-UTF-8 bytes in the folder name are safe
        uri = "file:" + urllib.parse.quote(os.fsencode(path)) + "?mode=ro&immutable=1"
        db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        try:
            cols = [r[1] for r in db.execute("PRAGMA table_info(items)")]
        except sqlite3.DatabaseError as e:
            db.close()
            raise IndexFormatError(f"{path}: not a readable item table ({e})") from None
        if tuple(cols) != COLUMNS:
            db.close()
            raise IndexFormatError(f"{path}: unexpected metadata columns {cols}")
        return cls(db, mutable=False)

    def _make_mutable(self) -> None:
        if not self._mutable:
            mem = sqlite3.connect(":memory:", check_same_thread=False)
            self._db.backup(mem)
            self._db.close()
            self._db, self._mutable = mem, True

    # --- writing ------------------------------------------------------------------------------------------

    def insert(self, ids: Iterable[int], items: Sequence[GalleryItem], added: float) -> None:
        """Add one row per (id, item); ``added`` is a Unix time in seconds."""
        rows = [
            (int(i), encode_path(r.path), r.pid, r.camid, r.frame, r.tracklet, r.source, added)
            for i, r in zip(ids, items, strict=True)
        ]
        with self._lock:
            self._make_mutable()
            with self._db:
                self._db.executemany(f"INSERT INTO items VALUES ({', '.join('?' * len(COLUMNS))})", rows)

    def delete(self, ids: Iterable[int]) -> None:
        """Remove the rows of ``ids``."""
        with self._lock:
            self._make_mutable()
            with self._db:
                self._db.executemany("DELETE FROM items WHERE id = ?", [(int(i),) for i in ids])

    def save(self, path: Path) -> None:
        """Write the table to a new SQLite file at ``path`` and fsync it."""
        out = sqlite3.connect(path)
        try:
            with self._lock:
                self._db.backup(out)
        finally:
            out.close()
        fsync_path(path)

    # --- reading ------------------------------------------------------------------------------------------

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, list(params)).fetchall()

    def items(self, ids: Sequence[int] | np.ndarray) -> dict[int, dict[str, Any]]:
        """Rows for ``ids`` as ``{id: {column: value}}`` (missing ids are absent)."""
        ids = [int(i) for i in ids]
        out: dict[int, dict[str, Any]] = {}
        for start in range(0, len(ids), _BATCH):
            part = ids[start : start + _BATCH]
            sql = f"SELECT {', '.join(COLUMNS)} FROM items WHERE id IN ({', '.join('?' * len(part))})"
            out.update({r[0]: _row(r) for r in self._query(sql, part)})
        return out

    def ids_where(self, **equals: Any) -> np.ndarray:
        """Ids (ascending) whose columns equal the given values, e.g. ``ids_where(camid=0)``.

        Raises:
            UnknownNameError: a column that does not exist (lists the columns).
        """
        for key in equals:
            if key not in COLUMNS:
                raise UnknownNameError(f"unknown metadata column {key!r}; choose one of {list(COLUMNS)}")
        values = [encode_path(v) if k == "path" else v for k, v in equals.items()]
        where = " AND ".join(f"{k} = ?" for k in equals) or "1"
        return np.array(
            [r[0] for r in self._query(f"SELECT id FROM items WHERE {where} ORDER BY id", values)], np.int64
        )

    def ids_for_paths(self, paths: Sequence[str]) -> dict[str, int]:
        """``{path: id}`` for the given paths that are indexed."""
        out: dict[str, int] = {}
        for start in range(0, len(paths), _BATCH):
            part = [encode_path(p) for p in paths[start : start + _BATCH]]
            sql = f"SELECT path, id FROM items WHERE path IN ({', '.join('?' * len(part))})"
            out.update({decode_path(p): i for p, i in self._query(sql, part)})
        return out

    def ids_under(self, folder: str) -> list[int]:
        """Ids whose path is ``folder`` or lies under it (compared as paths, not as text prefixes)."""
        prefix = folder.rstrip(os.sep) + os.sep
        rows = self._query("SELECT id, path FROM items ORDER BY id")
        return [i for i, p in rows if (path := decode_path(p)) == folder or path.startswith(prefix)]

    def labels(self, ids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(pids, camids)``, ``(n,)`` int64 each in the order of ``ids``; -1 where unknown."""
        meta = self.items(ids)
        pids = np.array([_or(meta[int(i)]["pid"]) for i in ids], np.int64)
        cams = np.array([_or(meta[int(i)]["camid"]) for i in ids], np.int64)
        return pids, cams

    def stats(self) -> dict[str, Any]:
        """Counts for people: items, identities (pid > 0), 0-based cameras, items per source."""
        return {
            "items": int(self._query("SELECT COUNT(*) FROM items")[0][0]),
            "identities": int(self._query("SELECT COUNT(DISTINCT pid) FROM items WHERE pid > 0")[0][0]),
            "cameras": sorted(r[0] for r in self._query("SELECT DISTINCT camid FROM items WHERE camid IS NOT NULL")),
            "sources": dict(self._query("SELECT COALESCE(source, '?'), COUNT(*) FROM items GROUP BY source")),
        }


def _or(value: int | None, default: int = -1) -> int:
    return default if value is None else int(value)
