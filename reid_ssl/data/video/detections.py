"""Detection, the slow pass over a video, made resumable: boxes are appended to a CSV in blocks, and a small
state file records how far the CSV is valid. A killed run continues after the last recorded frame."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from reid_ssl.data.video.detect import Detector
from reid_ssl.data.video.frames import FrameSelection, FrameSource
from reid_ssl.data.video.track import Detection, detections_of
from reid_ssl.fileio import atomic_write_bytes, json_text

HEADER = "frame,x,y,w,h,score\n"


class DetectionLog:
    """``<work>/detections.csv`` and ``<work>/state.json`` for one input.

    ``state.json`` holds ``{"key": ..., "done_until": last processed frame, "bytes": valid CSV length,
    "complete": bool, "frames": processed frames}`` (and ``"decoded"`` for a truncated video); it is replaced
    atomically after each block is fsynced, so the CSV beyond ``bytes`` (a block cut by a kill) is ignored and
    overwritten.
    """

    def __init__(self, work: Path, key: str) -> None:
        self.work, self.key = work, key
        self.csv, self.state_path = work / "detections.csv", work / "state.json"
        state = self._read_state()
        if state is None or state.get("key") != key or not self.csv.is_file():
            state = {"key": key, "done_until": -1, "bytes": len(HEADER), "complete": False, "frames": 0}
            work.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.csv, HEADER.encode())
            self._write_state(state)
        self.state: dict[str, Any] = state

    def _read_state(self) -> dict[str, Any] | None:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) else None

    def _write_state(self, state: dict[str, Any]) -> None:
        atomic_write_bytes(self.state_path, json_text(state, indent=None).encode())

    @property
    def complete(self) -> bool:
        return bool(self.state["complete"])

    def append(
        self, rows: list[Detection], done_until: int, frames: int, complete: bool = False, decoded: int | None = None
    ) -> None:
        """Append one block of detections (durably), then record it in the state (with the last block, ``decoded``:
        the frames a truncated video could decode, so a later run that reuses the log still knows)."""
        with open(self.csv, "r+b") as f:
            f.truncate(self.state["bytes"])  # drop whatever a killed run wrote after the last record
            f.seek(self.state["bytes"])
            f.write("".join(f"{d.frame},{d.x},{d.y},{d.w},{d.h},{d.score:.5f}\n" for d in rows).encode())
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        self.state = {**self.state, "done_until": done_until, "bytes": size, "complete": complete, "frames": frames}
        if decoded is not None:
            self.state["decoded"] = decoded
        self._write_state(self.state)

    def read(self) -> list[Detection]:
        """The recorded detections (the CSV up to the recorded length)."""
        with open(self.csv, "rb") as f:
            text = f.read(self.state["bytes"]).decode()
        rows = list(csv.DictReader(text.splitlines()))
        return [
            Detection(int(r["frame"]), int(r["x"]), int(r["y"]), int(r["w"]), int(r["h"]), float(r["score"]))
            for r in rows
        ]


def detect_all(
    source: FrameSource,
    selection: FrameSelection,
    detector: Detector,
    log: DetectionLog,
    min_height: int = 0,
    block: int = 50,
    on_frame: Callable[[int], object] | None = None,
) -> list[Detection]:
    """Run ``detector`` over the selected frames not yet in ``log``; returns every detection of the input.

    Boxes shorter than ``min_height`` pixels are dropped. The log is extended every ``block`` frames, so a kill
    loses at most one block.
    """
    pending: list[Detection] = []
    frames, last = log.state["frames"], log.state["done_until"]
    for index, frame in _frames_after(source, selection, last):
        pending += [d for d in detections_of(detector(frame), index) if d.h >= min_height]
        frames, last = frames + 1, index
        if on_frame is not None:
            on_frame(index)
        if frames % block == 0:
            log.append(pending, last, frames)
            pending = []
    log.append(pending, last, frames, complete=True, decoded=source.decoded)
    return log.read()


def _frames_after(source: FrameSource, selection: FrameSelection, last: int) -> Iterator[tuple[int, np.ndarray]]:
    yield from source.frames(selection, resume_after=last)
