"""What decoding an upload will cost, read from its structure before Pillow parses any of it.

Two kinds of decoding work can grow far beyond what a file's size suggests:

* Passes over the pixels, in C. A progressive JPEG is decoded scan by scan, and a scan walks every
  block of the components it covers however few bytes it holds: a ~1 MB file repeating a 16-byte
  refinement scan thousands of times took 80 s. Every other format is decoded in one pass.
* Steps of Pillow's own parsers, in Python, which hold the GIL and so slow every request of the
  process, not only this one: one per JPEG marker segment (and per junk byte) before the first
  scan, one per PNG chunk, one per GIF extension sub-block before the first frame, one per pixel
  of an RLE-compressed BMP (its decoder is Python), one per EXIF entry (``check_exif``).

``passes(data)`` walks the structure the way Pillow will, counting those steps, and refuses a file
that would take more of them than a bounded budget (its own walk stops there too); it returns the
number of passes over the pixels, an upper bound. ``check_work`` then holds width x height x passes,
with the size Pillow read from the header, to the ``max_decode_work`` setting.
"""

from __future__ import annotations

import re
import struct

import numpy as np

from service.errors import ApiError

# Steps of Pillow's parsers a file may take: a step is about 2 us of Python (a PNG chunk), so a
# file costs at most ~33 ms plus ~2 ms per MB of its size. Legitimate files take a few dozen
# (a 20 MB PNG written in libpng's 8 KB chunks: 2,560).
MAX_PARSE_STEPS = 16384
BYTES_PER_FREE_STEP = 1024
# cheaper Python iterations, as a fraction of a step: Pillow skips a JPEG's junk byte or decodes an
# RLE BMP's pixel in ~60-120 ns
CHEAP_PER_STEP = 16

# JPEG markers Pillow reads no length for (its MARKER table's entries without a handler)
_JPEG_BARE = frozenset({0xC8, *range(0xD0, 0xDA), *range(0xF0, 0xFE)})
# what starts a block in a GIF's stream; Pillow skips any other byte, one at a time
_GIF_BLOCK = re.compile(rb"[!,;]")


def too_complex(message: str) -> ApiError:
    return ApiError(422, "image_too_complex", message)


class _Steps:
    """Counts parser steps against the budget of a file of ``size`` bytes; ``what`` says what they are."""

    def __init__(self, what: str, size: int) -> None:
        self.what = what
        self.limit = MAX_PARSE_STEPS + size // BYTES_PER_FREE_STEP
        self.spent = 0.0

    def take(self, n: float = 1) -> None:
        self.spent += n
        if self.spent > self.limit:
            raise too_complex(f"Parsing this file takes over {self.limit} steps of the image library's Python code "
                              f"({self.what}); a normal file takes a few dozen. Re-encode it (PNG, or a plain JPEG).")


def passes(data: bytes) -> int:
    """Passes over the pixels that decoding ``data`` takes (an upper bound); raises ``image_too_complex``
    when Pillow's parsers would take too many steps. Formats are told by their signatures, as Pillow
    does; a file of none of them is left to Pillow to refuse."""
    if data[:3] == b"\xff\xd8\xff":
        return _jpeg(data, _Steps("JPEG marker segments and junk bytes before the first scan", len(data)))
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        _png(data, _Steps("PNG chunks", len(data)))
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        _gif(data, _Steps("GIF blocks and stray bytes before the first frame", len(data)))
    elif data[:2] == b"BM":
        _bmp(data, _Steps("the pixels of an RLE-compressed BMP, decoded in Python", len(data)))
    return 1


def _jpeg(data: bytes, steps: _Steps) -> int:
    """Pillow's header loop up to the first scan, step for step; then its scans, counted in C (a
    ``\\xff\\xda`` outside a scan header only raises the bound: entropy-coded data never holds one)."""
    pos, end = 2, len(data)  # at an 0xFF; the byte after it says what it starts
    while pos + 1 < end:
        if data[pos] != 0xFF:  # junk, skipped a byte at a time
            nxt = data.find(b"\xff", pos)
            nxt = end if nxt < 0 else nxt
            steps.take((nxt - pos) / CHEAP_PER_STEP)
            pos = nxt
            continue
        steps.take()
        marker = data[pos + 1]
        if marker == 0xDA:  # start of the first scan: libjpeg reads the rest
            return _count_scans(data, pos)
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0x00 or marker in _JPEG_BARE:
            pos += 2
        elif marker >= 0xC0:
            if pos + 4 > end:
                break
            (length,) = struct.unpack_from(">H", data, pos + 2)
            pos += 2 + max(length, 2)
        else:  # Pillow: "no marker found", refused before any work
            break
    return 1


def _count_scans(data: bytes, start: int) -> int:
    """``\\xff\\xda`` from ``start`` on: numpy scans the bytes without the GIL (``bytes.count`` holds
    it, ~1.5 ms per MB)."""
    view = np.frombuffer(data, np.uint8, offset=start)  # [n] no copy
    marks = np.flatnonzero(view[:-1] == 0xFF)  # [m], m ~ n / 100 in entropy-coded data
    return max(1, int(np.count_nonzero(view[marks + 1] == 0xDA)))


def _png(data: bytes, steps: _Steps) -> None:
    """One step per chunk, IDAT included (Pillow reads each in Python), up to IEND."""
    pos, end = 8, len(data)
    while pos + 8 <= end:
        steps.take()
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IEND":
            return
        pos += 12 + length


def _gif(data: bytes, steps: _Steps) -> None:
    """One step per block before the first frame's image data (LZW data is decoded in C)."""
    if len(data) < 13:
        return
    flags = data[10]
    pos, end = 13 + ((3 << ((flags & 7) + 1)) if flags & 0x80 else 0), len(data)
    while pos < end:
        found = _GIF_BLOCK.search(data, pos)
        nxt = end if found is None else found.start()
        steps.take(1 + (nxt - pos) / CHEAP_PER_STEP)  # the block, and the stray bytes before it
        if nxt == end or data[nxt] != 0x21:  # the first image descriptor, or the trailer
            return
        pos = nxt + 2  # an extension: its label, then sub-blocks up to an empty one
        while pos < end and data[pos]:
            steps.take()
            pos += 1 + data[pos]
        pos += 1


def _bmp(data: bytes, steps: _Steps) -> None:
    """An RLE8/RLE4 bitmap is decoded by Pillow in Python, per pixel (runs of RLE4, line ends)."""
    if len(data) < 34 or struct.unpack_from("<I", data, 14)[0] < 40:  # no compression field
        return
    width, height, _, _, compression = struct.unpack_from("<iiHHI", data, 18)
    if compression in (1, 2):
        steps.take((abs(width) * abs(height) + len(data)) / CHEAP_PER_STEP)


# A JPEG's EXIF fits one 64 KiB segment; PNG and WebP could carry megabytes, which the EXIF
# orientation step parses in Python (65,535 entries: ~0.1 s)
MAX_EXIF_BYTES = 65535


def check_exif(exif: bytes | None) -> None:
    """``image_too_complex`` for EXIF metadata over a JPEG's limit (checked after the decode, when a
    PNG's trailing chunks are in too, before the orientation step reads it)."""
    if exif is not None and len(exif) > MAX_EXIF_BYTES:
        raise too_complex(f"The image's EXIF metadata is {len(exif)} bytes; the limit is {MAX_EXIF_BYTES} "
                          "(a JPEG's). Strip it, or keep only the orientation.")


def check_work(width: int, height: int, passes: int, max_work: int) -> int:
    """width x height x passes, the decoding work in pixels; ``image_too_complex`` over ``max_work``."""
    work = width * height * passes
    if work > max_work:
        raise too_complex(
            f"Decoding this image takes {passes} passes over its {width}x{height} pixels ({work} pixel-passes); "
            f"the limit is {max_work}. A progressive JPEG with that many scans decodes far slower than its size "
            "suggests: re-encode it (baseline JPEG, a standard progressive one, or PNG).")
    return work
