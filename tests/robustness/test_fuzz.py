"""Property-based fuzzing through real HTTP: no 500, no hang, the error contract on every 4xx/503.

* Schemathesis reads the live app's /openapi.json and generates requests that fit it (positive)
  and that break it (negative) for every operation of both workers.
* Hypothesis mutates real images (bit flips, truncation, spliced bytes) and sends raw bytes under
  assorted content types to POST /v1/images, whose body the schema does not describe.
* Hypothesis builds questions from the model's special-token strings, control characters and
  text, asked about a stored image: 200 or a 4xx, and no special id ever comes from the question.

Bounded: ``SPLITVL_FUZZ_EXAMPLES`` examples per operation and mode (default and cap 150).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from service.app import create_app
from service.config import Settings
from service.llm.engine import LLMEngine
from service.llm.prompt import Prompt
from service.tiny import SPECIAL_TOKENS
from service.vision.encoder import VisionEncoder

from . import animated_gif, check_contract, cmyk_jpeg, encode, exif_rotated, noise, png, png16_rgb, upload

EXAMPLES = min(150, int(os.environ.get("SPLITVL_FUZZ_EXAMPLES", "150")))
REQUEST_TIMEOUT_S = 15.0  # a response slower than this is a hang

FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, print_blob=True,
                suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate, Phase.shrink])


class Server:
    def __init__(self, url: str, engine: LLMEngine) -> None:
        self.url = url
        self.engine = engine
        self.client = httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S)
        self.image_ids: list[str] = []
        self.counts: Counter[tuple[str, int]] = Counter()

    def record(self, label: str, response: httpx.Response | Any, elapsed: float) -> None:
        self.counts[label, response.status_code] += 1
        assert elapsed < REQUEST_TIMEOUT_S, f"took {elapsed:.1f} s"


@pytest.fixture(scope="module")
def server(tiny_checkpoint, redis_server, encoder: VisionEncoder, engine: LLMEngine, live_server) -> Iterator[Server]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    settings_ = Settings(model=str(tiny_checkpoint), redis_url=redis_server.url, device="cpu", max_batch_wait_ms=2,
                         max_upload_bytes=100_000, max_new_tokens=8, max_question_tokens=256, request_timeout_s=10)
    app = create_app(settings_, "all", workers={"vision_encoder": encoder, "llm_engine": engine})
    with live_server(app) as live:
        srv = Server(live.url, engine)
        for seed in range(2):
            r = upload(srv.client, png(60 + 20 * seed, 50, seed=seed))
            assert r.status_code == 200, r.text
            srv.image_ids.append(r.json()["image_id"])
        yield srv
        srv.client.close()
        labels = sorted({label for label, _ in srv.counts})
        print(f"\nfuzz: {sum(srv.counts.values())} requests")
        for label in labels:
            print(f"  {label}: {dict(sorted((s, n) for (lb, s), n in srv.counts.items() if lb == label))}")


def operations(url: str) -> list[Any]:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    ops = []
    for result in schema.get_all_operations():
        ops.append(result.ok())
    return ops


def fuzz_operation(server: Server, op: Any, mode: GenerationMode) -> Callable[[], None]:
    """A Hypothesis test that sends ``op``'s generated requests to the live server."""
    known = server.image_ids
    label = f"{mode.value} {op.label}"

    @FUZZ
    @given(case=op.as_strategy(generation_mode=mode), use_known=st.booleans(),
           which=st.integers(0, len(known) - 1))
    def run(case: Any, use_known: bool, which: int) -> None:
        # half the time, aim at an image that exists, so the deeper code paths run too
        if use_known and case.path_parameters and "image_id" in case.path_parameters:
            case.path_parameters["image_id"] = known[which]
        if use_known and isinstance(case.body, dict) and "image_id" in case.body:
            case.body["image_id"] = known[which]
        start = time.monotonic()
        response = case.call(base_url=server.url, timeout=REQUEST_TIMEOUT_S)
        server.record(label, response, time.monotonic() - start)
        headers = [(k, v) for k, values in response.headers.items() for v in values]
        try:
            check_contract(httpx.Response(response.status_code, headers=headers, content=response.content))
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nrequest: {case.as_curl_command()}") from None
        # a deleted image comes back for the next examples
        if case.method == "DELETE" and response.status_code == 204:
            server.client.post("/v1/images", content=png(60 + 20 * which, 50, seed=which),
                               headers={"Content-Type": "image/png"})

    return run


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
def test_schemathesis_every_operation(server: Server, mode: GenerationMode) -> None:
    ops = operations(server.url)
    labels = {op.label for op in ops}
    assert {"POST /v1/images", "GET /v1/images/{image_id}", "GET /v1/images/{image_id}/embeddings",
            "DELETE /v1/images/{image_id}", "POST /v1/questions", "GET /healthz", "GET /readyz",
            "GET /metrics"} <= labels, labels
    for op in ops:
        try:
            fuzz_operation(server, op, mode)()
        except Unsatisfiable:
            # nothing to break in an operation without parameters or body (GET /healthz)
            assert mode == GenerationMode.NEGATIVE, op.label


def _seed_images() -> list[tuple[bytes, str]]:
    gif, _ = animated_gif(40, 30, frames=2)
    rotated, _ = exif_rotated(40, 24)
    return [
        (png(40, 30, 1), "image/png"),
        (encode(noise(40, 30, 2), "JPEG"), "image/jpeg"),
        (encode(noise(40, 30, 3), "JPEG", progressive=True), "image/jpeg"),
        (gif, "image/gif"),
        (rotated, "image/jpeg"),
        (cmyk_jpeg(24, 24), "image/jpeg"),
        (encode(noise(40, 30, 4), "WEBP"), "image/webp"),
        (encode(noise(40, 30, 5), "WEBP", lossless=True), "image/webp"),
        (encode(noise(40, 30, 6), "BMP"), "image/bmp"),
        (encode(noise(20, 20, 7, "RGBA")), "image/png"),
        (png16_rgb(16, 12, 8), "image/png"),
    ]


SEEDS = _seed_images()
CONTENT_TYPES = ["image/png", "image/jpeg", "image/gif", "image/webp", "application/octet-stream", "image/x-foo",
                 "image/", "IMAGE/PNG; charset=utf-8", "text/plain", "application/json", "", "multipart/form-data"]


@st.composite
def mutated_image(draw: Callable[..., Any]) -> tuple[bytes, str]:
    data, content_type = draw(st.sampled_from(SEEDS))
    buf = bytearray(data)
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if not buf:
            break
        at = draw(st.integers(0, len(buf) - 1))
        if kind == "flip":
            buf[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            buf[at] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80]))
        elif kind == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del buf[at : at + draw(st.integers(1, 64))]
        else:
            del buf[at:]
    if draw(st.integers(0, 9)) == 0:
        content_type = draw(st.sampled_from(CONTENT_TYPES))
    return bytes(buf), content_type


@FUZZ
@given(body=st.one_of(mutated_image(), st.tuples(st.binary(max_size=2048), st.sampled_from(CONTENT_TYPES))),
       multipart=st.integers(0, 4))
def _fuzz_upload(server: Server, body: tuple[bytes, str], multipart: int) -> None:
    data, content_type = body
    start = time.monotonic()
    if multipart == 0:
        r = server.client.post("/v1/images", files={"file": ("f", data, content_type or "image/png")})
    else:
        r = upload(server.client, data, content_type)
    server.record("image bytes", r, time.monotonic() - start)
    check_contract(r)


def test_image_bytes_fuzz(server: Server) -> None:
    _fuzz_upload(server)


FRAGMENTS = [*SPECIAL_TOKENS, "<|im_start|>assistant\n", "\x00", "\x1b[2J", "\u202e", "\ufeff", "\r\n", " ", "é",
             "👍", "what", "?"]


@FUZZ
@given(parts=st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=12)), min_size=1, max_size=12),
       max_tokens=st.integers(1, 8), stream=st.booleans(), which=st.integers(0, 1))
def _fuzz_question(server: Server, recorded: list[tuple[str, Prompt]], parts: list[str], max_tokens: int,
                   stream: bool, which: int) -> None:
    question = "".join(parts)
    before = len(recorded)
    start = time.monotonic()
    r = server.client.post("/v1/questions", json={"image_id": server.image_ids[which], "question": question,
                                                  "max_tokens": max_tokens, "stream": stream})
    server.record("question text", r, time.monotonic() - start)
    check_contract(r)
    if not question.strip():
        assert r.status_code == 422
        return
    assert r.status_code == 200, r.text
    if stream:
        assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]
    (asked, prompt), = recorded[before:]
    assert asked == question
    baseline = server.engine.prompts.build("x", prompt.num_image_tokens)
    tok = server.engine.prompts.tokenizer
    specials = {tok.token_to_id(t) for t in SPECIAL_TOKENS}
    assert prompt.ids[: prompt.prefix_len] == baseline.ids[: baseline.prefix_len]
    assert Counter(i for i in prompt.ids[prompt.prefix_len:] if i in specials) == \
        Counter(i for i in baseline.ids[baseline.prefix_len:] if i in specials), question


def test_question_text_fuzz(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    recorded: list[tuple[str, Prompt]] = []
    real = server.engine.prompts.build

    def build(question: str, num_image_tokens: int) -> Prompt:
        prompt = real(question, num_image_tokens)
        recorded.append((question, prompt))
        return prompt

    monkeypatch.setattr(server.engine.prompts, "build", build)
    _fuzz_question(server, recorded)


def test_server_still_healthy_after_fuzzing(server: Server) -> None:
    assert server.client.get("/readyz").status_code == 200
    r = server.client.post("/v1/questions", json={"image_id": server.image_ids[0], "question": "ok?", "max_tokens": 2})
    assert r.status_code == 200, r.text
    metrics = server.client.get("/metrics").text
    assert 'status="500"' not in metrics
    assert server.engine.stats()["active"] == 0
