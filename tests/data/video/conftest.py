"""Synthetic footage with known identities, and a colour detector that finds them (no weights needed)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from reid_ssl.data.video.detect import DETECTORS, Box

# identity -> (BGR colour, start (x, y), velocity px/frame): 1 and 2 cross paths half-way through
PEOPLE = {
    1: ((40, 40, 220), (20, 60), (3.0, 0.0)),
    2: ((220, 60, 40), (290, 70), (-3.0, 0.0)),
    3: ((40, 200, 40), (40, 10), (1.0, 1.2)),
    4: ((200, 40, 200), (250, 150), (-1.5, -0.5)),
}
W, H, SIZE = 340, 240, (24, 60)  # frame, person (w, h)


def position(pid: int, t: int) -> tuple[int, int]:
    _, (x, y), (vx, vy) = PEOPLE[pid]
    return round(x + vx * t), round(y + vy * t)


def render(t: int) -> np.ndarray:
    rng = np.random.default_rng(t)
    frame = np.clip(128 + rng.normal(0, 6, (H, W, 3)), 0, 255).astype(np.uint8)
    for pid, (colour, _, _) in PEOPLE.items():
        x, y = position(pid, t)
        cv2.rectangle(frame, (x, y), (x + SIZE[0], y + SIZE[1]), colour, -1)
        cv2.circle(frame, (x + SIZE[0] // 2, y - 6), 7, colour, -1)  # a head
    return frame


def write_video(path: Path, frames: int = 90) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (W, H))
    for t in range(frames):
        writer.write(render(t))
    writer.release()
    return path


def write_frames(folder: Path, frames: int = 90) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for t in range(frames):
        cv2.imwrite(str(folder / f"{t:05d}.png"), render(t))
    return folder


def identity_of(crop: np.ndarray) -> int:
    """The person whose colour dominates a crop (0: none)."""
    best, votes = 0, 0
    for pid, (colour, _, _) in PEOPLE.items():
        n = int((np.abs(crop.astype(int) - colour).max(axis=2) < 50).sum())
        if n > votes:
            best, votes = pid, n
    return best if votes > 0.2 * crop.shape[0] * crop.shape[1] else 0


class ColourDetector:
    """One box per visible colour blob (the test's stand-in for a person detector)."""

    calls = 0
    fail_after: int | None = None

    def __call__(self, frame: np.ndarray) -> list[Box]:
        type(self).calls += 1
        if self.fail_after is not None and type(self).calls > self.fail_after:
            raise KeyboardInterrupt  # a kill in the middle of the detection pass
        boxes = []
        for colour, _, _ in PEOPLE.values():
            mask = (np.abs(frame.astype(int) - colour).max(axis=2) < 50).astype(np.uint8)
            if mask.sum() < 200:
                continue
            x, y, w, h = cv2.boundingRect(mask)
            boxes.append(Box(x, y, w, h, 0.9))
        return boxes


@pytest.fixture
def colour_detector(monkeypatch: pytest.MonkeyPatch) -> type[ColourDetector]:
    ColourDetector.calls, ColourDetector.fail_after = 0, None
    monkeypatch.setitem(DETECTORS._entries, "colour", lambda weights, min_score, device: ColourDetector())
    monkeypatch.setitem(DETECTORS._help, "colour", "test colours")
    return ColourDetector
