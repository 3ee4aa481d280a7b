"""Image files: one place that opens them, finds them and says clearly why one is unusable."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

# PIL's decompression-bomb guard: refuse images above this many pixels instead of only warning.
MAX_IMAGE_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


class ImageError(ValueError):
    """An image file that cannot be used (missing, empty, not an image, truncated, too large)."""


def open_rgb(source: str | Path | Image.Image) -> Image.Image:
    """Open an image file (or take a PIL image) fully decoded as RGB.

    Raises:
        ImageError: with the path and the reason.
    """
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    path = Path(source)
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: empty file")
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; refuse those images too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()  # decode now: truncated files fail here, not later in a worker
                return im.convert("RGB")
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{path}: refused, too many pixels ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: cannot decode ({e})") from None


def is_image_name(name: str | Path) -> bool:
    return str(name).lower().endswith(IMAGE_EXTENSIONS)


def list_images(root: str | Path) -> list[Path]:
    """All image files under ``root`` (recursive, following no symlinked folders), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    return sorted(p for p in root.rglob("*") if p.is_file() and is_image_name(p.name))


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
