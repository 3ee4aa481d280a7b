"""Untrusted uploads: images and zips of crops, checked before anything reaches the index.

Refused with a message (the index is never touched):

* zip-slip: a member name with a ``..`` part, an absolute name (``/etc/x``, ``C:\\x``) or a symlink member:
  the whole archive is refused;
* zip bombs: too many members, too many uncompressed bytes in total, or a member compressed > ``max_ratio``:1;
* decompression-bomb images: more than ``max_pixels`` pixels, checked from the header before decoding;
* non-images, empty or truncated files: reported per file (a zip's junk members are skipped and listed).

Members are never extracted under their own names: each good member is written as ``NNNNN_<basename>``
into a fresh folder, so no name in an archive can choose where bytes land.
"""

from __future__ import annotations

import re
import shutil
import stat
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image, UnidentifiedImageError

from reid_ssl.errors import ImageError, UploadError
from reid_ssl.images import crop_shape_problem, is_image_name, open_rgb

DEFAULT_UPLOAD_MB = 100  # `reid_ssl app --max-upload-mb`'s default: the one size limit of an uploaded file


@dataclass(frozen=True)
class UploadLimits:
    """Bounds on what one upload may contain.

    ``max_upload_mb`` is the one size limit of a file: the web server refuses a larger upload (gradio's
    ``max_file_size``, HTTP 413), and an image (a query, a frame, a gallery image, a zip member) larger than
    that is refused by :func:`check_image` and :func:`safe_extract_zip`.
    """

    max_files: int = 2000  # images per upload, zip members included
    max_total_bytes: int = 500 * 2**20  # all uncompressed bytes of one upload
    max_ratio: float = 200.0  # uncompressed / compressed size of one zip member (JPEG crops: ~1)
    max_pixels: int = 40_000_000  # one image (width x height), below PIL's own bomb limit
    max_upload_mb: int = DEFAULT_UPLOAD_MB  # one uploaded file, and one image in it (`--max-upload-mb`)

    @property
    def max_file_bytes(self) -> int:
        """The largest file, or image in a zip, in bytes (``max_upload_mb`` MiB)."""
        return self.max_upload_mb * 2**20


_SAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str, max_len: int = 80) -> str:
    """A file name with no folder part and only harmless characters (Market-style names survive)."""
    base = PurePosixPath(name.replace("\\", "/")).name
    base = _SAFE_CHARS.sub("_", base).lstrip(".") or "image"
    return base[-max_len:]


def check_image(path: str | Path, limits: UploadLimits = UploadLimits(), crop: bool = False) -> str | None:
    """Why ``path`` is not a usable image (``None`` when it is): size, pixel count, decodability, and with
    ``crop`` the shape of a person crop (:func:`~reid_ssl.images.crop_shape_problem`)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        return f"cannot read the file ({e.strerror})"
    if size == 0:
        return "empty file"
    if size > limits.max_file_bytes:
        return f"file too large ({size / 2**20:.1f} MB > {limits.max_upload_mb} MB, the app's --max-upload-mb)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # reads the header only
                w, h = im.size
    except UnidentifiedImageError:
        return "not an image file"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return f"refused: too many pixels (more than {limits.max_pixels:,})"
    except (OSError, SyntaxError, ValueError) as e:
        return f"cannot decode the image, truncated or corrupt ({e})"
    if w * h > limits.max_pixels:
        return f"refused: {w} x {h} = {w * h:,} pixels (limit {limits.max_pixels:,})"
    if crop and (reason := crop_shape_problem(w, h)):
        return reason
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            open_rgb(path)  # full decode: truncated files fail here
    except (ImageError, Image.DecompressionBombWarning) as e:
        return str(e).replace(str(path), "").lstrip(": ") or "cannot decode"
    return None


def _unsafe_member(info: zipfile.ZipInfo) -> str | None:
    name = info.filename
    posix = name.replace("\\", "/")
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix):
        return f"absolute path {name!r}"
    if ".." in PurePosixPath(posix).parts:
        return f"path leaving the archive {name!r}"
    if stat.S_ISLNK(info.external_attr >> 16):
        return f"symbolic link {name!r}"
    return None


def _checked_members(infos: list[zipfile.ZipInfo], limits: UploadLimits) -> list[zipfile.ZipInfo]:
    """The archive's file members, after the checks that refuse the whole archive (names, links, bombs).

    Raises:
        UploadError: an unsafe member name or link, too many members, or a (member or total) bomb.
    """
    for info in infos:
        if reason := _unsafe_member(info):
            raise UploadError(f"refused the zip: it contains an unsafe member ({reason})")
    files = [i for i in infos if not i.is_dir()]
    if len(files) > limits.max_files:
        raise UploadError(f"refused the zip: {len(files)} members (limit {limits.max_files})")
    total = sum(i.file_size for i in files)
    if total > limits.max_total_bytes:
        raise UploadError(
            f"refused the zip: it would expand to {total / 2**20:.0f} MB "
            f"(limit {limits.max_total_bytes / 2**20:.0f} MB)"
        )
    for i in files:
        if i.file_size > 2**20 and i.file_size > limits.max_ratio * max(i.compress_size, 1):
            raise UploadError(
                f"refused the zip: member {i.filename!r} expands {i.file_size / 2**20:.0f} MB from "
                f"{i.compress_size} bytes (a zip bomb)"
            )
    return files


def safe_extract_zip(
    zip_path: str | Path, dest: str | Path, limits: UploadLimits = UploadLimits()
) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    """Extract the image members of an untrusted zip into ``dest``.

    Returns:
        ([(written path, original member name)], [(member name, why it was skipped)]).

    Raises:
        UploadError: not a zip, an unsafe member name or link, or a bomb; nothing is left in ``dest``.
    """
    dest = Path(dest)
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise UploadError(f"not a readable zip archive ({e})") from None
    with zf:
        files = _checked_members(zf.infolist(), limits)
        written: list[tuple[Path, str]] = []
        skipped: list[tuple[str, str]] = []
        dest.mkdir(parents=True, exist_ok=True)
        try:
            for n, info in enumerate(files):
                if not is_image_name(info.filename):
                    skipped.append((info.filename, "not an image file name"))
                    continue
                if info.flag_bits & 0x1:
                    skipped.append((info.filename, "encrypted"))
                    continue
                if info.file_size > limits.max_file_bytes:
                    skipped.append(
                        (info.filename, f"too large ({info.file_size / 2**20:.1f} MB > {limits.max_upload_mb} MB)")
                    )
                    continue
                target = dest / f"{n:05d}_{safe_name(info.filename)}"
                with zf.open(info) as src, open(target, "wb") as out:
                    # the header's sizes can lie: count what actually comes out
                    copied = 0
                    while chunk := src.read(1 << 16):
                        copied += len(chunk)
                        if copied > limits.max_file_bytes:
                            raise UploadError(f"refused the zip: member {info.filename!r} is larger than it claims")
                        out.write(chunk)
                written.append((target, info.filename))
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
            shutil.rmtree(dest, ignore_errors=True)
            raise UploadError(f"the zip is damaged ({e})") from None
        except UploadError:
            shutil.rmtree(dest, ignore_errors=True)
            raise
    return written, skipped


@dataclass
class CheckedUpload:
    """Images that passed every check, and everything that did not, with reasons."""

    images: list[tuple[Path, str]]  # (path on disk, the name the user gave it)
    problems: list[tuple[str, str]]  # (name, reason)


def check_upload(
    files: list[str | Path], workdir: str | Path, limits: UploadLimits = UploadLimits(), names: list[str] | None = None
) -> CheckedUpload:
    """Expand zips (safely) into ``workdir`` and check every image. Raises :class:`UploadError` for unsafe zips.

    Args:
        files: uploaded file paths (images or ``.zip``).
        names: the names the user gave them (default: the files' own names).
    """
    workdir = Path(workdir)
    names = names or [Path(f).name for f in files]
    candidates: list[tuple[Path, str]] = []
    problems: list[tuple[str, str]] = []
    for n, (f, name) in enumerate(zip(files, names, strict=True)):
        f = Path(f)
        if name.lower().endswith(".zip") or (not is_image_name(name) and zipfile.is_zipfile(f)):
            written, skipped = safe_extract_zip(f, workdir / f"zip{n:03d}", limits)
            candidates += [(p, f"{name}/{member}") for p, member in written]
            problems += [(f"{name}/{member}", why) for member, why in skipped]
        else:
            candidates.append((f, name))
    if len(candidates) > limits.max_files:
        raise UploadError(f"too many images in one upload ({len(candidates)}, limit {limits.max_files})")
    images: list[tuple[Path, str]] = []
    for path, name in candidates:
        if not is_image_name(name):
            problems.append((name, "not an image file name (.jpg, .png, ...)"))
        elif reason := check_image(path, limits, crop=True):
            problems.append((name, reason))
        else:
            images.append((path, name))
    return CheckedUpload(images, problems)
