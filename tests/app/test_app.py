"""The gallery app's three jobs through gradio_client and its service: search, gallery uploads, full frames."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reid_ssl.app.service import GallerySearchApp, caption, verdict
from reid_ssl.data.video.detect import Box
from reid_ssl.index import GalleryIndex, SearchHit
from tests.helpers import REPO, write_person_image

CAPTION = re.compile(r"^[01]\.\d{3} · (pid \d+|junk) · camid \d+ · frame \d+$")


# ---------------------------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------------------------


def test_search_api_returns_the_index_results_with_captions(served):
    q = served.queries()[0]
    gallery, status = served.search(q, 5)
    captions = [item["caption"] for item in gallery]
    assert len(gallery) == 5 and all(CAPTION.match(c) for c in captions), captions
    assert captions == served.captions(q, 5)
    scores = [float(c.split(" ")[0]) for c in captions]
    assert scores == sorted(scores, reverse=True)
    assert "Match" in status or "No match" in status
    for item in gallery:  # the images really came back
        assert Image.open(item["image"]).size[0] > 0


def test_exclude_same_camera_uses_the_query_file_name(served):
    q = served.queries()[1]  # ..._c1s1_...: camid 0
    gallery, status = served.search(q, 8, True)
    assert all(" · camid 0 · " not in item["caption"] for item in gallery) and "camid 0 excluded" in status
    assert [i["caption"] for i in gallery] == served.captions(q, 8, exclude_camid=0)
    gallery, _ = served.search(q, 8, True, "2")  # an explicit choice wins over the file name
    assert all(" · camid 2 · " not in item["caption"] for item in gallery)


def test_no_match_threshold(served):
    q = served.queries()[0]
    _, status = served.search(q, 3, False, "auto", 1.0)
    assert status.startswith("**No match**") and "nobody in the gallery" in status
    _, status = served.search(q, 3, False, "auto", 0.001)
    assert status.startswith("**Match**")
    _, status = served.search(q, 3, False, "auto", 0.0)  # the slider's 0 switches the verdict off
    assert "every result is shown as a candidate" in status
    default = GalleryIndex.load(served.index).threshold
    assert default is not None and f"{default:.3f}" in served.search(q, 3)[1]


def test_verdict_and_caption_text():
    hit = SearchHit(id=1, score=0.8234, path="/g/a.jpg", pid=12, camid=1, frame=345)
    assert caption(hit) == "0.823 · pid 12 · camid 1 · frame 345"
    assert caption(SearchHit(id=2, score=0.5, path="/g/b.jpg", pid=7, tracklet=7)) == "0.500 · tracklet 7"
    assert caption(SearchHit(id=3, score=0.5, path="/g/holiday.jpg")) == "0.500 · holiday.jpg"
    assert verdict([hit], 0.9).startswith("**No match**") and verdict([hit], 0.5).startswith("**Match**")
    assert "no calibrated threshold" in verdict([hit], None)


def test_fewer_results_than_asked_for_are_explained(served):
    app, idx = served.app, GalleryIndex.load(served.index)
    feature = served.embedder.embed_image(served.queries()[0])
    gallery, status = app._search_feature(feature, 5, None, None)
    assert len(gallery) == 5 and "Showing" not in status
    gallery, status = app._search_feature(feature, idx.ntotal + 3, None, None)
    assert len(gallery) == idx.ntotal
    assert f"Showing {idx.ntotal} of the {idx.ntotal + 3} results asked for: the gallery holds only" in status
    k = idx.ntotal - 1
    gallery, status = app._search_feature(feature, k, 1, None)
    assert len(gallery) == idx.ntotal - len(idx.ids_where(camid=1)) < k
    assert f"Showing {len(gallery)} of the {k} results asked for: the others are from camid 1" in status


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("nan",), "must be a finite number"),
        (("1e999",), "must be a finite number"),
        (("many",), "must be a number"),
        ((5, True, "camera nine"), "the query camid must be 'auto' or a camera id"),
        ((5, True, "99999999999999999999"), "the query camid must be"),
        ((5, False, "auto", 7.5), "cosine similarity in"),
    ],
    ids=["k-nan", "k-inf", "k-text", "camid-text", "camid-huge", "threshold"],
)
def test_bad_search_options_are_refused_with_a_message(served, args, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        served.search(served.queries()[0], *args)
    assert len(served.search(served.queries()[0], 2)[0]) == 2


def test_empty_index_says_so(tmp_path, served):
    GalleryIndex.create(served.embedder).save(tmp_path / "empty")
    app = GallerySearchApp(GalleryIndex.load(tmp_path / "empty"), served.embedder)
    gallery, status = app.search(str(served.queries()[0]), 5)
    assert gallery == [] and "gallery is empty" in status


# ---------------------------------------------------------------------------------------------------------
# Gallery uploads (the refusals are in test_uploads.py)
# ---------------------------------------------------------------------------------------------------------


def test_gallery_upload_adds_searchable_items_and_persists(served, tmp_path):
    rng = np.random.default_rng(7)
    single = write_person_image(tmp_path / "0077_c3s1_000123_00.jpg", 77, rng)
    zpath = tmp_path / "crops.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for n in range(3):
            z.write(write_person_image(tmp_path / f"z{n}.jpg", 78, rng), f"people/0078_c2s1_{n:06d}_00.jpg")
        z.writestr("people/readme.txt", "junk member")
    before = GalleryIndex.load(served.index)
    status, stats = served.add(single, zpath)
    assert "Added **4** images" in status and "readme.txt" in status
    after = GalleryIndex.load(served.index)
    assert after.ntotal == before.ntotal + 4 and after.generation == before.generation + 1
    assert f"| Images | {after.ntotal} |" in stats
    new = after.items(after.ids[-4:])
    assert sorted((m["pid"], m["camid"]) for m in new.values()) == [(77, 2), (78, 1), (78, 1), (78, 1)]
    assert all(Path(m["path"]).is_relative_to((served.index / "uploads").resolve()) for m in new.values())
    gallery, _ = served.search(single, 1)
    assert (
        gallery[0]["caption"].startswith(("1.000", "0.999")) and "pid 77 · camid 2 · frame 123" in gallery[0]["caption"]
    )


# ---------------------------------------------------------------------------------------------------------
# Full frame
# ---------------------------------------------------------------------------------------------------------


def test_full_frame_detect_then_pick_a_person(served, tmp_path):
    frame = np.full((240, 320, 3), 90, np.uint8)
    person = np.asarray(Image.open(served.queries()[2]).resize((40, 80)))
    frame[100:180, 200:240] = person
    Image.fromarray(frame).save(tmp_path / "frame.png")
    app = GallerySearchApp(
        GalleryIndex.load(served.index),
        served.embedder,
        detector=lambda rgb: [Box(10, 10, 30, 60, 0.9), Box(200, 100, 40, 80, 2.0)],
    )
    (_, annotations), people, crops, status = app.detect(str(tmp_path / "frame.png"))
    assert [label for _, label in annotations] == ["person 1", "person 2"] and "Found **2** people" in status
    assert annotations[1][0] == (200, 100, 240, 180) and len(people) == len(crops) == 2
    picked, gallery, text = app.search_person(crops, 2, 3)
    assert text.startswith("Person 2:") and len(gallery) == 3 and Image.open(picked).size == (40 + 4, 80 + 8)


def test_large_frames_are_shown_shrunk_with_their_boxes_scaled(served, tmp_path):
    Image.new("RGB", (2560, 400), (90, 90, 90)).save(tmp_path / "wide.png")
    app = GallerySearchApp(
        GalleryIndex.load(served.index), served.embedder, detector=lambda bgr: [Box(1000, 100, 60, 200, 1.0)]
    )
    (shown, annotations), people, _, _ = app.detect(str(tmp_path / "wide.png"))
    assert Image.open(shown).size == (1280, 200) and annotations == [((500, 50, 530, 150), "person 1")]
    assert Image.open(people[0][0]).size == (60 + 6, 200 + 20)  # the crop itself is taken at full resolution


def test_detect_api_on_a_frame_without_people(served, tmp_path):
    Image.new("RGB", (320, 240), (120, 130, 140)).save(tmp_path / "empty.png")
    *_, status = served.detect(tmp_path / "empty.png")
    assert "No people found" in status


@pytest.mark.parametrize("size", [(1, 1), (32, 64)])
def test_detect_api_refuses_a_frame_too_small_and_keeps_serving(served, tmp_path, size):
    """The issue's report: a 1x1 PNG or a 32x64 crop posted to the detect tab killed the server (free())."""
    from gradio_client.exceptions import AppError

    Image.new("RGB", size, (120, 130, 140)).save(tmp_path / "small.png")
    with pytest.raises(AppError, match=r"frame too small to detect people: \d+x\d+ \(min \d+x\d+"):
        served.detect(tmp_path / "small.png")
    assert len(served.search(served.queries()[0], 2)[0]) == 2  # the server keeps serving


# ---------------------------------------------------------------------------------------------------------
# The package
# ---------------------------------------------------------------------------------------------------------


def test_importing_the_app_runs_nothing():
    """No gradio, torch or OpenCV import and no environment change until an app is built."""
    modules = ["reid_ssl.app", *(f"reid_ssl.app.{m}" for m in ("files", "serve", "service", "ui", "uploads"))]
    code = (
        "import os, sys; before = dict(os.environ); "
        + "; ".join(f"import {m}" for m in [*modules, "reid_ssl.cli.app"])
        + "; print('gradio' in sys.modules, 'torch' in sys.modules, 'cv2' in sys.modules, dict(os.environ) == before)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout.split() == ["False", "False", "False", "True"], out.stderr


def test_a_refused_request_is_one_console_line_not_a_traceback(caplog):
    """Bad input is the user's, not the server's fault: a toast for the user, one log line for the operator, and
    no traceback (Gradio prints one for every ``gr.Error`` unless ``print_exception`` is off)."""
    import gradio as gr

    from reid_ssl.app.ui import user_errors
    from reid_ssl.errors import InputError

    def search(query):
        raise InputError("Upload a query first.")

    with caplog.at_level(logging.INFO, logger="reid_ssl.app.ui"), pytest.raises(gr.Error) as err:
        user_errors(search)(None)
    assert err.value.print_exception is False and "Upload a query first." in str(err.value)
    assert [r.getMessage() for r in caplog.records] == ["refused a request (search): Upload a query first."]
