"""Image files: one place that opens them, finds them and says clearly why one is unusable."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from reid_ssl.errors import ImageError, MissingFileError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

# PIL's decompression-bomb guard: refuse images above this many pixels instead of only warning.
MAX_IMAGE_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


# Transparent pixels (LA, RGBA, PA, P with transparency) are composited on this background before the alpha
# channel is dropped: person crops cut out on a transparent background read as if pasted on white paper.
ALPHA_BACKGROUND = (255, 255, 255)


# A person crop (a query, a gallery image): at least this many pixels on its short side, and its long side at most
# this many times its short side (people are about 2-3 times as tall as wide; lying or cropped ones less).
MIN_CROP_SIDE = 8
MAX_CROP_ASPECT = 8.0


APP_FRAME_HINT = "for a whole camera frame use the Full frame tab"


def crop_shape_problem(width: int, height: int, frame_hint: str = APP_FRAME_HINT) -> str | None:
    """Why a ``width`` x ``height`` image cannot be a person crop (too small or too elongated), else ``None``.

    The one rule for every place a user hands in a person crop: the app's search query, gallery upload and zip
    member, and the command line's ``index search --query`` and ``index add`` (:func:`image_crop_problem`).
    ``frame_hint`` ends the too-small message (where a whole frame should go instead).
    """
    short, long = min(width, height), max(width, height)
    if short < MIN_CROP_SIDE:
        return (
            f"too small for a person crop: {width}x{height} pixels (each side needs at least {MIN_CROP_SIDE}); "
            f"{frame_hint}"
        )
    if long > MAX_CROP_ASPECT * short:
        return (
            f"not the shape of a person crop: {width}x{height} pixels is {long / short:.0f} times as "
            f"{'tall' if height > width else 'wide'} as it is {'wide' if height > width else 'tall'} (at most "
            f"{MAX_CROP_ASPECT:g}); crop the image around one person"
        )
    return None


CLI_FRAME_HINT = "for whole camera frames cut the people out first: reid_ssl prepare video FRAMES"


def image_crop_problem(path: str | Path) -> str | None:
    """:func:`crop_shape_problem` of the image file ``path``, from its header only; ``None`` also when the header
    cannot be read (decoding reports that, with its own reason)."""
    try:
        with Image.open(path) as im:
            width, height = im.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    return crop_shape_problem(width, height, CLI_FRAME_HINT)


def open_rgb(source: str | Path | Image.Image) -> Image.Image:
    """Decode an image file (or take a PIL image) the way an image viewer shows it, as 8-bit RGB.

    The one decoder behind training, evaluation, the index and the app: EXIF orientation is applied, and every
    Pillow mode is converted faithfully (:func:`to_rgb`). A truncated file fails here, not later in a worker.

    Raises:
        ImageError: the path and the reason (missing, empty, not an image, truncated, too many pixels, or a
            mode that cannot be converted faithfully).
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    path = Path(source)
    try:
        empty = path.stat().st_size == 0
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot decode ({e})") from None
    if empty:
        raise ImageError(f"{path}: empty file")
    return _decode(path, str(path))


def decode_bytes(data: bytes, name: str) -> Image.Image:
    """:func:`open_rgb` for an image's bytes (a shard sample, an upload): the same checks and errors, which name
    ``name``.

    Raises:
        ImageError: as :func:`open_rgb`.
    """
    if not data:
        raise ImageError(f"{name}: empty file")
    return _decode(io.BytesIO(data), name)


def _decode(source: Path | io.BytesIO, name: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; refuse those images too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                im.load()  # decode now: truncated files fail here, not later in a worker
                return to_rgb(im, name)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: refused, too many pixels ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: cannot decode ({e})") from None


def to_rgb(im: Image.Image, name: str = "image") -> Image.Image:
    """An 8-bit RGB copy of ``im``, upright (EXIF orientation applied) and faithful to its mode.

    * ``I;16`` (and its byte orders): 16-bit values scaled by 255/65535, so an 8-bit image stored as 16 bits
      (x257) comes back exactly.
    * ``I`` (32-bit integers): values up to 255 kept, up to 65535 scaled like ``I;16``, larger ranges scaled
      from their minimum and maximum.
    * ``F`` (floats): values in [0, 1] scaled by 255, in [0, 255] kept, other ranges scaled from min to max.
    * Alpha (``LA``, ``RGBA``, ``PA``, ``P`` with transparency): composited on :data:`ALPHA_BACKGROUND`.
    * ``P``, ``L``, ``1``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: Pillow's own conversion.
    * 48-bit RGB PNGs are decoded by Pillow to 8 bits per channel (the high bytes).

    Raises:
        ImageError: a mode with no faithful 8-bit conversion.
    """
    with contextlib.suppress(OSError, ValueError, TypeError, SyntaxError):  # damaged EXIF: pixels as stored
        im = ImageOps.exif_transpose(im) or im
    mode = im.mode
    if mode == "RGB":
        return im.copy() if im.readonly else im
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(im), mode), mode="L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("LA", "PA", "La", "RGBa"):
        im, mode = im.convert("RGBA"), "RGBA"
    if mode == "RGBA":
        canvas = Image.new("RGB", im.size, ALPHA_BACKGROUND)
        canvas.paste(im, mask=im.getchannel("A"))
        return canvas
    if mode in ("L", "1", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return im.convert("RGB")
    raise ImageError(f"{name}: Pillow mode {mode!r} has no faithful 8-bit RGB conversion; convert the file first")


def _scale_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Grey values of a 16-bit, 32-bit or float image as uint8 (the rules of :func:`to_rgb`)."""
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        scale, offset = 255.0 / 65535.0, 0.0
    elif mode == "I" and lo >= 0 and hi <= 255:
        scale, offset = 1.0, 0.0
    elif mode == "I" and lo >= 0 and hi <= 65535:
        scale, offset = 255.0 / 65535.0, 0.0
    elif mode == "F" and lo >= 0 and hi <= 1:
        scale, offset = 255.0, 0.0
    elif mode == "F" and lo >= 0 and hi <= 255:
        scale, offset = 1.0, 0.0
    else:
        scale, offset = (255.0 / (hi - lo) if hi > lo else 0.0), lo
    return np.clip(np.rint((a - offset) * scale), 0, 255).astype(np.uint8)


def is_image_name(name: str | Path) -> bool:
    return str(name).lower().endswith(IMAGE_EXTENSIONS)


def is_junk_name(name: str) -> bool:
    """Hidden files and folders (``.DS_Store``, macOS ``._x.jpg`` resource forks, ``.tmp`` build folders).

    torchreid's ``glob`` skips them too, so both tools read the same images from a dataset folder.
    """
    return name.startswith(".")


def iter_images(root: str | Path, recursive: bool = True) -> Iterator[Path]:
    """The image files under ``root``, sorted by path; the one folder-walking policy of reid_ssl.

    Image files are named with one of :data:`IMAGE_EXTENSIONS` (any case). Hidden files and folders are skipped
    (:func:`is_junk_name`); symlinked folders are never entered (no loops), symlinked files are listed.

    Raises:
        MissingFileError: ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"image folder not found: {root}")
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if recursive and not is_junk_name(d))
        for name in sorted(filenames):
            if is_image_name(name) and not is_junk_name(name):
                path = Path(dirpath) / name
                if path.is_file():
                    yield path


def list_images(root: str | Path, recursive: bool = True) -> list[Path]:
    """:func:`iter_images` as a list."""
    return list(iter_images(root, recursive))


def check_images(paths: Iterable[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Split paths into (readable, [(bad path, reason)]) by decoding each one."""
    good: list[Path] = []
    bad: list[tuple[Path, str]] = []
    for p in paths:
        try:
            open_rgb(p)
            good.append(Path(p))
        except ImageError as e:
            bad.append((Path(p), str(e)))
    return good, bad
