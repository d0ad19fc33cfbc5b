"""Image decoding on a generated bad-input corpus: every case is an RGB image or an ImageError that
names the input; nothing else escapes."""

import io
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.images import ImageError, decode_image, read_image


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims huge dimensions (IHDR only): a decompression bomb's calling card."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


RGB = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))


@pytest.mark.parametrize("name,data,words", [
    ("zero.jpg", b"", "empty file"),
    ("text.jpg", b"hello, this is not an image\n", "not a decodable image"),
    ("page.png", b"<html><body>404</body></html>", "not a decodable image"),
    ("truncated.jpg", _jpeg(RGB)[:200], "corrupt or truncated"),
    ("corrupt.jpg", _jpeg(RGB)[:20] + b"\x00" * 50 + _jpeg(RGB)[70:80], "not a decodable image"),
    ("bomb.png", _png_header_only(60_000, 60_000), "decompression-bomb guard"),
])
def test_bad_inputs_raise_named_errors(name, data, words):
    with pytest.raises(ImageError) as e:
        decode_image(data, name)
    assert str(e.value).startswith(name + ": ") and re.search(words, str(e.value))


@pytest.mark.parametrize("make", [
    lambda: _png(Image.new("RGBA", (30, 20), (255, 0, 0, 0))),  # fully transparent
    lambda: _png(Image.new("L", (30, 20), 128)),
    lambda: _png(Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16))),  # 16-bit grayscale
    lambda: _jpeg(Image.new("CMYK", (30, 20), (0, 255, 255, 0))),
    lambda: _png(Image.new("P", (30, 20), 3)),
    lambda: _png(Image.new("RGB", (1, 1), (1, 2, 3))),
])
def test_odd_but_valid_images_become_rgb(make):
    img = decode_image(make(), "odd")
    assert img.mode == "RGB" and img.width >= 1 and img.height >= 1


def test_alpha_composited_on_white_and_16bit_keeps_contrast():
    transparent = decode_image(_png(Image.new("RGBA", (4, 4), (255, 0, 0, 0))), "a")
    assert transparent.getpixel((0, 0)) == (255, 255, 255)
    g16 = decode_image(_png(Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16))), "g")
    assert g16.getpixel((0, 0))[0] == 40000 // 256


def test_cmyk_colour_is_converted():
    red = decode_image(_jpeg(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), quality=95), "cmyk")
    r, g, b = red.getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60


def test_exif_rotation_applied():
    """A 60x40 image stored with orientation 6 (rotate 90 CW to display) decodes as 40x60, and the
    pixel that is displayed top-left is the stored bottom-left one."""
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[-10:, :10] = (255, 0, 0)  # stored bottom-left: red
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(_jpeg(img, exif=exif.tobytes(), quality=95), "rotated.jpg")
    assert out.size == (40, 60)
    r, g, b = out.getpixel((2, 2))
    assert r > 200 and g < 60


def test_read_image_missing_file(tmp_path):
    with pytest.raises(ImageError, match="file not found") as e:
        read_image(str(tmp_path / "nope.jpg"))
    assert "nope.jpg" in str(e.value)
