"""Edges: ids checked exactly, every number range-checked, log lines that cannot be forged, errors that
name no internal address and fit their route."""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Iterator

import httpx
import pytest

from service.logs import TextFormatter

from . import assert_error, check_contract, png, upload


@pytest.fixture
def client(make_app, redis_url, live_server) -> Iterator[httpx.Client]:
    with live_server(make_app("all", redis_url=redis_url, max_new_tokens=8)) as live, \
            httpx.Client(base_url=live.url, timeout=30) as client:
        yield client


@pytest.fixture
def image_id(client: httpx.Client) -> str:
    return upload(client, png(56, 56, seed=1)).json()["image_id"]


def chat(image: dict, **params: object) -> dict:
    return {"messages": [{"role": "user", "content": [image, {"type": "text", "text": "what?"}]}], **params}


@pytest.mark.parametrize("tail", ["\n", "%0A", "%0D%0A", "%0A%0A", " ", "%00"])
def test_an_id_with_a_trailing_newline_is_refused(client, image_id, tail):
    """``<id>\\n`` passed a regex ``$`` and, for a stored image, broke the response headers (the
    connection closed with no answer)."""
    suffix = tail if tail.startswith("%") or tail == " " else "%0A"
    for method, path in (("GET", f"/v1/images/{image_id}{suffix}"), ("GET", f"/v1/images/{image_id}{suffix}/embeddings"),
                         ("DELETE", f"/v1/images/{image_id}{suffix}")):
        assert_error(client.request(method, path), 422, "invalid_image_id")
    text = image_id + tail.replace("%0A", "\n").replace("%0D", "\r").replace("%00", "\x00")
    for image in ({"type": "image_url", "image_url": {"url": f"splitvl://images/{text}"}},
                  {"type": "image_id", "image_id": text}):
        assert_error(client.post("/v1/chat/completions", json=chat(image)), 400, "invalid_image_id")
    r = client.post("/v1/questions", json={"image_id": text, "question": "what?"})
    assert_error(r, 422, "invalid_request")
    assert client.get(f"/v1/images/{image_id}/embeddings").status_code == 200  # and the image is still there


QUESTION_NUMBERS = [("max_tokens", 0), ("max_tokens", -1), ("max_tokens", 10**30), ("max_tokens", 1.5),
                    ("temperature", -0.1), ("temperature", 2.01), ("top_p", 0),
                    ("top_p", 1.0001), ("seed", -1), ("seed", 2**64), ("seed", 10**40)]
CHAT_NUMBERS = [*QUESTION_NUMBERS, ("max_completion_tokens", 0), ("max_completion_tokens", 10**30), ("n", 0),
                ("n", 129), ("top_logprobs", -1), ("top_logprobs", 21), ("frequency_penalty", 2.5),
                ("presence_penalty", -2.5), ("logit_bias", {"1": 101}), ("logit_bias", {"1": -101})]


@pytest.mark.parametrize("field,value", QUESTION_NUMBERS, ids=[f"{f}={v}"[:40] for f, v in QUESTION_NUMBERS])
def test_every_question_number_is_range_checked(client, image_id, field, value):
    r = client.post("/v1/questions", json={"image_id": image_id, "question": "what?", field: value})
    assert_error(r, 422)


@pytest.mark.parametrize("field,value", CHAT_NUMBERS, ids=[f"{f}={v}"[:40] for f, v in CHAT_NUMBERS])
def test_every_chat_number_is_range_checked(client, image_id, field, value):
    """seed >= 2**64 was a plain-text 500."""
    image = {"type": "image_url", "image_url": {"url": f"splitvl://images/{image_id}"}}
    assert_error(client.post("/v1/chat/completions", json=chat(image, **{field: value})), 422)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_json_non_numbers_are_range_checked(client, image_id, literal):
    """Python's JSON parser reads NaN and Infinity: no field takes them."""
    image = {"type": "image_id", "image_id": image_id}
    for field in ("temperature", "top_p", "frequency_penalty"):
        for path, body in (("/v1/questions", {"image_id": image_id, "question": "what?"}),
                           ("/v1/chat/completions", chat(image))):
            raw = json.dumps({**body, field: "<n>"}).replace('"<n>"', literal)
            r = client.post(path, content=raw, headers={"Content-Type": "application/json"})
            check_contract(r)
            assert r.status_code in (400, 422), r.text


def test_the_largest_seed_is_served(client, image_id):
    image = {"type": "image_id", "image_id": image_id}
    r = client.post("/v1/chat/completions", json=chat(image, seed=2**64 - 1, max_tokens=2))
    assert r.status_code == 200, r.text


@pytest.fixture
def access_lines(make_app, redis_url, live_server) -> Iterator[tuple[httpx.Client, io.StringIO]]:
    """A server whose access log goes, in the text format, to a buffer."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("splitvl.access")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with live_server(make_app("vision", redis_url=redis_url)) as live, \
                httpx.Client(base_url=live.url, timeout=30) as client:
            yield client, buffer
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_a_request_path_cannot_forge_a_log_line(access_lines):
    client, buffer = access_lines
    forged = "2026-01-01 00:00:00,000 INFO splitvl.access: GET /admin 200 1.0 ms request_id=x"
    for breaker in ("%0A", "%0D", "%C2%85", "%E2%80%A8", "%1B[2K"):
        client.get(f"/nope{breaker}{forged}")
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 5 and not any(line.startswith("2026-01-01") for line in lines), lines
    assert all("splitvl.access: GET /nope" in line for line in lines)
    assert "\\x0a" in lines[0] and "\\u2028" in lines[3] and "\\x1b" in lines[4]


def test_errors_name_no_internal_address(make_app, redis_server, tmp_path, live_server):
    """503s said ``Timeout reading from 127.0.0.1:16379``; the LLM worker's said where its vision worker is."""
    own = type(redis_server)(tmp_path)
    own.start()
    vision_url = "http://127.0.0.1:9"  # nothing listens there
    try:
        app = make_app("llm", redis_url=own.url, redis_timeout_s=0.5, vision_url=vision_url)
        with live_server(app) as live, httpx.Client(base_url=live.url, timeout=30) as client:
            data_url = "data:image/png;base64," + base64.b64encode(png(40, 40, seed=2)).decode()
            image = {"type": "image_url", "image_url": {"url": data_url}}
            err = assert_error(client.post("/v1/chat/completions", json=chat(image)), 503, "vision_unavailable")
            assert "127.0.0.1" not in err["message"] and ":9" not in err["message"], err
            own.stop()
            r = client.post("/v1/questions", json={"image_id": "ab" * 32, "question": "hi"})
            err = assert_error(r, 503, "redis_unavailable")
            assert "127.0.0.1" not in err["message"] and str(own.port) not in err["message"], err
    finally:
        own.stop()


def test_error_messages_fit_their_route(client):
    """A broken multipart upload was told to send a JSON object."""
    r = client.post("/v1/images", content=b"--x\r\nnot multipart", headers={"Content-Type": "multipart/form-data"})
    err = assert_error(r, 400, "invalid_multipart")
    assert "JSON" not in err["message"] and "multipart" in err["message"]
    r = client.post("/v1/images", content=b"abc", headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert "JSON" not in assert_error(r, 422 if r.status_code == 422 else 400)["message"]
    r = client.post("/v1/questions", content=b'{"image_id": 1', headers={"Content-Type": "application/json"})
    assert_error(r, 422, "invalid_request")
    r = client.post("/v1/questions", content=b"\xff\xfe", headers={"Content-Type": "application/json"})
    check_contract(r)
    assert r.status_code in (400, 422)
