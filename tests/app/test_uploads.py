"""Untrusted uploads to the app: non-images, truncated files, pixel bombs, zip slips and zip bombs, oversized
requests and full disks. Each is refused with a message, nothing is written outside the upload's own folder,
the index is left as it was, and the server goes on serving."""

from __future__ import annotations

import struct

import httpx
import numpy as np
import pytest
from PIL import Image

from reid_ssl.app.service import GallerySearchApp
from reid_ssl.app.uploads import UploadError, UploadLimits, check_image, safe_extract_zip
from reid_ssl.errors import ReidSslError
from reid_ssl.images import MAX_IMAGE_PIXELS, ImageError, open_rgb
from reid_ssl.index import GalleryIndex, GalleryItem, current_generation
from tests.app.conftest import UPLOAD_MB
from tests.helpers import SmallDisk, assert_consistent, png_header_only, write_person_image, write_zip

# ---------------------------------------------------------------------------------------------------------
# Files that are not usable images
# ---------------------------------------------------------------------------------------------------------


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
        served.search(path, 5)
    gallery, _ = served.search(served.queries()[0], 2)  # the server keeps serving
    assert len(gallery) == 2


@pytest.mark.parametrize(
    ("kind", "message"),
    [("text", "not an image"), ("truncated", "decode"), ("empty", "empty")],
)
def test_uploads_non_image_or_truncated_image_gives_a_clear_message(served, tmp_path, kind, message):
    from gradio_client.exceptions import AppError

    good = write_person_image(tmp_path / "good.jpg", 1, np.random.default_rng(0), size=(128, 64)).read_bytes()
    path = tmp_path / f"{kind}.jpg"
    path.write_bytes({"text": b"just some text", "truncated": good[:300], "empty": b""}[kind])
    generation = current_generation(served.index)
    with pytest.raises(AppError, match=message):
        served.search(path)
    with pytest.raises(AppError, match=message):
        served.add(path)
    assert current_generation(served.index) == generation
    assert len(served.search(served.queries()[0], 2)[0]) == 2


def test_uploads_decompression_bomb_images_are_refused(served, tmp_path):
    from gradio_client.exceptions import AppError

    bomb = png_header_only(tmp_path / "bomb.png", 30_000, 30_000)  # 900 Mpx claimed by a 100-byte file
    assert "too many pixels" in check_image(bomb)
    assert Image.MAX_IMAGE_PIXELS == MAX_IMAGE_PIXELS  # PIL's own guard, set by reid_ssl.images: an error
    with pytest.raises(ImageError, match="too many pixels"):  # what index builds and training open with
        open_rgb(bomb)
    below_pil = png_header_only(tmp_path / "big.png", 7_000, 7_000)  # 49 Mpx: under PIL's limit, over the app's
    assert "refused: 7000 x 7000" in check_image(below_pil)
    generation = current_generation(served.index)
    with pytest.raises(AppError, match="too many pixels"):
        served.search(bomb)
    with pytest.raises(AppError, match="too many pixels"):
        served.add(bomb)
    assert current_generation(served.index) == generation
    assert len(served.search(served.queries()[0], 2)[0]) == 2  # still serving


def test_check_image_refuses_by_header_before_decoding(tmp_path):
    assert "too many pixels" in check_image(png_header_only(tmp_path / "x.png", 10_000, 10_000))
    good = write_person_image(tmp_path / "g.jpg", 1, np.random.default_rng(0))
    assert check_image(good) is None
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (800, 600, 3), np.uint8)).save(big)  # > 1 MB
    assert "too large" in check_image(big, UploadLimits(max_upload_mb=1))


# ---------------------------------------------------------------------------------------------------------
# Zips
# ---------------------------------------------------------------------------------------------------------


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
    generation = current_generation(served.index)
    with pytest.raises(AppError, match=message):
        served.add(path)
    assert current_generation(served.index) == generation and not escape.exists()
    assert len(served.search(served.queries()[0], 2)[0]) == 2  # still serving


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


def test_uploads_zip_slip_never_writes_outside_the_target_folder(served, tmp_path):
    good = write_person_image(tmp_path / "good.jpg", 5, np.random.default_rng(0)).read_bytes()
    escape = tmp_path / "escaped.jpg"
    target = tmp_path / "sandbox" / "out"
    cases = {
        "dot-dot": ({"ok.jpg": good, f"{'../' * 12}{str(escape).lstrip('/')}": good}, None, "leaving the archive"),
        "dot-dot-inside": ({"a/../../escaped.jpg": good}, None, "leaving the archive"),
        "backslash": ({"..\\..\\escaped.jpg": good}, None, "leaving the archive"),
        "absolute": ({str(escape): good}, None, "absolute path"),
        "drive": ({"C:\\escaped.jpg": good}, None, "absolute path"),
        "symlink": ({"ok.jpg": good}, "link.jpg", "symbolic link"),
    }
    for name, (members, link, message) in cases.items():
        z = write_zip(tmp_path / f"{name}.zip", members, link)
        with pytest.raises(UploadError, match=message):
            safe_extract_zip(z, target)
        assert not escape.exists() and not target.exists(), name
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and p.suffix == ".jpg") == ["good.jpg"]
    # through the server: refused with the message, nothing written, the index untouched
    generation = current_generation(served.index)
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="unsafe member"):
        served.add(tmp_path / "dot-dot.zip")
    assert current_generation(served.index) == generation and not escape.exists()


def test_uploads_zip_bombs_are_refused_with_a_message(tmp_path):
    good = write_person_image(tmp_path / "good.jpg", 5, np.random.default_rng(0)).read_bytes()
    out = tmp_path / "out"
    # one member that expands 1000:1
    with pytest.raises(UploadError, match="zip bomb"):
        safe_extract_zip(write_zip(tmp_path / "ratio.zip", {"big.jpg": b"\0" * (8 << 20)}), out)
    # more members than one upload may hold (default limit: 2000)
    with pytest.raises(UploadError, match="2001 members"):
        safe_extract_zip(write_zip(tmp_path / "count.zip", {f"{i}.jpg": b"x" for i in range(2001)}), out)
    # a central directory that claims 4 GB in total (checked before a byte is extracted)
    data = bytearray(write_zip(tmp_path / "claims.zip", {"a.jpg": good}).read_bytes())
    cd = data.rfind(b"PK\x01\x02")
    data[cd + 24 : cd + 28] = struct.pack("<I", 0xFFFFFFF0)
    (tmp_path / "claims.zip").write_bytes(bytes(data))
    with pytest.raises(UploadError, match="would expand to"):
        safe_extract_zip(tmp_path / "claims.zip", out)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------
# Sizes and disks
# ---------------------------------------------------------------------------------------------------------


def test_uploads_size_limit_is_enforced_by_the_server(served):
    url = served.url + "gradio_api/upload"
    too_big = b"\xff\xd8" + b"\0" * (UPLOAD_MB * 1536 << 10)  # 1.5 times the served app's cap
    big = httpx.post(url, files={"files": ("big.jpg", too_big, "image/jpeg")})
    assert big.status_code == 413 and "maximum allowed size" in big.text
    small = httpx.post(url, files={"files": ("small.jpg", b"\xff\xd8" + b"\0" * 1024, "image/jpeg")})
    assert small.status_code == 200


def test_faults_full_disk_during_gallery_add_in_the_app(served, tmp_path):
    embedder = served.embedder
    images = [write_person_image(tmp_path / f"{i}.jpg", i, np.random.default_rng(i)) for i in range(6)]
    with SmallDisk(tmp_path / "disk") as small_disk:
        folder = small_disk.folder / "gallery-index"
        idx = GalleryIndex.create(embedder, "flat")
        idx.add(embedder.embed_images(images[:3]).features, [GalleryItem(path=str(p)) for p in images[:3]])
        idx.save(folder)
        app = GallerySearchApp(GalleryIndex.load(folder), embedder)
        with small_disk.full(leave=4096), pytest.raises(ReidSslError, match="the gallery is unchanged"):
            app.add_files([str(p) for p in images[3:]])
        assert assert_consistent(folder).ntotal == 3 and current_generation(folder) == 1
        assert list((folder / "uploads").glob("*")) == []  # the copied upload was removed again
        status, _ = app.add_files([str(p) for p in images[3:]])  # and works once there is room
        assert "Added **3** images" in status and assert_consistent(folder).ntotal == 6
