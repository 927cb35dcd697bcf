"""Optional OpenTelemetry tracing, off unless the standard ``OTEL_*`` variables ask for it.

On (``OTEL_TRACES_EXPORTER`` other than ``none``, or an ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``, and
not ``OTEL_SDK_DISABLED=true``), every HTTP request gets a server span, continuing the caller's W3C
``traceparent``; its phases are child spans: an upload's read, hash, lookup, lock, preprocess (decode +
resize + patchify), encode and store; a question's feature fetch, prefill and decode. An LLM worker
that has a vision worker encode an image passes the trace on, so both workers' spans form one trace.
Off, nothing here imports OpenTelemetry or costs a request anything.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_enabled = False  # set by setup(): spans are made only then


def requested(env: Mapping[str, str] = os.environ) -> bool:
    """Whether the ``OTEL_*`` variables ask for traces."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters == "none":
        return False
    return bool(exporters) or any(env.get(name) for name in _ENDPOINTS)


def _exporter(name: str) -> Any:
    if name == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise RuntimeError("OTEL_* ask for OTLP traces, but the OTLP exporter is not installed: "
                               "pip install 'splitvl[otel]', or set OTEL_TRACES_EXPORTER=console or none") from None
        return OTLPSpanExporter()  # endpoint, headers, timeout: from OTEL_EXPORTER_OTLP_*
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    raise RuntimeError(f"OTEL_TRACES_EXPORTER={name!r} is not supported: use otlp, console or none")


def setup(service_name: str) -> bool:
    """Turn tracing on when the environment asks for it: a tracer provider with the exporters it names
    (unless the process has one already, as a test's in-memory exporter). Whether tracing is on."""
    global _enabled
    if not requested():
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise RuntimeError("the OTEL_* variables ask for tracing, but OpenTelemetry is not installed: "
                           "pip install 'splitvl[otel]'") from None
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are read by Resource.create; ours is the default
        attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
        provider = TracerProvider(resource=Resource.create(attributes))
        for name in (os.environ.get("OTEL_TRACES_EXPORTER") or "otlp").split(","):
            provider.add_span_processor(BatchSpanProcessor(_exporter(name.strip().lower())))
        trace.set_tracer_provider(provider)
    _enabled = True
    return True


def enabled() -> bool:
    return _enabled


def _tracer() -> Any:
    from opentelemetry import trace

    return trace.get_tracer("splitvl")


def phase(name: str, start_ns: int, end_ns: int, **attributes: Any) -> None:
    """A finished child span of the current one, for a phase measured as it ran."""
    if _enabled:
        _tracer().start_span(name, start_time=start_ns, attributes=attributes).end(end_time=end_ns)


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[None]:
    """A child span of the current one around a block (nothing when tracing is off)."""
    if not _enabled:
        yield
        return
    from opentelemetry.trace import SpanKind

    kind = attributes.pop("kind", None)
    with _tracer().start_as_current_span(name, kind=getattr(SpanKind, kind or "INTERNAL"), attributes=attributes):
        yield


def inject(headers: MutableMapping[str, str]) -> None:
    """Add the current trace context (``traceparent``) to outgoing request headers."""
    if _enabled:
        from opentelemetry import propagate

        propagate.inject(headers)


def now_ns() -> int:
    return time.time_ns()


class TracingMiddleware:
    """A server span per HTTP request, continuing the caller's trace; named by route template."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind, Status, StatusCode

        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers") or []}
        method = scope["method"]
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with _tracer().start_as_current_span(
                f"{method} {scope['path']}", context=propagate.extract(carrier), kind=SpanKind.SERVER,
                attributes={"http.request.method": method, "url.path": scope["path"]}) as server_span:
            try:
                await self.app(scope, receive, send_wrapper)
            finally:
                route = getattr(scope.get("route"), "path", None)
                if route:
                    server_span.update_name(f"{method} {route}")
                    server_span.set_attribute("http.route", route)
                server_span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    server_span.set_status(Status(StatusCode.ERROR))
