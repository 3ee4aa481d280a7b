"""The images the app hands to the browser: re-encoded JPEG copies, written once, bounded in size.

Results are never shown by a path the client chooses: a gallery image is displayed through :meth:`thumbnail`,
which reads it only from under the index's own folders, and every image the app returns (thumbnails, person
crops, the annotated frame) is a JPEG no larger than :data:`DISPLAY_SIDE` on its longest side, so that no
uploaded shape (70000 x 1 pixels, say) can make a resize or an encoder allocate gigabytes.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import threading
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from reid_ssl.errors import ImageError
from reid_ssl.images import open_rgb

THUMB_BOX = (512, 256)  # largest (width, height) of a result thumbnail
DISPLAY_SIDE = 1280  # longest side of any other image the app returns
KEPT_FILES = 4096  # files written before the oldest are deleted (gradio keeps its own copies)


def fit(im: Image.Image, box: tuple[int, int]) -> Image.Image:
    """``im`` shrunk (never enlarged) to fit ``box`` = (width, height), aspect kept, each side >= 1 pixel."""
    scale = min(box[0] / im.width, box[1] / im.height, 1.0)
    if scale >= 1.0:
        return im
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    return im.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def placeholder() -> Image.Image:
    """The grey stand-in shown for a gallery image that may not or cannot be displayed."""
    return Image.new("RGB", (64, 128), (200, 200, 200))


class DisplayFiles:
    """JPEG files named by their content in a private temporary folder; the last :data:`KEPT_FILES` are kept.

    gradio copies a returned *file* into its cache atomically but writes a returned PIL image in place, so
    identical results of two concurrent searches could be downloaded half-rewritten: hence files, written by
    atomic rename.
    """

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="reid_ssl_app_"))
        weakref.finalize(self, shutil.rmtree, self.folder, True)
        self._lock = threading.Lock()
        self._files: OrderedDict[str, None] = OrderedDict()
        self._thumbs: OrderedDict[str, str] = OrderedDict()  # gallery path -> display file

    def write(self, im: Image.Image, side: int = DISPLAY_SIDE) -> str:
        """``im`` (shrunk to ``side``) as a JPEG file; the path of the file."""
        buf = io.BytesIO()
        fit(im, (side, side)).convert("RGB").save(buf, format="JPEG", quality=92)
        data = buf.getvalue()
        path = str(self.folder / f"{hashlib.sha1(data).hexdigest()[:24]}.jpg")
        with self._lock:
            if path in self._files:
                self._files.move_to_end(path)
                return path
        if not os.path.exists(path):
            tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
            Path(tmp).write_bytes(data)
            os.replace(tmp, path)
        with self._lock:
            self._files[path] = None
            while len(self._files) > KEPT_FILES:
                old, _ = self._files.popitem(last=False)
                Path(old).unlink(missing_ok=True)
                for k in [k for k, v in self._thumbs.items() if v == old]:
                    del self._thumbs[k]
        return path

    def thumbnail(self, path: str, roots: Sequence[Path]) -> str:
        """A gallery image for display, read only if it lies under one of ``roots`` (after resolving links)."""
        with self._lock:
            if path in self._thumbs and Path(self._thumbs[path]).exists():
                self._thumbs.move_to_end(path)
                return self._thumbs[path]
        real = Path(path).resolve()
        if not any(real.is_relative_to(r) for r in roots) or not real.is_file():
            return self.write(placeholder())
        try:
            im = open_rgb(real)
        except ImageError:
            return self.write(placeholder())
        file = self.write(fit(im, THUMB_BOX))
        with self._lock:
            self._thumbs[path] = file
            while len(self._thumbs) > KEPT_FILES:
                self._thumbs.popitem(last=False)
        return file
