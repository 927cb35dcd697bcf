"""POST /v1/questions over HTTP against the engine called directly: the harness that
``llm_bench.http_overhead`` (GPU) and ``http_overhead_cpu.py`` (CPU) share.

The app is mounted as ``create_app`` mounts the LLM routes (middleware, error handlers, auth
dependency), served by uvicorn in a thread of this process; the clients run in their own process
and are driven one request at a time, alternating with direct ``engine.generate(...).result()``
calls so that a drift of the device or host between phases cancels in the pairs' differences.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from service.llm.engine import LLMEngine
from service.ports import free_port
from service.store import FeatureStore, ImageRecord

# The HTTP clients run in their own process: the server's overhead, not the client's, and no share of
# the server's GIL. Each defines ``ask()`` (one request, checked for 200) over one keep-alive
# connection; argv: port, JSON body, warm-up requests; driven line by line (``_CLIENT_LOOP``).
_CLIENT_ARGS = """
import sys, time
port, body, warm = int(sys.argv[1]), sys.argv[2].encode(), int(sys.argv[3])
"""
# warm-up requests, then "ready"; then one timed request per line on stdin, its ms on stdout
_CLIENT_LOOP = """
for _ in range(warm):
    ask()
print("ready", flush=True)
for _ in sys.stdin:
    t = time.perf_counter()
    ask()
    print((time.perf_counter() - t) * 1e3, flush=True)
"""
HTTP_CLIENT = _CLIENT_ARGS + """
import http.client
conn = http.client.HTTPConnection("127.0.0.1", port)

def ask():
    conn.request("POST", "/v1/questions", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    r.read()
    assert r.status == 200, r.status
""" + _CLIENT_LOOP

# The same requests over a bare socket: the request bytes are built once and the response is read by
# its Content-Length, so the client's own Python (http.client parses headers with the email package)
# counts as little as possible.
RAW_HTTP_CLIENT = _CLIENT_ARGS + """
import socket
request = (b"POST /v1/questions HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\nContent-Type: application/json\\r\\n"
           b"Content-Length: %d\\r\\n\\r\\n" % len(body)) + body
sock = socket.create_connection(("127.0.0.1", port))
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

def recv():
    chunk = sock.recv(65536)
    if not chunk:
        raise ConnectionError("the server closed the connection")
    return chunk

def ask():
    sock.sendall(request)
    data = b""
    while b"\\r\\n\\r\\n" not in data:
        data += recv()
    head, _, rest = data.partition(b"\\r\\n\\r\\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\\r\\n") if line.lower().startswith(b"content-length")))
    while len(rest) < length:
        rest += recv()
    assert head.startswith(b"HTTP/1.1 200"), head[:40]
""" + _CLIENT_LOOP


class StandInStore:
    """The feature store's read path, answering one record from memory (no Redis)."""

    def __init__(self, record: ImageRecord) -> None:
        self.record = record

    async def registered_fingerprint(self, key: str) -> str:
        return self.record.fingerprint

    async def get(self, fingerprint: str, image_id: str, *, with_embeds: bool = True) -> ImageRecord:
        return self.record

    async def other_fingerprint(self, fingerprint: str, image_id: str) -> None:
        return None


@contextlib.contextmanager
def redis_store(record: ImageRecord) -> Iterator[FeatureStore]:
    """A real store on an embedded Redis that holds ``record`` (what a deployment reads per question)."""
    from service.embedded_redis import EmbeddedRedis

    with EmbeddedRedis() as server:
        async def put() -> None:
            store = FeatureStore(server.url)
            await store.put(record)
            await store.close()

        asyncio.run(put())
        yield FeatureStore(server.url)


@contextlib.contextmanager
def serving(engine: LLMEngine, ckpt: Path, store: Any, device_type: str, fingerprint: str) -> Iterator[int]:
    """The LLM routes over ``engine`` and ``store`` under uvicorn in a thread; yields the port."""
    import uvicorn
    from fastapi import FastAPI

    from service.config import Settings
    from service.errors import install_error_handlers
    from service.guard import RequestGuard
    from service.llm.routes import body_limits, router
    from service.llm.worker import LLMWorker
    from service.metrics import Metrics, RequestMetricsMiddleware

    settings = Settings(model=str(ckpt), redis_url="redis://127.0.0.1:1/0", device=device_type, max_new_tokens=4096)
    app = FastAPI()
    install_error_handlers(app)
    metrics = Metrics()
    app.add_middleware(RequestGuard, api_keys=settings.api_keys, limits=body_limits(settings),
                       body_timeout_s=settings.body_timeout_s)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    app.state.settings = settings
    app.include_router(router)
    app.state.llm = LLMWorker(settings, store, metrics, engine=engine, fingerprint=fingerprint)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def in_app_times() -> Iterator[list[float]]:
    """Each question's time inside the app, in ms, from the access-log line the metrics middleware
    writes (arrival to the last byte handed to uvicorn): the client's time minus it is uvicorn, the
    socket and the client."""
    from service.metrics import access_log

    times: list[float] = []

    class AccessTimes(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if getattr(record, "path", None) == "/v1/questions":
                times.append(record.duration_ms)  # type: ignore[attr-defined]

    handler, level = AccessTimes(), access_log.level
    access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    try:
        yield times
    finally:
        access_log.removeHandler(handler)
        access_log.setLevel(level)


def wait_for_count(samples: list[float], count: int, timeout_s: float = 2.0) -> list[float]:
    """``samples`` once it holds ``count`` (the server thread logs a request after its last byte)."""
    deadline = time.monotonic() + timeout_s
    while len(samples) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return list(samples)


def paired(script: str, port: int, body: str, reps: int, direct: Callable[[], float], *, warm: int,
           idle_s: float = 0.0, after_http: Callable[[], None] | None = None) -> tuple[list[float], list[float]]:
    """``reps`` HTTP requests from a client process running ``script`` and ``reps`` direct calls,
    alternating (HTTP first, then direct first), after the client's ``warm`` requests; ``idle_s``
    of sleep before each timed call."""
    client = subprocess.Popen([sys.executable, "-c", script, str(port), body, str(warm)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert client.stdin is not None and client.stdout is not None
    watchdog = threading.Timer(300, client.kill)  # a stuck request ends the run, not the bench
    watchdog.start()
    try:
        if client.stdout.readline().strip() != "ready":
            raise RuntimeError("the HTTP client failed to start")
        http, here = [], []
        for i in range(reps):
            if i % 2:
                time.sleep(idle_s)
                here.append(direct())
            time.sleep(idle_s)
            client.stdin.write("go\n")
            client.stdin.flush()
            http.append(float(client.stdout.readline()))
            if after_http is not None:
                after_http()
            if not i % 2:
                time.sleep(idle_s)
                here.append(direct())
        return http, here
    finally:
        watchdog.cancel()
        client.stdin.close()
        try:
            client.wait(timeout=30)
        except subprocess.TimeoutExpired:  # never left running, nor hiding the first error
            client.kill()
