"""End to end on the GPU: `POST /v1/images` under concurrent clients vs the tower alone.

Builds a visual-only checkpoint with the Qwen2-VL-2B vision config (random bf16 weights, only
``visual.*`` tensors on disk: the vision worker needs nothing else), measures the patched tower's
images/s in this process, then starts ``splitvl serve vision`` as a subprocess with an embedded
Redis and drives it with N concurrent asyncio clients posting distinct 448x448 JPEGs.

    python bench/vision_e2e_bench.py --clients 16 --requests 1200 --out results.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VISION_2B = {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16, "mlp_ratio": 4,
             "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
             "hidden_act": "quick_gelu"}


def make_checkpoint(path: Path) -> Path:
    from safetensors.torch import save_file
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    from service.tiny import perturb_, preprocessor_config

    config = Qwen2VLConfig(vision_config=VISION_2B, text_config={"hidden_size": 1536, "num_hidden_layers": 1,
                                                                  "num_attention_heads": 12, "num_key_value_heads": 2,
                                                                  "intermediate_size": 8960, "vocab_size": 151936})
    config.save_pretrained(path)
    tower = Qwen2VisionTransformerPretrainedModel._from_config(config.vision_config)
    perturb_(tower, seed=0)
    save_file({f"visual.{k}": v.to(torch.bfloat16).contiguous() for k, v in tower.state_dict().items()},
              path / "model.safetensors", metadata={"format": "pt"})
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(3136, 12845056)))
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


def cuda_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def tower_alone(path: Path, images: list[bytes]) -> dict:
    from service.vision.encoder import VisionEncoder

    enc = VisionEncoder(path, device="cuda", dtype=torch.bfloat16)
    ref = VisionEncoder(path, device="cuda", dtype=torch.float32, use_kernels=False)
    out: dict = {}
    patches = [enc.preprocess(d) for d in images[:32]]
    for n in (1, 16, 32):
        batch = patches[:n]
        for _ in range(3):
            enc.forward(batch)
        ms = cuda_ms(lambda b=batch: enc.forward(b), 10)
        out[f"tower_{n}_ms"] = ms
        out[f"tower_{n}_img_s"] = n / ms * 1000
    ms = cuda_ms(lambda: enc.preprocess(images[0]), 20)
    out["preprocess_1_ms"] = ms
    (ours,) = enc.forward(patches[:1])
    (want,) = ref.forward([ref.preprocess(images[0])])
    out["rel_l2_vs_fp32_unpatched"] = float((ours.float() - want).norm() / want.norm())
    enc.tower, ref.tower = None, None  # free the device before the server starts
    torch.cuda.empty_cache()
    return out


def profile_worker(path: Path, images: list[bytes], clients: int, out_dir: Path | None) -> dict:
    """The vision worker in this process (no HTTP), sequential then concurrent, with host wall times."""
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



async def drive(url: str, images: list[bytes], clients: int) -> tuple[float, list[float], dict[int, int]]:
    import httpx

    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for d in images:
        queue.put_nowait(d)
    latencies: list[float] = []
    statuses: dict[int, int] = {}

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            data = queue.get_nowait()
            t = time.perf_counter()
            r = await http.post("/v1/images", content=data, headers={"Content-Type": "image/jpeg"})
            latencies.append((time.perf_counter() - t) * 1000)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return time.perf_counter() - t0, latencies, statuses


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=1200)
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", action="store_true", help="profile the worker in-process instead of HTTP")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="splitvl-e2e-"))
    path = make_checkpoint(work / "qwen2vl-2b-visual")
    images = jpegs(args.requests + 64)
    result = {"gpu": torch.cuda.get_device_name(), "clients": args.clients, "requests": args.requests}
    result.update(tower_alone(path, images))
    print(json.dumps(result, indent=1), flush=True)
    if args.profile:
        result.update(profile_worker(path, images, args.clients, Path(args.out).parent if args.out else None))
        print(json.dumps(result, indent=1), flush=True)
        return

    from service.embedded_redis import EmbeddedRedis
    from service.ports import free_port

    port = free_port()
    with EmbeddedRedis() as redis:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "service.cli", "serve", "vision", "--model", str(path), "--redis-url",
               redis.url, "--port", str(port), "--device", "cuda", "--dtype", "bfloat16", "--max-queue", "1024",
               "--log-level", "warning"]
        log = open(work / "server.log", "w")  # noqa: SIM115
        server = subprocess.Popen(cmd, env={**env, "SPLITVL_PREPROCESS_THREADS": "8"}, stdout=log,
                                  stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            import httpx

            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 180
            while True:
                if server.poll() is not None:
                    raise RuntimeError((work / "server.log").read_text()[-3000:])
                try:
                    if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("server not ready")
                time.sleep(0.5)
            asyncio.run(drive(url, images[-64:], args.clients))  # warm-up: graphs, allocator, connections
            one = []
            for d in images[:20]:
                t = time.perf_counter()
                httpx.post(url + "/v1/images", content=d, headers={"Content-Type": "image/jpeg"}, timeout=60)
                one.append((time.perf_counter() - t) * 1000)
            result["http_1_image_ms_p50"] = statistics.median(one)
            elapsed, lat, statuses = asyncio.run(drive(url, images[20:args.requests], args.clients))
            n = args.requests - 20
            result.update({"e2e_img_s": n / elapsed, "e2e_p50_ms": statistics.median(lat),
                           "e2e_p99_ms": float(np.percentile(lat, 99)), "statuses": statuses})
            result["e2e_vs_tower_32"] = result["e2e_img_s"] / result["tower_32_img_s"]
            result["e2e_vs_tower_16"] = result["e2e_img_s"] / result["tower_16_img_s"]
            metrics = httpx.get(url + "/metrics", timeout=5).text
            result["batch_size_metrics"] = [line for line in metrics.splitlines()
                                            if line.startswith("splitvl_batch_size_sum")
                                            or line.startswith("splitvl_batch_size_count")]
        finally:
            server.terminate()
            server.wait(timeout=30)
            log.close()
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
