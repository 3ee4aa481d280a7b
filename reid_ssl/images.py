"""Image files: one place that opens them, finds them and says clearly why one is unusable."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from reid_ssl.errors import ImageError, MissingFileError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

# PIL's decompression-bomb guard: refuse images above this many pixels instead of only warning.
MAX_IMAGE_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


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
