"""Load test: N concurrent clients against ``splitvl serve all`` on a tiny checkpoint, on loopback (CPU).

    python bench/load_test.py [--clients 64] [--duration 60] [--model DIR] [--out load.json]

Starts ``python -m service.cli serve all`` (embedded Redis) on a free 127.0.0.1 port with a tiny
random checkpoint it writes (or ``--model``), then runs an asyncio httpx driver: each client loops
until the deadline over a mix of uploads (half of them from a shared pool of 16 images, so
repeated, half fresh), questions about uploaded images (plain and streamed), metadata and
embeddings reads. A 503 is honoured by waiting its Retry-After (at most 1 s) before the next request.

Reports requests, errors by status, 503s, requests lost (no response at all), p50/p99 latency per
endpoint, and the server's RSS (``/proc/PID/status`` VmRSS) before the load, in the middle and at
the end, plus the embedded Redis' RSS. ``tests/robustness/test_load.py`` runs a short version in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


# -- the server ---------------------------------------------------------------------------------------



def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def children(pid: int) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(proc.name))
            except (OSError, ValueError, IndexError):
                continue
    return found


class Server:
    """``splitvl serve all`` as a child process; stopped with SIGINT (so its embedded Redis goes too)."""

    def __init__(self, model: Path, log: Path, *extra: str) -> None:
        from service.ports import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = log.open("w")
        cmd = [sys.executable, "-m", "service.cli", "serve", "all", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(self.port), "--device", "cpu", "--log-level", "warning", *extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def redis_pid(self) -> int | None:
        pids = [p for p in children(self.pid) if "redis" in Path(f"/proc/{p}/cmdline").read_text()]
        return pids[0] if pids else None

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        from service.ports import wait_until_ready

        wait_until_ready(self.url, self.proc, timeout_s, lambda: self.log_path.read_text()[-3000:])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        return self.proc.returncode


# -- the driver ---------------------------------------------------------------------------------------


def image_bytes(rng: random.Random, size: int | None = None) -> bytes:
    width = size or rng.randint(28, 224)
    height = size or rng.randint(28, 224)
    pixels = np.random.default_rng(rng.getrandbits(32)).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG" if rng.random() < 0.7 else "JPEG")
    return buf.getvalue()


@dataclass
class Result:
    endpoint: str
    status: int | None  # None: no response (lost)
    latency_s: float
    at_s: float
    retry_after: str | None = None
    error: str | None = None


@dataclass
class Report:
    clients: int
    duration_s: float
    requests: int = 0
    responses: int = 0
    lost: int = 0
    requests_per_s: float = 0.0
    by_status: dict[str, int] = field(default_factory=dict)
    by_endpoint: dict[str, dict[str, Any]] = field(default_factory=dict)
    unavailable_503: int = 0
    unavailable_503_without_retry_after: int = 0
    server_errors: int = 0  # 5xx other than 503: bugs
    lost_examples: list[str] = field(default_factory=list)
    rss_mb: dict[str, float] = field(default_factory=dict)
    redis_rss_mb: dict[str, float] = field(default_factory=dict)

    def ok(self, max_rss_growth_mb: float) -> list[str]:
        """What is wrong with this run, as sentences (empty when it passed)."""
        problems = []
        if self.lost:
            problems.append(f"{self.lost} requests got no response: {self.lost_examples[:3]}")
        if self.server_errors:
            problems.append(f"{self.server_errors} responses were 5xx other than 503: {self.by_status}")
        if self.unavailable_503_without_retry_after:
            problems.append(f"{self.unavailable_503_without_retry_after} 503s lacked Retry-After")
        growth = self.rss_mb.get("end", 0) - self.rss_mb.get("middle", 0)
        if growth > max_rss_growth_mb:
            problems.append(f"server RSS grew {growth:.0f} MB in the second half (limit {max_rss_growth_mb:g})")
        return problems


class Driver:
    def __init__(self, url: str, clients: int, duration_s: float, seed: int = 0, pool: int = 16) -> None:
        self.url = url
        self.clients = clients
        self.duration_s = duration_s
        rng = random.Random(seed)
        self.seed = seed
        self.pool = [image_bytes(rng) for _ in range(pool)]
        self.ids: list[str] = []
        self.results: list[Result] = []
        self.t0 = 0.0

    async def _request(self, client: httpx.AsyncClient, endpoint: str, method: str, path: str,
                       **kwargs: Any) -> httpx.Response | None:
        start = time.monotonic()
        try:
            if kwargs.pop("stream", False):
                async with client.stream(method, path, **kwargs) as r:
                    await r.aread()
            else:
                r = await client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            self.results.append(Result(endpoint, None, time.monotonic() - start, start - self.t0, error=repr(exc)))
            return None
        self.results.append(Result(endpoint, r.status_code, time.monotonic() - start, start - self.t0,
                                   r.headers.get("retry-after")))
        return r

    async def _client(self, index: int, deadline: float) -> None:
        rng = random.Random(self.seed * 1000 + index)
        async with httpx.AsyncClient(base_url=self.url, timeout=120) as client:
            while time.monotonic() < deadline:
                roll = rng.random()
                if roll < 0.3 or not self.ids:
                    data = rng.choice(self.pool) if rng.random() < 0.5 else image_bytes(rng)
                    r = await self._request(client, "POST /v1/images", "POST", "/v1/images", content=data,
                                            headers={"Content-Type": "image/png"})
                    if r is not None and r.status_code == 200:
                        self.ids.append(r.json()["image_id"])
                elif roll < 0.85:
                    stream = rng.random() < 0.2
                    body = {"image_id": rng.choice(self.ids), "question": rng.choice(QUESTIONS),
                            "max_tokens": rng.randint(1, 16), "stream": stream}
                    r = await self._request(client, "POST /v1/questions" + (" (stream)" if stream else ""), "POST",
                                            "/v1/questions", json=body, stream=stream)
                elif roll < 0.95:
                    r = await self._request(client, "GET /v1/images/{id}", "GET", f"/v1/images/{rng.choice(self.ids)}")
                else:
                    r = await self._request(client, "GET /v1/images/{id}/embeddings", "GET",
                                            f"/v1/images/{rng.choice(self.ids)}/embeddings")
                if r is not None and r.status_code == 503:
                    await asyncio.sleep(min(float(r.headers.get("retry-after", 1)), 1.0))

    async def run(self, server_pid: int | None = None, redis_pid: int | None = None) -> Report:
        rss: dict[str, float] = {}
        redis_rss: dict[str, float] = {}

        def sample(label: str) -> None:
            if server_pid:
                rss[label] = round(rss_bytes(server_pid) / 2**20, 1)
            if redis_pid:
                redis_rss[label] = round(rss_bytes(redis_pid) / 2**20, 1)

        async def sampler(deadline: float) -> None:
            await asyncio.sleep(self.duration_s / 2)
            sample("middle")
            peak = 0.0
            while time.monotonic() < deadline:
                if server_pid:
                    peak = max(peak, rss_bytes(server_pid) / 2**20)
                await asyncio.sleep(0.5)
            rss["peak_second_half"] = round(peak, 1)

        sample("start")
        self.t0 = time.monotonic()
        deadline = self.t0 + self.duration_s
        tasks = [asyncio.create_task(self._client(i, deadline)) for i in range(self.clients)]
        watcher = asyncio.create_task(sampler(deadline))
        await asyncio.gather(*tasks, watcher)
        wall = time.monotonic() - self.t0
        sample("end")
        return self.report(wall, rss, redis_rss)

    def report(self, wall_s: float, rss: dict[str, float], redis_rss: dict[str, float]) -> Report:
        rep = Report(self.clients, round(wall_s, 2), rss_mb=rss, redis_rss_mb=redis_rss)
        rep.requests = len(self.results)
        answered = [r for r in self.results if r.status is not None]
        rep.responses = len(answered)
        rep.lost = rep.requests - rep.responses
        rep.lost_examples = [f"{r.endpoint}: {r.error}" for r in self.results if r.status is None][:10]
        rep.requests_per_s = round(rep.requests / wall_s, 1)
        rep.by_status = {str(k): v for k, v in sorted(Counter(r.status for r in answered).items())}
        rep.unavailable_503 = sum(1 for r in answered if r.status == 503)
        rep.unavailable_503_without_retry_after = sum(1 for r in answered if r.status == 503 and not r.retry_after)
        rep.server_errors = sum(1 for r in answered if r.status >= 500 and r.status != 503)
        groups: dict[str, list[Result]] = defaultdict(list)
        for r in answered:
            groups[r.endpoint].append(r)
        for endpoint, rs in sorted(groups.items()):
            lat = sorted(r.latency_s * 1000 for r in rs)
            rep.by_endpoint[endpoint] = {
                "requests": len(rs),
                "statuses": {str(k): v for k, v in sorted(Counter(r.status for r in rs).items())},
                "p50_ms": round(statistics.median(lat), 1),
                "p99_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1),
                "max_ms": round(lat[-1], 1),
            }
        return rep


QUESTIONS = ["What is in this picture?", "How many people are there?", "Describe the image in detail.",
             "Is it day or night?", "What colour is the car?", "Answer briefly: yes or no."]


def print_report(rep: Report) -> None:
    print(f"\n{rep.clients} clients for {rep.duration_s} s: {rep.requests} requests ({rep.requests_per_s}/s), "
          f"{rep.responses} responses, {rep.lost} lost")
    print(f"statuses: {rep.by_status}; 503: {rep.unavailable_503} "
          f"(without Retry-After: {rep.unavailable_503_without_retry_after}); other 5xx: {rep.server_errors}")
    print(f"{'endpoint':36} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  statuses")
    for endpoint, row in rep.by_endpoint.items():
        print(f"{endpoint:36} {row['requests']:8d} {row['p50_ms']:8.1f} {row['p99_ms']:8.1f} {row['max_ms']:8.1f}  "
              f"{row['statuses']}")
    print(f"server RSS MB: {rep.rss_mb}; embedded Redis RSS MB: {rep.redis_rss_mb}")


def run(clients: int, duration_s: float, model: Path | None = None, workdir: Path | None = None,
        extra_args: tuple[str, ...] = (), seed: int = 0) -> Report:
    """Start the server, drive it, stop it; the report (raises if the server does not start or stop cleanly)."""
    sys.path.insert(0, str(ROOT))
    from service.tiny import make_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="splitvl-load-") as tmp:
        work = workdir or Path(tmp)
        if model is None:
            model = make_tiny_checkpoint(work / "tiny", seed=0)
        server = Server(model, work / "server.log", *extra_args)
        try:
            server.wait_ready()
            driver = Driver(server.url, clients, duration_s, seed=seed)
            # warm up (first-call allocations) before the start sample
            with httpx.Client(base_url=server.url, timeout=60) as client:
                image_id = client.post("/v1/images", content=driver.pool[0],
                                       headers={"Content-Type": "image/png"}).json()["image_id"]
                client.post("/v1/questions", json={"image_id": image_id, "question": "hi", "max_tokens": 4})
            report = asyncio.run(driver.run(server.pid, server.redis_pid()))
        finally:
            code = server.stop()
        if code != 0:
            raise RuntimeError(f"server exited with {code}: {(work / 'server.log').read_text()[-3000:]}")
        return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: a tiny random one)")
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-rss-growth-mb", type=float, default=100.0,
                        help="fail when the server's RSS grows more than this in the second half")
    parser.add_argument("server_args", nargs="*", help="extra `splitvl serve all` flags, after --")
    args = parser.parse_args(argv)
    report = run(args.clients, args.duration, args.model, extra_args=tuple(args.server_args), seed=args.seed)
    print_report(report)
    if args.out:
        args.out.write_text(json.dumps(asdict(report), indent=2))
    problems = report.ok(args.max_rss_growth_mb)
    for p in problems:
        print(f"FAIL: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
