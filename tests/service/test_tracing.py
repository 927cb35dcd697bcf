"""OpenTelemetry tracing: off by default; with OTEL_* set, a span per request with its phases as children,
and one trace across the LLM worker and the vision worker it asks to encode (SDK in-memory exporter)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service import tracing
from service.app import create_app
from service.config import Settings

pytest.importorskip("opentelemetry.sdk")
from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """Tracing on (as OTEL_TRACES_EXPORTER would turn it on), into an in-memory exporter."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):  # a process has one provider, ever
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")  # the provider above is kept: no console output
    monkeypatch.setattr(tracing, "_enabled", False)  # restored after the test: other tests trace nothing
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


@pytest.mark.parametrize(("env", "on"), [
    ({}, False),
    ({"OTEL_SERVICE_NAME": "x"}, False),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, False),
])
def test_tracing_is_on_only_when_the_otel_variables_ask(env, on):
    assert tracing.requested(env) is on


def settings(model: Path, redis_url: str, **overrides) -> Settings:
    return Settings(model=str(model), redis_url=redis_url, device="cpu", max_batch_wait_ms=1, max_new_tokens=8,
                    **overrides)


def children(finished: list, parent) -> dict[str, object]:  # noqa: ANN001
    return {s.name: s for s in finished if s.parent is not None and s.parent.span_id == parent.context.span_id}


def test_no_spans_by_default(tiny_checkpoint, redis_url, live_server, image_bytes, monkeypatch):
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tracing, "_enabled", False)
    _EXPORTER.clear()
    app = create_app(settings(tiny_checkpoint, redis_url), "vision")
    assert not any(m.cls is tracing.TracingMiddleware for m in app.user_middleware)
    with live_server(app) as live:
        assert httpx.post(f"{live.url}/v1/images", content=image_bytes(40, 40, 1),
                          headers={"Content-Type": "image/png"}).status_code == 200
    assert _EXPORTER.get_finished_spans() == ()


def test_spans_follow_a_request_across_the_split(spans, tiny_checkpoint, redis_url, live_server, image_bytes):
    with live_server(create_app(settings(tiny_checkpoint, redis_url), "vision")) as vision, \
            live_server(create_app(settings(tiny_checkpoint, redis_url, vision_url=vision.url), "llm")) as llm, \
            httpx.Client(timeout=60) as client:
        r = client.post(f"{vision.url}/v1/images", content=image_bytes(40, 40, 2), headers={"Content-Type": "image/png"})
        image_id = r.json()["image_id"]
        assert client.post(f"{llm.url}/v1/questions", json={"image_id": image_id, "question": "What?",
                                                            "max_tokens": 4}).status_code == 200
        url = "data:image/png;base64," + base64.b64encode(image_bytes(44, 40, 3)).decode()
        chat = client.post(f"{llm.url}/v1/chat/completions", json={"model": "m", "max_tokens": 4, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "Describe it."}]}]})
        assert chat.status_code == 200, chat.text
    finished = list(spans.get_finished_spans())
    servers = [s for s in finished if s.kind == trace.SpanKind.SERVER]
    upload = next(s for s in servers if s.name == "POST /v1/images" and s.parent is None)
    encode_for_chat = next(s for s in servers if s.name == "POST /v1/images" and s.parent is not None)
    question = next(s for s in servers if s.name == "POST /v1/questions")
    completion = next(s for s in servers if s.name == "POST /v1/chat/completions")

    assert upload.parent is None and upload.attributes["http.response.status_code"] == 200
    assert {"hash", "lookup", "lock", "preprocess", "encode", "store"} <= set(children(finished, upload))
    assert {"feature fetch", "prefill", "decode"} <= set(children(finished, question))
    phases = children(finished, question)
    assert phases["prefill"].end_time <= phases["decode"].start_time + 1

    # the chat completion's image had no features: the LLM worker asked the vision worker, in one trace
    client_span = children(finished, completion)["vision encode"]
    assert client_span.kind == trace.SpanKind.CLIENT
    assert encode_for_chat.context.trace_id == completion.context.trace_id
    assert encode_for_chat.parent.span_id == client_span.context.span_id
    assert {"encode", "store"} <= set(children(finished, encode_for_chat))
