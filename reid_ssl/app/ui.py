"""The app's page: ``build_demo(index, embedder) -> gr.Blocks`` (served by :func:`reid_ssl.app.serve.launch`).

Tabs:

* **Search**: a query person crop -> the k most similar gallery images with captions (score, pid or
  tracklet, camid, frame), an "exclude the query's camera" filter, and the "no match" verdict: when the best
  score is below the index's calibrated threshold the app says that nobody in the gallery matches. The click
  event is the API endpoint ``/search`` taking ``(image, k)`` (filters and threshold are optional).
* **Gallery**: images or a .zip of crops are checked (:mod:`reid_ssl.app.uploads`), embedded, added to the
  index and saved (atomically, under the index's writer lock); statistics of the index. API: ``/add``.
* **Full frame**: a whole camera frame -> HOG person boxes (:mod:`reid_ssl.data.video.detect`); clicking a
  person searches the gallery with that crop. API: ``/detect``.

Every event calls :class:`~reid_ssl.app.service.GallerySearchApp` through :func:`user_errors`: an error the
user caused (:class:`~reid_ssl.errors.ReidSslError`) becomes an error toast with its message, and the
server goes on serving. gradio is imported when :func:`build_demo` runs, never at import.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reid_ssl.app.serve import offline_gradio
from reid_ssl.app.service import MAX_K, GallerySearchApp
from reid_ssl.app.uploads import UploadLimits
from reid_ssl.data.market import parse_market_name
from reid_ssl.errors import ReidSslError, one_line
from reid_ssl.images import is_image_name
from reid_ssl.index import GalleryIndex, describe_calibration

if TYPE_CHECKING:
    from reid_ssl.data.video.detect import Detector

log = logging.getLogger(__name__)

UPLOAD_SOURCES = ["upload", "clipboard"]  # no webcam: the app never asks for a camera
INTRO = """# Person re-identification: gallery search
Upload a crop of one person to find them in the gallery. Scores are cosine similarities of the
self-supervised embedder's features; below the calibrated threshold the app says that nobody matches."""


def user_errors(fn: Callable[..., Any], duration: float | None = 10) -> Callable[..., Any]:
    """``fn`` with every :class:`ReidSslError` shown as a ``gr.Error`` toast (``duration=None``: until closed).

    The server's console gets one line per refused request (not Gradio's traceback: it is the user's input, not
    a fault of the server); other exceptions keep their traceback.
    """
    gr = offline_gradio()

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        try:
            return fn(*args)
        except ReidSslError as e:
            log.info("refused a request (%s): %s", fn.__name__, one_line(e))
            raise gr.Error(one_line(e), duration=duration, print_exception=False) from None

    return call


def build_demo(
    index: GalleryIndex,
    embedder: Any,
    *,
    examples: Sequence[str | Path] = (),
    limits: UploadLimits | None = None,
    detector: Detector | None = None,
    title: str = "reid_ssl gallery search",
) -> Any:
    """The app as a ``gr.Blocks`` (not launched: see :func:`reid_ssl.app.serve.launch`).

    Args:
        index: a saved index (uploads are persisted into its folder).
        embedder: the embedder that built ``index`` (checked by fingerprint).
        examples: query images offered as clickable examples.
        detector: person detector for the Full-frame tab (HOG by default).
    """
    gr = offline_gradio()
    app = GallerySearchApp(index, embedder, limits, detector, warn=gr.Warning)
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        with gr.Tabs():
            with gr.Tab("Search", id="search"):
                _search_tab(gr, app, index, examples)
            with gr.Tab("Gallery", id="gallery"):
                stats = _gallery_tab(gr, app)
            with gr.Tab("Full frame", id="frame"):
                _frame_tab(gr, app)
        demo.load(app.stats_markdown, None, stats, api_visibility="private")
    demo.reid_app = app  # for tests and the CLI: the logic behind the UI
    return demo


def open_demo(
    index_dir: str | Path,
    checkpoint: str | Path | None = None,
    *,
    device: str = "auto",
    limits: UploadLimits | None = None,
) -> Any:
    """:func:`build_demo` over a saved index, with the checkpoint that built it (or ``checkpoint``) and
    example queries from the index's calibration folder."""
    from reid_ssl.index.manifest import load_recorded_embedder

    index = GalleryIndex.load(index_dir)
    embedder = load_recorded_embedder(index.manifest, index.path, checkpoint, device)
    return build_demo(index, embedder, examples=pick_examples(index), limits=limits)


def pick_examples(index: GalleryIndex, limit: int = 6) -> list[str]:
    """Example queries: the calibration query folder's images (one per identity), else gallery images."""
    folder = index.manifest.get("queries")
    candidates: list[Path] = []
    if folder and Path(folder).is_dir():
        candidates = sorted(p for p in Path(folder).iterdir() if p.is_file() and is_image_name(p.name))
    if not candidates:
        meta = index.items(index.ids[:200])
        candidates = [Path(m["path"]) for m in meta.values() if Path(m["path"]).is_file()]
    chosen, seen = [], set()
    for p in candidates:
        name = parse_market_name(p.name)
        pid = p.name if name is None else name.pid
        if pid not in seen:
            seen.add(pid)
            chosen.append(str(p))
        if len(chosen) == limit:
            break
    return chosen


def _results(gr: Any, elem_id: str) -> Any:
    return gr.Gallery(
        label="Most similar gallery images",
        columns=5,
        height="auto",
        object_fit="contain",
        elem_id=elem_id,
        format="jpeg",
    )


def _search_tab(gr: Any, app: GallerySearchApp, index: GalleryIndex, examples: Sequence[str | Path]) -> None:
    thr = index.threshold
    thr_label = (
        f"No-match threshold (calibrated: {thr:.3f}, {(index.calibration or {}).get('source', '')})"
        if thr is not None
        else f"No-match threshold, 0 = off ({describe_calibration(index.calibration)})"
    )
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            query = gr.Image(
                type="filepath", label="Query person crop", elem_id="query", height=300, sources=UPLOAD_SOURCES
            )
            k = gr.Slider(1, MAX_K, value=10, step=1, label="Results (k)", elem_id="k")
            exclude = gr.Checkbox(False, label="Exclude the query's camera", elem_id="exclude_camera")
            qcam = gr.Dropdown(
                ["auto", *map(str, index.stats()["cameras"])],
                value="auto",
                elem_id="query_camera",
                label="Query camid (auto: from a Market-style file name, where c1 is camid 0)",
            )
            threshold = gr.Slider(
                0.0, 1.0, value=thr if thr is not None else 0.0, step=0.001, label=thr_label, elem_id="threshold"
            )
            search_btn = gr.Button("Search", variant="primary", elem_id="search_button")
            if examples:
                gr.Examples([[str(e)] for e in examples], inputs=[query], label="Example queries")
        with gr.Column(scale=2):
            status = gr.Markdown("Upload a query to search the gallery.", elem_id="status", label="status")
            results = _results(gr, "results")
    search_btn.click(
        user_errors(app.search),
        [query, k, exclude, qcam, threshold],
        [results, status],
        api_name="search",
        preprocess=False,
    )


def _gallery_tab(gr: Any, app: GallerySearchApp) -> Any:
    stats = gr.Markdown(app.stats_markdown(), elem_id="stats", label="statistics")
    files = gr.File(
        file_count="multiple",
        file_types=["image", ".zip"],
        elem_id="gallery_upload",
        label="Images or a .zip of person crops (Market-style names keep pid/camid/frame)",
    )
    add_btn = gr.Button("Add to gallery", variant="primary", elem_id="add_button")
    add_status = gr.Markdown(elem_id="add_status", label="status")
    add = user_errors(app.add_files, duration=None)
    add_btn.click(add, [files], [add_status, stats], api_name="add", preprocess=False)
    return stats


def _frame_tab(gr: Any, app: GallerySearchApp) -> None:
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
        frame_results = _results(gr, "frame_results")
    detect = user_errors(app.detect)
    detect_btn.click(detect, [frame], [boxes, people, crops_state, frame_status], api_name="detect", preprocess=False)

    def on_select(crops: list, k_value: Any, evt: Any) -> tuple[Any, Any, list, str]:
        n = int(evt.index) + 1
        picked_image, gallery, text = app.search_person(crops, n, k_value)
        return n, picked_image, gallery, text

    on_select.__annotations__["evt"] = gr.SelectData  # how gradio knows to pass the selection
    people.select(
        user_errors(on_select),
        [crops_state, frame_k],
        [person, picked, frame_results, frame_status],
        api_visibility="private",
    )
    person_btn.click(
        user_errors(app.search_person),
        [crops_state, person, frame_k],
        [picked, frame_results, frame_status],
        api_visibility="private",
    )
