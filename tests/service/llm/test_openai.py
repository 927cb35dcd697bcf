"""/v1/chat/completions through the official openai client: the same greedy answers as /v1/questions."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import openai
import pytest
import redis

from service.app import create_app
from service.config import Settings


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def user(image: dict, text: str) -> list[dict]:
    return [{"role": "user", "content": [image, {"type": "text", "text": text}]}]


def image_url(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def settings(checkpoint: Path, redis_url: str, **kw) -> Settings:
    return Settings(model=str(checkpoint), redis_url=redis_url, device="cpu", max_new_tokens=32,
                    max_upload_bytes=200_000, **kw)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, redis_server, parts, live_server):
    """``serve all``: the LLM worker encodes missing images with its own process's vision worker."""
    encoder, engine = parts
    app = create_app(settings(tiny_checkpoint, redis_server.url), "all",
                     workers={"vision_encoder": encoder, "llm_engine": engine})
    with live_server(app) as live:
        yield live


@pytest.fixture(scope="module")
def oai(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60) as client:
        yield client


def questions_answer(base: str, image_id: str, question: str, max_tokens: int = 10) -> dict:
    r = httpx.post(base + "/v1/questions", json={"image_id": image_id, "question": question,
                                                 "max_tokens": max_tokens}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_greedy_answers_equal_questions(server, oai, image_bytes):
    data = image_bytes(96, 80, seed=11)
    image_id = httpx.post(server.url + "/v1/images", content=data, headers={"Content-Type": "image/png"},
                          timeout=60).json()["image_id"]
    question = "What is in this picture?"
    expected = questions_answer(server.url, image_id, question)

    for image in (image_url(f"splitvl://images/{image_id}"), image_url(data_url(data)),
                  {"type": "image_id", "image_id": image_id}, {"type": "image_url", "image_url": data_url(data)}):
        out = oai.chat.completions.create(model="tiny-vl", messages=user(image, question), max_tokens=10,
                                          temperature=0)
        assert out.object == "chat.completion" and out.model == "tiny-vl"
        assert out.choices[0].message.role == "assistant"
        assert out.choices[0].message.content == expected["answer"]
        assert out.choices[0].finish_reason == expected["finish_reason"]
        assert out.usage.completion_tokens == expected["usage"]["completion_tokens"]
        assert out.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
        assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
        assert out.model_extra["image_id"] == image_id

    # text before the image, max_completion_tokens: the same prompt (the image always goes first)
    messages = [{"role": "user", "content": [{"type": "text", "text": question}, image_url(data_url(data))]}]
    out = oai.chat.completions.create(model="m", messages=messages, max_completion_tokens=10, temperature=0)
    assert out.choices[0].message.content == expected["answer"]

    chunks = list(oai.chat.completions.create(model="tiny-vl", messages=user(image_url(data_url(data)), question),
                                              max_tokens=10, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.model == "tiny-vl" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected["answer"]
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [expected["finish_reason"]]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == expected["usage"]["completion_tokens"]


def test_inline_image_is_encoded_when_missing(server, oai, image_bytes):
    data = image_bytes(70, 90, seed=12)
    out = oai.chat.completions.create(model="m", messages=user(image_url(data_url(data)), "Describe it."),
                                      max_tokens=8, temperature=0)
    image_id = out.model_extra["image_id"]
    assert httpx.get(f"{server.url}/v1/images/{image_id}").status_code == 200  # the vision worker stored it
    assert out.choices[0].message.content == questions_answer(server.url, image_id, "Describe it.", 8)["answer"]


def test_unsupported_requests_are_clear_4xx(server, oai, image_bytes):
    data = image_bytes(64, 64, seed=13)
    ref = image_url(data_url(data))

    def create(**kw):
        kw.setdefault("messages", user(ref, "hi"))
        kw.setdefault("max_tokens", 4)
        return oai.chat.completions.create(model="m", **kw)

    cases = [
        (dict(n=2), "unsupported_parameter"),
        (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "unsupported_parameter"),
        (dict(stop=["."]), "unsupported_parameter"),
        (dict(logprobs=True), "unsupported_parameter"),
        (dict(messages=[{"role": "system", "content": "be brief"}, *user(ref, "hi")]), "unsupported_message"),
        (dict(messages=[*user(ref, "hi"), {"role": "assistant", "content": "x"}]), "unsupported_message"),
        (dict(messages=[{"role": "user", "content": [ref, ref, {"type": "text", "text": "hi"}]}]),
         "unsupported_content"),
        (dict(messages=[{"role": "user", "content": "hi"}]), "missing_image"),
        (dict(messages=[{"role": "user", "content": [ref]}]), "missing_question"),
        (dict(messages=user(image_url("https://example.com/cat.png"), "hi")), "unsupported_image_url"),
        (dict(messages=user(image_url("data:image/png;base64,@@@@"), "hi")), "invalid_image_url"),
        (dict(messages=user(image_url("data:text/plain;base64,aGk="), "hi")), "unsupported_image_url"),
        (dict(messages=user(image_url("splitvl://images/abc"), "hi")), "invalid_image_id"),
    ]
    for kwargs, code in cases:
        with pytest.raises(openai.BadRequestError) as err:
            create(**kwargs)
        assert err.value.status_code == 400 and err.value.body["code"] == code, (kwargs, err.value.body)

    with pytest.raises(openai.NotFoundError) as err:
        create(messages=user(image_url("splitvl://images/" + "e" * 64), "hi"))
    assert err.value.body["code"] == "image_not_found"
    with pytest.raises(openai.UnprocessableEntityError):
        create(max_tokens=33)  # over the server's max_new_tokens
    with pytest.raises(openai.UnprocessableEntityError):
        create(temperature=3)

    # our error format, and the body limit (an image travels base64 inside the JSON)
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": user(ref, "hi"), "n": 3})
    assert r.status_code == 400 and set(r.json()) == {"error"} and set(r.json()["error"]) == {"code", "message"}
    big = image_url("data:image/png;base64," + "A" * 400_000)
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": user(big, "hi")})
    assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large"
    r = httpx.post(server.url + "/v1/chat/completions", content=b"x" * 2_000_000,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_llm_worker_asks_a_remote_vision_worker(tiny_checkpoint, redis_url, parts, live_server, image_bytes):
    encoder, engine = parts
    data = image_bytes(80, 64, seed=14)
    vision_app = create_app(settings(tiny_checkpoint, redis_url), "vision", workers={"vision_encoder": encoder})
    with live_server(vision_app) as vision:
        # no features stored yet, not even the model's fingerprint: the LLM worker learns both after encoding
        redis.Redis.from_url(redis_url).flushall()
        llm_app = create_app(settings(tiny_checkpoint, redis_url, vision_url=vision.url), "llm",
                             workers={"llm_engine": engine})
        with live_server(llm_app) as llm, openai.OpenAI(base_url=llm.url + "/v1", api_key="x", max_retries=0) as oai:
            messages = user(image_url(data_url(data)), "What is it?")
            out = oai.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0)
            image_id = out.model_extra["image_id"]
            assert out.choices[0].message.content == questions_answer(llm.url, image_id, "What is it?", 8)["answer"]
            stream = oai.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0,
                                                 stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream) == out.choices[0].message.content
            assert "splitvl_cache_total{cache=\"prefix\",result=\"hit\"}" in httpx.get(llm.url + "/metrics").text

    fresh = user(image_url(data_url(image_bytes(50, 50, seed=15))), "hi")
    for vision_url in (None, vision.url):  # none configured; configured but gone
        app = create_app(settings(tiny_checkpoint, redis_url, vision_url=vision_url), "llm",
                         workers={"llm_engine": engine})
        with live_server(app) as llm:
            r = httpx.post(llm.url + "/v1/chat/completions", json={"messages": fresh, "max_tokens": 4}, timeout=30)
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "vision_unavailable"


def test_errors_after_the_stream_started_reach_the_client(server, tiny_checkpoint, redis_server, parts, live_server, image_bytes):
    data = image_bytes(40, 40, seed=16)
    image_id = httpx.post(server.url + "/v1/images", content=data, headers={"Content-Type": "image/png"}).json()[
        "image_id"]
    app = create_app(settings(tiny_checkpoint, redis_server.url, request_timeout_s=0.001), "llm",
                     workers={"llm_engine": parts[1]})
    with live_server(app) as llm, openai.OpenAI(base_url=llm.url + "/v1", api_key="x", max_retries=0) as oai:
        stream = oai.chat.completions.create(model="m", messages=user(image_url(f"splitvl://images/{image_id}"), "hi"),
                                             max_tokens=32, stream=True)
        with pytest.raises(openai.APIError, match="longer than"):
            for _ in stream:
                pass
