"""One live `serve all` server (tiny checkpoint, real Redis, API key "sekret") for the client tests."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import redis

from service.app import create_app
from service.config import Settings
from service.llm.engine import LLMEngine
from service.vision.encoder import VisionEncoder


@pytest.fixture(scope="package")
def server(tiny_checkpoint: Path, redis_server, live_server):
    encoder = VisionEncoder(tiny_checkpoint, device="cpu")
    engine = LLMEngine(tiny_checkpoint, device="cpu", max_batch_slots=4, prefix_cache_entries=4)
    settings = Settings(model=str(tiny_checkpoint), redis_url=redis_server.url, device="cpu", max_new_tokens=32,
                        api_keys=["sekret"])
    app = create_app(settings, "all", workers={"vision_encoder": encoder, "llm_engine": engine})
    with live_server(app) as live:
        yield live
    engine.close()


@pytest.fixture
def raw_answer(server):
    """``raw_answer(image_id, question, max_tokens)``: the body ``/v1/questions`` answers, without the client."""

    def ask(image_id: str, question: str, max_tokens: int) -> dict:
        r = httpx.post(server.url + "/v1/questions", headers={"Authorization": "Bearer sekret"}, timeout=60,
                       json={"image_id": image_id, "question": question, "max_tokens": max_tokens})
        return r.json()

    return ask


@pytest.fixture
def evict(redis_server):
    """``evict()``: empty Redis, as if the service had evicted every image."""
    client = redis.Redis.from_url(redis_server.url, socket_timeout=10)
    yield client.flushall
    client.close()
