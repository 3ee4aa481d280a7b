"""Extreme image shapes and modes through every app endpoint and every CLI entry that takes images.

The issue: a 1x1 PNG or a 32x64 crop posted to the full-frame tab crashed OpenCV (``free(): invalid next
size``) and with it the server. Here every endpoint (``/search``, ``/detect``, ``/add`` with images and with a
zip of them) and ``reid_ssl index search --query`` / ``index add`` get images of 1x1, 1xN, Nx1, just below and
above each native minimum (HOG's 64x128 window after the 1.5x upscale, the detector's 4000-pixel side, JPEG's
65500-pixel side), very wide and very tall, in modes 1, L, LA, P, RGB, RGBA, CMYK and I;16. Each call succeeds
or fails with a clear message (``/search`` and ``/add`` refuse what cannot be a person crop, by one rule);
afterwards a normal search still answers.
"""

from __future__ import annotations

import json
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reid_ssl.images import crop_shape_problem
from tests.helpers import run_cli

# name -> ((width, height), whether the HOG detector takes the frame)
SHAPES = {
    "1x1": ((1, 1), False),
    "1xN": ((1, 300), False),
    "Nx1": ((300, 1), False),
    "below-hog-width": ((42, 86), False),  # 42 * 1.5 = 63 < 64
    "at-hog-minimum": ((43, 85), True),  # 85 * 1.5 = 127.5, rounded to the window's 128
    "below-hog-height": ((43, 84), False),  # 84 * 1.5 = 126 < 128
    "tall-below-hog-width": ((63, 800), False),  # from 800 px high there is no upscale
    "tall-at-hog-minimum": ((64, 800), True),
    "over-max-side": ((4001, 128), True),  # shrunk to 4000 px wide: 128 px high stays
    "over-max-side-too-low": ((4001, 127), False),
    "very-wide": ((20000, 2), False),
    "very-tall": ((2, 20000), False),
    "wide": ((3000, 130), True),
    "tall": ((90, 3000), True),
    "over-jpeg-side": ((70000, 1), False),
}
MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16"]
CROP_REFUSED = re.compile(r"(too small for|not the shape of) a person crop: \d+x\d+")
TOO_SMALL = re.compile(r"frame too small to detect people: \d+x\d+ \(min \d+x\d+")


def write_image(path: Path, size: tuple[int, int], mode: str) -> Path:
    """A smooth gradient (small files, whatever the size) in ``mode``; CMYK as JPEG, the others as PNG."""
    w, h = size
    ramp = (np.add.outer(np.arange(h), np.arange(w)) % 256).astype(np.uint8)
    rgb = Image.fromarray(np.stack([ramp, ramp[::-1] if h > 1 else ramp, np.full_like(ramp, 128)], -1))
    if mode == "I;16":
        im = Image.fromarray(ramp.astype(np.uint16) * 257).convert("I;16")
    elif mode == "P":
        im = rgb.quantize(16)
    else:
        im = rgb.convert(mode)
    path = path.with_suffix(".jpg" if mode == "CMYK" else ".png")
    im.save(path)
    with Image.open(path) as back:
        assert back.mode == (mode if mode != "CMYK" else "CMYK") and back.size == size, (mode, back.mode, size)
    return path


@pytest.fixture(scope="module")
def fuzz_images(tmp_path_factory) -> list[tuple[Path, bool]]:
    """(image, whether HOG takes it): every shape in RGB, every mode at 1x1 and at 64x128."""
    root = tmp_path_factory.mktemp("fuzz")
    images = [(write_image(root / f"{name}_RGB", size, "RGB"), hog) for name, (size, hog) in SHAPES.items()]
    for mode in MODES:
        tag = mode.replace(";", "")
        images.append((write_image(root / f"1x1_{tag}", (1, 1), mode), False))
        images.append((write_image(root / f"64x128_{tag}", (64, 128), mode), True))
    return images


def outcome(job) -> tuple[bool, object]:
    """(True, result) or (False, the error message) of a submitted gradio_client job."""
    from gradio_client.exceptions import AppError

    try:
        return True, job.result(timeout=300)
    except AppError as e:
        return False, str(e)


def test_every_endpoint_takes_extreme_images_and_the_server_keeps_serving(served, fuzz_images, tmp_path):
    from gradio_client import handle_file

    start = time.monotonic()
    client = served.client
    jobs = [
        (
            path,
            hog,
            client.submit(handle_file(str(path)), 3, api_name="/search"),
            client.submit(handle_file(str(path)), api_name="/detect"),
        )
        for path, hog in fuzz_images
    ]
    for path, hog, search, detect in jobs:
        ok, result = outcome(search)
        if crop_shape_problem(*Image.open(path).size):  # the one crop rule of search and add
            assert not ok and CROP_REFUSED.search(result), (path.name, result)
        else:
            assert ok and len(result[0]) == 3, (path.name, result)  # any other decodable image is a valid query
        ok, result = outcome(detect)
        if hog:
            assert ok and re.search(r"No people found|Found \*\*\d+\*\* people", result[-1]), (path.name, result)
        else:
            assert not ok and TOO_SMALL.search(result), (path.name, result)

    crops = [path for path, _ in fuzz_images if not crop_shape_problem(*Image.open(path).size)]
    n, refused = len(crops), len(fuzz_images) - len(crops)
    status, _ = served.add(*(path for path, _ in fuzz_images))
    assert f"Added **{n}** images" in status and f"and {refused - 8} more" in status, status
    assert "person crop" in status and refused > 8
    archive = tmp_path / "fuzz.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for path in crops:
            z.write(path, f"crops/{path.name}")
    with pytest.raises(Exception, match="already in the gallery"):  # the same images again: nothing added
        served.add(archive)
    ok, message = outcome(client.submit(handle_file(str(archive)), 3, api_name="/search"))
    assert not ok and "not an image file" in message

    # the gallery now holds every shape: searches show them, bounded in size
    gallery, _ = served.search(served.queries()[0], 50)
    assert len(gallery) == min(50, served.app.index.ntotal) and all(
        max(Image.open(item["image"]).size) <= 512 for item in gallery
    )
    print(f"{2 * n + 4} requests in {time.monotonic() - start:.1f} s")


def test_cli_image_entries_take_extreme_images(served, fuzz_images):
    """Every decodable image of a person-crop shape is searched and added; the others get the app's shape rule
    (one line, exit code 2 for a query; skipped with the reason by `index add`), never a traceback."""
    paths = [str(path) for path, _ in fuzz_images]
    crops = [p for p in paths if not crop_shape_problem(*Image.open(p).size)]
    odd = sorted(set(paths) - set(crops))
    assert crops and odd
    code, out, err = run_cli(["index", "search", "--index", str(served.index), "--json", "-k", "2", "--query", *crops])
    assert code == 0 and "Traceback" not in err, err
    assert [q["query"] for q in json.loads(out)["queries"]] == crops
    assert all(len(q["results"]) == 2 for q in json.loads(out)["queries"])
    code, out, err = run_cli(["index", "search", "--index", str(served.index), "--query", odd[0]])
    assert code == 2 and "Traceback" not in err and "person crop" in err, err
    code, out, err = run_cli(["index", "add", "--index", str(served.index), "--json", *paths])
    assert code == 0 and "Traceback" not in err, err
    added = json.loads(out)
    assert added["added"] == len(set(crops))  # a file named twice is added once
    assert {p for p, _ in added["skipped"]} >= set(odd)
    assert len(served.search(served.queries()[0], 2)[0]) == 2  # and the app still answers
