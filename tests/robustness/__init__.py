"""Helpers for the robustness tests: hostile and unusual images, HTTP checks, subprocess workers.

Everything here talks to 127.0.0.1 only, and every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from service.ports import free_port, wait_until_ready


async def eventually(predicate: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    """Poll ``predicate`` on the event loop until it holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"never reached: {what}"
        await asyncio.sleep(0.02)


@dataclass
class Outcome:
    """One request of a load test: its kind, when it started, how long it took and how it ended."""

    kind: str
    started: float
    elapsed: float
    status: int | None = None
    code: str | None = None
    retry_after: str | None = None
    error: str | None = None
    message: str | None = None

    @classmethod
    def of(cls, kind: str, started: float, response: httpx.Response) -> Outcome:
        """A request answered with ``response``: its status, and its error's code and message if any."""
        error = response.json().get("error", {}) if response.status_code >= 400 else {}
        return cls(kind, started, time.monotonic() - started, response.status_code, error.get("code"),
                   response.headers.get("retry-after"), message=error.get("message"))

    @classmethod
    def failed(cls, kind: str, started: float, exc: Exception) -> Outcome:
        """A request that got no response."""
        return cls(kind, started, time.monotonic() - started, error=repr(exc))


# -- images --------------------------------------------------------------------------------------


def noise(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "CMYK": 4}[mode]
    shape = (height, width) if channels == 1 else (height, width, channels)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png(width: int, height: int, seed: int) -> bytes:
    return encode(noise(width, height, seed))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written by hand, for layouts Pillow cannot save (16-bit RGB) or sizes it would refuse."""
    return (b"\x89PNG\r\n\x1a\n"
            + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(rows)) + _png_chunk(b"IEND", b""))


def png16_rgb(width: int, height: int, seed: int) -> bytes:
    """16 bits per channel RGB (color type 2, bit depth 16)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 65536, (height, width, 3), dtype=np.uint16).astype(">u2")
    rows = b"".join(b"\x00" + pixels[y].tobytes() for y in range(height))
    return raw_png(width, height, 16, 2, rows)


def png16_gray(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 65536, (height, width), dtype=np.uint16).astype(">u2")
    rows = b"".join(b"\x00" + pixels[y].tobytes() for y in range(height))
    return raw_png(width, height, 16, 0, rows)


def bomb_png(width: int, height: int) -> bytes:
    """A few hundred bytes that declare a ``width`` x ``height`` 1-bit image (a decompression bomb)."""
    rows = b"".join(b"\x00" + b"\x00" * ((width + 7) // 8) for _ in range(16))
    return raw_png(width, height, 1, 0, rows)


def bomb_gif(width: int, height: int) -> bytes:
    """A GIF whose logical screen and only frame declare ``width`` x ``height``, with almost no data."""
    header = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return header + frame + b"\x3b"


def bomb_jpeg(width: int, height: int) -> bytes:
    """A real small JPEG whose SOF header is patched to declare ``width`` x ``height``."""
    data = bytearray(encode(noise(16, 16, 0), "JPEG"))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def animated_gif(width: int, height: int, frames: int = 3) -> tuple[bytes, Image.Image]:
    """(GIF bytes, the first frame as Pillow decodes it to RGB)."""
    images = [noise(width, height, seed=100 + i).convert("P", palette=Image.Palette.ADAPTIVE) for i in range(frames)]
    data = encode(images[0], "GIF", save_all=True, append_images=images[1:], duration=50, loop=0)
    first = Image.open(io.BytesIO(data))
    first.seek(0)
    return data, first.convert("RGB")


def exif_rotated(width: int, height: int, orientation: int = 6) -> tuple[bytes, Image.Image]:
    """(JPEG stored ``width`` x ``height`` with an EXIF orientation tag, the upright image as decoded)."""
    image = noise(width, height, seed=7)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(image, "JPEG", exif=exif.tobytes(), quality=95)
    from PIL import ImageOps

    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    return data, upright.convert("RGB")


def cmyk_jpeg(width: int, height: int) -> bytes:
    return encode(noise(width, height, seed=9, mode="CMYK"), "JPEG")


# -- images that cost far more to decode than their size suggests ----------------------------------


def progressive_jpeg(width: int, height: int, extra_scans: int = 0, seed: int | None = None) -> bytes:
    """A progressive JPEG of a flat image (of noise with ``seed``), its last scan (an AC refinement of
    a few bytes when flat) repeated ``extra_scans`` more times: each copy is one more pass over every
    block of the image, ~0.6 ns a pixel, for its few bytes (libjpeg only warns)."""
    image = noise(width, height, seed) if seed is not None else Image.new("RGB", (width, height), (120, 90, 60))
    data = encode(image, "JPEG", progressive=True, quality=90)
    last, end = data.rindex(b"\xff\xda"), data.rindex(b"\xff\xd9")
    return data[:end] + data[last:end] * extra_scans + data[end:]


def jpeg_with_segments(count: int) -> bytes:
    """A small JPEG with ``count`` empty comment segments before its frame: Pillow parses each in Python."""
    data = encode(noise(32, 32, seed=3), "JPEG")
    return data[:2] + b"\xff\xfe\x00\x02" * count + data[2:]


def jpeg_with_junk(count: int) -> bytes:
    """A small JPEG with ``count`` junk bytes after its first segment: Pillow skips them one at a time."""
    data = encode(noise(32, 32, seed=4), "JPEG")
    after_app0 = 4 + struct.unpack_from(">H", data, 4)[0]
    return data[:after_app0] + b"\x00" * count + data[after_app0:]


def png_with_chunks(count: int, width: int = 32, height: int = 32) -> bytes:
    """A PNG with ``count`` empty private chunks after its header: Pillow reads each in Python."""
    data = encode(noise(width, height, seed=5), "PNG")
    return data[:33] + _png_chunk(b"prVt", b"") * count + data[33:]


def gif_with_subblocks(count: int, stray: int = 0) -> bytes:
    """A GIF with a comment of ``count`` one-byte sub-blocks (and ``stray`` stray bytes) before its
    frame: Pillow reads each in Python."""
    data = encode(noise(32, 32, seed=6).convert("P"), "GIF")
    start = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    return data[:start] + b"\x00" * stray + b"\x21\xfe" + b"\x01c" * count + b"\x00" + data[start:]


def bmp_rle8(width: int, height: int) -> bytes:
    """An 8-bit RLE-compressed BMP of horizontal stripes (Pillow decodes RLE in Python)."""
    rows = b"".join(b"".join(bytes([min(255, width - x), y % 256]) for x in range(0, width, 255)) + b"\x00\x00"
                    for y in range(height))
    body = rows + b"\x00\x01"
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(body), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(body), 0, 0, offset) + info + palette + body


# -- junk in Redis ---------------------------------------------------------------------------------


def junk(r, key: str, kind: str) -> None:  # noqa: ANN001 - a redis.Redis
    """Replace ``key`` with junk of ``kind``: another type (hash, list, zset), bytes that are not
    UTF-8, or a megabyte of text."""
    r.delete(key)
    if kind == "hash":
        r.hset(key, "junk", "1")
    elif kind == "list":
        r.rpush(key, "junk")
    elif kind == "zset":
        r.zadd(key, {"junk": 1})
    elif kind == "not utf-8":
        r.set(key, b"\xff\xfe\x00\x80")
    elif kind == "a megabyte":
        r.set(key, b"f" * 1_000_000)
    else:
        raise ValueError(kind)


# -- HTTP checks -----------------------------------------------------------------------------------


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    """The design's error contract: JSON ``{"error": {"code", "message"}}``, Retry-After on 503."""
    assert response.status_code == status, f"{response.status_code} {response.text[:500]}"
    body = response.json()
    assert isinstance(body.get("error"), dict), body
    assert isinstance(body["error"].get("code"), str) and isinstance(body["error"].get("message"), str), body
    if code is not None:
        assert body["error"]["code"] == code, body
    if status == 503:
        assert int(response.headers["retry-after"]) >= 1
    return body["error"]


def check_contract(response: httpx.Response) -> None:
    """No 500; a 5xx is only a 503 with Retry-After; every 4xx/5xx is the JSON error body."""
    status = response.status_code
    assert status < 500 or status == 503, f"{status} {response.text[:500]}"
    if status >= 400:
        assert_error(response, status)


def upload(client: httpx.Client, data: bytes, content_type: str = "image/png", **headers: str) -> httpx.Response:
    return client.post("/v1/images", content=data, headers={"Content-Type": content_type, **headers})


# -- processes -------------------------------------------------------------------------------------



class ServeProcess:
    """``python -m service.cli serve ROLE ...`` as a child process on a free loopback port."""

    def __init__(self, role: str, model: Path, log: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log_path = log
        self._log = log.open("w")
        cmd = [sys.executable, "-m", "service.cli", "serve", role, "--model", str(model), "--host", "127.0.0.1",
               "--port", str(self.port), "--device", "cpu", "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        wait_until_ready(self.url, self.proc, timeout_s, self.log, poll_s=0.1)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-4000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()

