"""The gallery app through gradio_client and raw HTTP: search, uploads, bad input, concurrency, serving rules."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

os.environ.setdefault("GRADIO_TEMP_DIR", tempfile.mkdtemp(prefix="reid_ssl_gradio_"))

import httpx
import numpy as np
import pytest
from tests.helpers import free_port, png_header_only, write_checkpoint, write_market_tree, write_person_image, write_zip
from PIL import Image

from reid_ssl.app.demo import GallerySearchApp, build_demo, caption, launch, verdict
from reid_ssl.data.video.detect import Box
from reid_ssl.data.video.detect import HOGDetector
from reid_ssl.app.uploads import UploadError, UploadLimits, check_image, safe_extract_zip
from reid_ssl import cli
from reid_ssl.cli.app import check_exposure, is_loopback, parse_auth, resolve_auth
from reid_ssl.embedder import load_embedder
from reid_ssl.index import GalleryIndex, SearchHit, build_index, current_generation, gallery_source

REPO = Path(__file__).resolve().parents[2]
CAPTION = re.compile(r"^[01]\.\d{3} · (pid \d+|junk) · cam \d · frame \d+$")



@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A Market-style gallery index served in-process on a free loopback port, with a gradio_client."""
    from gradio_client import Client

    root = tmp_path_factory.mktemp("app")
    ckpt = write_checkpoint(root / "ckpt.pt")
    tree = write_market_tree(root / "market")
    embedder = load_embedder(ckpt, device="cpu")
    build_index(embedder, gallery_source(tree), root / "idx", checkpoint=ckpt)
    demo = build_demo(GalleryIndex.load(root / "idx"), embedder, examples=sorted((tree / "query").iterdir())[:2])
    port = free_port()
    launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    client = Client(url, analytics_enabled=False, verbose=False)
    yield {
        "root": root,
        "tree": tree,
        "index": root / "idx",
        "embedder": embedder,
        "demo": demo,
        "url": url,
        "client": client,
        "app": demo.reid_app,
    }
    demo.close()


def queries(served) -> list[Path]:
    return sorted((served["tree"] / "query").iterdir())


def expected_captions(served, query: Path, k: int, **kw) -> list[str]:
    idx = GalleryIndex.load(served["index"])
    return [caption(h) for h in idx.search(served["embedder"].embed_image(query), k, **kw)[0]]


def search(served, path: Path, k: int = 5, *args):
    from gradio_client import handle_file

    return served["client"].predict(handle_file(str(path)), k, *args, api_name="/search")


# ---------------------------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------------------------


def test_search_api_returns_the_index_results_with_captions(served):
    q = queries(served)[0]
    gallery, status = search(served, q, 5)
    captions = [item["caption"] for item in gallery]
    assert len(gallery) == 5 and all(CAPTION.match(c) for c in captions), captions
    assert captions == expected_captions(served, q, 5)
    scores = [float(c.split(" ")[0]) for c in captions]
    assert scores == sorted(scores, reverse=True)
    assert "Match" in status or "No match" in status
    for item in gallery:  # the images really came back
        assert Image.open(item["image"]).size[0] > 0


def test_exclude_same_camera_uses_the_query_file_name(served):
    q = queries(served)[1]  # ..._c1s1_...
    gallery, status = search(served, q, 8, True)
    assert all(" · cam 1 · " not in item["caption"] for item in gallery) and "camera 1 excluded" in status
    assert [i["caption"] for i in gallery] == expected_captions(served, q, 8, exclude_camid=1)
    gallery, _ = search(served, q, 8, True, "2")  # an explicit choice wins over the file name
    assert all(" · cam 2 · " not in item["caption"] for item in gallery)


def test_no_match_threshold(served):
    q = queries(served)[0]
    _, status = search(served, q, 3, False, "auto", 1.0)
    assert status.startswith("**No match**") and "nobody in the gallery" in status
    _, status = search(served, q, 3, False, "auto", 0.001)
    assert status.startswith("**Match**")
    _, status = search(served, q, 3, False, "auto", 0.0)  # the slider's 0 switches the verdict off
    assert "every result is shown as a candidate" in status
    default = GalleryIndex.load(served["index"]).threshold
    assert default is not None and f"{default:.3f}" in search(served, q, 3)[1]


def test_verdict_and_caption_text():
    hit = SearchHit(id=1, score=0.8234, path="/g/a.jpg", pid=12, camid=1, frame=345)
    assert caption(hit) == "0.823 · pid 12 · cam 1 · frame 345"
    assert caption(SearchHit(id=2, score=0.5, path="/g/b.jpg", pid=7, tracklet=7)) == "0.500 · tracklet 7"
    assert caption(SearchHit(id=3, score=0.5, path="/g/holiday.jpg")) == "0.500 · holiday.jpg"
    assert verdict([hit], 0.9).startswith("**No match**") and verdict([hit], 0.5).startswith("**Match**")
    assert "no calibrated threshold" in verdict([hit], None)


def test_twenty_simultaneous_searches_all_answer_correctly(served):
    from gradio_client import handle_file

    qs = [queries(served)[i % 5] for i in range(20)]
    expected = {q: expected_captions(served, q, 5) for q in set(qs)}
    jobs = [served["client"].submit(handle_file(str(q)), 5, api_name="/search") for q in qs]
    results = [job.result(timeout=180) for job in jobs]
    for q, (gallery, _) in zip(qs, results, strict=True):
        assert [item["caption"] for item in gallery] == expected[q]


def test_searches_keep_answering_while_an_upload_is_added(served, tmp_path):
    from gradio_client import handle_file

    rng = np.random.default_rng(21)
    zpath = tmp_path / "batch.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for n in range(12):
            z.write(write_person_image(tmp_path / f"u{n}.jpg", 60 + n, rng), f"0{60 + n}_c3s1_{n:06d}_00.jpg")
    q = queries(served)[3]
    expected = expected_captions(served, q, 3)
    upload = served["client"].submit([handle_file(str(zpath))], api_name="/add")
    jobs = [served["client"].submit(handle_file(str(q)), 3, api_name="/search") for _ in range(20)]
    results = [job.result(timeout=180) for job in jobs]
    assert "Added **12** images" in upload.result(timeout=180)[0]
    after = expected_captions(served, q, 3)
    for gallery, _ in results:  # each search saw the gallery before or after the upload, never a broken one
        assert [item["caption"] for item in gallery] in (expected, after)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: (d / "notes.jpg").write_text("hello") and d / "notes.jpg", "not an image"),
        (lambda d: (d / "cut.jpg").write_bytes((d.parent / "good.jpg").read_bytes()[:300]) and d / "cut.jpg", "decode"),
        (lambda d: png_header_only(d / "bomb.png", 20_000, 20_000), "too many pixels"),
        (lambda d: (d / "empty.png").write_bytes(b"") or d / "empty.png", "empty"),
    ],
    ids=["text", "truncated", "pixel-bomb", "empty"],
)
def test_bad_query_upload_gives_a_clear_message(served, tmp_path, make, message):
    from gradio_client.exceptions import AppError

    write_person_image(tmp_path / "good.jpg", 1, np.random.default_rng(0), size=(128, 64))
    (tmp_path / "bad").mkdir()
    path = make(tmp_path / "bad")
    with pytest.raises(AppError, match=message):
        search(served, path, 5)
    gallery, _ = search(served, queries(served)[0], 2)  # the server keeps serving
    assert len(gallery) == 2


def test_empty_index_says_so(tmp_path, served):
    GalleryIndex.create(served["embedder"]).save(tmp_path / "empty")
    app = GallerySearchApp(GalleryIndex.load(tmp_path / "empty"), served["embedder"])
    gallery, status = app.search(str(queries(served)[0]), 5)
    assert gallery == [] and "gallery is empty" in status


def test_thumbnails_only_come_from_the_gallery_folders(served, tmp_path):
    outside = write_person_image(tmp_path / "private" / "secret.jpg", 3, np.random.default_rng(1), size=(96, 48))
    app, idx = served["app"], GalleryIndex.load(served["index"])
    assert Image.open(app.thumbnail(str(outside), idx)).size == (64, 128)  # the grey placeholder, not the file
    inside = idx.items([0])[0]["path"]
    assert Image.open(app.thumbnail(inside, idx)).size == Image.open(inside).size


# ---------------------------------------------------------------------------------------------------------
# Gallery uploads
# ---------------------------------------------------------------------------------------------------------


def add(served, *paths: Path):
    from gradio_client import handle_file

    return served["client"].predict([handle_file(str(p)) for p in paths], api_name="/add")


def test_gallery_upload_adds_searchable_items_and_persists(served, tmp_path):
    rng = np.random.default_rng(7)
    single = write_person_image(tmp_path / "0077_c3s1_000123_00.jpg", 77, rng)
    zpath = tmp_path / "crops.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for n in range(3):
            z.write(write_person_image(tmp_path / f"z{n}.jpg", 78, rng), f"people/0078_c2s1_{n:06d}_00.jpg")
        z.writestr("people/readme.txt", "junk member")
    before = GalleryIndex.load(served["index"])
    status, stats = add(served, single, zpath)
    assert "Added **4** images" in status and "readme.txt" in status
    after = GalleryIndex.load(served["index"])
    assert after.ntotal == before.ntotal + 4 and after.generation == before.generation + 1
    assert f"| Images | {after.ntotal} |" in stats
    new = after.items(after.ids[-4:])
    assert sorted((m["pid"], m["camid"]) for m in new.values()) == [(77, 3), (78, 2), (78, 2), (78, 2)]
    assert all(Path(m["path"]).is_relative_to((served["index"] / "uploads").resolve()) for m in new.values())
    gallery, _ = search(served, single, 1)
    assert (
        gallery[0]["caption"].startswith(("1.000", "0.999")) and "pid 77 · cam 3 · frame 123" in gallery[0]["caption"]
    )


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("text", "not an image"),
        ("truncated", "decode"),
        ("pixel-bomb", "too many pixels"),
        ("zip-slip", "unsafe member"),
        ("zip-absolute", "absolute path"),
        ("zip-symlink", "symbolic link"),
        ("zip-bomb", "zip bomb"),
        ("zip-junk-only", "not an image"),
        ("not-a-zip", "not a readable zip"),
    ],
)
def test_bad_gallery_uploads_are_refused_and_leave_the_index_alone(served, tmp_path, kind, message):
    from gradio_client.exceptions import AppError

    good = write_person_image(tmp_path / "good.jpg", 5, np.random.default_rng(0)).read_bytes()
    escape = tmp_path / "escaped.jpg"
    files = {
        "text": lambda: (tmp_path / "a.jpg").write_text("no pixels here") and tmp_path / "a.jpg",
        "truncated": lambda: (tmp_path / "t.jpg").write_bytes(good[:200]) and tmp_path / "t.jpg",
        "pixel-bomb": lambda: png_header_only(tmp_path / "b.png", 30_000, 30_000),
        "zip-slip": lambda: write_zip(tmp_path / "s.zip", {"ok.jpg": good, f"../../{'../' * 10}{escape}": good}),
        "zip-absolute": lambda: write_zip(tmp_path / "s.zip", {str(escape): good}),
        "zip-symlink": lambda: write_zip(tmp_path / "s.zip", {"ok.jpg": good}, symlink="link.jpg"),
        "zip-bomb": lambda: write_zip(tmp_path / "s.zip", {"big.jpg": b"\0" * (8 * 2**20)}),
        "zip-junk-only": lambda: write_zip(tmp_path / "s.zip", {"a.txt": b"x", "b.exe": b"y"}),
        "not-a-zip": lambda: (tmp_path / "n.zip").write_bytes(b"PK\x03\x04 garbage") and tmp_path / "n.zip",
    }
    path = files[kind]()
    generation = current_generation(served["index"])
    with pytest.raises(AppError, match=message):
        add(served, path)
    assert current_generation(served["index"]) == generation and not escape.exists()
    assert len(search(served, queries(served)[0], 2)[0]) == 2  # still serving


def test_zip_extraction_limits(tmp_path):
    good = write_person_image(tmp_path / "g.jpg", 1, np.random.default_rng(0)).read_bytes()
    many = write_zip(tmp_path / "many.zip", {f"{i}.jpg": good for i in range(30)})
    with pytest.raises(UploadError, match="30 members"):
        safe_extract_zip(many, tmp_path / "out", UploadLimits(max_files=20))
    with pytest.raises(UploadError, match="expand"):
        safe_extract_zip(many, tmp_path / "out", UploadLimits(max_total_bytes=len(good) * 10))
    written, skipped = safe_extract_zip(
        write_zip(tmp_path / "ok.zip", {"a/b/c.jpg": good, "d.txt": b""}), tmp_path / "out"
    )
    assert [(p.name, m) for p, m in written] == [("00000_c.jpg", "a/b/c.jpg")]  # flattened, renamed
    assert skipped == [("d.txt", "not an image file name")]
    with pytest.raises(UploadError, match="leaving the archive"):  # any '..' is refused, even one that stays inside
        safe_extract_zip(write_zip(tmp_path / "dots.zip", {"a/../c.jpg": good}), tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_check_image_refuses_by_header_before_decoding(tmp_path):
    assert "too many pixels" in check_image(png_header_only(tmp_path / "x.png", 10_000, 10_000))
    good = write_person_image(tmp_path / "g.jpg", 1, np.random.default_rng(0))
    assert check_image(good) is None
    assert "too large" in check_image(good, UploadLimits(max_file_bytes=10))


# ---------------------------------------------------------------------------------------------------------
# Full frame
# ---------------------------------------------------------------------------------------------------------


def test_full_frame_detect_then_pick_a_person(served, tmp_path):
    frame = np.full((240, 320, 3), 90, np.uint8)
    person = np.asarray(Image.open(queries(served)[2]).resize((40, 80)))
    frame[100:180, 200:240] = person
    Image.fromarray(frame).save(tmp_path / "frame.png")
    app = GallerySearchApp(
        GalleryIndex.load(served["index"]),
        served["embedder"],
        detector=lambda rgb: [Box(10, 10, 30, 60, 0.9), Box(200, 100, 40, 80, 2.0)],
    )
    (_, annotations), people, crops, status = app.detect(str(tmp_path / "frame.png"))
    assert [label for _, label in annotations] == ["person 1", "person 2"] and "Found **2** people" in status
    assert annotations[1][0] == (200, 100, 240, 180) and len(people) == len(crops) == 2
    picked, gallery, text = app.search_person(crops, 2, 3)
    assert text.startswith("Person 2:") and len(gallery) == 3 and Image.open(picked).size == (40 + 4, 80 + 8)


def test_detect_api_on_a_frame_without_people(served, tmp_path):
    from gradio_client import handle_file

    Image.new("RGB", (320, 240), (120, 130, 140)).save(tmp_path / "empty.png")
    *_, status = served["client"].predict(handle_file(str(tmp_path / "empty.png")), api_name="/detect")
    assert "No people found" in status


@pytest.mark.skipif(not (REPO / "data" / "vtest.avi").is_file(), reason="needs data/vtest.avi (PETS09 video)")
def test_hog_finds_people_in_a_pets09_frame():
    import cv2

    cap = cv2.VideoCapture(str(REPO / "data" / "vtest.avi"))
    cap.set(cv2.CAP_PROP_POS_FRAMES, 200)
    ok, bgr = cap.read()
    assert ok
    boxes = HOGDetector()(bgr)
    assert len(boxes) >= 3 and all(60 <= b.h <= 200 for b in boxes)  # people are 86-140 px tall here


# ---------------------------------------------------------------------------------------------------------
# Serving rules: files, remote fetches, binding, auth, import
# ---------------------------------------------------------------------------------------------------------


def test_only_gradio_files_are_served(served, tmp_path):
    secret = write_person_image(tmp_path / "secret.jpg", 2, np.random.default_rng(3))
    gallery_file = GalleryIndex.load(served["index"]).items([0])[0]["path"]
    link = Path(gallery_file).parent / "link_to_secret.jpg"
    link.symlink_to(secret)
    try:
        base = served["url"] + "gradio_api/file="
        for target in [
            "/etc/passwd",
            str(secret),
            gallery_file,
            str(link),
            "../../../../etc/passwd",
            "%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        ]:
            r = httpx.get(base + target)
            assert r.status_code in (403, 404), (target, r.status_code)
            assert b"root:" not in r.content
        for remote in ["http://example.com/x.jpg", "https://1.1.1.1/", "//example.com/x"]:
            r = httpx.get(base + remote)
            assert r.status_code == 403 and "no remote files" in r.text
        assert httpx.get(served["url"] + "gradio_api/proxy=http://example.com/").status_code == 403
        gallery, _ = search(served, queries(served)[0], 1)  # what a search returns IS served
        r = httpx.get(served["url"] + "gradio_api/file=" + gallery[0]["image"])
        assert r.status_code == 200 and r.content[:2] == b"\xff\xd8"
    finally:
        link.unlink()


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("192.168.1.5", False),
        ("example.org", False),
    ],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_public_bind_needs_a_login(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("REID_SSL_APP_AUTH", raising=False)
    with pytest.raises(ValueError, match=r"refusing to serve on 0\.0\.0\.0"):
        check_exposure("0.0.0.0", None, insecure=False)
    assert check_exposure("0.0.0.0", [("u", "p")], insecure=False) == []
    assert "WITHOUT a login" in check_exposure("0.0.0.0", None, insecure=True)[0]
    assert check_exposure("127.0.0.1", None, insecure=False) == []
    assert cli.main(["app", "--host", "0.0.0.0", "--index", str(tmp_path)]) == 2
    assert "refusing to serve" in capsys.readouterr().err


def test_auth_from_env_or_file(tmp_path):
    assert parse_auth("alice:s3cret, bob:pw:with:colons", "env") == [("alice", "s3cret"), ("bob", "pw:with:colons")]
    with pytest.raises(ValueError, match="user:password"):
        parse_auth("nopassword", "env")
    assert resolve_auth(None, {"REID_SSL_APP_AUTH": "a:b"}) == ([("a", "b")], [])
    f = tmp_path / "auth.txt"
    f.write_text("# team\ncarol:pw\n")
    f.chmod(0o644)
    creds, warnings = resolve_auth(str(f), {"REID_SSL_APP_AUTH": "a:b"})
    assert creds == [("carol", "pw")] and "chmod 600" in warnings[0]
    f.chmod(0o600)
    assert resolve_auth(str(f), {}) == ([("carol", "pw")], [])
    assert resolve_auth(None, {}) == (None, [])


def test_login_is_enforced_when_set(served):
    demo = build_demo(GalleryIndex.load(served["index"]), served["embedder"])
    port = free_port()
    launch(demo, "127.0.0.1", port, auth=[("alice", "s3cret")], prevent_thread_lock=True, quiet=True)
    try:
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/gradio_api/info").status_code == 401
        assert httpx.post(url + "/login", data={"username": "alice", "password": "nope"}).status_code == 400
        with httpx.Client() as c:
            assert c.post(url + "/login", data={"username": "alice", "password": "s3cret"}).status_code == 200
            assert c.get(url + "/gradio_api/info").status_code == 200
    finally:
        demo.close()


def test_app_without_index_explains_how_to_build_one(tmp_path, capsys):
    assert cli.main(["app", "--index", str(tmp_path / "nothing")]) == 2
    assert "reid_ssl index build" in capsys.readouterr().err


def test_importing_the_app_runs_nothing():
    code = "import sys, reid_ssl.app, reid_ssl.app.demo; print('gradio' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout.split() == ["False", "False"], out.stderr
