"""Crops and contact sheets: cut tracked boxes out of the decoded frames, and draw one PNG per camera that a
person can scan to see whether each tracklet shows one person."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw

from reid_ssl.data.video.detect import clip_box
from reid_ssl.data.video.frames import FrameSelection, FrameSource

# frame index -> [(box x, y, w, h, destination files: the first is written, the others are hard links to it)]
CropJobs = dict[int, list[tuple[tuple[int, int, int, int], list[Path]]]]


def write_crops(source: FrameSource, selection: FrameSelection, jobs: CropJobs, quality: int = 95) -> int:
    """Decode ``source`` once and write every job's crop at native resolution (clipped to the frame, JPEG).

    Returns:
        The number of crops written.

    Raises:
        OSError: a crop could not be written (full disk, permissions); the message names the file.
    """
    if not jobs:
        return 0
    last = max(jobs)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    written = 0
    for index, frame in source.frames(FrameSelection(selection.start, last + 1, 1)):
        for box, paths in jobs.get(index, []):
            clipped = clip_box(box, frame.shape[1], frame.shape[0])
            if clipped is None:
                continue
            x, y, w, h = clipped
            paths[0].parent.mkdir(parents=True, exist_ok=True)
            if not cv2.imwrite(str(paths[0]), frame[y : y + h, x : x + w], params):
                raise OSError(f"could not write {paths[0]} (full disk or no permission?)")
            for extra in paths[1:]:
                extra.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(paths[0], extra)
            written += 1
    return written


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def contact_sheet(
    tracklets: Sequence[tuple[str, Sequence[Path]]],
    path: Path,
    per_row: int = 12,
    height: int = 64,
    max_rows: int = 300,
) -> Path:
    """One row per tracklet: its label, then up to ``per_row`` evenly spaced crops scaled to ``height`` px.

    Args:
        tracklets: ``(label, crop files in time order)``; the longest ``max_rows`` are drawn (a note says so).
    """
    rows = sorted(tracklets, key=lambda t: -len(t[1]))[:max_rows]
    label_w, cell_w = 150, height // 2 + 4
    note = [] if len(tracklets) <= max_rows else [f"{len(tracklets) - max_rows} shorter tracklets not shown"]
    sheet = Image.new("RGB", (label_w + per_row * cell_w, (len(rows) + len(note)) * (height + 4) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (label, crops) in enumerate(rows):
        y = 4 + r * (height + 4)
        draw.text((4, y + height // 2 - 6), f"{label} ({len(crops)})", fill=(0, 0, 0))
        picks = [crops[i] for i in np.linspace(0, len(crops) - 1, min(per_row, len(crops))).round().astype(int)]
        for c, crop in enumerate(picks):
            with Image.open(crop) as src:
                im = src.convert("RGB")
                thumb = im.resize((max(1, round(im.width * height / im.height)), height))
            sheet.paste(thumb.crop((0, 0, min(thumb.width, cell_w - 4), height)), (label_w + c * cell_w, y))
    for k, line in enumerate(note):
        draw.text((4, 4 + (len(rows) + k) * (height + 4) + height // 2 - 6), line, fill=(120, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
