"""Every limit is a setting, and each is answered with the design's 4xx or a 503 with Retry-After."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from service.llm.engine import LLMEngine

from . import assert_error, eventually, png, upload


def test_upload_bytes_limit_is_exact(make_app, redis_url, live_server):
    data = png(40, 40, seed=1)
    for limit, status in ((len(data), 200), (len(data) - 1, 413)):
        with live_server(make_app("vision", redis_url=redis_url, max_upload_bytes=limit)) as live, \
                httpx.Client(base_url=live.url, timeout=30) as client:
            r = upload(client, data)
            if status == 200:
                assert r.status_code == 200, r.text
            else:
                assert_error(r, 413, "image_too_large")
                assert_error(client.post("/v1/images", files={"file": ("a.png", data, "image/png")}), 413,
                             "image_too_large")


def test_pixel_limit(make_app, redis_url, live_server):
    with live_server(make_app("vision", redis_url=redis_url, max_image_pixels=10_000)) as live, \
            httpx.Client(base_url=live.url, timeout=30) as client:
        assert upload(client, png(100, 100, seed=2)).status_code == 200
        assert_error(upload(client, png(101, 100, seed=3)), 413, "image_too_large")
        assert_error(upload(client, png(10, 1001, seed=4)), 413, "image_too_large")


def test_question_token_and_max_tokens_limits(make_app, redis_url, live_server, engine: LLMEngine):
    limit = 40
    app = make_app("all", redis_url=redis_url, max_question_tokens=limit, max_new_tokens=8)
    with live_server(app) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        image_id = upload(client, png(64, 64, seed=5)).json()["image_id"]

        def ask(question: str, **kw: Any) -> httpx.Response:
            return client.post("/v1/questions", json={"image_id": image_id, "question": question, **kw})

        # grow a question to exactly the limit (the count includes the user turn's end and the assistant turn)
        words = ["what"]
        while len(engine.prompts.question_ids(" ".join(words + ["what"]))) <= limit:
            words.append("what")
        at_limit = " ".join(words)
        assert len(engine.prompts.question_ids(at_limit)) <= limit
        assert ask(at_limit, max_tokens=2).status_code == 200
        over = at_limit + " what what"
        assert len(engine.prompts.question_ids(over)) > limit
        assert_error(ask(over, max_tokens=2), 422, "question_too_long")

        assert ask("hi", max_tokens=8).status_code == 200
        err = assert_error(ask("hi", max_tokens=9), 422, "invalid_request")
        assert "8" in err["message"]
        # no max_tokens: the default fits under the server's limit instead of failing
        r = ask("hi")
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] <= 8


def test_context_length_limit(make_app, redis_url, live_server, tiny_checkpoint):
    small = LLMEngine(tiny_checkpoint, device="cpu", max_batch_slots=1, max_seq_len=128)
    try:
        app = make_app("all", redis_url=redis_url, llm_engine=small, max_new_tokens=512)
        with live_server(app) as live, httpx.Client(base_url=live.url, timeout=60) as client:
            image_id = upload(client, png(64, 64, seed=6)).json()["image_id"]
            r = client.post("/v1/questions", json={"image_id": image_id, "question": "hi", "max_tokens": 100})
            assert_error(r, 422, "context_length_exceeded")
            r = client.post("/v1/questions", json={"image_id": image_id, "question": "hi", "max_tokens": 4})
            assert r.status_code == 200, r.text
    finally:
        small.close()


def slow(fn: Callable[..., Any], delay_s: float) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        time.sleep(delay_s)
        return fn(*args, **kwargs)

    return wrapper


def test_vision_request_timeout_is_503(make_app, redis_url, live_server):
    app = make_app("vision", redis_url=redis_url, request_timeout_s=0.5)
    with live_server(app) as live, httpx.Client(base_url=live.url, timeout=30) as client:
        batcher = app.state.vision.batcher
        real = batcher._run_batch
        batcher._run_batch = slow(real, 2.0)
        data = png(50, 50, seed=7)
        start = time.monotonic()
        assert_error(upload(client, data), 503, "timeout")
        assert time.monotonic() - start < 1.5  # answered at the timeout, not when the batch ended
        batcher._run_batch = real
        time.sleep(2.0)  # the abandoned batch finishes on the device thread
        r = upload(client, data)
        assert r.status_code == 200 and r.json()["cached"] is False, r.text


def test_llm_request_timeout_is_503(make_app, redis_url, live_server):
    app = make_app("all", redis_url=redis_url, own_engine=True, request_timeout_s=0.5, max_new_tokens=64)
    with live_server(app) as live, httpx.Client(base_url=live.url, timeout=30) as client:
        engine: LLMEngine = app.state.llm.engine
        image_id = upload(client, png(50, 50, seed=8)).json()["image_id"]
        engine._decode = slow(engine._decode, 0.1)  # type: ignore[method-assign]
        req = {"image_id": image_id, "question": "describe it", "max_tokens": 40}
        start = time.monotonic()
        assert_error(client.post("/v1/questions", json=req), 503, "timeout")
        assert time.monotonic() - start < 2.0
        # streamed: the status is already 200, the timeout arrives as an error event
        with client.stream("POST", "/v1/questions", json={**req, "stream": True}) as s:
            assert s.status_code == 200
            text = "".join(s.iter_text())
        assert "event: error" in text and '"timeout"' in text, text[-500:]
        # the abandoned generations give their slots back
        deadline = time.monotonic() + 10
        while engine.stats()["active"] or engine.stats()["waiting"]:
            assert time.monotonic() < deadline, engine.stats()
            time.sleep(0.05)
        del engine._decode  # back to the class's method
        assert client.post("/v1/questions", json={**req, "max_tokens": 4}).status_code == 200


async def test_full_vision_queue_is_503_with_retry_after(make_app, redis_url, live_server):
    max_queue = 2
    app = make_app("vision", redis_url=redis_url, max_queue=max_queue, max_batch_patches=64)
    release = threading.Event()
    with live_server(app) as live:
        batcher = app.state.vision.batcher
        real = batcher._run_batch

        entered: list[int] = []

        def blocked(batch: list[Any]) -> list[Any]:
            entered.append(len(batch))
            release.wait(timeout=30)
            return real(batch)

        batcher._run_batch = blocked
        images = [png(56, 56, seed=100 + i) for i in range(8)]  # 16 patches each: 4 per batch at most
        try:
            async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
                tasks = [asyncio.create_task(client.post("/v1/images", content=d, headers={
                    "Content-Type": "image/png"})) for d in images]
                # every upload is answered (503), inside the blocked batch, or waiting in the queue
                await eventually(lambda: sum(t.done() for t in tasks) + sum(entered) + batcher.depth >= len(images),
                                 "every upload answered, in the blocked batch or queued", 20)
                release.set()
                responses = await asyncio.gather(*tasks)
        finally:
            release.set()
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) <= {200, 503} and statuses[503] >= 1 and statuses[200] >= 1 + max_queue, statuses
    for r in responses:
        if r.status_code == 503:
            assert_error(r, 503, "overloaded")


async def test_full_llm_queue_is_503_with_retry_after(make_app, redis_url, live_server):
    app = make_app("all", redis_url=redis_url, own_engine=True, max_queue=1, max_batch_size=1, max_new_tokens=8)
    release = threading.Event()
    with live_server(app) as live:
        engine: LLMEngine = app.state.llm.engine
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
            r = await client.post("/v1/images", content=png(50, 50, seed=9), headers={"Content-Type": "image/png"})
            image_id = r.json()["image_id"]
            real = engine._decode
            decoding = threading.Event()

            def blocked() -> None:
                decoding.set()
                release.wait(timeout=30)
                real()

            engine._decode = blocked  # type: ignore[method-assign]

            def ask(i: int) -> asyncio.Task[httpx.Response]:
                return asyncio.create_task(client.post("/v1/questions", json={
                    "image_id": image_id, "question": f"question {i}", "max_tokens": 3}))

            try:
                # the first is admitted and decoding (blocked) before the others arrive, so the count
                # below does not depend on how fast the engine takes it off the queue
                tasks = [ask(0)]
                await eventually(decoding.is_set, "the first question decoding", 20)
                tasks += [ask(i) for i in range(1, 5)]
                # of the other four, one waits in the queue and three are turned away at once
                await eventually(lambda: sum(t.done() for t in tasks) >= 3, "three questions turned away", 20)
                release.set()
                responses = await asyncio.gather(*tasks)
            finally:
                release.set()
                del engine._decode
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {200: 2, 503: 3}, statuses
    for r in responses:
        if r.status_code == 503:
            assert_error(r, 503, "overloaded")


@pytest.mark.parametrize("field,value", [("max_upload_bytes", 0), ("max_image_pixels", -1), ("max_queue", 0),
                                         ("request_timeout_s", 0), ("max_new_tokens", 0),
                                         ("max_question_tokens", 0)])
def test_limits_must_be_positive(tiny_checkpoint, field, value):
    from pydantic import ValidationError

    from service.config import Settings

    with pytest.raises(ValidationError):
        Settings(model=str(tiny_checkpoint), **{field: value})
