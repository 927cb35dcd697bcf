"""service.decode_cost: files that decode far slower than their size suggests are refused from their
structure, before Pillow parses them; ordinary files of every format pass untouched."""

from __future__ import annotations

import io
import struct
import time

import PIL.Image
import pytest

from service import decode_cost
from service.errors import ApiError
from service.preprocess import ImageLimits, decode_image, open_image
from tests.robustness import (
    bmp_rle8,
    encode,
    gif_with_subblocks,
    jpeg_with_junk,
    jpeg_with_segments,
    noise,
    png_with_chunks,
    progressive_jpeg,
)


def refused(data: bytes, limits: ImageLimits | None = None) -> ApiError:
    with pytest.raises(ApiError) as info:
        decode_image(data, limits or ImageLimits())
    assert info.value.status == 422 and info.value.code == "image_too_complex", info.value.message
    return info.value


def test_a_progressive_jpeg_costs_a_pass_per_scan():
    plain = encode(noise(96, 64, seed=1), "JPEG")
    progressive = progressive_jpeg(96, 64, seed=1)
    assert decode_cost.passes(plain) == 1
    scans = decode_cost.passes(progressive)
    assert 2 <= scans <= 12  # libjpeg's standard script: 10 for colour (a thumbnail may add one)
    assert decode_cost.passes(progressive_jpeg(96, 64, extra_scans=500)) == decode_cost.passes(
        progressive_jpeg(96, 64)) + 500
    assert open_image(progressive, ImageLimits())[1] == 96 * 64 * scans


def test_repeated_scans_are_refused_before_decoding():
    """The attack: a few hundred KB repeating a tiny refinement scan, ~60 s to decode."""
    bomb = progressive_jpeg(1024, 1024, extra_scans=40_000)
    assert len(bomb) < 1_000_000
    started = time.perf_counter()
    err = refused(bomb)
    assert time.perf_counter() - started < 0.5
    assert "1024x1024" in err.message and "passes" in err.message
    # the same file is fine under a budget that covers it, and decodes as Pillow decodes it
    small = progressive_jpeg(64, 64, extra_scans=30)
    work = 64 * 64 * decode_cost.passes(small)
    refused(small, ImageLimits(max_decode_work=work - 1))
    image = decode_image(small, ImageLimits(max_decode_work=work))
    assert image.tobytes() == PIL.Image.open(io.BytesIO(small)).convert("RGB").tobytes()


@pytest.mark.parametrize("name,make", [
    ("jpeg segments", lambda n: jpeg_with_segments(n)),
    ("jpeg junk", lambda n: jpeg_with_junk(n * 32)),
    ("png chunks", lambda n: png_with_chunks(n)),
    ("gif sub-blocks", lambda n: gif_with_subblocks(n)),
    ("gif stray bytes", lambda n: gif_with_subblocks(1, stray=n * 32)),
])
def test_parser_bombs_are_refused_before_pillow_parses_them(name, make, monkeypatch):
    """Structure that Pillow would walk in Python (holding the GIL) step by step: a few dozen steps
    pass; tens of thousands are refused, without Pillow opening the file."""
    ordinary = make(20)
    assert decode_image(ordinary, ImageLimits()).size == (32, 32)

    def never(*args, **kwargs):
        raise AssertionError("Pillow opened a file the structure walk should have refused")

    monkeypatch.setattr(PIL.Image, "open", never)
    started = time.perf_counter()
    refused(make(60_000))
    assert time.perf_counter() - started < 0.5


def test_rle_bitmaps_are_held_to_what_pillow_decodes_in_python():
    assert decode_image(bmp_rle8(200, 100), ImageLimits()).size == (200, 100)
    err = refused(bmp_rle8(2000, 2000))
    assert "RLE" in err.message


def test_exif_is_held_to_a_jpegs_limit():
    """An EXIF orientation step parses the metadata in Python: a PNG or WebP could carry megabytes of it."""
    entries = 8000  # 12 bytes each: ~96 KB, over the 64 KiB a JPEG segment holds
    tiff = (b"II*\x00" + struct.pack("<IH", 8, entries)
            + b"".join(struct.pack("<HHII", 1000 + i, 3, 1, 1) for i in range(entries)) + b"\x00" * 4)
    for fmt in ("PNG", "WEBP"):
        big = encode(noise(32, 32, seed=3), fmt, exif=tiff)
        assert "EXIF" in refused(big).message
        small = encode(noise(32, 32, seed=3), fmt, exif=tiff[:8] + struct.pack("<H", 1) + tiff[10:22] + b"\x00" * 4)
        assert decode_image(small, ImageLimits()).size == (32, 32)


def test_a_large_ordinary_png_passes():
    """A real encoder's chunking (Pillow: 64 KB IDAT chunks) is far inside the budget at any size."""
    data = encode(noise(1500, 1500, seed=2), "PNG")
    assert decode_cost.passes(data) == 1 and len(data) > 5_000_000
    assert decode_image(data, ImageLimits()).size == (1500, 1500)


def test_truncated_and_foreign_files_are_left_to_pillow():
    for data in (b"\xff\xd8\xff", b"\xff\xd8\xff\xe0\x00", b"\x89PNG\r\n\x1a\n\x00", b"GIF89a", b"BM", b"not an image"):
        assert decode_cost.passes(data) == 1
        with pytest.raises(ApiError) as info:
            decode_image(data, ImageLimits())
        assert info.value.status in (400, 415)


def test_limit_must_be_positive():
    with pytest.raises(ValueError):
        ImageLimits(max_decode_work=0)
