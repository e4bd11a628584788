"""Decoding what real datasets contain, and refusing what must be refused, on real awkward files."""

from __future__ import annotations

import csv
import dataclasses
import io
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from stoker.server.imaging.decode import ALPHA_BACKGROUND, BadImage
from stoker.server.imaging.limits import DecodeLimits
from stoker.server.imaging.pipelines import BUILTIN_PIPELINES
from stoker.server.imaging.render import StageTimes, render_sample
from tests.helpers import LIMITS, ODD_DATA

with open(ODD_DATA / "MANIFEST.tsv", newline="") as _manifest:
    MANIFEST = {row["file"]: row for row in csv.DictReader(_manifest, delimiter="\t")}


def render(path: Path, size: int = 64, pipeline: str = "resize", limits: DecodeLimits = LIMITS) -> np.ndarray:
    out = np.zeros((size, size, 3), np.uint8)
    render_sample(str(path).encode(), 0, BUILTIN_PIPELINES[pipeline], size, out, limits, StageTimes())
    return out


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_every_odd_file_is_decoded_or_refused_as_pillow_would(name: str) -> None:
    row = MANIFEST[name]
    readable = row["pillow_load"] == "ok"
    if readable:
        out = render(ODD_DATA / name)
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8 and out.std() > 5
    else:
        with pytest.raises(BadImage) as info:
            render(ODD_DATA / name)
        assert info.value.reason


def test_colour_models_decode_to_the_same_picture() -> None:
    reference = render(ODD_DATA / "baseline_444_coffee.jpg")
    for name in ("cmyk_adobe_coffee.jpg", "progressive_coffee.jpg", "png_named_as.jpg", "trailing_garbage_coffee.jpg"):
        assert mad(render(ODD_DATA / name), reference) < 4.0, name


def test_greyscale_and_16_bit_greyscale_become_three_equal_channels() -> None:
    grey = render(ODD_DATA / "grayscale_camera.jpg")
    deep = render(ODD_DATA / "png_16bit_gray_camera.png")
    for image in (grey, deep):
        assert np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2])
    assert mad(grey, deep) < 4.0  # 16-bit is scaled to 8 bits, not clipped at 255


def test_palette_png_and_alpha_png_match_the_photo() -> None:
    reference = render(ODD_DATA / "exif_orientation1_chelsea.jpg")
    assert mad(render(ODD_DATA / "png_palette_chelsea.png"), reference) < 8.0
    with Image.open(ODD_DATA / "png_rgba_gradient_alpha_chelsea.png") as image:
        alpha = np.asarray(image)[..., 3]
    transparent_columns = np.where(alpha.max(axis=0) == 0)[0]
    out = render(ODD_DATA / "png_rgba_gradient_alpha_chelsea.png", size=451 // 4)
    if len(transparent_columns):
        assert np.abs(out[:, 0].astype(int) - ALPHA_BACKGROUND).max() <= 2


def test_alpha_is_composited_on_the_fixed_background(tmp_path: Path) -> None:
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:, 16:] = (255, 0, 0, 255)  # opaque red right half, transparent left half
    path = tmp_path / "half.png"
    Image.fromarray(rgba, "RGBA").save(path)
    out = render(path, size=32)
    assert tuple(out[5, 2]) == ALPHA_BACKGROUND and tuple(out[5, 30]) == (255, 0, 0)


def test_webp_behind_a_jpg_name(tmp_path: Path) -> None:
    with Image.open(ODD_DATA / "baseline_444_coffee.jpg") as image:
        path = tmp_path / "actually_webp.jpg"
        image.save(path, "WEBP", quality=90)
    assert path.read_bytes()[8:12] == b"WEBP"
    assert mad(render(path), render(ODD_DATA / "baseline_444_coffee.jpg")) < 4.0


def _png_declaring(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def _jpeg_declaring(width: int, height: int) -> bytes:
    data = bytearray((ODD_DATA / "baseline_444_coffee.jpg").read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (_png_declaring(100_000, 100_000), "decompression bomb"),
        (_png_declaring(9000, 9000), "max_decoded_pixels"),  # 81 MP, a PNG cannot be decoded reduced
        (_jpeg_declaring(65535, 65535), "decompression bomb"),
        (b"", "empty file"),
        (b"GIF89a" + b"\0" * 10, "not a decodable image"),
    ],
)
def test_hostile_headers_are_refused_before_decoding(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "hostile.jpg"
    path.write_bytes(content)
    tracemalloc.start()
    try:
        with pytest.raises(BadImage, match=needle):
            render(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 1024 * 1024


def test_huge_valid_jpeg_is_decoded_reduced_in_bounded_memory(tmp_path: Path) -> None:
    # 12000 x 8000 = 96 megapixels; a full decode would need 288 MB for its pixels alone.
    width, height = 12000, 8000
    rows = np.linspace(0, 255, height, dtype=np.uint8)[:, None, None]
    cols = np.linspace(0, 255, width, dtype=np.uint8)[None, :, None]
    picture = np.concatenate(
        [
            np.broadcast_to(rows, (height, width, 1)),
            np.broadcast_to(cols, (height, width, 1)),
            np.full((height, width, 1), 90, np.uint8),
        ],
        axis=2,
    )
    path = tmp_path / "huge.jpg"
    path.write_bytes(simplejpeg.encode_jpeg(np.ascontiguousarray(picture), quality=80))
    del picture
    tracemalloc.start()
    try:
        out = render(path, size=224, pipeline="eval")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 48 * 1024 * 1024, f"peak {peak / 1e6:.0f} MB"
    assert abs(int(out[:, :, 2].mean()) - 90) <= 3 and out[0, 112, 1] < out[0, 200, 1]


def test_file_size_limit() -> None:
    with pytest.raises(BadImage, match="max_file_bytes"):
        render(ODD_DATA / "baseline_444_coffee.jpg", limits=dataclasses.replace(LIMITS, max_file_bytes=1000))


def test_image_bytes_from_pillow_round_trip() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(buffer, "PNG")
    assert buffer.getvalue().startswith(b"\x89PNG")
