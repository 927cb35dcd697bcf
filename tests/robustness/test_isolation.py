"""One request never affects another's answer: abandoned work is dropped, a request's failure is its
own, and what one request left in a cache slot is invisible to the next user of the slot."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from service.llm.engine import LLMEngine

from . import png

ASK_LONG = 400  # tokens a dropped question asks for


def slow_steps(engine: LLMEngine, seconds: float) -> None:
    """Each decode step takes ``seconds`` longer (undone with ``del engine._decode``)."""
    real = engine._decode

    def slowed() -> None:
        time.sleep(seconds)
        real()

    engine._decode = slowed  # type: ignore[method-assign]


def question_body(route: str, image_id: str, text: str, max_tokens: int) -> dict[str, Any]:
    if route == "/v1/questions":
        return {"image_id": image_id, "question": text, "max_tokens": max_tokens}
    return {"max_tokens": max_tokens, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"splitvl://images/{image_id}"}}, {"type": "text", "text": text}]}]}


@pytest.mark.parametrize("route", ["/v1/questions", "/v1/chat/completions"])
async def test_a_dropped_question_stops_decoding(route, make_app, redis_url, live_server):
    """Clients that drop the connection of a non-streamed question: their answers stop at once (100
    dropped 1024-token questions delayed the next 8-token one by 16 s)."""
    app = make_app("all", redis_url=redis_url, own_engine=True, max_batch_size=2, max_new_tokens=ASK_LONG)
    with live_server(app) as live:
        engine: LLMEngine = app.state.llm.engine
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
            r = await client.post("/v1/images", content=png(56, 56, seed=1), headers={"Content-Type": "image/png"})
            image_id = r.json()["image_id"]
            slow_steps(engine, 0.02)  # an answer of ASK_LONG tokens: 8 s
            before = engine.stats()["generated_tokens"]

            async def drop(i: int) -> None:
                async with httpx.AsyncClient(base_url=live.url, timeout=0.4) as impatient:
                    with pytest.raises(httpx.ReadTimeout):
                        await impatient.post(route, json=question_body(route, image_id, f"question {i}", ASK_LONG))

            await asyncio.gather(*[drop(i) for i in range(6)])  # two decode, four wait, all leave
            deadline = time.monotonic() + 3
            while engine.stats()["active"] or engine.stats()["waiting"]:
                assert time.monotonic() < deadline, engine.stats()
                await asyncio.sleep(0.02)
            assert engine.stats()["generated_tokens"] - before < ASK_LONG  # not 6 x 400
            started = time.monotonic()
            r = await client.post(route, json=question_body(route, image_id, "and now?", 4))
            assert r.status_code == 200, r.text
            assert time.monotonic() - started < 2.0
            del engine._decode
