"""The gallery search app: ``build_demo(index, embedder) -> gr.Blocks``. Nothing runs at import.

Tabs:

* **Search**: a query person crop -> the k most similar gallery images with captions (score, pid or
  tracklet, camera, frame), an "exclude the query's camera" filter, and the "no match" verdict: when the
  best score is below the index's calibrated threshold the app says that nobody in the gallery matches.
  The click event is the API endpoint ``/search`` taking ``(image, k)`` (filters and threshold are optional).
* **Gallery**: images or a .zip of crops are checked (:mod:`app.uploads`), embedded, added to the index
  and saved (atomically, under the index's writer lock); statistics of the index.
* **Full frame**: a whole camera frame -> OpenCV HOG person boxes (:mod:`app.detect`); clicking a person
  searches the gallery with that crop.

Safety: results are shown as re-encoded copies of gallery images that lie under the index's own folders
(``manifest["roots"]``), never by a path the client chooses; ``allowed_paths`` stays empty; gradio's
``/file=<url>`` and ``/proxy=`` routes, which would make the server fetch remote URLs, are refused.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

OFFLINE_ENV = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_SHARE": "False",
}


def set_offline_env() -> None:
    """Keep gradio offline: call before gradio is imported (ui-testing.md).

    The values are forced, not defaults: a ``GRADIO_ANALYTICS_ENABLED=True`` or ``GRADIO_SHARE=True`` left in
    the environment never turns telemetry or a share link on.
    """
    for key, value in OFFLINE_ENV.items():
        os.environ[key] = value
    for key in ("NO_PROXY", "no_proxy"):
        hosts = [h for h in os.environ.get(key, "").split(",") if h]
        os.environ[key] = ",".join(dict.fromkeys([*hosts, "127.0.0.1", "localhost"]))


set_offline_env()  # setting variables is all that happens at import; gradio is imported by build_demo

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from reid_ssl.app.uploads import UploadError, UploadLimits, check_image, check_upload, safe_name
from reid_ssl.data.video.detect import Box, Detector, HOGDetector
from reid_ssl.images import ImageError, open_rgb
from reid_ssl.index import (
    GalleryIndex,
    IndexLockedError,
    SearchHit,
    current_generation,
    describe_calibration,
    parse_market_name,
)

MAX_K = 50
THUMB_HEIGHT = 256


# ---------------------------------------------------------------------------------------------------------
# Captions and verdicts
# ---------------------------------------------------------------------------------------------------------


def caption(hit: SearchHit) -> str:
    """``0.823 · pid 12 · cam 1 · frame 345`` (tracklet instead of pid where identities are tracklets)."""
    parts = [f"{hit.score:.3f}"]
    if hit.tracklet is not None:
        parts.append(f"tracklet {hit.tracklet}")
    elif hit.pid is not None:
        parts.append("junk" if hit.pid < 0 else f"pid {hit.pid}")
    if hit.camid is not None:
        parts.append(f"cam {hit.camid}")
    if hit.frame is not None:
        parts.append(f"frame {hit.frame}")
    if len(parts) == 1:
        parts.append(Path(hit.path).name)
    return " · ".join(parts)


def verdict(hits: Sequence[SearchHit], threshold: float | None) -> str:
    """The status line above the results: match, no match, or uncalibrated."""
    if not hits:
        return "No gallery item passed the filters."
    best = hits[0].score
    if threshold is None:
        return (
            f"Best score **{best:.3f}**. No no-match threshold is in use (this index has no calibrated threshold, "
            "or the slider is at 0), so every result is shown as a candidate."
        )
    above = sum(h.score >= threshold for h in hits)
    if best >= threshold:
        return (
            f"**Match**: best score {best:.3f} ≥ threshold {threshold:.3f}; {above} of {len(hits)} results "
            "are above it."
        )
    return (
        f"**No match**: nobody in the gallery scores above the threshold {threshold:.3f} (best "
        f"{best:.3f}). The nearest candidates are shown for reference."
    )


def _payload(value: Any) -> tuple[str | None, str]:
    """(path, name the user gave) from a raw gradio FileData dict, a path, or None."""
    if value is None:
        return None, ""
    if isinstance(value, dict):
        path = value.get("path")
        return path, value.get("orig_name") or (Path(path).name if path else "")
    return str(value), Path(str(value)).name


# ---------------------------------------------------------------------------------------------------------
# The app's logic, callable without a server (tests call these methods directly)
# ---------------------------------------------------------------------------------------------------------


class GallerySearchApp:
    """Search, gallery uploads and full-frame detection over one index and its embedder.

    Searches use the current :class:`GalleryIndex` object; an upload builds the next one under the index's
    writer lock and swaps it in, so searches in flight never see an index being modified. Saves made by
    other processes (``reid_ssl index add``) are picked up within a second.
    """

    def __init__(
        self,
        index: GalleryIndex,
        embedder: Any,
        limits: UploadLimits | None = None,
        detector: Detector | None = None,
    ) -> None:
        index.check_embedder(embedder)
        self._index = index
        self.embedder = embedder
        self.limits = limits or UploadLimits()
        self.detector = detector or HOGDetector()
        self._swap_lock = threading.Lock()
        self._checked = time.monotonic()
        self._thumbs: OrderedDict[str, str] = OrderedDict()  # gallery path -> display file
        self._thumb_lock = threading.Lock()
        # Images the app returns are files written here once, by atomic rename: gradio copies a returned *file*
        # into its cache atomically, but writes a returned PIL image in place, so identical results of two
        # concurrent searches could be downloaded half-rewritten.
        self._files_dir = Path(tempfile.mkdtemp(prefix="reid_ssl_app_"))
        weakref.finalize(self, shutil.rmtree, self._files_dir, True)
        self._files: OrderedDict[str, None] = OrderedDict()

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

    def _roots(self, idx: GalleryIndex) -> list[Path]:
        roots = [Path(r) for r in idx.manifest.get("roots", [])]
        if self.uploads_dir is not None:
            roots.append(self.uploads_dir.resolve())
        return roots

    def image_file(self, im: Image.Image) -> str:
        """``im`` as a JPEG file named by its content, written once (atomic rename); the last 4096 are kept."""
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=92)
        data = buf.getvalue()
        path = self._files_dir / f"{hashlib.sha1(data).hexdigest()[:24]}.jpg"
        with self._thumb_lock:
            if str(path) in self._files:
                self._files.move_to_end(str(path))
                return str(path)
        if not path.exists():
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        with self._thumb_lock:
            self._files[str(path)] = None
            while len(self._files) > 4096:
                old, _ = self._files.popitem(last=False)
                Path(old).unlink(missing_ok=True)  # gradio already holds its own copy
                for k in [k for k, v in self._thumbs.items() if v == old]:
                    del self._thumbs[k]
        return str(path)

    def thumbnail(self, path: str, idx: GalleryIndex) -> str:
        """A gallery image for display (a file), only from the index's own folders (a crafted index cannot
        make the app read other files)."""
        with self._thumb_lock:
            if path in self._thumbs and Path(self._thumbs[path]).exists():
                self._thumbs.move_to_end(path)
                return self._thumbs[path]
        real = Path(path).resolve()
        if not any(real.is_relative_to(r) for r in self._roots(idx)) or not real.is_file():
            return self.image_file(_placeholder("not under the gallery folders"))
        try:
            im = open_rgb(real)
        except ImageError:
            return self.image_file(_placeholder("unreadable"))
        if im.height > THUMB_HEIGHT:
            im = im.resize((max(1, round(im.width * THUMB_HEIGHT / im.height)), THUMB_HEIGHT), Image.BICUBIC)
        file = self.image_file(im)
        with self._thumb_lock:
            self._thumbs[path] = file
            while len(self._thumbs) > 4096:
                self._thumbs.popitem(last=False)
        return file

    # --- search ---------------------------------------------------------------------------------------

    def _query_image(self, image: Any) -> tuple[str, str]:
        import gradio as gr

        path, name = _payload(image)
        if not path:
            raise gr.Error("Upload a query image (a person crop) first.")
        if reason := check_image(path, self.limits):
            raise gr.Error(f"This file cannot be used as a query: {reason}.")
        return path, name

    def search(
        self,
        image: Any,
        k: float = 10,
        exclude_same_camera: bool = False,
        query_camera: str = "auto",
        threshold: float | None = None,
    ) -> tuple[list[tuple[str, str]], str]:
        """Query crop -> ([(image, caption)] best first, status markdown)."""
        import gradio as gr

        path, name = self._query_image(image)
        try:
            feature = self.embedder.embed_image(path)
        except ImageError as e:
            raise gr.Error(f"This file cannot be used as a query: {e}") from None
        camid = None
        if exclude_same_camera:
            camid = _query_camera(query_camera, name)
            if camid is None:
                gr.Warning(
                    "The query's camera is unknown (no Market-style file name): pick it under 'Query "
                    "camera' to exclude it. Showing all cameras."
                )
        return self._search_feature(feature, k, camid, threshold)

    def _search_feature(
        self, feature: np.ndarray, k: Any, camid: int | None, threshold: float | None
    ) -> tuple[list[tuple[str, str]], str]:
        idx = self.index
        if idx.ntotal == 0:
            return [], "The gallery is empty: add images in the **Gallery** tab first."
        k = int(min(max(int(float(k or 10)), 1), MAX_K))
        hits = idx.search(feature, k, exclude_camid=camid)[0]
        thr = idx.threshold if threshold is None else (float(threshold) if float(threshold) > 0 else None)
        gallery = [(self.thumbnail(h.path, idx), caption(h)) for h in hits]
        note = f" (camera {camid} excluded)" if camid is not None else ""
        return gallery, verdict(hits, thr) + note

    # --- gallery uploads ------------------------------------------------------------------------------

    def add_files(self, files: Sequence[Any] | None) -> tuple[str, str]:
        """Uploaded images / zips -> checked, embedded, added, saved. Returns (status, statistics)."""
        import gradio as gr

        if not files:
            raise gr.Error("Choose images or a .zip of crops first.")
        if self._index.path is None:
            raise gr.Error("This index was never saved to a folder, so uploads cannot be kept.")
        paths, names = zip(*(_payload(f) for f in files), strict=True)
        work = Path(tempfile.mkdtemp(prefix="reid_ssl_upload_"))
        try:
            try:
                checked = check_upload(list(paths), work, self.limits, names=[safe_name(n) for n in names])
            except UploadError as e:
                raise gr.Error(f"Nothing was added: {e}.", duration=None) from None
            problems = list(checked.problems)
            if not checked.images:
                raise gr.Error("Nothing was added: " + _summary(problems), duration=None)
            added, failures = self._add_checked(checked.images)
            problems += failures
        finally:
            shutil.rmtree(work, ignore_errors=True)
        status = f"Added **{len(added)}** image{'s' * (len(added) != 1)} to the gallery"
        status += f" (ids {added[0]}–{added[-1]})." if added else "."
        if problems:
            status += " Skipped: " + _summary(problems)
            gr.Warning(f"{len(problems)} file(s) skipped: " + _summary(problems, limit=3))
        return status, self.stats_markdown()

    def _add_checked(self, images: list[tuple[Path, str]]) -> tuple[list[int], list[tuple[str, str]]]:
        import gradio as gr

        assert self.uploads_dir is not None
        batch = self.uploads_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        try:
            batch.mkdir(parents=True)
            kept = []
            for n, (src, name) in enumerate(images):
                dst = batch / f"{n:05d}_{safe_name(name)}"
                shutil.copyfile(src, dst)
                kept.append((dst, name))
            res = self.embedder.embed_images([p for p, _ in kept], batch_size=32)
            failures = [(kept[i][1], reason) for i, reason in res.failures]
            items = []
            for i in res.ok:
                path, name = kept[i]
                meta = parse_market_name(Path(name).name) or {}
                items.append({"path": str(path.resolve()), "source": "upload", **meta})
            with GalleryIndex.open_for_update(self._index.path, timeout=30) as idx:
                idx.check_embedder(self.embedder)
                ids = idx.add(res.features, items)
                idx.add_roots(self.uploads_dir)
            with self._swap_lock:
                self._index = idx  # saved and consistent: new searches use it, running ones keep theirs
        except IndexLockedError:
            shutil.rmtree(batch, ignore_errors=True)
            raise gr.Error("The index is being written by another process; nothing was added, try again.") from None
        except OSError as e:
            shutil.rmtree(batch, ignore_errors=True)
            raise gr.Error(f"Could not store the upload ({e.strerror or e}); the gallery is unchanged.") from None
        return [int(i) for i in ids], failures

    def stats_markdown(self) -> str:
        idx = self.index
        s = idx.stats()
        thr = describe_calibration(idx.calibration)
        rows = [
            ("Images", s["items"]),
            ("Identities / tracklets", s["identities"]),
            ("Cameras", ", ".join(map(str, s["cameras"])) or "–"),
            ("Index", f"{idx.manifest['index']['type'] or '–'} ({idx.manifest['index']['factory'] or '–'})"),
            ("No-match threshold", thr),
            ("Generation", idx.generation),
            ("Sources", ", ".join(f"{k}: {v}" for k, v in s["sources"].items()) or "–"),
        ]
        return "| Gallery index | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)

    # --- full frames ----------------------------------------------------------------------------------

    def detect(self, frame: Any) -> tuple[Any, list, list, str]:
        """Frame -> (annotated image, [(crop, caption)], crops for the state, status)."""
        import gradio as gr

        path, _ = _payload(frame)
        if not path:
            raise gr.Error("Upload a camera frame first.")
        if reason := check_image(path, self.limits):
            raise gr.Error(f"This file cannot be used as a frame: {reason}.")
        rgb = np.asarray(open_rgb(path))
        boxes = sorted(self.detector(np.ascontiguousarray(rgb[..., ::-1])), key=lambda b: (b.x, b.y))
        annotations = [(b.xyxy(), f"person {i + 1}") for i, b in enumerate(boxes)]
        crops = [crop(rgb, b) for b in boxes]
        if not boxes:
            return (path, []), [], [], "No people found in this frame (HOG detector, score > 0.3)."
        gallery = [(self.image_file(crops[i]), f"person {i + 1} · HOG {b.score:.2f}") for i, b in enumerate(boxes)]
        status = f"Found **{len(boxes)}** people. Click one to search the gallery with it."
        return (path, annotations), gallery, [np.asarray(c) for c in crops], status

    def search_person(self, crops: list, number: Any, k: Any = 10) -> tuple[Any, list, str]:
        """Search with the ``number``-th (1-based) detected person of the last frame."""
        import gradio as gr

        if not crops:
            raise gr.Error("Detect people in a frame first.")
        n = int(float(number or 1))
        if not 1 <= n <= len(crops):
            raise gr.Error(f"Pick a person between 1 and {len(crops)}.")
        person = Image.fromarray(np.asarray(crops[n - 1], np.uint8))
        gallery, status = self._search_feature(self.embedder.embed_image(person), k, None, None)
        return self.image_file(person), gallery, f"Person {n}: " + status


def crop(rgb: np.ndarray, box: Box, pad: float = 0.05) -> Image.Image:
    """The box (grown by ``pad`` of its size on each side, clipped to the frame) as a PIL image."""
    h, w = rgb.shape[:2]
    dx, dy = round(box.w * pad), round(box.h * pad)
    x0, y0 = max(0, box.x - dx), max(0, box.y - dy)
    x1, y1 = min(w, box.x + box.w + dx), min(h, box.y + box.h + dy)
    return Image.fromarray(np.ascontiguousarray(rgb[y0:y1, x0:x1]))


def _query_camera(choice: Any, name: str) -> int | None:
    if choice not in (None, "", "auto"):
        m = re.search(r"-?\d+", str(choice))
        return int(m.group()) if m else None
    meta = parse_market_name(Path(name).name)
    return None if meta is None else meta["camid"]


def _summary(problems: list[tuple[str, str]], limit: int = 8) -> str:
    shown = "; ".join(f"{name}: {why}" for name, why in problems[:limit])
    more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
    return shown + more


def _placeholder(reason: str) -> Image.Image:
    return Image.new("RGB", (64, 128), (200, 200, 200))


# ---------------------------------------------------------------------------------------------------------
# The Blocks
# ---------------------------------------------------------------------------------------------------------

INTRO = """# Person re-identification: gallery search
Upload a crop of one person to find them in the gallery. Scores are cosine similarities of the
self-supervised embedder's features; below the calibrated threshold the app says that nobody matches."""


def build_demo(
    index: GalleryIndex,
    embedder: Any,
    *,
    examples: Sequence[str | Path] = (),
    limits: UploadLimits | None = None,
    detector: Detector | None = None,
    title: str = "reid_ssl gallery search",
) -> Any:
    """The app as a ``gr.Blocks`` (not launched: see :func:`launch`).

    Args:
        index: a saved index (uploads are persisted into its folder).
        embedder: the embedder that built ``index`` (checked by fingerprint).
        examples: query images offered as clickable examples.
        detector: person detector for the Full-frame tab (HOG by default).
    """
    import gradio as gr

    app = GallerySearchApp(index, embedder, limits, detector)
    cams = index.stats()["cameras"]
    thr = index.threshold
    thr_label = (
        f"No-match threshold (calibrated: {thr:.3f}, {(index.calibration or {}).get('source', '')})"
        if thr is not None
        else f"No-match threshold, 0 = off ({describe_calibration(index.calibration)})"
    )
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        with gr.Tabs():
            with gr.Tab("Search", id="search"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=280):
                        query = gr.Image(
                            type="filepath",
                            label="Query person crop",
                            elem_id="query",
                            height=300,
                            sources=["upload", "clipboard"],
                        )
                        k = gr.Slider(1, MAX_K, value=10, step=1, label="Results (k)", elem_id="k")
                        exclude = gr.Checkbox(False, label="Exclude the query's camera", elem_id="exclude_camera")
                        qcam = gr.Dropdown(
                            ["auto", *map(str, cams)],
                            value="auto",
                            elem_id="query_camera",
                            label="Query camera (auto: from a Market-style file name)",
                        )
                        threshold = gr.Slider(
                            0.0,
                            1.0,
                            value=thr if thr is not None else 0.0,
                            step=0.001,
                            label=thr_label,
                            elem_id="threshold",
                        )
                        search_btn = gr.Button("Search", variant="primary", elem_id="search_button")
                        if examples:
                            gr.Examples([[str(e)] for e in examples], inputs=[query], label="Example queries")
                    with gr.Column(scale=2):
                        status = gr.Markdown("Upload a query to search the gallery.", elem_id="status", label="status")
                        results = gr.Gallery(
                            label="Most similar gallery images",
                            columns=5,
                            height="auto",
                            object_fit="contain",
                            elem_id="results",
                            format="jpeg",
                        )
                search_btn.click(
                    app.search,
                    [query, k, exclude, qcam, threshold],
                    [results, status],
                    api_name="search",
                    preprocess=False,
                )
            with gr.Tab("Gallery", id="gallery"):
                stats = gr.Markdown(app.stats_markdown(), elem_id="stats", label="statistics")
                files = gr.File(
                    file_count="multiple",
                    file_types=["image", ".zip"],
                    elem_id="gallery_upload",
                    label="Images or a .zip of person crops (Market-style names keep pid/camera/frame)",
                )
                add_btn = gr.Button("Add to gallery", variant="primary", elem_id="add_button")
                add_status = gr.Markdown(elem_id="add_status", label="status")
                add_btn.click(app.add_files, [files], [add_status, stats], api_name="add", preprocess=False)
            with gr.Tab("Full frame", id="frame"):
                crops_state = gr.State([])
                with gr.Row():
                    with gr.Column(scale=1):
                        frame = gr.Image(
                            type="filepath",
                            label="Whole camera frame",
                            elem_id="frame",
                            height=300,
                            sources=["upload", "clipboard"],
                        )
                        detect_btn = gr.Button("Detect people", variant="primary", elem_id="detect_button")
                        frame_k = gr.Slider(1, MAX_K, value=10, step=1, label="Results (k)", elem_id="frame_k")
                        person = gr.Number(1, precision=0, minimum=1, label="Person number", elem_id="person")
                        person_btn = gr.Button("Search this person", elem_id="person_button")
                    with gr.Column(scale=2):
                        boxes = gr.AnnotatedImage(label="Detected people", elem_id="boxes", height=360)
                        frame_status = gr.Markdown(elem_id="frame_status", label="status")
                        people = gr.Gallery(
                            label="People (click one to search)",
                            columns=8,
                            height="auto",
                            object_fit="contain",
                            elem_id="people",
                            allow_preview=False,
                        )
                with gr.Row():
                    picked = gr.Image(label="Query", interactive=False, height=200, elem_id="picked")
                    frame_results = gr.Gallery(
                        label="Most similar gallery images",
                        columns=5,
                        height="auto",
                        object_fit="contain",
                        elem_id="frame_results",
                        format="jpeg",
                    )
                detect_btn.click(
                    app.detect, [frame], [boxes, people, crops_state, frame_status], api_name="detect", preprocess=False
                )

                def on_select(crops: list, k_value: Any, evt: gr.SelectData) -> tuple[Any, Any, list, str]:
                    n = int(evt.index) + 1
                    picked_image, gallery, text = app.search_person(crops, n, k_value)
                    return n, picked_image, gallery, text

                on_select.__annotations__["evt"] = gr.SelectData  # resolvable without `gr` in module globals
                people.select(
                    on_select,
                    [crops_state, frame_k],
                    [person, picked, frame_results, frame_status],
                    api_visibility="private",
                )
                person_btn.click(
                    app.search_person,
                    [crops_state, person, frame_k],
                    [picked, frame_results, frame_status],
                    api_visibility="private",
                )
        demo.load(app.stats_markdown, None, stats, api_visibility="private")
    demo.reid_app = app  # for tests and the CLI: the logic behind the UI
    return demo


# ---------------------------------------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------------------------------------


class RefuseRemoteFetch:
    """ASGI middleware: refuse ``/file=<url>`` and ``/proxy=`` so that no client can make the server fetch URLs.

    (gradio serves ``/gradio_api/file=http://...`` by downloading the URL itself.)
    """

    _REMOTE = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.-]*:|//)")

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") == "http":
            path = scope.get("path", "")
            at = path.find("/file=")
            if "/proxy=" in path or (at >= 0 and self._REMOTE.match(path[at + 6 :])):
                from starlette.responses import PlainTextResponse

                await PlainTextResponse("This app serves no remote files.", status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# Let result captions wrap instead of being cut to "0.823 · pid 1…" under narrow thumbnails.
CSS = """
#results .caption-label, #frame_results .caption-label, #people .caption-label {
  white-space: normal !important; overflow: visible !important; text-overflow: clip !important;
  max-width: 100% !important;
}
"""


def launch(
    demo: Any,
    host: str = "127.0.0.1",
    port: int | None = None,
    *,
    auth: list[tuple[str, str]] | None = None,
    limits: UploadLimits | None = None,
    prevent_thread_lock: bool = False,
    quiet: bool = False,
) -> Any:
    """Serve ``demo`` with the safe settings: no share link, no telemetry, upload size cap, no remote fetches."""
    from starlette.middleware import Middleware

    limits = limits or UploadLimits()
    demo.queue(default_concurrency_limit=1, max_size=256)
    return demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        auth=auth,
        show_error=True,
        quiet=quiet,
        prevent_thread_lock=prevent_thread_lock,
        max_file_size=f"{limits.max_upload_mb}mb",
        allowed_paths=[],
        ssr_mode=False,
        mcp_server=False,
        enable_monitoring=False,
        pwa=False,
        footer_links=["api"],
        css=CSS,
        app_kwargs={"middleware": [Middleware(RefuseRemoteFetch)]},
    )
