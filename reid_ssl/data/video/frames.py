"""Frames from a video file (anything OpenCV decodes) or a folder of frame images, subsampled and trimmed.

A frame is identified by its index in the ORIGINAL stream (0-based), whatever subsampling keeps, so boxes,
crops and the manifest always point at the same frame of the source.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from reid_ssl.errors import InputError, VideoError
from reid_ssl.images import iter_images, open_rgb

log = logging.getLogger(__name__)

DEFAULT_FOLDER_FPS = 25.0  # frame folders carry no rate; --source-fps overrides


@dataclass(frozen=True)
class FrameSelection:
    """Which frames of a source are used: ``start <= index < end`` and ``(index - start) % step == 0``."""

    start: int
    end: int
    step: int

    @property
    def count(self) -> int:
        return max(0, math.ceil((self.end - self.start) / self.step))

    def __contains__(self, index: int) -> bool:
        return self.start <= index < self.end and (index - self.start) % self.step == 0


class FrameSource:
    """One input: a video file or a folder of frames (sorted by name), read as BGR uint8 arrays (H, W, 3).

    Args:
        path: the video file or frame folder.
        fps: the source's frame rate for a frame folder (default :data:`DEFAULT_FOLDER_FPS`), or for a video
            whose file reports none. A video that reports its rate keeps it: a different ``fps`` is refused, since
            it would put a wrong clock on ``--start``/``--end``/``--fps``.

    Attributes:
        decoded: after :meth:`frames` stopped early (the file ends before the frame count in its header: a
            truncated or damaged video), the number of frames it could decode; else None.

    Raises:
        VideoError: OpenCV cannot open the video, or it (or the folder) has no frame.
        InputError: ``fps`` disagrees with the rate the video file reports.
    """

    def __init__(self, path: str | Path, fps: float | None = None) -> None:
        self.path = Path(path)
        self._frames: list[Path] | None = None
        self.decoded: int | None = None
        if self.path.is_dir():
            self._frames = list(iter_images(self.path, recursive=False))
            if not self._frames:
                raise VideoError(f"{self.path}: a folder without frame images (.jpg, .png, ...)")
            self.fps = float(fps or DEFAULT_FOLDER_FPS)
            self.frame_count = len(self._frames)
            return
        if not self.path.is_file():
            raise VideoError(f"{self.path}: no such video file or frame folder")
        cap = cv2.VideoCapture(str(self.path))
        try:
            if not cap.isOpened():
                raise VideoError(f"{self.path}: OpenCV cannot open this video (unknown or damaged container/codec)")
            rate = cap.get(cv2.CAP_PROP_FPS)
            own = rate if rate and math.isfinite(rate) and rate > 0 else None
            if fps and own and abs(fps - own) > 0.01 * own:
                raise InputError(
                    f"{self.path}: --source-fps {fps:g} is for frame folders (and videos that report no rate); this "
                    f"video reports {own:g} fps, which sets its clock for --start, --end and --fps: leave "
                    "--source-fps out"
                )
            self.fps = float(own or fps or DEFAULT_FOLDER_FPS)
            self.frame_count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)  # a hint: some containers lie
            ok, _ = cap.read()
        finally:
            cap.release()
        if not ok:
            raise VideoError(f"{self.path}: the video holds no decodable frame")

    def select(self, fps: float | None = None, start_s: float = 0.0, end_s: float | None = None) -> FrameSelection:
        """Frames at about ``fps`` (every ``round(source fps / fps)``-th; all when None) in [start_s, end_s)."""
        if fps is not None and fps <= 0:
            raise InputError(f"--fps must be > 0, got {fps}")
        if start_s < 0 or (end_s is not None and end_s <= start_s):
            raise InputError(f"the time range must have 0 <= start < end, got {start_s}..{end_s}")
        step = max(1, round(self.fps / fps)) if fps else 1
        start = round(start_s * self.fps)
        if self.frame_count and start >= self.frame_count:
            length = self.frame_count / self.fps
            raise InputError(
                f"{self.path}: --start {start_s:g} s is past its end ({self.frame_count} frames, {length:.1f} s at "
                f"{self.fps:g} fps); give a start below {length:.1f}"
            )
        end = round(end_s * self.fps) if end_s is not None else (self.frame_count or 1 << 40)
        return FrameSelection(start, end, step)

    def frames(self, selection: FrameSelection, resume_after: int = -1) -> Iterator[tuple[int, np.ndarray]]:
        """``(index, bgr)`` of the selected frames after ``resume_after``, in order.

        Frames before the first wanted one are skipped without decoding their pixels where the source allows.

        Raises:
            ImageError: a frame file of a folder cannot be decoded.
        """
        first = max(selection.start, resume_after + 1)
        if self._frames is not None:
            for index in range(first, min(selection.end, len(self._frames))):
                if index in selection:
                    yield index, np.ascontiguousarray(np.asarray(open_rgb(self._frames[index]))[..., ::-1])
            return
        cap = cv2.VideoCapture(str(self.path))
        try:
            index = 0
            while index < selection.end:
                if index < first or index not in selection:
                    if not cap.grab():
                        break
                else:
                    ok, frame = cap.read()
                    if not ok:
                        break
                    yield index, frame
                index += 1
        finally:
            cap.release()
        if index < min(selection.end, self.frame_count) and self.decoded is None:
            self.stopped_early(index)

    def stopped_early(self, decoded: int) -> None:
        """Record (:attr:`decoded`) and warn that decoding ended after ``decoded`` frames, before the header's count."""
        self.decoded = decoded
        log.warning(
            "%s: decoding stopped after %d of the %d frames its header promises (%.1f of %.1f s): the file is "
            "truncated or damaged, and only the frames before are used",
            self.path, decoded, self.frame_count, decoded / self.fps, self.frame_count / self.fps,
        )  # fmt: skip
