"""Prometheus metrics, one registry per app (so several apps can live in one process)."""

from __future__ import annotations

import time
import uuid

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("splitvl_requests", "HTTP requests", ["method", "route", "status"], registry=r)
        self.latency = Histogram(
            "splitvl_request_seconds", "HTTP request latency", ["method", "route"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.batch_size = Histogram(
            "splitvl_batch_size", "jobs per model call", ["worker"], registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )
        self.batch_cost = Histogram(
            "splitvl_batch_patches", "patches (vision) or tokens (llm) per model call", ["worker"], registry=r,
            buckets=(64, 256, 1024, 4096, 16384, 65536),
        )
        self.cache = Counter("splitvl_cache", "feature/prefix cache lookups", ["cache", "result"], registry=r)
        self.queue_depth = Gauge("splitvl_queue_depth", "jobs waiting", ["worker"], registry=r)
        self.gpu_memory = Gauge("splitvl_gpu_memory_bytes", "GPU memory allocated by torch", registry=r)

    def render(self) -> bytes:
        try:
            import torch

            if torch.cuda.is_available():
                self.gpu_memory.set(torch.cuda.memory_allocated())
        except Exception:  # noqa: BLE001 - metrics must never fail a scrape
            pass
        return generate_latest(self.registry)


class RequestMetricsMiddleware:
    """Counts and times every request by route template; tags it with an ``X-Request-Id``."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(scope["method"], path, str(status)).inc()
            self.metrics.latency.labels(scope["method"], path).observe(time.perf_counter() - start)
