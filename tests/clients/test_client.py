"""SplitVL and AsyncSplitVL against a live `serve all` server: every endpoint, and re-upload on eviction."""

from __future__ import annotations

import socket

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from clients import Answer, AsyncSplitVL, ImageInfo, SplitVL, SplitVLError
from clients.core import ImageCache


def pil(seed: int, size: tuple[int, int] = (72, 60)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def client(server):
    with SplitVL(server.url, api_key="sekret", timeout=60) as c:
        yield c


def test_images(client, tmp_path, image_bytes):
    path = tmp_path / "a.png"
    path.write_bytes(image_bytes(72, 60, 1))
    info = client.upload(path)
    assert isinstance(info, ImageInfo) and len(info.image_id) == 64 and info.cached is False
    assert client.upload(path.read_bytes()).cached is True
    assert client.upload(str(path)).image_id == info.image_id
    assert client.upload(pil(2)).image_id != info.image_id
    got = client.get(info.image_id)
    assert got.grid_thw == info.grid_thw and got.num_tokens == info.num_tokens and got.cached is None

    by_id = client.embeddings(info.image_id)
    assert by_id.info == got
    embeds = by_id.image_embeds
    assert embeds.shape == (info.num_tokens, info.hidden_size) and str(embeds.dtype) == "torch." + info.dtype
    assert by_id.image_grid_thw.tolist() == [list(info.grid_thw)]
    in_one_trip = client.embeddings(path)  # uploads and receives the embeddings in one response
    assert in_one_trip.info.cached is True and torch.equal(in_one_trip.image_embeds, embeds)

    client.delete(info.image_id)
    with pytest.raises(SplitVLError) as err:
        client.get(info.image_id)
    assert err.value.status == 404 and err.value.code == "image_not_found" and err.value.request_id
    with pytest.raises(SplitVLError) as err:
        client.delete(info.image_id)
    assert err.value.status == 404
    assert client.healthz() == {"status": "ok"}
    assert client.readyz()["ready"] is True


def test_ask_and_chat(client, raw_answer, image_bytes):
    data = image_bytes(72, 60, 3)
    info = client.upload(data)
    expected = raw_answer(info.image_id, "What is it?", 8)
    answer = client.ask(info, "What is it?", max_tokens=8)
    assert isinstance(answer, Answer) and answer.answer == expected["answer"] == str(answer)
    assert answer.finish_reason == expected["finish_reason"]
    assert answer.usage.completion_tokens == expected["usage"]["completion_tokens"]

    stream = client.ask(info.image_id, "What is it?", max_tokens=8, stream=True)
    assert "".join(stream) == expected["answer"] and stream.answer == answer

    assert client.chat(data, "What is it?", max_tokens=8) == answer
    chat_stream = client.chat(data, "What is it?", max_tokens=8, stream=True)
    assert "".join(chat_stream) == expected["answer"]
    assert chat_stream.answer.finish_reason == answer.finish_reason

    with pytest.raises(SplitVLError) as err:
        client.ask(info, "What is it?", max_tokens=1000)
    assert err.value.status == 422


def test_reuploads_evicted_images(client, server, evict, tmp_path, image_bytes):
    path = tmp_path / "b.png"
    path.write_bytes(image_bytes(72, 60, 4))
    first = client.ask(path, "Describe it.", max_tokens=6)  # never uploaded: 404, upload, retry
    evict()  # evicted
    assert client.ask(first.image_id, "Describe it.", max_tokens=6) == first
    evict()
    assert "".join(client.ask(first.image_id, "Describe it.", max_tokens=6, stream=True)) == first.answer
    evict()
    assert client.embeddings(first.image_id).info.image_id == first.image_id
    evict()
    assert client.chat(first.image_id, "Describe it.", max_tokens=6) == first  # sent as a data URL

    evict()
    with SplitVL(server.url, api_key="sekret") as stranger:  # never saw the bytes: the 404 stands
        with pytest.raises(SplitVLError) as err:
            stranger.ask(first.image_id, "Describe it.", max_tokens=6)
        assert err.value.code == "image_not_found"


def test_errors(server, monkeypatch):
    with SplitVL(server.url) as anonymous, pytest.raises(SplitVLError) as err:
        anonymous.get("0" * 64)
    assert err.value.status == 401 and err.value.code == "unauthorized"
    monkeypatch.setenv("SPLITVL_URL", server.url)
    monkeypatch.setenv("SPLITVL_API_KEY", "sekret")
    with SplitVL() as from_env:
        assert from_env.readyz()["ready"]
        with pytest.raises(FileNotFoundError):
            from_env.upload("/no/such/image.png")
        with pytest.raises(FileNotFoundError):
            from_env.ask("not-an-id-nor-a-file", "hi")
        with pytest.raises(ValueError):
            from_env.upload("a" * 64)  # an id, not an image
    with SplitVL("http://127.0.0.1:9") as nowhere, pytest.raises(SplitVLError) as err:
        nowhere.healthz()
    assert err.value.status is None and err.value.code == "connection_error"


def test_timeout_applies_to_a_given_http_client():
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with SplitVL(url, timeout=0.3, http_client=httpx.Client(timeout=None)) as client, \
                pytest.raises(SplitVLError) as err:
            client.healthz()
    assert err.value.status is None and err.value.code == "timeout"


async def test_async_client(server, raw_answer, evict, image_bytes):
    data = image_bytes(72, 60, 5)
    async with AsyncSplitVL(server.url, api_key="sekret", timeout=60) as client:
        info = await client.upload(data)
        assert (await client.get(info.image_id)).image_id == info.image_id
        answer = await client.ask(info, "Why?", max_tokens=6)
        assert answer.answer == raw_answer(info.image_id, "Why?", 6)["answer"]
        deltas = [d async for d in await client.ask(info, "Why?", max_tokens=6, stream=True)]
        assert "".join(deltas) == answer.answer
        assert await client.chat(info, "Why?", max_tokens=6) == answer
        assert "".join([d async for d in await client.chat(info, "Why?", max_tokens=6, stream=True)]) == answer.answer
        emb = await client.embeddings(info.image_id)
        assert emb.image_embeds.shape == (info.num_tokens, info.hidden_size)
        evict()
        assert await client.ask(info.image_id, "Why?", max_tokens=6) == answer  # re-uploaded
        await client.delete(info.image_id)
        with pytest.raises(SplitVLError):
            await client.get(info.image_id)
        assert (await client.healthz())["status"] == "ok"


def test_image_cache_is_bounded():
    cache = ImageCache(max_items=2, max_bytes=10)
    cache.put("a", b"1234")
    cache.put("b", b"1234")
    assert cache.get("a") == b"1234"  # a is now the most recent
    cache.put("c", b"1234")  # over 2 items: b goes
    assert cache.get("b") is None and len(cache) == 2
    cache.put("d", b"123456")  # over 10 bytes: the oldest go
    assert cache.get("a") is None and cache.get("d") == b"123456"
    cache.put("huge", b"x" * 11)
    assert cache.get("huge") is None
