from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blackbox_vqa.errors import ImageError
from blackbox_vqa.images import load_image, to_rgb_array


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
