"""The one decoder and the one folder walker: every image is read the way a viewer shows it.

Each Pillow mode is written from an 8-bit original and must decode back to it; EXIF orientation is applied;
what cannot be read faithfully is reported by file name.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from reid_ssl.errors import ImageError, MissingFileError
from reid_ssl.images import ALPHA_BACKGROUND, iter_images, open_rgb, to_rgb


@pytest.fixture
def original() -> np.ndarray:
    """A 40x24 RGB gradient with a distinct top (shirt) and bottom (trousers)."""
    rng = np.random.default_rng(0)
    img = np.zeros((40, 24, 3), np.uint8)
    img[:20] = (200, 30, 40)
    img[20:] = (20, 60, 180)
    return np.clip(img.astype(int) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)


def _grey(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("L"))


def test_16_bit_grey_is_scaled_not_clipped(tmp_path: Path, original: np.ndarray) -> None:
    grey = _grey(original)
    path = tmp_path / "g16.png"
    Image.fromarray(grey.astype(np.uint16) * 257).save(path)  # mode I;16, values up to 65535
    assert Image.open(path).mode.startswith("I;16")
    got = np.asarray(open_rgb(path))
    assert np.abs(got[..., 0].astype(int) - grey).max() <= 1  # not 99% white any more
    assert (got == 255).mean() < 0.5


@pytest.mark.parametrize(
    ("mode", "values"),
    [
        ("I", lambda g: g.astype(np.int32) * 257),
        ("I", lambda g: g.astype(np.int32)),
        ("F", lambda g: g / 255.0),
        ("F", lambda g: g.astype(np.float32)),
    ],
    ids=["I-16bit-range", "I-8bit-range", "F-unit", "F-255"],
)
def test_32_bit_and_float_modes_by_their_range(original: np.ndarray, mode: str, values) -> None:
    grey = _grey(original)
    im = Image.fromarray(np.asarray(values(grey), np.float32 if mode == "F" else np.int32), mode=mode)
    got = np.asarray(to_rgb(im))[..., 0].astype(int)
    assert np.abs(got - grey).max() <= 1


def test_48_bit_rgb_png(tmp_path: Path, original: np.ndarray) -> None:
    path = tmp_path / "rgb48.png"
    cv2.imwrite(str(path), cv2.cvtColor(original, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257)
    assert np.abs(np.asarray(open_rgb(path)).astype(int) - original).max() <= 1


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA-palette"])
def test_alpha_is_composited_on_the_stated_background(tmp_path: Path, original: np.ndarray, mode: str) -> None:
    alpha = np.full(original.shape[:2], 255, np.uint8)
    alpha[:, :8] = 0  # a transparent left band
    rgba = Image.fromarray(np.dstack([original, alpha]), mode="RGBA")
    if mode == "LA":
        im = rgba.convert("LA")
        expect = np.repeat(np.asarray(im.convert("L"))[..., None], 3, axis=2)
    elif mode == "PA-palette":
        im = rgba.convert("P")  # palette with a transparent index
        transparent = np.asarray(im)[0, 0]
        im.info["transparency"] = int(transparent)
        expect = np.asarray(im.convert("RGB"))
    else:
        im, expect = rgba, original
    path = tmp_path / f"{mode}.png"
    im.save(path)
    got = np.asarray(open_rgb(path))
    assert (got[:, :8] == ALPHA_BACKGROUND).all()  # transparent pixels: the background, not black
    assert np.abs(got[:, 8:].astype(int) - expect[:, 8:]).max() <= 1


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK", "YCbCr"])
def test_other_modes_convert_like_pillow(tmp_path: Path, original: np.ndarray, mode: str) -> None:
    im = Image.fromarray(original).convert(mode)
    ext = "jpg" if mode in ("CMYK", "YCbCr") else "png"
    path = tmp_path / f"x.{ext}"
    im.save(path)
    got = np.asarray(open_rgb(path))
    assert got.shape == original.shape and got.dtype == np.uint8
    if mode == "L":
        assert np.abs(got[..., 0].astype(int) - _grey(original)).max() <= 1


def test_exif_orientation_is_applied(tmp_path: Path, original: np.ndarray) -> None:
    """A phone photo stored sideways with Orientation=6 (rotate 90 degrees clockwise to view)."""
    stored = np.ascontiguousarray(np.rot90(original, k=1))  # what the camera wrote: 24 wide -> 40 wide
    exif = Image.Exif()
    exif[0x0112] = 6
    for path in (tmp_path / "phone.png", tmp_path / "phone.jpg"):
        Image.fromarray(stored).save(path, exif=exif, quality=98)
        got = np.asarray(open_rgb(path))
        assert got.shape == original.shape  # upright, as a viewer shows it
        assert got[:20, :, 0].mean() > got[20:, :, 0].mean() + 100  # the red shirt is on top
    assert (got_png := np.asarray(open_rgb(tmp_path / "phone.png"))).tolist() == original.tolist(), got_png.shape


def test_unreadable_files_are_named(tmp_path: Path) -> None:
    for name, data in {"empty.jpg": b"", "text.jpg": b"hello", "cut.png": b"\x89PNG\r\n\x1a\n\0\0"}.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageError, match=name):
            open_rgb(tmp_path / name)
    with pytest.raises(ImageError, match="no such file"):
        open_rgb(tmp_path / "missing.jpg")


def test_walker_skips_junk_and_never_loops(tmp_path: Path, original: np.ndarray) -> None:
    for rel in ["a/1.jpg", "a/._1.jpg", ".hidden/2.jpg", "b/3.PNG", "b/Thumbs.db", "b/.DS_Store", "c.txt"]:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(original).save(path, format="PNG") if rel.lower().endswith(
            (".jpg", ".png")
        ) else path.write_text("x")
    (tmp_path / "b" / "loop").symlink_to(tmp_path, target_is_directory=True)
    assert [p.relative_to(tmp_path).as_posix() for p in iter_images(tmp_path)] == ["a/1.jpg", "b/3.PNG"]
    assert list(iter_images(tmp_path, recursive=False)) == []
    with pytest.raises(MissingFileError):
        list(iter_images(tmp_path / "nope"))
