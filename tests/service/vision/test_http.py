"""The vision worker's HTTP contract, end to end: real uvicorn on loopback, real Redis."""

from __future__ import annotations

import asyncio
import hashlib
import struct
import zlib
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load as load_safetensors

from service.app import create_app
from service.config import Settings
from service.vision.encoder import VisionEncoder


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring a huge 1-bit image whose data compresses to almost nothing."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\x00" * ((width + 7) // 8) for _ in range(64))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint: Path) -> VisionEncoder:
    return VisionEncoder(tiny_checkpoint, device="cpu")


@pytest.fixture
def server(tiny_checkpoint, redis_url, encoder, live_server):
    settings = Settings(model=str(tiny_checkpoint), redis_url=redis_url, device="cpu",
                        max_upload_bytes=200_000, max_image_pixels=4_000_000, max_batch_wait_ms=20)
    with live_server(create_app(settings, "vision", workers={"vision_encoder": encoder})) as live:
        yield live


def test_upload_get_embeddings_delete(server, encoder, image_bytes):
    data = image_bytes(150, 100, seed=1)
    image_id = hashlib.sha256(data).hexdigest()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.post("/v1/images", files={"file": ("a.png", data, "image/png")})
        assert r.status_code == 200, r.text
        meta = r.json()
        assert meta["image_id"] == image_id and meta["cached"] is False
        assert meta["fingerprint"] == encoder.fingerprint and meta["dtype"] == "float32"
        t, h, w = meta["grid_thw"]
        assert meta["num_tokens"] == t * h * w // 4 and meta["hidden_size"] == 64

        again = client.post("/v1/images", content=data, headers={"Content-Type": "image/png"})
        assert again.status_code == 200 and again.json()["cached"] is True

        got = client.get(f"/v1/images/{image_id}")
        assert got.status_code == 200 and got.json()["grid_thw"] == meta["grid_thw"]

        emb = client.get(f"/v1/images/{image_id}/embeddings")
        assert emb.headers["content-type"] == "application/octet-stream"
        tensors = load_safetensors(emb.content)
        (expected,) = encoder.forward([encoder.preprocess(data)])  # [1, n, D]: Qwen2-VL stores embeds only
        torch.testing.assert_close(tensors["image_embeds"], expected[0])
        assert "deepstack_image_embeds" not in tensors
        assert tensors["image_grid_thw"].tolist() == [meta["grid_thw"]]

        assert client.delete(f"/v1/images/{image_id}").status_code == 204
        missing = client.get(f"/v1/images/{image_id}")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "image_not_found"
        assert client.delete(f"/v1/images/{image_id}").status_code == 404


def server_timing(response: httpx.Response) -> dict[str, float]:
    phases = {}
    for part in response.headers["server-timing"].split(","):
        name, _, dur = part.strip().partition(";dur=")
        phases[name] = float(dur)
    return phases


def test_uploads_tell_their_phase_times(server, image_bytes):
    data = image_bytes(120, 90, seed=21)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        first = server_timing(client.post("/v1/images", content=data, headers={"Content-Type": "image/png"}))
        again = server_timing(client.post("/v1/images", content=data, headers={"Content-Type": "image/png"}))
    assert list(first) == ["read", "hash", "lookup", "lock", "preprocess", "encode", "store"]
    assert all(ms >= 0 for ms in first.values())
    assert first["encode"] >= 20 * 0.9  # one image waits out the 20 ms batch window
    assert list(again) == ["read", "hash", "lookup"]  # cached: nothing computed


def test_one_round_trip_to_embeddings(server, image_bytes):
    data = image_bytes(90, 90, seed=2, fmt="JPEG")
    with httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.post("/v1/images", content=data,
                        headers={"Content-Type": "image/jpeg", "Accept": "application/octet-stream"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert r.headers["x-splitvl-image-id"] == hashlib.sha256(data).hexdigest()
    tensors = load_safetensors(r.content)
    assert tensors["image_embeds"].shape[0] == int(r.headers["x-splitvl-num-tokens"])


@pytest.mark.parametrize(
    "body,content_type,status,code",
    [
        (b"", "image/png", 400, "empty_image"),
        (b"this is not an image at all", "image/png", 415, "unsupported_image"),
        (None, "image/png", 400, "invalid_image"),  # truncated PNG
        (b"x" * 200_001, "image/png", 413, "image_too_large"),
        (bomb_png(30_000, 30_000), "image/png", 413, "image_too_large"),
        (b"{}", "application/json", 415, "unsupported_media_type"),
    ],
)
def test_bad_uploads_get_clear_4xx(server, body, content_type, status, code, image_bytes):
    if body is None:
        body = image_bytes(200, 200, seed=3)[:400]
    with httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.post("/v1/images", content=body, headers={"Content-Type": content_type})
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]


def test_unknown_and_malformed_ids(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get("/v1/images/" + "0" * 64).json()["error"]["code"] == "image_not_found"
        r = client.get("/v1/images/not-a-hash")
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_image_id"
        r = client.post("/v1/images", files={"other": ("a.png", b"x", "image/png")})
        assert r.status_code == 422 and r.json()["error"]["code"] == "missing_file"


def test_ops_endpoints(server, image_bytes):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        client.post("/v1/images", content=image_bytes(60, 60, seed=4), headers={"Content-Type": "image/png"})
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        metrics = client.get("/metrics").text
        assert 'splitvl_requests_total{method="POST",route="/v1/images",status="200"}' in metrics
        assert "splitvl_batch_size_bucket" in metrics


async def test_concurrent_uploads_are_batched_and_computed_once(server, encoder, monkeypatch, image_bytes):
    calls: list[int] = []
    real = encoder.launch

    def counting(batch):
        calls.append(len(batch))
        return real(batch)

    monkeypatch.setattr(encoder, "launch", counting)
    # the worker captured the bound method at start: patch the batch queue's reference too
    server.server.config.app.state.vision.batcher._run_batch = counting
    distinct = [image_bytes(70 + 7 * i, 80, seed=10 + i) for i in range(6)]
    same = image_bytes(100, 100, seed=99)
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        posts = [client.post("/v1/images", content=d, headers={"Content-Type": "image/png"}) for d in distinct]
        posts += [client.post("/v1/images", content=same, headers={"Content-Type": "image/png"}) for _ in range(5)]
        responses = await asyncio.gather(*posts)
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert sum(calls) == 7, calls  # 6 distinct + the repeated one once
    assert max(calls) > 1, calls  # concurrent requests shared a forward
    assert sum(1 for r in responses[6:] if not r.json()["cached"]) == 1
