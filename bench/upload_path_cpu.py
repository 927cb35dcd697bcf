"""The vision worker's upload request path on the CPU: HTTP + Redis work per upload, no model.

    PYTHONPATH=. python bench/upload_path_cpu.py [--runs 3] [--duration 8] [--clients 16] \\
        [--code DIR ...] [--out upload.json] [--profile DIR]

Runs the real vision app (``create_app(settings, "vision")``: routes, worker, batcher, feature
store) under uvicorn (uvloop + httptools, as ``splitvl serve vision``) in a child process, against
a real ``redis-server`` on loopback TCP (as in ``compose.yaml``). Only the encoder is a stand-in,
defined here: its preprocessing decodes nothing and its forward returns one fixed [256, 1536]
bfloat16 tensor (Qwen2-VL-2B's embeddings of a 448x448 image), so what is measured is what the
host does around the GPU per upload: read the body, hash it, the Redis round trips, serialising
and checksumming ~786 KB of embeddings, the JSON answer.

Each run, for each ``--code`` tree in turn (the tree the server imports ``service`` from, default
this checkout; alternate an old and a new tree to compare them in one session), measures two
phases of ``--duration`` seconds with ``--clients`` concurrent httpx connections posting raw
``image/jpeg`` bodies:

- ``new``: every upload is a different image (a ~45 KB JPEG with a unique trailer): a miss, the
  lock, the stand-in forward, the store;
- ``repeat``: uploads cycle over 16 images stored beforehand: one lookup each.

Reported per tree and phase, as the median over runs: uploads/s, the request latency p50 and p90
(client side), the server's and redis-server's CPU time per upload (``/proc/PID/stat``: the
number that does not depend on how the 2 cores are shared with the client), and the server's own
phase durations (``Server-Timing``) p50. Redis runs with ``maxmemory 2gb`` + LRU (the new phase
writes ~300 MB/s) and is emptied before each phase.

With ``--profile DIR`` the server's event-loop thread runs under cProfile during each measured phase
(and only then): ``DIR/{tree}-{run}-{phase}.prof``, for ``python -m pstats``. cProfile slows the
server several-fold: the CPU numbers of a profiled run say nothing, only the profile's proportions do.

A baseline tree for comparison: ``git archive COMMIT | tar -x -C /tmp/base`` and ``--code /tmp/base
--code .``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HIDDEN, TOKENS, GRID = 1536, 256, (1, 32, 32)  # Qwen2-VL-2B, 448x448: 32x32 patches, 2x2 merge
REPEAT_POOL = 16


# -- the server (child process) ------------------------------------------------------------------


class StandInEncoder:
    """What the vision worker needs of ``VisionEncoder``, with no model: every image is 448x448 and
    its embeddings are one fixed tensor (the worker never writes into them)."""

    spatial_merge_size = 2
    hidden_size = HIDDEN
    deepstack_layers = 0
    fingerprint = "standin2b"
    model_key = "standin-2b"

    def __init__(self) -> None:
        import torch

        self.embeds = torch.randn(1, TOKENS, HIDDEN).to(torch.bfloat16)  # an image's features [K, n, D]
        self._empty = torch.empty(0)

    def warmup(self, max_patches: int) -> None:
        pass

    def preprocess(self, data: bytes, limits: Any = None) -> Any:
        from service.vision.encoder import Patches

        return Patches(pixel_values=self._empty, grid_thw=GRID)

    def launch(self, batch: list[Any]) -> list[Any]:
        return batch

    def finish(self, batch: list[Any]) -> list[Any]:
        return [self.embeds for _ in batch]


def profile_on_signal(prefix: str) -> None:
    """Each SIGUSR1 starts a fresh cProfile of this (the event loop's) thread, or stops the running one
    and writes it to ``{prefix}{n}.prof``: the parent brackets each measured phase with two signals."""
    import cProfile
    import signal

    state: dict[str, Any] = {"profiler": None, "n": 0}

    def toggle(signum: int, frame: Any) -> None:
        profiler = state["profiler"]
        if profiler is None:
            state["profiler"] = profiler = cProfile.Profile()
            profiler.enable()
            return
        profiler.disable()
        profiler.dump_stats(f"{prefix}{state['n']}.prof")
        state["profiler"], state["n"] = None, state["n"] + 1

    signal.signal(signal.SIGUSR1, toggle)


def serve(port: int, redis_url: str, log_level: str, profile: str | None = None) -> None:
    import uvicorn

    from service.app import create_app
    from service.config import Settings
    from service.logs import configure_logging

    settings = Settings(model="standin-2b", redis_url=redis_url, device="cpu", log_level=log_level,
                        host="127.0.0.1", port=port)
    configure_logging(settings.log_level, settings.log_format, show_pid=False)
    app = create_app(settings, "vision", workers={"vision_encoder": StandInEncoder()})
    if profile:
        profile_on_signal(profile)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level=log_level, log_config=None, access_log=False)


# -- processes -----------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """This script's ``serve`` in a child process that imports ``service`` from ``code``."""

    def __init__(self, code: Path, redis_url: str, log: Path, log_level: str, profile: str | None = None) -> None:
        from service.ports import free_port, wait_until_ready

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = log.open("w")
        env = {**os.environ, "PYTHONPATH": str(code), "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "serve", "--port", str(self.port), "--redis-url", redis_url,
             "--log-level", log_level, *(["--profile", profile] if profile else [])], cwd=code, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        wait_until_ready(self.url, self.proc, 120, lambda: log.read_text(errors="replace")[-3000:])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


# -- the load ------------------------------------------------------------------------------------


def base_jpeg() -> bytes:
    """A 448x448 JPEG of a photo's size (~45 KB): a smooth gradient with some noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:448, 0:448]
    rgb = np.stack([x * 255 / 447, y * 255 / 447, (x + y) * 255 / 894], axis=-1)
    rgb = np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@dataclass
class Phase:
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    cached: dict[bool, int] = field(default_factory=lambda: defaultdict(int))
    timings: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    server_cpu_s: float = 0.0
    redis_cpu_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        n = len(self.latencies_ms)
        lat = sorted(self.latencies_ms)
        return {
            "uploads": n, "uploads_per_s": n / self.seconds,
            "latency_p50_ms": statistics.median(lat), "latency_p90_ms": lat[int(0.9 * (n - 1))],
            "server_cpu_us_per_upload": self.server_cpu_s / n * 1e6,
            "redis_cpu_us_per_upload": self.redis_cpu_s / n * 1e6,
            "server_timing_p50_ms": {k: statistics.median(v) for k, v in self.timings.items()},
            "statuses": dict(self.statuses), "cached": {str(k): v for k, v in self.cached.items()},
        }


def note(phase: Phase, started: float, response: Any) -> None:
    phase.latencies_ms.append((time.perf_counter() - started) * 1000)
    phase.statuses[response.status_code] += 1
    if response.status_code == 200:
        phase.cached[bool(response.json()["cached"])] += 1
    for part in filter(None, (p.strip() for p in response.headers.get("server-timing", "").split(","))):
        name, _, dur = part.partition(";dur=")
        phase.timings[name].append(float(dur))


async def drive(url: str, bodies: Any, clients: int, duration_s: float, pids: tuple[int, int],
                profile: bool = False) -> Phase:
    """``clients`` connections posting ``next(bodies)`` until ``duration_s`` has passed; with ``profile``
    the server (``pids[0]``) is signalled to profile the measured interval."""
    import httpx

    phase = Phase()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"Content-Type": "image/jpeg"}
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        async def client() -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                note(phase, started, await http.post("/v1/images", content=next(bodies), headers=headers))

        # open the connections first: the measured phase starts with all of them warm
        await asyncio.gather(*(http.get("/healthz") for _ in range(clients)))
        if profile:
            os.kill(pids[0], signal.SIGUSR1)
        cpu = [cpu_seconds(p) for p in pids]
        began = time.perf_counter()
        deadline = began + duration_s
        await asyncio.gather(*(client() for _ in range(clients)))
        phase.seconds = time.perf_counter() - began
        phase.server_cpu_s, phase.redis_cpu_s = (cpu_seconds(p) - c for p, c in zip(pids, cpu, strict=True))
        if profile:
            os.kill(pids[0], signal.SIGUSR1)
    return phase


def unique_bodies(base: bytes, tag: str) -> Any:
    """Endless distinct uploads: bytes after the JPEG's end marker change the id, not the image."""
    return (base + f"{tag}:{i}".encode() for i in itertools.count())


async def measure(url: str, redis_url: str, base: bytes, tag: str, args: argparse.Namespace,
                  pids: tuple[int, int]) -> dict[str, Any]:
    import httpx
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(redis_url)
    out = {}
    await r.flushall()
    # warm the server's code paths and connections before measuring
    await drive(url, unique_bodies(base, f"warm-{tag}"), args.clients, 1.0, pids)
    await r.flushall()
    profile = args.profile is not None
    out["new"] = (await drive(url, unique_bodies(base, tag), args.clients, args.duration, pids, profile)).summary()
    await r.flushall()
    pool = [base + f"{tag}:repeat:{i}".encode() for i in range(REPEAT_POOL)]
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        for body in pool:
            (await http.post("/v1/images", content=body, headers={"Content-Type": "image/jpeg"})).raise_for_status()
    out["repeat"] = (await drive(url, itertools.cycle(pool), args.clients, args.duration, pids, profile)).summary()
    await r.aclose()
    return out


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("uploads_per_s", "latency_p50_ms", "latency_p90_ms", "server_cpu_us_per_upload", "redis_cpu_us_per_upload")
    out: dict[str, Any] = {k: round(statistics.median(r[k] for r in runs), 1) for k in keys}
    out["all_uploads_per_s"] = [round(r["uploads_per_s"], 1) for r in runs]
    out["all_server_cpu_us_per_upload"] = [round(r["server_cpu_us_per_upload"]) for r in runs]
    phases = {name for r in runs for name in r["server_timing_p50_ms"]}
    out["server_timing_p50_ms"] = {name: round(statistics.median(r["server_timing_p50_ms"].get(name, 0.0)
                                                                 for r in runs), 3) for name in sorted(phases)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per phase")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--code", type=Path, action="append", help="tree the server imports service from "
                        "(repeat to alternate several); default this checkout")
    parser.add_argument("--log-level", default="info", help="the server's (info: an access line per request)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--profile", type=Path, help="write cProfile stats of each measured phase here "
                        "(the server's CPU numbers are then meaningless)")
    args = parser.parse_args()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    trees = [p.resolve() for p in (args.code or [ROOT])]
    base = base_jpeg()
    results: dict[str, list[dict[str, Any]]] = defaultdict(list)
    from service.embedded_redis import EmbeddedRedis
    from service.ports import free_port

    # over loopback TCP, as compose's workers reach their Redis; LRU: the new phase writes ~300 MB/s
    with tempfile.TemporaryDirectory(prefix="upload-bench-") as tmp, \
            EmbeddedRedis(maxmemory="2gb", tcp_port=free_port()) as redis_server:
        redis_url = redis_server.url
        assert redis_server.proc is not None
        for run, (i, tree) in itertools.product(range(args.runs), enumerate(trees)):
            # the server numbers its profiles in phase order: 0 new, 1 repeat
            profile = str(args.profile.resolve() / f"{i}-{run}-") if args.profile else None
            server = Server(tree, redis_url, Path(tmp) / f"server-{i}-{run}.log", args.log_level, profile)
            try:
                got = asyncio.run(measure(server.url, redis_url, base, f"{i}-{run}", args,
                                          (server.proc.pid, redis_server.proc.pid)))
            finally:
                server.stop()
            label = f"{i}:{tree}"
            results[label].append(got)
            print(f"run {run} {label}: " + ", ".join(
                f"{ph} {got[ph]['uploads_per_s']:.0f}/s p50 {got[ph]['latency_p50_ms']:.1f} ms "
                f"server {got[ph]['server_cpu_us_per_upload']:.0f} us/upload "
                f"redis {got[ph]['redis_cpu_us_per_upload']:.0f} us/upload "
                f"statuses {got[ph]['statuses']}" for ph in ("new", "repeat")), flush=True)
    summary = {label: {ph: median_of([r[ph] for r in runs]) for ph in ("new", "repeat")}
               for label, runs in results.items()}
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "median_over_runs": summary, "runs": results}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve_args = argparse.ArgumentParser()
        serve_args.add_argument("cmd")
        serve_args.add_argument("--port", type=int, required=True)
        serve_args.add_argument("--redis-url", required=True)
        serve_args.add_argument("--log-level", default="info")
        serve_args.add_argument("--profile")
        a = serve_args.parse_args()
        serve(a.port, a.redis_url, a.log_level, a.profile)
    else:
        main()
