"""Safe image reading: every mode becomes RGB, every bad file is an ImageReadError with its reason."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from lageo_utils.images import ImageDataset, ImageReadError, collate_skip_failures, input_size, open_rgb, to_rgb

RED = (200, 30, 40)


def _save(img: Image.Image, path, **kwargs):
    img.save(path, **kwargs)
    return path


def _jpeg_bytes(size=(32, 32), color=RED) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming the given size but holding no pixel data: a huge image in 60 bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"") + _png_chunk(b"IEND", b"")


def _reason(path) -> str:
    with pytest.raises(ImageReadError) as info:
        open_rgb(path)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)
    return info.value.reason


def test_rgb_jpeg_opens_unchanged_in_size(tmp_path):
    path = tmp_path / "ok.jpg"
    path.write_bytes(_jpeg_bytes((40, 30)))
    img = open_rgb(path)
    assert img.mode == "RGB" and img.size == (40, 30)
    assert np.abs(np.asarray(img, dtype=int)[15, 20] - RED).max() <= 3


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.jpg", b"", "empty file (0 bytes)"),
        ("notes.jpg", b"latitude,longitude\n34.05,-118.25\n", "not an image"),
        ("noise.png", bytes(range(256)) * 4, "not an image"),
    ],
)
def test_unreadable_files_are_named_with_their_reason(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    assert expected in _reason(path)


def test_missing_file(tmp_path):
    assert _reason(tmp_path / "absent.jpg") == "file not found"


def test_truncated_jpeg(tmp_path):
    path = tmp_path / "truncated.jpg"
    data = _jpeg_bytes((64, 64))
    path.write_bytes(data[: len(data) // 2])
    assert "truncated" in _reason(path)


def test_corrupt_png_data(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    start = data.index(b"IDAT") + 8
    data[start : start + 40] = bytes(40)  # zero part of the compressed pixels (and break the chunk CRC)
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    assert "corrupt" in _reason(path)


@pytest.mark.parametrize(
    ("mode", "color", "expected"),
    [
        ("L", 128, (128, 128, 128)),
        ("LA", (128, 255), (128, 128, 128)),
        ("I;16", 40000, (255, 255, 255)),  # 16-bit values are clipped to 8 bits by Pillow's conversion
    ],
)
def test_grey_modes_become_rgb(tmp_path, mode, color, expected):
    path = _save(Image.new(mode, (8, 8), color), tmp_path / f"grey_{mode.replace(';', '')}.png")
    img = open_rgb(path)
    assert img.mode == "RGB"
    assert tuple(np.asarray(img)[4, 4]) == expected


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = _save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(path).mode == "CMYK"
    img = open_rgb(path)
    assert img.mode == "RGB" and img.size == (16, 16)
    r, g, b = np.asarray(img, dtype=int)[8, 8]
    assert r > 200 and g < 60 and b < 60  # cyan 0, magenta and yellow full: red


def test_palette_images(tmp_path):
    palette_img = Image.new("RGB", (8, 8), RED).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    path = _save(palette_img, tmp_path / "palette.png")
    assert Image.open(path).mode == "P"
    assert tuple(np.asarray(open_rgb(path))[0, 0]) == RED

    transparent = Image.new("P", (8, 8), 1)
    transparent.putpalette([0, 0, 0, *RED] + [0] * 762)
    transparent.putpixel((0, 0), 0)
    path = _save(transparent, tmp_path / "palette_alpha.png", transparency=0)
    pixels = np.asarray(open_rgb(path))
    assert tuple(pixels[0, 0]) == (255, 255, 255)  # the transparent index is flattened onto white
    assert tuple(pixels[4, 4]) == RED


def test_alpha_is_flattened_onto_white(tmp_path):
    img = Image.new("RGBA", (8, 8), (*RED, 255))
    img.putpixel((0, 0), (0, 0, 0, 0))
    img.putpixel((1, 0), (0, 0, 0, 128))
    pixels = np.asarray(open_rgb(_save(img, tmp_path / "alpha.png")), dtype=int)
    assert tuple(pixels[0, 0]) == (255, 255, 255)
    assert np.abs(pixels[0, 1] - 127).max() <= 1  # half-transparent black over white: mid grey
    assert tuple(pixels[4, 4]) == RED


def test_to_rgb_of_an_rgb_image_is_a_copy():
    img = Image.new("RGB", (4, 4), RED)
    out = to_rgb(img)
    out.putpixel((0, 0), (0, 0, 0))
    assert img.getpixel((0, 0)) == RED


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    path = _save(Image.new("RGB", (40, 20), RED), tmp_path / "rotated.jpg", exif=exif)
    assert open_rgb(path).size == (20, 40)


def test_image_beyond_twice_the_bomb_limit_is_refused_unread(tmp_path):
    # A 100000 x 100000 PNG (10 Gpx) is refused by Pillow's guard from its header alone.
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header_only(100_000, 100_000))
    assert "decompression-bomb guard" in _reason(path)


def test_image_over_the_limit_is_refused_unless_a_jpeg_can_be_decoded_small(tmp_path, monkeypatch):
    # The limit is lowered so that a 120 x 120 image plays a 12000 x 12000 one (beyond 1x, within 2x).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    png = _save(Image.new("RGB", (120, 120), RED), tmp_path / "big.png")
    assert "too large: 120x120 px exceeds" in _reason(png)

    jpeg = tmp_path / "big.jpg"
    jpeg.write_bytes(_jpeg_bytes((120, 120)))
    img = open_rgb(jpeg)
    assert img.size == (15, 15)  # decoded at 1/8 scale, never at full size
    assert np.abs(np.asarray(img, dtype=int)[7, 7] - RED).max() <= 6


def test_large_jpeg_within_the_limit_is_decoded_at_reduced_scale(tmp_path):
    path = tmp_path / "large.jpg"
    path.write_bytes(_jpeg_bytes((2100, 2100)))
    assert open_rgb(path).size == (1050, 1050)  # draft to the first scale at least 1024 px


@pytest.mark.parametrize(("size", "min_size", "decoded"), [
    ((640, 640), 224, (320, 320)),  # Street View size for a 224 px model: half scale
    ((640, 480), 224, (320, 240)),  # the short side stays at least the model input
    ((640, 447), 224, (640, 447)),  # half scale would take the short side below 224: full size
    ((640, 640), 64, (80, 80)),  # a 64 px model: eighth scale
])
def test_jpeg_is_decoded_small_but_never_below_the_size_asked_for(tmp_path, size, min_size, decoded):
    path = tmp_path / "street.jpg"
    path.write_bytes(_jpeg_bytes(size))
    assert open_rgb(path).size == size
    assert open_rgb(path, min_size).size == decoded
    assert ImageDataset([str(path)], lambda im: torch.tensor(im.size), min_size=min_size)[0][0].tolist() == list(decoded)


def test_input_size_is_the_first_resize_of_the_preprocessing():
    from torchvision import transforms as T

    assert input_size(T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor()])) == 224
    assert input_size(T.Compose([T.Resize((200, 300)), T.ToTensor()])) == 300  # both sides must stay large enough
    assert input_size(T.ToTensor()) is None


def test_dataset_reports_failures_and_loader_skips_them(tmp_path):
    good = tmp_path / "good.jpg"
    good.write_bytes(_jpeg_bytes((20, 20)))
    (tmp_path / "empty.jpg").write_bytes(b"")
    _save(Image.new("RGB", (200, 2), RED), tmp_path / "strip.png")
    dataset = ImageDataset(["good.jpg", "empty.jpg", "strip.png", "good.jpg"], lambda im: torch.zeros(3), root=tmp_path)

    assert dataset[1] == (None, 1, "empty file (0 bytes)")
    _, _, reason = dataset[2]
    assert reason.startswith("extreme aspect ratio (200x2 px)")

    images, indices, failures = next(iter(DataLoader(dataset, batch_size=4, collate_fn=collate_skip_failures)))
    assert images.shape == (2, 3)
    assert indices.tolist() == [0, 3]
    assert [i for i, _ in failures] == [1, 2]


def test_dataset_reports_a_failing_transform(tmp_path):
    path = tmp_path / "good.jpg"
    path.write_bytes(_jpeg_bytes())

    def broken(_img):
        raise RuntimeError("boom")

    tensor, index, reason = ImageDataset([str(path)], broken)[0]
    assert tensor is None and index == 0
    assert reason == "preprocessing failed (RuntimeError: boom)"


def test_collate_of_only_failures():
    images, indices, failures = collate_skip_failures([(None, 0, "x"), (None, 1, "y")])
    assert images is None and indices.tolist() == [] and failures == [(0, "x"), (1, "y")]
