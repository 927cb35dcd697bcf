"""End to end on the GPU: `POST /v1/images` under concurrent clients vs the tower alone.

Builds a visual-only checkpoint with the Qwen2-VL-2B vision config (random bf16 weights, only
``visual.*`` tensors on disk: the vision worker needs nothing else), measures the patched tower's
images/s in this process, then, for each N of ``--workers``, starts ``splitvl serve vision
--workers N`` as a subprocess with its own embedded Redis and drives it with ``--clients``
concurrent connections spread over ``--client-procs`` client processes (one client process's
own host work would cap the rate it can offer), posting distinct 448x448 JPEGs.

    python bench/vision_e2e_bench.py --clients 16 --requests 1200 --workers 1,2,3 --out results.json
    python bench/vision_e2e_bench.py --smoke      # the whole flow on the CPU with a tiny checkpoint

The server logs at info level (one access line per request, as compose runs it): the bench reads
its startup lines to wait until all N processes serve.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VISION_2B = {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16, "mlp_ratio": 4,
             "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
             "hidden_act": "quick_gelu"}


def make_checkpoint(path: Path) -> Path:
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    from service.models import family
    from service.tiny import perturb_

    config = Qwen2VLConfig(vision_config=VISION_2B, text_config={"hidden_size": 1536, "num_hidden_layers": 1,
                                                                  "num_attention_heads": 12, "num_key_value_heads": 2,
                                                                  "intermediate_size": 8960, "vocab_size": 151936})
    config.save_pretrained(path)
    tower = Qwen2VisionTransformerPretrainedModel._from_config(config.vision_config)
    perturb_(tower, seed=0)
    save_file({f"visual.{k}": v.to(torch.bfloat16).contiguous() for k, v in tower.state_dict().items()},
              path / "model.safetensors", metadata={"format": "pt"})
    published = family("qwen2_vl").published_preprocess
    (path / "preprocessor_config.json").write_text(
        json.dumps(family("qwen2_vl").tiny_preprocessor(published.min_pixels, published.max_pixels)))
    return path


def jpegs(n: int, side: int = 448) -> list[bytes]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = []
    for i in range(n):
        img = base.copy()
        img[i % side, :, i % 3] = rng.integers(0, 256, side, dtype=np.uint8)  # distinct bytes, distinct ids
        img[:, (i * 7) % side, (i + 1) % 3] = i % 256
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def device_ms(fn, reps: int, device: str) -> float:
    """Median time of ``fn``: CUDA events on the GPU, the wall clock on the CPU."""
    import torch

    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def tower_alone(path: Path, images: list[bytes], device: str = "cuda") -> dict:
    import torch

    from service.vision.encoder import VisionEncoder

    enc = VisionEncoder(path, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    ref = VisionEncoder(path, device=device, dtype=torch.float32, use_kernels=False)
    out: dict = {}
    patches = [enc.ready(enc.preprocess(d)) for d in images[:32]]  # the tower alone: patches on the device
    for n in (1, 2, 4, 16, 32):  # up to graph_max_images (8): CUDA graphs on the GPU
        batch = patches[:n]
        for _ in range(3):
            enc.forward(batch)
        ms = device_ms(lambda b=batch: enc.forward(b), 10, device)
        out[f"tower_{n}_ms"] = ms
        out[f"tower_{n}_img_s"] = n / ms * 1000
    ms = device_ms(lambda: enc.ready(enc.preprocess(images[0])), 20, device)  # decode + patchify
    out["preprocess_1_ms"] = ms
    (ours,) = enc.forward(patches[:1])
    (want,) = ref.forward([ref.preprocess(images[0])])
    out["rel_l2_vs_fp32_unpatched"] = float((ours.float() - want).norm() / want.norm())
    enc.tower, ref.tower = None, None  # free the device before the server starts
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def profile_worker(path: Path, images: list[bytes], clients: int, out_dir: Path | None) -> dict:
    """The vision worker in this process (no HTTP), sequential then concurrent, with host wall times."""
    import torch

    from service.config import Settings
    from service.embedded_redis import EmbeddedRedis
    from service.metrics import Metrics
    from service.store import FeatureStore
    from service.vision.worker import VisionWorker

    result: dict = {}

    async def run(url: str) -> None:
        settings = Settings(model=str(path), redis_url=url, device="cuda", dtype="bfloat16", preprocess_threads=8,
                            max_queue=1024)
        worker = VisionWorker(settings, FeatureStore(url), Metrics())
        await worker.start()
        for d in images[:32]:
            await worker.encode(d)
        seq = []
        for d in images[32:64]:
            t = time.perf_counter()
            await worker.encode(d)
            seq.append((time.perf_counter() - t) * 1000)
        result["worker_1_image_ms_p50"] = statistics.median(seq)
        try:
            from pyinstrument import Profiler
        except ImportError:
            Profiler = None  # noqa: N806
        profiler = Profiler(async_mode="enabled") if Profiler else None
        if profiler:
            profiler.start()
        batch = images[64:64 + 16 * 20]
        t = time.perf_counter()
        sem = asyncio.Semaphore(clients)

        async def one(d: bytes) -> None:
            async with sem:
                await worker.encode(d)

        await asyncio.gather(*(one(d) for d in batch))
        result["worker_concurrent_img_s"] = len(batch) / (time.perf_counter() - t)
        if profiler:
            profiler.stop()
            text = profiler.output_text(unicode=False, color=False)
            if out_dir:
                (out_dir / "worker_profile.txt").write_text(text)
            print(text[:8000])
        # the forward's host wall time vs its device time
        patches = [worker.encoder.preprocess(d) for d in images[:16]]
        for n in (1, 4, 16):
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(5):
                worker.encoder.forward(patches[:n])
            torch.cuda.synchronize()
            result[f"forward_{n}_host_ms"] = (time.perf_counter() - t) / 5 * 1000
        t = time.perf_counter()
        for d in images[:16]:
            worker.encoder.preprocess(d)
        result["preprocess_host_ms"] = (time.perf_counter() - t) / 16 * 1000
        await worker.stop()

    with EmbeddedRedis() as redis:
        asyncio.run(run(redis.url))
    return result



Record = tuple[float, float, int, dict[str, float]]


def phases(server_timing: str) -> dict[str, float]:
    """``read;dur=0.12, hash;dur=0.05, ...`` -> {"read": 0.12, ...} (ms)."""
    out = {}
    for part in filter(None, (p.strip() for p in server_timing.split(","))):
        name, _, dur = part.partition(";dur=")
        out[name] = float(dur)
    return out


async def drive(url: str, images: list[bytes], clients: int) -> list[Record]:
    """Post every image, ``clients`` at a time; (start, end, status, server phases in ms) of each
    request, on the monotonic clock (system-wide on Linux: comparable between client processes).
    Status 0: no answer."""
    import httpx

    todo: asyncio.Queue[bytes] = asyncio.Queue()
    for d in images:
        todo.put_nowait(d)
    records: list[Record] = []

    async def client(http: httpx.AsyncClient) -> None:
        while not todo.empty():
            data = todo.get_nowait()
            t = time.monotonic()
            timing: dict[str, float] = {}
            try:
                r = await http.post("/v1/images", content=data, headers={"Content-Type": "image/jpeg"})
                status = r.status_code
                timing = phases(r.headers.get("server-timing", ""))
            except httpx.HTTPError:
                status = 0
            records.append((t, time.monotonic(), status, timing))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return records


def client_process(url: str, images: list[bytes], clients: int, start: Any, out: Any) -> None:
    """One client process: its share of the images over its share of the connections."""
    start.wait()  # every client process starts posting at once
    out.put(asyncio.run(drive(url, images, clients)))


def drive_processes(url: str, images: list[bytes], clients: int, procs: int) -> list[Record]:
    """``clients`` connections split evenly over ``procs`` spawned client processes, each with its
    own event loop (and GIL)."""
    procs = max(1, min(procs, clients, len(images)))
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=client_process, daemon=True,
                           args=(url, images[i::procs], clients // procs + (i < clients % procs), start, out))
               for i in range(procs)]
    for w in workers:
        w.start()
    records: list[Record] = []
    done = 0
    try:
        while done < procs:
            try:
                records += out.get(timeout=1)  # before join: a child blocks until its result is read
                done += 1
            except queue.Empty:
                if any(w.exitcode not in (None, 0) for w in workers):
                    raise RuntimeError("a client process failed (see above)") from None
    finally:
        for w in workers:
            w.join(timeout=10)
            if w.is_alive():
                w.kill()
    return records


def batch_totals(url: str) -> tuple[float, float, float]:
    """The vision worker's (jobs, forwards, GPU bytes allocated) from /metrics (all processes)."""
    import httpx

    wanted = {'splitvl_batch_size_sum{worker="vision"}': 0.0, 'splitvl_batch_size_count{worker="vision"}': 0.0,
              "splitvl_gpu_memory_bytes": 0.0}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in wanted:
            wanted[name] = float(value)
    jobs, forwards, gpu = wanted.values()
    return jobs, forwards, gpu


def wait_until_serving(server: subprocess.Popen[bytes], url: str, log: Path, processes: int,
                       timeout_s: float = 600) -> None:
    """/readyz answers, and all ``processes`` have logged their app's start (a process accepts
    connections only from then on: measuring earlier would measure fewer processes)."""
    from service.ports import wait_until_ready

    def all_started() -> bool:
        started = {json.loads(line).get("pid") for line in log.read_text(errors="replace").splitlines()
                   if line.startswith("{") and "Application startup complete" in line}
        return len(started) >= processes

    wait_until_ready(url, server, timeout_s, lambda: log.read_text(errors="replace")[-3000:], also=all_started,
                     poll_s=0.5)


def serve_and_measure(path: Path, workers: int, measured: list[bytes], single: list[bytes], warm: list[bytes],
                      args: argparse.Namespace, device: str, work: Path) -> dict:
    """Start ``serve vision --workers N`` (its own Redis: nothing cached from an earlier N), warm it
    up, time one image at a time, then the measured images under load; stop it."""
    import httpx

    from service.embedded_redis import EmbeddedRedis
    from service.ports import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    out: dict = {"workers": workers}
    log_path = work / f"server-{workers}.log"
    with EmbeddedRedis() as redis, log_path.open("wb") as log:
        cmd = [sys.executable, "-m", "service.cli", "serve", "vision", "--model", str(path), "--redis-url",
               redis.url, "--port", str(port), "--device", device, "--max-queue", "1024",
               "--workers", str(workers), "--log-level", "info", "--log-format", "json"]
        if device == "cuda":
            cmd += ["--dtype", "bfloat16"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "SPLITVL_PREPROCESS_THREADS": "8"}
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            wait_until_serving(server, url, log_path, workers)
            drive_processes(url, warm, args.clients, args.client_procs)  # graphs, allocator, connections
            one, one_phases = [], []
            for d in single:
                t = time.perf_counter()
                r = httpx.post(url + "/v1/images", content=d, headers={"Content-Type": "image/jpeg"}, timeout=60)
                one.append((time.perf_counter() - t) * 1000)
                one_phases.append(phases(r.headers.get("server-timing", "")))
            out["http_1_image_ms_p50"] = statistics.median(one)
            out["http_1_image_phase_ms_p50"] = {name: round(statistics.median(p[name] for p in one_phases), 2)
                                                for name in one_phases[0]}
            jobs0, forwards0, _ = batch_totals(url)
            records = drive_processes(url, measured, args.clients, args.client_procs)
            jobs1, forwards1, gpu = batch_totals(url)
        finally:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:  # never leave a GPU server behind for the next N
                server.kill()
                server.wait()
    lat = [(end - begin) * 1000 for begin, end, _, _ in records]
    statuses: dict[str, int] = {}
    names: dict[str, list[float]] = {}
    for _, _, status, timing in records:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        for name, ms in timing.items():
            names.setdefault(name, []).append(ms)
    out["server_phase_ms_p50"] = {name: round(statistics.median(v), 2) for name, v in names.items()}
    elapsed = max(end for _, end, _, _ in records) - min(begin for begin, _, _, _ in records)
    out.update({"e2e_img_s": len(records) / elapsed, "e2e_p50_ms": statistics.median(lat),
                "e2e_p99_ms": float(np.percentile(lat, 99)), "statuses": statuses,
                "mean_batch_size": (jobs1 - jobs0) / max(forwards1 - forwards0, 1),
                "gpu_memory_allocated_gib": gpu / 2**30})
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=16, help="concurrent connections in all")
    parser.add_argument("--client-procs", dest="client_procs", type=int, default=4,
                        help="client processes the connections are split over")
    parser.add_argument("--requests", type=int, default=1200, help="measured uploads for each N")
    parser.add_argument("--workers", default="1", help="comma-separated process counts, e.g. 1,2,3")
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", action="store_true", help="profile the worker in-process instead of HTTP")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, tiny random checkpoint, 20 measured images: checks the flow, not the speed")
    args = parser.parse_args()
    sweep = [int(n) for n in args.workers.split(",")]
    if args.smoke and args.profile:
        parser.error("--profile needs the GPU")

    work = Path(tempfile.mkdtemp(prefix="splitvl-e2e-"))
    if args.smoke:
        from service.tiny import make_tiny_checkpoint

        device, side, n_single, n_warm = "cpu", 112, 4, 8
        args.requests = 20
        args.clients, args.client_procs = min(args.clients, 4), min(args.client_procs, 2)
        path = make_tiny_checkpoint(work / "tiny")
        name = "cpu (smoke)"
    else:
        import torch

        device, side, n_single, n_warm = "cuda", 448, 20, 64
        path = make_checkpoint(work / "qwen2vl-2b-visual")
        name = torch.cuda.get_device_name()
    images = jpegs(args.requests + n_single + n_warm, side)
    measured, single = images[:args.requests], images[args.requests:args.requests + n_single]
    warm = images[args.requests + n_single:]
    result: dict = {"device": name, "clients": args.clients, "client_procs": args.client_procs,
                    "requests": args.requests}
    result.update(tower_alone(path, images, device))
    print(json.dumps(result, indent=1), flush=True)
    if args.profile:
        result.update(profile_worker(path, images, args.clients, Path(args.out).parent if args.out else None))
        print(json.dumps(result, indent=1), flush=True)
        return

    result["by_workers"] = {}
    for n in sweep:
        run = serve_and_measure(path, n, measured, single, warm, args, device, work)
        run["e2e_vs_tower_32"] = run["e2e_img_s"] / result["tower_32_img_s"]
        result["by_workers"][str(n)] = run
        print(json.dumps({str(n): run}), flush=True)
        if args.out:  # after every N: a run cut short keeps what it measured
            Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"\n{'workers':>7} {'img/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6} {'vs tower32':>10}  statuses")
    for n, run in result["by_workers"].items():
        print(f"{n:>7} {run['e2e_img_s']:8.1f} {run['e2e_p50_ms']:8.1f} {run['e2e_p99_ms']:8.1f} "
              f"{run['mean_batch_size']:6.2f} {run['e2e_vs_tower_32']:10.2f}  {run['statuses']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
