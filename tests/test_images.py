from __future__ import annotations

import os
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blackbox_vqa.errors import ImageError, ImageTooLargeError, InputError
from blackbox_vqa.images import MAX_IMAGE_PIXELS, decode_image_bytes, load_image, to_rgb_array
from cli_runner import run_cli


def test_png_and_jpeg_load_as_rgb(tmp_path: Path) -> None:
    pixels = np.zeros((5, 7, 3), dtype=np.uint8)
    pixels[1, 2] = (10, 20, 30)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    loaded = load_image(tmp_path / "a.png")
    assert loaded.dtype == np.uint8 and np.array_equal(loaded, pixels)
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=95)
    assert load_image(tmp_path / "a.jpg").shape == (5, 7, 3)


def test_grayscale_palette_and_rgba(tmp_path: Path) -> None:
    Image.fromarray(np.full((3, 3), 77, dtype=np.uint8), mode="L").save(tmp_path / "g.png")
    assert (load_image(tmp_path / "g.png") == 77).all()
    palette = Image.new("P", (3, 3))
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 1), 1)
    palette.save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png")[1, 1].tolist() == [200, 100, 50]
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (0, 0, 0, 0)  # transparent: white
    rgba[1, 0] = (0, 0, 255, 128)  # half blue over white
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "t.png")
    out = load_image(tmp_path / "t.png")
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert out[1, 0].tolist() == pytest.approx([127, 127, 255], abs=1)


def test_missing_corrupt_and_tiny_files(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="image file not found"):
        load_image(tmp_path / "none.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageError, match="cannot read image"):
        load_image(tmp_path / "bad.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="cannot read image"):
        load_image(tmp_path / "empty.png")
    Image.new("RGB", (1, 1)).save(tmp_path / "one.png")
    with pytest.raises(ImageError, match="1x1 pixels; at least 2x2"):
        load_image(tmp_path / "one.png")
    truncated = tmp_path / "trunc.png"
    Image.fromarray(np.zeros((50, 50, 3), np.uint8) + 9).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(ImageError, match="cannot read image"):
        load_image(truncated)


def test_arrays() -> None:
    gray = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert to_rgb_array(gray)[1, 2].tolist() == [5, 5, 5]
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    assert to_rgb_array(rgba).shape == (2, 2, 3)
    floats = to_rgb_array(np.full((2, 2, 3), 3, dtype=np.int32))
    assert floats.dtype == np.float32 and floats[0, 0, 0] == 3.0
    as_pil = to_rgb_array(Image.new("L", (4, 3), 9))
    assert as_pil.shape == (3, 4, 3)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((4, 4, 2)), "must have shape H x W x 3"),
        (np.zeros((4,)), "must have shape H x W x 3"),
        (np.zeros((0, 5, 3)), "is 5x0 pixels"),
        (np.full((3, 3, 3), np.nan, dtype=np.float32), "NaN or infinite"),
        (np.full((3, 3, 3), "x"), "must be numeric"),
    ],
)
def test_bad_arrays(array: np.ndarray, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        to_rgb_array(array)


def test_unsupported_type() -> None:
    with pytest.raises(ImageError, match="got int"):
        to_rgb_array(5)  # type: ignore[arg-type]


# ------------------------------------------------------------------ hostile files


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` RGB pixels, with no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data).to_bytes(4, "big")
        return len(data).to_bytes(4, "big") + kind + data + crc

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_16_bit_grayscale_pngs_are_scaled_not_white(tmp_path: Path) -> None:
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")  # a real 16-bit grayscale PNG
    with Image.open(tmp_path / "deep.png") as opened:
        assert opened.mode.startswith("I")
    loaded = load_image(tmp_path / "deep.png")
    expected = np.rint(ramp / 257.0).astype(np.uint8)
    assert loaded.dtype == np.uint8 and loaded.shape == (64, 64, 3)
    np.testing.assert_array_equal(loaded[:, :, 0], expected)
    assert (loaded[:, :, 0] == loaded[:, :, 2]).all()
    assert loaded.min() == 0 and 250 <= loaded.max() <= 255 and len(np.unique(loaded)) > 200
    # 32-bit integer grayscale (mode I) follows the same 0-65535 scale, clipped.
    wide = np.array([[0, 257, 65535, 70000], [-5, 514, 0, 0]], dtype=np.int32)
    assert to_rgb_array(Image.fromarray(wide, mode="I"))[:, :, 1].tolist() == \
        [[0, 1, 255, 255], [0, 2, 0, 0]]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    stored = np.zeros((32, 64, 3), dtype=np.uint8)  # 64 wide, 32 high as stored
    stored[:, :32] = (255, 0, 0)  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    upright = load_image(tmp_path / "photo.jpg")
    assert upright.shape == (64, 32, 3)  # as a viewer shows it: portrait
    assert upright[8, 16, 0] > 200 and upright[56, 16, 0] < 50  # red on top now
    data = (tmp_path / "photo.jpg").read_bytes()
    np.testing.assert_array_equal(decode_image_bytes(data), upright)


@pytest.mark.parametrize(("width", "height"), [(50_000, 50_000), (10_000, 10_000)],
                         ids=["past-pillow-error", "past-pillow-warning"])
def test_a_huge_image_is_refused_from_its_header(tmp_path: Path, width: int, height: int) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_declaring(width, height))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no raw DecompressionBombWarning
        with pytest.raises(ImageTooLargeError, match=f"limit is {MAX_IMAGE_PIXELS} pixels"):
            load_image(path)
    if width * height > 2 * Image.MAX_IMAGE_PIXELS:  # Pillow's own cap stays a cap
        with pytest.raises(ImageTooLargeError, match="Pillow's own cap"):
            load_image(path, max_pixels=width * height)
        return
    # A limit of one's own; the file has no pixel data, so only the header was read.
    with pytest.raises(ImageTooLargeError, match=f"{width}x{height}"):
        load_image(path, max_pixels=width * height - 1)
    with pytest.raises(ImageError, match="cannot read image"):  # within the limit: decoded
        load_image(tmp_path / "bomb.png", max_pixels=width * height)


def test_a_directory_or_a_device_is_named_as_such(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="is a directory, not an image file"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="is not a regular file"):
        load_image(os.devnull)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="is not a regular file"):
        load_image(fifo)  # returns at once: a pipe is never opened


@pytest.mark.parametrize("kind", ["bomb", "directory", "device"])
def test_cli_refuses_bad_image_paths_with_exit_2(tmp_path: Path, kind: str) -> None:
    path = {"bomb": tmp_path / "bomb.png", "directory": tmp_path,
            "device": Path(os.devnull)}[kind]
    if kind == "bomb":
        path.write_bytes(png_declaring(50_000, 50_000))
    code, _, err = run_cli(["explain", "-i", str(path), "-q", "is it bright?",
                            "--out", str(tmp_path / "out")])
    assert code == InputError.exit_code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err and "unexpected" not in err
    words = {"bomb": "pixels; the limit is", "directory": "is a directory",
             "device": "is not a regular file"}[kind]
    assert words in err
