"""Hostile and unusual images through real HTTP: each gets the right status, never a 500 or a hang."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator

import httpx
import pytest
import torch
from safetensors.torch import load as load_safetensors

from service.vision.encoder import VisionEncoder

from . import (
    animated_gif,
    assert_error,
    bomb_gif,
    bomb_jpeg,
    bomb_png,
    cmyk_jpeg,
    encode,
    exif_rotated,
    noise,
    png,
    png16_gray,
    png16_rgb,
    upload,
)

MAX_BYTES = 300_000

# Pillow warns about the 100 MP bombs before our own limit refuses them: expected here
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


@pytest.fixture
def client(make_app, redis_url, live_server) -> Iterator[httpx.Client]:
    app = make_app("vision", redis_url=redis_url, max_upload_bytes=MAX_BYTES)
    with live_server(app) as live, httpx.Client(base_url=live.url, timeout=30) as client:
        yield client


def embeddings(client: httpx.Client, image_id: str) -> torch.Tensor:
    r = client.get(f"/v1/images/{image_id}/embeddings")
    assert r.status_code == 200, r.text
    return load_safetensors(r.content)["image_embeds"]


BAD = {
    "zero bytes": (b"", "image/png", 400, "empty_image"),
    "truncated png": (png(200, 150, 1)[:300], "image/png", 400, "invalid_image"),
    "truncated jpeg": (encode(noise(200, 150, 2), "JPEG")[:500], "image/jpeg", 400, "invalid_image"),
    "png header only": (png(64, 64, 3)[:33], "image/png", 415, "unsupported_image"),  # Pillow: unidentified
    "text as image/png": (b"hello, I am not an image" * 4, "image/png", 415, "unsupported_image"),
    "html as image/jpeg": (b"<html><body>x</body></html>", "image/jpeg", 415, "unsupported_image"),
    "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "image/svg+xml", 415,
            "unsupported_image"),
    "tiff (decoder not allowed)": (encode(noise(32, 32, 4), "TIFF"), "image/tiff", 415, "unsupported_image"),
    "png as application/json": (png(32, 32, 5), "application/json", 415, "unsupported_media_type"),
    "png as text/plain": (png(32, 32, 5), "text/plain", 415, "unsupported_media_type"),
    "png as form-urlencoded": (png(32, 32, 5), "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    "100 MP png bomb": (bomb_png(10_000, 10_000), "image/png", 413, "image_too_large"),
    "1 GP png bomb": (bomb_png(40_000, 25_000), "image/png", 413, "image_too_large"),
    "100 MP gif bomb": (bomb_gif(10_000, 10_000), "image/gif", 413, "image_too_large"),
    "4 GP jpeg bomb": (bomb_jpeg(65_000, 65_000), "image/jpeg", 413, "image_too_large"),
    "aspect 201:1": (png(2010, 10, 6), "image/png", 422, "invalid_image_shape"),
    "aspect 1:300": (png(3, 900, 7), "image/png", 422, "invalid_image_shape"),
    "zero-height png header": (bomb_png(10, 0), "image/png", 415, "unsupported_image"),
    "over the byte limit": (b"\x89PNG" + b"\x00" * MAX_BYTES, "image/png", 413, "image_too_large"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_images_get_their_4xx(client, case):
    data, content_type, status, code = BAD[case]
    assert_error(upload(client, data, content_type), status, code)


def test_bad_images_as_multipart_too(client):
    for case in ("zero bytes", "truncated png", "100 MP png bomb", "aspect 201:1", "text as image/png"):
        data, _, status, code = BAD[case]
        r = client.post("/v1/images", files={"file": ("x.png", data, "image/png")})
        assert_error(r, status, code)
    r = client.post("/v1/images", files={"file": ("x.png", b"\x89PNG" + b"\x00" * MAX_BYTES, "image/png")})
    assert_error(r, 413, "image_too_large")
    assert_error(client.post("/v1/images", data={"file": "not a file"}, files={"other": ("a", b"x")}), 422,
                 "missing_file")
    for body, content_type in [(b"--xx\r\n\r\n", "multipart/form-data; boundary=xx"),
                               (b"garbage", "multipart/form-data"),
                               (b"--xx\r\nContent-Disposition: form-data; name=file; filename=a\r\n\r\nabc",
                                "multipart/form-data; boundary=xx")]:
        r = client.post("/v1/images", content=body, headers={"Content-Type": content_type})
        assert 400 <= r.status_code < 500, r.text
        assert_error(r, r.status_code)


def test_streamed_body_over_the_limit_is_cut_off(client):
    """No Content-Length (chunked): the limit is enforced while reading, not after."""

    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"\x00" * 16_384

    assert_error(client.post("/v1/images", content=chunks(), headers={"Content-Type": "image/png"}), 413,
                 "image_too_large")


def test_declared_length_over_the_limit_is_refused_before_reading(client):
    """A client that announces a huge body gets 413 at once, without the server waiting for the bytes."""
    host, port = client.base_url.host, client.base_url.port
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(f"POST /v1/images HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
                  f"Content-Length: {MAX_BYTES * 1000}\r\n\r\n".encode() + b"\x89PNG")
        head = s.recv(65536).decode("latin-1")
    assert head.startswith("HTTP/1.1 413"), head
    assert '"image_too_large"' in head or "image_too_large" in s.recv(65536).decode("latin-1")


def test_good_unusual_images_are_encoded(client, encoder: VisionEncoder):
    gif, gif_first = animated_gif(90, 70)
    rotated, upright = exif_rotated(120, 60)
    cases = {
        "animated gif": (gif, "image/gif", gif_first),
        "16-bit rgb png": (png16_rgb(64, 48, 1), "image/png", None),
        "16-bit gray png": (png16_gray(64, 48, 2), "image/png", None),
        "cmyk jpeg": (cmyk_jpeg(80, 60), "image/jpeg", None),
        "exif rotated jpeg": (rotated, "image/jpeg", upright),
        "rgba png": (encode(noise(50, 40, 3, "RGBA")), "image/png", None),
        "gray png": (encode(noise(50, 40, 4, "L")), "image/png", None),
        "palette png with transparency": (encode(noise(40, 40, 5).convert("P"), transparency=0), "image/png", None),
        "webp": (encode(noise(60, 60, 6), "WEBP"), "image/webp", None),
        "bmp": (encode(noise(60, 60, 7), "BMP"), "image/bmp", None),
        "1x1 png": (png(1, 1, 8), "image/png", None),
        "aspect exactly 200:1": (png(2000, 10, 9), "image/png", None),
        "octet-stream body": (png(30, 30, 10), "application/octet-stream", None),
        "mislabelled type (jpeg sent as image/png)": (encode(noise(30, 30, 11), "JPEG"), "image/png", None),
    }
    for name, (data, content_type, expected_image) in cases.items():
        r = upload(client, data, content_type)
        assert r.status_code == 200, f"{name}: {r.text}"
        meta = r.json()
        assert meta["image_id"] == hashlib.sha256(data).hexdigest(), name
        if expected_image is not None:
            # what was encoded is the first frame / the upright image, exactly
            expected = encoder.forward([encoder.preprocess(encode(expected_image))])[0][0]  # features [K, n, D]: row 0
            torch.testing.assert_close(embeddings(client, meta["image_id"]), expected, msg=name)
    # EXIF orientation 6 turns the stored 120x60 into an upright 60x120: the grid is taller than wide
    t, h, w = upload(client, rotated, "image/jpeg").json()["grid_thw"]
    assert h > w
