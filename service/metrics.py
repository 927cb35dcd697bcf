"""Prometheus metrics, one registry per app (so several apps can live in one process).

Under ``splitvl serve vision --workers N`` the CLI points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh
directory before the worker processes start; prometheus_client then keeps every process's samples
in files there, and a scrape of any process reports counters and histograms summed over all of
them, and gauges summed over the live ones.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.logs import request_id_var

access_log = logging.getLogger("splitvl.access")
log = logging.getLogger(__name__)
_PROBES = frozenset({"/healthz", "/readyz", "/metrics"})


def multiprocess_dir() -> str | None:
    """The directory this process writes its samples to, in prometheus_client's multiprocess mode.

    prometheus_client chooses file-backed values once, when it is first imported, from
    ``PROMETHEUS_MULTIPROC_DIR``: a process that sets the variable later keeps its samples in memory.
    """
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return path if path and values.ValueClass is not values.MutexValue else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    return True


def forget_dead_processes(path: str) -> None:
    """Drop the live gauges of worker processes that died without cleaning up (killed): uvicorn's
    supervisor replaces them under a new pid, and their last queue depth would otherwise count forever."""
    for file in Path(path).glob("gauge_live*_*.db"):
        pid = file.stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            mark_process_dead(int(pid), path)


class Metrics:
    def __init__(self) -> None:
        self.multiprocess_dir = multiprocess_dir()
        if self.multiprocess_dir:
            forget_dead_processes(self.multiprocess_dir)
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
        # Gauges with several processes: the sum over the live ones (jobs waiting in all queues, memory
        # all processes hold on the GPU); a process that stopped no longer counts. One process: as ever.
        live = "livesum"
        self.queue_depth = Gauge("splitvl_queue_depth", "jobs waiting", ["worker"], registry=r,
                                 multiprocess_mode=live)
        self.gpu_memory = Gauge("splitvl_gpu_memory_bytes", "GPU memory allocated by torch", registry=r,
                                multiprocess_mode=live)
        self.llm_tokens = Counter("splitvl_llm_tokens", "LLM tokens computed", ["kind"], registry=r)
        self.llm_decode_steps = Counter("splitvl_llm_decode_steps", "batched LLM decode steps", registry=r)
        self.llm_active = Gauge("splitvl_llm_active_requests", "questions holding a decode slot", registry=r,
                                multiprocess_mode=live)
        self.prefix_entries = Gauge("splitvl_llm_prefix_cache_entries", "image prefixes cached on the device",
                                    registry=r, multiprocess_mode=live)
        self._hooks: list[Callable[[], None]] = []

    def on_scrape(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` before each scrape (to read gauges and counters that live elsewhere)."""
        self._hooks.append(hook)

    def watch_engine(self, stats: Callable[[], Mapping[str, int]]) -> None:
        """Export an LLM engine's own counters (``engine.stats()``) at scrape time."""
        counters = {  # engine counter -> our counter; increased by the difference since the last scrape
            "prefix_hits": self.cache.labels("prefix", "hit"),
            "prefix_misses": self.cache.labels("prefix", "miss"),
            "prefill_tokens": self.llm_tokens.labels("prefill"),
            "generated_tokens": self.llm_tokens.labels("generated"),
            "decode_steps": self.llm_decode_steps,
        }
        seen = dict.fromkeys(counters, 0)

        def hook() -> None:
            now = stats()
            for key, counter in counters.items():
                value = int(now.get(key, 0))
                if value > seen[key]:
                    counter.inc(value - seen[key])
                seen[key] = value
            self.queue_depth.labels("llm").set(now.get("waiting", 0))
            self.llm_active.set(now.get("active", 0))
            self.prefix_entries.set(now.get("prefix_entries", 0))

        self.on_scrape(hook)

    def refresh(self) -> None:
        """Read this process's values that live elsewhere (scrape hooks, GPU memory) into its gauges."""
        for hook in self._hooks:
            try:
                hook()
            except Exception:  # noqa: BLE001 - metrics must never fail a scrape
                log.exception("metrics hook failed")
        try:
            import torch

            if torch.cuda.is_available():
                self.gpu_memory.set(torch.cuda.memory_allocated())
        except Exception:  # noqa: BLE001 - metrics must never fail a scrape
            pass

    async def refresh_forever(self, interval_s: float = 1.0) -> None:
        """With several processes a scrape reaches one of them, which refreshes only its own gauges:
        the others refresh theirs on their own, so what a scrape sums is at most ``interval_s`` old."""
        while True:
            await asyncio.sleep(interval_s)
            self.refresh()

    def close(self) -> None:
        """A stopping process's gauges leave the sums (its counters stay: they were counted)."""
        if self.multiprocess_dir:
            mark_process_dead(os.getpid(), self.multiprocess_dir)

    def render(self) -> bytes:
        self.refresh()
        if self.multiprocess_dir:
            # every process's files, merged at each scrape (a fresh registry: the collector reads on collect)
            merged = CollectorRegistry()
            MultiProcessCollector(merged, path=self.multiprocess_dir)
            return generate_latest(merged)
        return generate_latest(self.registry)


class RequestMetricsMiddleware:
    """Counts and times every request by route template; tags it with an ``X-Request-Id``; writes
    one access log line per request (``splitvl.access``: method, path, status, duration, request id)."""

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
        token = request_id_var.set(request_id)
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
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(scope["method"], path, str(status)).inc()
            self.metrics.latency.labels(scope["method"], path).observe(elapsed)
            client = scope.get("client")
            quiet = scope["path"] in _PROBES and status < 400  # probes every few seconds: debug level
            access_log.log(
                logging.DEBUG if quiet else logging.INFO, "%s %s %d %.1f ms request_id=%s", scope["method"], scope["path"], status, elapsed * 1000, request_id,
                extra={"request_id": request_id, "method": scope["method"], "path": scope["path"], "status": status,
                       "duration_ms": round(elapsed * 1000, 3), "client": client[0] if client else None},
            )
            request_id_var.reset(token)
