"""Several vision worker processes on one port (`splitvl serve vision --workers N`), and single
flight across workers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from service.config import Settings
from service.metrics import Metrics
from service.ports import free_port
from service.store import FeatureStore
from service.vision.encoder import VisionEncoder
from service.vision.worker import VisionWorker

ROOT = Path(__file__).resolve().parents[3]
KEY = "k2"
AUTH = {"Authorization": f"Bearer {KEY}"}


async def test_no_second_encode_when_the_first_worker_finishes_between_miss_and_lock(tiny_checkpoint, redis_url,
                                                                                      image_bytes):
    encoder = VisionEncoder(tiny_checkpoint, device="cpu")
    settings = Settings(model=str(tiny_checkpoint), redis_url=redis_url, device="cpu")
    first, second = (VisionWorker(settings, FeatureStore(redis_url), Metrics(), encoder) for _ in range(2))
    for worker in (first, second):
        await worker.start()
    data = image_bytes(56, 56, seed=7)
    take_lock = second.store.lock_unless_stored

    async def lock_after_the_other_finished(*args: object, **kwargs: object) -> bool | None:
        await first.encode(data)  # stores the record and drops its lock in one transaction
        return await take_lock(*args, **kwargs)

    second.store.lock_unless_stored = lock_after_the_other_finished  # type: ignore[method-assign]
    try:
        record, cached = await second.encode(data)
        assert cached and record.image_id == hashlib.sha256(data).hexdigest()
        assert second.metrics.registry.get_sample_value("splitvl_batch_size_count", {"worker": "vision"}) is None
        assert await second.store.lock(second.fingerprint, record.image_id, ttl_s=1)  # the lock was not left held
    finally:
        for worker in (first, second):
            await worker.stop()
            await worker.store.close()


# -- several processes behind one port ------------------------------------------------------------


@dataclass
class Served:
    url: str
    log: Path
    tmp: Path
    proc: subprocess.Popen[bytes]

    def access_pids(self) -> dict[str, int]:
        """request id -> pid of the process whose access line names it."""
        out = {}
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                if record.get("logger") == "splitvl.access":
                    out[record["request_id"]] = record["pid"]
        return out

    def started_pids(self) -> set[int]:
        return {json.loads(line)["pid"] for line in self.log.read_text(errors="replace").splitlines()
                if line.startswith("{") and "Application startup complete" in line}


@pytest.fixture
def served(tiny_checkpoint: Path, redis_url: str, tmp_path: Path) -> Iterator[Served]:
    port = free_port()
    log = tmp_path / "serve.log"
    # TMPDIR: where the CLI makes its metrics directory, to check that it is removed at exit
    env = {**os.environ, "SPLITVL_DEVICE": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "TMPDIR": str(tmp_path)}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "vision", "--workers", "2", "--model", str(tiny_checkpoint),
             "--redis-url", redis_url, "--port", str(port), "--log-format", "json", "--max-batch-wait-ms", "50",
             "--api-key", "k1", "--api-key", KEY],  # a list setting: it reaches the processes as JSON
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    live = Served(f"http://127.0.0.1:{port}", log, tmp_path, proc)
    try:
        # a process accepts connections only once its app has started: wait for both
        deadline = time.monotonic() + 50
        while len(live.started_pids()) < 2:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "not both processes started:\n" + log.read_text()[-3000:]
            time.sleep(0.2)
        assert httpx.get(live.url + "/readyz", headers=AUTH, timeout=5).status_code == 200
        yield live
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


async def post_all(url: str, images: list[bytes], tag: str, concurrency: int = 8,
                   stagger_s: float = 0.0) -> list[httpx.Response]:
    """Post concurrently, each request on a new connection, the i-th starting after ``i * stagger_s``.
    A process that accepts takes every connection waiting at that moment: new connections arriving
    at different moments are what spreads the requests over the processes."""
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits, headers=AUTH) as client:
        async def one(i: int, data: bytes) -> httpx.Response:
            await asyncio.sleep(i * stagger_s)
            async with sem:
                return await client.post("/v1/images", content=data,
                                         headers={"Content-Type": "image/png", "X-Request-Id": f"{tag}-{i}"})

        return await asyncio.gather(*(one(i, d) for i, d in enumerate(images)))


def answered_by(served: Served, request_ids: list[str]) -> set[int]:
    deadline = time.monotonic() + 5  # every line is flushed as written; allow for the scheduler
    while True:
        pids = served.access_pids()
        if all(r in pids for r in request_ids) or time.monotonic() > deadline:
            return {pids[r] for r in request_ids if r in pids}
        time.sleep(0.05)


def metric(text: str, sample: str) -> float:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{sample} not in\n{text}")


async def test_two_processes_share_the_port_the_store_and_the_metrics(served: Served, image_bytes):
    images = [image_bytes(56, 56, seed=1000 + i) for i in range(24)]
    responses = await post_all(served.url, images, "distinct")
    for data, r in zip(images, responses, strict=True):
        assert r.status_code == 200, r.text
        assert r.json()["image_id"] == hashlib.sha256(data).hexdigest() and r.json()["cached"] is False
    pids = answered_by(served, [f"distinct-{i}" for i in range(len(images))])
    rounds = 0
    while len(pids) < 2 and rounds < 10:  # which process accepts is up to the kernel: rarely all one
        rounds += 1
        more = [image_bytes(56, 56, seed=2000 + 8 * rounds + i) for i in range(8)]
        assert all(r.status_code == 200 for r in await post_all(served.url, more, f"more{rounds}"))
        images += more
        pids |= answered_by(served, [f"more{rounds}-{i}" for i in range(8)])
    assert len(pids) == 2 and served.proc.pid not in pids, pids

    # one image posted to both processes at once is encoded once (the Redis lock across processes)
    posted, both = len(images), False
    for attempt in range(10):
        data = image_bytes(64, 48, seed=3000 + attempt)
        tag = f"same{attempt}"
        # all 8 within the first one's batch wait (50 ms), one at a time on new connections
        responses = await post_all(served.url, [data] * 8, tag, stagger_s=0.004)
        posted += 8
        assert all(r.status_code == 200 for r in responses)
        assert {r.json()["image_id"] for r in responses} == {hashlib.sha256(data).hexdigest()}
        assert sum(not r.json()["cached"] for r in responses) == 1
        images.append(data)
        if len(answered_by(served, [f"{tag}-{i}" for i in range(8)])) == 2:
            both = True
            break
    assert both, "the copies of one image never reached both processes"

    # any process answers /metrics with the sums over both
    text = httpx.get(served.url + "/metrics", headers=AUTH, timeout=10).text
    assert metric(text, 'splitvl_requests_total{method="POST",route="/v1/images",status="200"}') == posted
    assert metric(text, 'splitvl_batch_size_sum{worker="vision"}') == len(images)  # each image encoded once
    assert metric(text, 'splitvl_queue_depth{worker="vision"}') == 0
    assert "pid=" not in text  # summed, not one series per process

    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=30) == 0, served.log.read_text()[-3000:]
    assert not list(served.tmp.glob("splitvl-metrics-*")), "the metrics directory outlived the server"
