"""Metrics read at scrape time (engine counters, queue depths) and the per-request access log line."""

from __future__ import annotations

import io
import json
import logging
import os

import httpx
from fastapi import FastAPI

from service.logs import JsonFormatter, RequestIdFilter, TextFormatter
from service.metrics import Metrics, RequestMetricsMiddleware


def sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in\n{text}")


def test_engine_counters_and_queue_depth_at_scrape_time():
    metrics = Metrics()
    stats = {"prefix_hits": 3, "prefix_misses": 1, "prefill_tokens": 50, "generated_tokens": 7, "decode_steps": 5,
             "waiting": 2, "active": 1, "prefix_entries": 1}
    metrics.watch_engine(lambda: stats)
    depth = {"n": 4}
    metrics.on_scrape(lambda: metrics.queue_depth.labels("vision").set(depth["n"]))
    text = metrics.render().decode()
    assert sample(text, 'splitvl_cache_total{cache="prefix",result="hit"}') == 3
    assert sample(text, 'splitvl_cache_total{cache="prefix",result="miss"}') == 1
    assert sample(text, 'splitvl_llm_tokens_total{kind="generated"}') == 7
    assert sample(text, 'splitvl_queue_depth{worker="llm"}') == 2
    assert sample(text, 'splitvl_queue_depth{worker="vision"}') == 4
    assert sample(text, "splitvl_llm_active_requests") == 1
    stats.update(prefix_hits=5, waiting=0)
    depth["n"] = 0
    text = metrics.render().decode()
    assert sample(text, 'splitvl_cache_total{cache="prefix",result="hit"}') == 5  # counted once, not twice
    assert sample(text, 'splitvl_queue_depth{worker="llm"}') == 0
    assert sample(text, 'splitvl_queue_depth{worker="vision"}') == 0

    metrics.on_scrape(lambda: 1 / 0)  # a broken hook never fails a scrape
    assert b"splitvl_requests" in metrics.render()


async def test_access_log_lines_carry_the_request_id():
    metrics = Metrics()
    app = FastAPI()
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)

    @app.get("/v1/things/{name}")
    async def thing(name: str) -> dict[str, str]:
        logging.getLogger("splitvl.test").warning("working on %s", name)
        return {"name": name}

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("splitvl")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            r = await client.get("/v1/things/x", headers={"X-Request-Id": "req-42"})
            assert r.headers["x-request-id"] == "req-42"
            r = await client.get("/nowhere")
            generated = r.headers["x-request-id"]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    work, access, missing = lines
    assert work["logger"] == "splitvl.test" and work["request_id"] == "req-42" and work["level"] == "warning"
    assert access["logger"] == "splitvl.access" and access["request_id"] == "req-42"
    assert (access["method"], access["path"], access["status"]) == ("GET", "/v1/things/x", 200)
    assert access["duration_ms"] >= 0 and access["ts"].endswith("Z")
    assert missing["status"] == 404 and missing["request_id"] == generated and len(generated) == 32

    record = logging.LogRecord("splitvl.x", logging.INFO, "", 0, "hello", None, None)
    record.request_id = "r1"
    assert TextFormatter().format(record).endswith("hello [request_id=r1]")


def test_gauges_of_killed_worker_processes_are_forgotten(tmp_path):
    import subprocess
    import sys

    from service.metrics import forget_dead_processes

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for pid in (dead.pid, os.getpid()):
        (tmp_path / f"gauge_livesum_{pid}.db").write_bytes(b"")
        (tmp_path / f"counter_{pid}.db").write_bytes(b"")
    forget_dead_processes(str(tmp_path))
    # the dead process's live gauge is gone; its counters still count, the live process keeps everything
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"counter_{dead.pid}.db", f"counter_{os.getpid()}.db", f"gauge_livesum_{os.getpid()}.db"])


def test_json_and_text_lines_name_their_process_when_asked():
    record = logging.LogRecord("splitvl.x", logging.INFO, "", 0, "hello", None, None)
    assert json.loads(JsonFormatter(show_pid=True).format(record))["pid"] == os.getpid()
    assert "pid" not in json.loads(JsonFormatter().format(record))
    assert f"splitvl.x[{os.getpid()}]: hello" in TextFormatter(show_pid=True).format(record)
    assert "splitvl.x: hello" in TextFormatter().format(record)
