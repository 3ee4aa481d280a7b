"""People in video frames: one detector interface, registered by name in :data:`DETECTORS`.

A detector takes one BGR frame, (H, W, 3) uint8, and returns :class:`Box` es in that frame's pixels, best
score first, with a score in [0, 1]. ``reid_ssl prepare video`` and the app's full-frame search call the same
detector objects. Every frame is validated before it reaches native code (OpenCV's HOG corrupts memory on
frames smaller than its 64x128 window).

* ``hog`` (default): no weights file needed; its SVM margin m becomes the score ``1 - exp(-m)``.
* ``fasterrcnn``, ``retinanet``, ``ssdlite``: torchvision's COCO detectors, built without weights and loaded
  from a local file the user already has (``--weights``); nothing is ever downloaded. Only the COCO class
  "person" is kept.

The default, ``hog``, is OpenCV's HOG + linear SVM pedestrian detector (Dalal and Triggs, CVPR 2005): no
weights file needed. As measured on PETS09-S2L1 (people 86-140 px tall, below HOG's 128-px window), frames
are upscaled 1.5x first, then winStride 8, padding 8, scale step 1.05, OpenCV's grouping (2 neighbours),
greedy NMS at IoU 0.4 keeping SVM scores > 0.3.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from reid_ssl.errors import DependencyError, InputError
from reid_ssl.registry import Registry

HOG_WINDOW = (64, 128)  # width, height of OpenCV's default people detector window


class PixelBox:
    """A box in frame pixels, ``x, y`` its top-left corner and ``w, h`` its size, as the tuples the detector,
    the tracker and the crops use. Mixed into :class:`Box` and the records of :mod:`reid_ssl.data.video.track`
    (each a frozen dataclass that declares the four fields)."""

    x: int
    y: int
    w: int
    h: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        """``(x, y, w, h)``."""
        return (self.x, self.y, self.w, self.h)

    def xyxy(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)``: the top-left and bottom-right corners."""
        return self.x, self.y, self.x + self.w, self.y + self.h


@dataclass(frozen=True)
class Box(PixelBox):
    """A detection in frame pixels: top-left corner, size, and the detector's score."""

    x: int
    y: int
    w: int
    h: int
    score: float = 1.0

    @property
    def xywh(self) -> tuple[int, int, int, int]:
        """``(x, y, w, h)`` (:attr:`box`)."""
        return self.box


class Detector(Protocol):
    """``detector(bgr_frame) -> [Box]``, best score first."""

    def __call__(self, frame: np.ndarray) -> list[Box]: ...


def check_frame(frame: np.ndarray, min_size: tuple[int, int] = (1, 1)) -> np.ndarray:
    """The frame as a C-contiguous (H, W, 3) uint8 array, or :class:`InputError` saying what is wrong.

    Args:
        min_size: smallest (width, height) accepted.
    """
    a = np.asarray(frame)
    if a.dtype != np.uint8:
        raise InputError(f"expected an 8-bit frame, got dtype {a.dtype}")
    if a.ndim != 3 or a.shape[2] != 3:
        raise InputError(f"expected an (H, W, 3) colour frame, got shape {a.shape}")
    h, w = a.shape[:2]
    if w < min_size[0] or h < min_size[1]:
        raise InputError(f"frame too small to detect people: {w}x{h} (min {min_size[0]}x{min_size[1]})")
    return np.ascontiguousarray(a)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of (N, 4) and (M, 4) ``x, y, w, h`` boxes -> (N, M) in [0, 1]."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ax1, ay1 = a[:, 0:1], a[:, 1:2]
    ax2, ay2 = ax1 + a[:, 2:3], ay1 + a[:, 3:4]
    bx1, by1 = b[:, 0], b[:, 1]
    bx2, by2 = bx1 + b[:, 2], by1 + b[:, 3]
    iw = np.clip(np.minimum(ax2, bx2) - np.maximum(ax1, bx1), 0, None)
    ih = np.clip(np.minimum(ay2, by2) - np.maximum(ay1, by1), 0, None)
    inter = iw * ih
    union = a[:, 2:3] * a[:, 3:4] + b[:, 2] * b[:, 3] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """IoU of two ``(x, y, w, h)`` boxes."""
    return float(iou_matrix(np.asarray([a], float), np.asarray([b], float))[0, 0])


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = 0.4, score_threshold: float = 0.3) -> list[int]:
    """Greedy non-maximum suppression.

    Args:
        boxes: (N, 4) boxes ``x, y, w, h``.
        scores: (N,) detector scores.

    Returns:
        Indices of the kept boxes, highest score first: score > ``score_threshold`` and IoU <=
        ``iou_threshold`` with every higher-scoring kept box.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    order = [int(i) for i in np.argsort(-scores, kind="stable") if scores[i] > score_threshold]
    overlaps = iou_matrix(boxes, boxes)
    kept: list[int] = []
    for i in order:
        if all(overlaps[i, j] <= iou_threshold for j in kept):
            kept.append(i)
    return kept


def clip_box(box: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int] | None:
    """Clip ``(x, y, w, h)`` to a ``width`` x ``height`` image; None when nothing is left."""
    x0, y0 = max(0, box[0]), max(0, box[1])
    x1, y1 = min(width, box[0] + box[2]), min(height, box[1] + box[3])
    if x1 <= x0 or y1 <= y0:
        return None
    return (x0, y0, x1 - x0, y1 - y0)


class HOGDetector:
    """OpenCV's HOG people detector with the settings of the module docstring.

    Args:
        upscale: resize factor before detection; ``None``: 1.5 for frames under 800 px high, else 1.
        max_side: frames larger than this after upscaling are shrunk to it (one huge upload cannot tie up
            the CPU for minutes).
        min_box: smallest (width, height) of a returned box, in frame pixels.
    """

    def __init__(
        self,
        upscale: float | None = None,
        win_stride: int = 8,
        padding: int = 8,
        scale: float = 1.05,
        group_threshold: int = 2,
        nms_threshold: float = 0.4,
        score_threshold: float = 0.3,
        max_side: int = 4000,
        min_box: tuple[int, int] = (8, 16),
    ) -> None:
        if not hasattr(cv2, "HOGDescriptor"):
            raise DependencyError(f"OpenCV {cv2.__version__} has no HOGDescriptor: install opencv-python-headless<5")
        self.upscale, self.win_stride, self.padding, self.scale = upscale, win_stride, padding, scale
        self.group_threshold, self.nms_threshold, self.score_threshold = group_threshold, nms_threshold, score_threshold
        self.max_side, self.min_box = max_side, min_box

    def factor(self, height: int, width: int) -> float:
        """The resize factor used for a ``height`` x ``width`` frame."""
        f = self.upscale if self.upscale is not None else (1.5 if height < 800 else 1.0)
        return min(f, self.max_side / max(height, width, 1))

    def __call__(self, frame: np.ndarray) -> list[Box]:
        frame = check_frame(frame)
        height, width = frame.shape[:2]
        f = self.factor(height, width)
        sw, sh = int(width * f + 0.5), int(height * f + 0.5)  # rounded half up, as the resize target
        if sw < HOG_WINDOW[0] or sh < HOG_WINDOW[1]:
            need_w, need_h = (math.ceil((v - 0.5) / f) for v in HOG_WINDOW)
            raise InputError(
                f"frame too small to detect people: {width}x{height} (min {need_w}x{need_h} here; the HOG "
                f"detector's window is {HOG_WINDOW[0]}x{HOG_WINDOW[1]})"
            )
        big = (
            frame
            if f == 1.0
            else cv2.resize(frame, (sw, sh), interpolation=cv2.INTER_LINEAR if f > 1 else cv2.INTER_AREA)
        )
        hog = cv2.HOGDescriptor()  # one per call: cheap, and never shared between threads
        # cv2's stubs say the detector is a Sequence[float]; it is an ndarray, which setSVMDetector takes
        hog.setSVMDetector(cv2.HOGDescriptor.getDefaultPeopleDetector())  # type: ignore[call-overload]
        rects, weights = hog.detectMultiScale(
            np.ascontiguousarray(big),
            winStride=(self.win_stride, self.win_stride),
            padding=(self.padding, self.padding),
            scale=self.scale,
            groupThreshold=self.group_threshold,
        )
        if len(rects) == 0:
            return []
        boxes = np.asarray(rects, dtype=np.float64).reshape(-1, 4) / f
        scores = np.asarray(weights, dtype=np.float64).reshape(-1)
        found = []
        for i in nms(boxes, scores, self.nms_threshold, self.score_threshold):
            x0, y0 = round(boxes[i, 0]), round(boxes[i, 1])
            x1, y1 = round(boxes[i, 0] + boxes[i, 2]), round(boxes[i, 1] + boxes[i, 3])
            clipped = clip_box((x0, y0, x1 - x0, y1 - y0), width, height)
            if clipped is not None and clipped[2] >= self.min_box[0] and clipped[3] >= self.min_box[1]:
                found.append(Box(*clipped, score=hog_confidence(float(scores[i]))))
        return found


def hog_confidence(margin: float) -> float:
    """HOG's SVM margin (0.3 .. ~3 for people) as a score in [0, 1): ``1 - exp(-margin)``."""
    return float(1.0 - np.exp(-max(margin, 0.0)))


@dataclass(frozen=True)
class TorchvisionArch:
    """A torchvision COCO detector: its builder name and the weights file torchvision publishes for it."""

    builder: str
    weights_file: str


TORCHVISION_DETECTORS = {
    "fasterrcnn": TorchvisionArch("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"),
    "retinanet": TorchvisionArch("retinanet_resnet50_fpn", "retinanet_resnet50_fpn_coco-eeacb38b.pth"),
    "ssdlite": TorchvisionArch("ssdlite320_mobilenet_v3_large", "ssdlite320_mobilenet_v3_large_coco-a79551df.pth"),
}
COCO_PERSON = 1


class TorchvisionDetector:
    """A torchvision COCO detector from a local weights file, keeping "person" boxes above ``score_threshold``.

    Args:
        arch: a key of :data:`TORCHVISION_DETECTORS`.
        weights: the state dict file (torchvision's published ``.pth``, or any compatible state dict).
        device: ``auto``, ``cpu``, ``cuda``...

    Raises:
        InputError: no ``weights`` given; MissingFileError: the file does not exist (the message names the file
            torchvision publishes); CheckpointError: it does not load into the architecture.
    """

    def __init__(
        self, arch: str, weights: str | None = None, score_threshold: float = 0.5, device: str = "auto"
    ) -> None:
        import torchvision

        from reid_ssl.checkpoint import safe_torch_load
        from reid_ssl.distributed import resolve_device
        from reid_ssl.errors import CheckpointError, MissingFileError

        spec = TORCHVISION_DETECTORS[arch]
        if not weights:
            raise InputError(
                f"detector {arch} needs --weights FILE: a local copy of torchvision's {spec.weights_file} "
                "(reid_ssl never downloads weights); or use --detector hog, which needs none"
            )
        if not Path(weights).is_file():
            raise MissingFileError(f"{arch} weights not found: {weights} (expected torchvision's {spec.weights_file})")
        builder = getattr(torchvision.models.detection, spec.builder)
        model = builder(weights=None, weights_backbone=None)
        state = safe_torch_load(weights, f"{arch} weights file")
        try:
            model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
        except (RuntimeError, AttributeError, TypeError) as e:
            raise CheckpointError(f"{weights} does not fit torchvision's {spec.builder}: {str(e)[:200]}") from None
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.score_threshold = score_threshold

    def __call__(self, frame: np.ndarray) -> list[Box]:
        import torch

        frame = check_frame(frame, min_size=(8, 8))
        height, width = frame.shape[:2]
        x = torch.from_numpy(np.ascontiguousarray(frame[..., ::-1])).permute(2, 0, 1).float().div(255)
        with torch.no_grad():
            out = self.model([x.to(self.device)])[0]
        found = []
        for (x0, y0, x1, y1), label, score in zip(
            out["boxes"].cpu().tolist(), out["labels"].cpu().tolist(), out["scores"].cpu().tolist(), strict=True
        ):
            if label != COCO_PERSON or score < self.score_threshold:
                continue
            box = clip_box((round(x0), round(y0), round(x1 - x0), round(y1 - y0)), width, height)
            if box is not None:
                found.append(Box(*box, score=float(score)))
        return sorted(found, key=lambda b: -b.score)


# Every entry builds a detector from the same options: (weights file or None, minimum score in [0, 1] or None,
# device). A detector that needs no weights refuses a weights file rather than ignoring it.
DetectorFactory = Callable[[str | None, float | None, str], Detector]
DETECTORS: Registry[DetectorFactory] = Registry("person detector")


@DETECTORS.register("hog", help="OpenCV HOG + linear SVM pedestrian detector (no weights file needed)")
def _hog(weights: str | None, min_score: float | None, device: str) -> Detector:
    if weights:
        raise InputError("the hog detector needs no --weights; it is built into OpenCV")
    if min_score is None:
        return HOGDetector()
    if not 0 < min_score < 1:
        raise InputError(f"--min-score must be in (0, 1), got {min_score}")
    return HOGDetector(score_threshold=-float(np.log1p(-min_score)))  # the margin whose confidence is min_score


def _torchvision_factory(name: str) -> DetectorFactory:
    def build(weights: str | None, min_score: float | None, device: str) -> Detector:
        return TorchvisionDetector(name, weights, 0.5 if min_score is None else min_score, device)

    return build


for _name, _arch in TORCHVISION_DETECTORS.items():
    DETECTORS.register(
        _name,
        _torchvision_factory(_name),
        help=f"torchvision {_arch.builder}, COCO person class, from a local --weights file ({_arch.weights_file})",
    )


def build_detector(
    name: str = "hog", weights: str | None = None, min_score: float | None = None, device: str = "auto"
) -> Detector:
    """A detector from :data:`DETECTORS`.

    Raises:
        UnknownNameError: unknown name; InputError / MissingFileError / CheckpointError: unusable options or weights.
    """
    return DETECTORS[name](weights, min_score, device)
