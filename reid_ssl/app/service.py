"""What the app does, without a user interface: search, gallery uploads and full-frame detection over one index.

:class:`GallerySearchApp` takes the raw values a client sent (the app's events run with ``preprocess=False``:
file payloads, numbers and choices as they came over the wire), checks every one of them
(:mod:`reid_ssl.app.inputs`), and raises a :class:`~reid_ssl.errors.ReidSslError` whose message the user can
act on; :mod:`reid_ssl.app.ui` shows it as an error toast. Native code only sees validated input: image files
are checked from their header (size, pixels) before a decoder runs (:func:`~reid_ssl.app.uploads.check_image`),
frames are checked by the detector before OpenCV (:func:`~reid_ssl.data.video.detect.check_frame`), and numbers
reach FAISS and SQLite only after they were parsed and bounded. What the user reads (captions, the verdict) is
worded in :mod:`reid_ssl.app.text`. This module never imports gradio.

Camera ids are 0-based (file name ``..._c1...`` is camid 0, see :mod:`reid_ssl.data.market`): captions,
the "exclude the query's camera" filter and the query-camera choice all use that one number.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from reid_ssl.app.files import DISPLAY_SIDE, DisplayFiles, fit
from reid_ssl.app.inputs import MAX_K, no_match_threshold, number, payload, query_camid, results_k
from reid_ssl.app.text import caption, shortfall, summary, verdict
from reid_ssl.app.uploads import UploadLimits, check_image, check_upload, safe_name
from reid_ssl.data.market import parse_market_name
from reid_ssl.errors import ImageError, IndexLockedError, InputError, UploadError
from reid_ssl.fileio import sha256_file
from reid_ssl.images import open_rgb
from reid_ssl.index import GalleryIndex, GalleryItem, current_generation, describe_calibration

if TYPE_CHECKING:  # the detector module imports OpenCV, which edits LD_LIBRARY_PATH: only when detecting
    from reid_ssl.data.video.detect import Box, Detector

MAX_PEOPLE = 50  # detections shown per frame (best scores first)
ALREADY_INDEXED = "already in the gallery"  # why a gallery upload was skipped (the rule of `index add`)

# the names that lived here before inputs.py and text.py were split out (reid_ssl.app.ui imports MAX_K)
__all__ = ["MAX_K", "MAX_PEOPLE", "GallerySearchApp", "caption", "crop", "query_camid", "verdict"]

log = logging.getLogger(__name__)


def crop(rgb: np.ndarray, box: Box, pad: float = 0.05) -> Image.Image:
    """The box (grown by ``pad`` of its size on each side, clipped to the frame) as a PIL image."""
    h, w = rgb.shape[:2]
    dx, dy = round(box.w * pad), round(box.h * pad)
    x0, y0 = max(0, box.x - dx), max(0, box.y - dy)
    x1, y1 = min(w, box.x + box.w + dx), min(h, box.y + box.h + dy)
    return Image.fromarray(np.ascontiguousarray(rgb[y0:y1, x0:x1]))


# ---------------------------------------------------------------------------------------------------------
# The app's logic, callable without a server (tests call these methods directly)
# ---------------------------------------------------------------------------------------------------------


class GallerySearchApp:
    """Search, gallery uploads and full-frame detection over one index and its embedder.

    Searches use the current :class:`GalleryIndex` object; an upload builds the next one under the index's
    writer lock and swaps it in, so searches in flight never see an index being modified. Saves made by
    other processes (``reid_ssl index add``) are picked up within a second.

    Args:
        warn: called with a message the user should see without the request failing (the UI passes
            ``gr.Warning``); logs it by default.
    """

    def __init__(
        self,
        index: GalleryIndex,
        embedder: Any,
        limits: UploadLimits | None = None,
        detector: Detector | None = None,
        warn: Callable[[str], Any] | None = None,
    ) -> None:
        index.check_embedder(embedder)
        self._index = index
        self.embedder = embedder
        self.limits = limits or UploadLimits()
        if detector is None:
            from reid_ssl.data.video.detect import HOGDetector

            detector = HOGDetector()
        self.detector = detector
        self.warn = warn or log.warning
        self.files = DisplayFiles()
        self._swap_lock = threading.Lock()
        self._checked = time.monotonic()

    # --- the index, kept current ----------------------------------------------------------------------

    @property
    def index(self) -> GalleryIndex:
        idx = self._index
        if idx.path is not None and time.monotonic() - self._checked > 1.0:
            self._checked = time.monotonic()
            try:
                if current_generation(idx.path) != idx.generation:
                    with self._swap_lock:
                        if current_generation(idx.path) != self._index.generation:
                            self._index = GalleryIndex.load(idx.path)
            except (OSError, ValueError):  # a damaged newer generation: keep serving the one in memory
                pass
        return self._index

    @property
    def uploads_dir(self) -> Path | None:
        return None if self._index.path is None else self._index.path / "uploads"

    def thumbnail(self, path: str, idx: GalleryIndex) -> str:
        """A gallery image for display (a file), only from the index's own folders (a crafted index cannot
        make the app read other files)."""
        roots = [Path(r) for r in idx.manifest.get("roots", [])]
        if self.uploads_dir is not None:
            roots.append(self.uploads_dir.resolve())
        return self.files.thumbnail(path, roots)

    def image_file(self, im: Image.Image) -> str:
        return self.files.write(im)

    def open_upload(self, value: Any, what: str, crop: bool = False) -> tuple[Image.Image, str, str]:
        """A client's image payload -> (decoded RGB image, path, the name the user gave), checked first (with
        ``crop``: also the shape of a person crop, the rule gallery uploads follow too)."""
        path, name = payload(value)
        if not path:
            raise InputError(f"Upload a {what} first.")
        if reason := check_image(path, self.limits, crop=crop):
            raise ImageError(f"This file cannot be used as a {what}: {reason}.")
        try:
            return open_rgb(path), path, name
        except ImageError as e:
            raise ImageError(f"This file cannot be used as a {what}: {e}") from None

    # --- search ---------------------------------------------------------------------------------------

    def search(
        self,
        image: Any,
        k: Any = 10,
        exclude_same_camera: Any = False,
        query_camera: Any = "auto",
        threshold: Any = None,
    ) -> tuple[list[tuple[str, str]], str]:
        """Query crop -> ([(image file, caption)] best first, status markdown)."""
        k = results_k(k)
        exclude = exclude_same_camera is True or str(exclude_same_camera).lower() in ("true", "1")
        camid = query_camid(query_camera, payload(image)[1]) if exclude else None
        im, _, _ = self.open_upload(image, "query image (a person crop)", crop=True)
        feature = self.embedder.embed_image(im)
        if exclude and camid is None:
            self.warn(
                "The query's camera is unknown (no Market-style file name): pick its camid under 'Query "
                "camid' to exclude it. Showing all cameras."
            )
        return self._search_feature(feature, k, camid, threshold)

    def _search_feature(
        self, feature: np.ndarray, k: Any, camid: int | None, threshold: Any
    ) -> tuple[list[tuple[str, str]], str]:
        idx = self.index
        if idx.ntotal == 0:
            return [], "The gallery is empty: add images in the **Gallery** tab first."
        k = results_k(k)
        thr = no_match_threshold(threshold, idx.threshold)
        hits = idx.search(feature, k, exclude_camid=camid)[0]
        gallery = [(self.thumbnail(h.path, idx), caption(h)) for h in hits]
        note = ""
        if camid is not None:
            cameras = idx.stats()["cameras"] if len(idx.ids_where(camid=camid)) == 0 else None
            note = (
                f" (camid {camid} excluded)"
                if cameras is None
                else f" (camid {camid} is not a camera of this gallery, whose camids are "
                f"{', '.join(map(str, cameras)) or 'unknown'}: nothing was excluded)"
            )
        return gallery, verdict(hits, thr) + note + shortfall(len(hits), k, idx, camid)

    # --- gallery uploads ------------------------------------------------------------------------------

    def add_files(self, files: Any) -> tuple[str, str]:
        """Uploaded images / zips -> checked, embedded, added, saved. Returns (status, statistics)."""
        if isinstance(files, (dict, str)):
            files = [files]
        if not files:
            raise InputError("Choose images or a .zip of crops first.")
        if not isinstance(files, (list, tuple)):
            raise InputError(f"expected a list of files, got {type(files).__name__}")
        if self._index.path is None:
            raise InputError("This index was never saved to a folder, so uploads cannot be kept.")
        pairs = [payload(f) for f in files]
        paths: list[str | Path] = [p for p, _ in pairs if p is not None]
        if len(paths) < len(pairs):
            raise InputError("Every uploaded item must be a file.")
        work = Path(tempfile.mkdtemp(prefix="reid_ssl_upload_"))
        try:
            try:
                checked = check_upload(paths, work, self.limits, [safe_name(n) for _, n in pairs])
            except UploadError as e:
                raise UploadError(f"Nothing was added: {e}.") from None
            problems = list(checked.problems)
            if not checked.images:
                raise UploadError("Nothing was added: " + summary(problems))
            added, failures = self._add_checked(checked.images)
            problems += failures
            if not added:
                raise UploadError("Nothing was added: " + summary(problems))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        status = f"Added **{len(added)}** image{'s' * (len(added) != 1)} to the gallery"
        status += f" (id {added[0]})." if len(added) == 1 else f" (ids {added[0]}–{added[-1]})."
        if problems:
            status += " Skipped: " + summary(problems)
            self.warn(f"{len(problems)} file(s) skipped: " + summary(problems, limit=3))
        return status, self.stats_markdown()

    def _stored_path(self, src: Path, name: str) -> Path:
        """Where an upload is kept: named by its bytes' digest and its name, so the same image uploaded again
        has the same path and :meth:`GalleryIndex.duplicates` (the rule of ``index add``) finds it."""
        assert self.uploads_dir is not None
        return (self.uploads_dir / f"{sha256_file(src)[:32]}_{safe_name(name)}").resolve()

    def _add_checked(self, images: list[tuple[Path, str]]) -> tuple[list[int], list[tuple[str, str]]]:
        """Store, embed and add checked images, skipping duplicates; ([new ids], [(name, why skipped)])."""
        assert self._index.path is not None and self.uploads_dir is not None
        created: list[Path] = []  # files this call wrote: removed again when nothing is added
        failures: list[tuple[str, str]] = []
        try:
            self.uploads_dir.mkdir(parents=True, exist_ok=True)
            stored = [(self._stored_path(src, name), src, name) for src, name in images]
            dup = self.index.duplicates([str(dst) for dst, _, _ in stored])
            kept: list[tuple[Path, str]] = []
            for (dst, src, name), d in zip(stored, dup, strict=True):
                if d:
                    failures.append((name, ALREADY_INDEXED))
                    continue
                if not dst.exists():
                    created.append(dst)  # before copying: a full disk may leave part of it
                    shutil.copyfile(src, dst)
                kept.append((dst, name))
            if not kept:
                return [], failures
            res = self.embedder.embed_images([p for p, _ in kept], batch_size=32)
            failures += [(kept[i][1], reason) for i, reason in res.failures]
            items = []
            for i in res.ok:
                path, name = kept[i]
                meta = parse_market_name(Path(name).name)
                fields = {} if meta is None else {"pid": meta.pid, "camid": meta.camid, "frame": meta.frame}
                items.append(GalleryItem(path=str(path), source="upload", **fields))
            with GalleryIndex.open_for_update(self._index.path, timeout=30) as idx:
                idx.check_embedder(self.embedder)
                fresh = ~np.array(idx.duplicates([it.path for it in items]), bool)  # added meanwhile?
                failures += [(kept[i][1], ALREADY_INDEXED) for i, f in zip(res.ok, fresh, strict=True) if not f]
                ids = idx.add(res.features[fresh], [it for it, f in zip(items, fresh, strict=True) if f])
                if len(ids):
                    idx.add_roots(self.uploads_dir)
                else:  # under the lock: no other upload can have indexed these files meanwhile
                    self._remove(created)
            with self._swap_lock:
                self._index = idx  # saved and consistent: new searches use it, running ones keep theirs
        except IndexLockedError:
            self._remove(created)
            raise IndexLockedError(
                "The index is being written by another process; nothing was added, try again."
            ) from None
        except OSError as e:
            self._remove(created)
            raise UploadError(f"Could not store the upload ({e.strerror or e}); the gallery is unchanged.") from None
        return [int(i) for i in ids], failures

    @staticmethod
    def _remove(files: list[Path]) -> None:
        for f in files:
            f.unlink(missing_ok=True)

    def stats_markdown(self) -> str:
        idx = self.index
        s = idx.stats()
        rows = [
            ("Images", s["items"]),
            ("Identities / tracklets", s["identities"]),
            ("Camids", ", ".join(map(str, s["cameras"])) or "–"),
            ("Index", f"{idx.manifest['index']['type'] or '–'} ({idx.manifest['index']['factory'] or '–'})"),
            ("No-match threshold", describe_calibration(idx.calibration)),
            ("Generation", idx.generation),
            ("Sources", ", ".join(f"{k}: {v}" for k, v in s["sources"].items()) or "–"),
        ]
        return "| Gallery index | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)

    # --- full frames ----------------------------------------------------------------------------------

    def detect(self, frame: Any) -> tuple[Any, list, list, str]:
        """Frame -> ((display frame, [(box, label)]), [(crop file, caption)], crops for the state, status).

        The frame shown is a copy no larger than :data:`~reid_ssl.app.files.DISPLAY_SIDE`, boxes scaled to it.
        """
        im, _, _ = self.open_upload(frame, "camera frame")
        rgb = np.asarray(im)
        found = self.detector(np.ascontiguousarray(rgb[..., ::-1]))  # BGR; the detector checks the frame
        boxes = sorted(found[:MAX_PEOPLE], key=lambda b: (b.x, b.y))
        display = fit(im, (DISPLAY_SIDE, DISPLAY_SIDE))
        shown, scale = self.image_file(display), display.width / im.width
        annotations = [(tuple(round(v * scale) for v in b.xyxy()), f"person {i + 1}") for i, b in enumerate(boxes)]
        if not boxes:
            return (shown, []), [], [], "No people found in this frame (HOG detector, score > 0.3)."
        crops = [crop(rgb, b) for b in boxes]
        pairs = zip(crops, boxes, strict=True)
        gallery = [(self.image_file(c), f"person {i + 1} · HOG {b.score:.2f}") for i, (c, b) in enumerate(pairs)]
        status = f"Found **{len(boxes)}** people. Click one to search the gallery with it."
        if len(found) > MAX_PEOPLE:
            status += f" Showing the {MAX_PEOPLE} best-scoring of {len(found)}."
        return (shown, annotations), gallery, [np.asarray(c) for c in crops], status

    def search_person(self, crops: list, number_: Any, k: Any = 10) -> tuple[Any, list, str]:
        """Search with the ``number_``-th (1-based) detected person of the last frame."""
        if not crops:
            raise InputError("Detect people in a frame first.")
        n = round(number(number_, "the person number", 1))
        if not 1 <= n <= len(crops):
            raise InputError(f"Pick a person between 1 and {len(crops)}.")
        person = Image.fromarray(np.ascontiguousarray(np.asarray(crops[n - 1], np.uint8)))
        gallery, status = self._search_feature(self.embedder.embed_image(person), k, None, None)
        return self.image_file(person), gallery, f"Person {n}: " + status
