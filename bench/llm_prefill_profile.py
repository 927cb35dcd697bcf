"""Where a batched question prefill spends its device time, kernel by kernel (GPU).

The admission of many questions on seen images is one fused prefill of ``--rows`` rows of
``--tokens`` tokens each, after a cached prefix of ``--prefix`` tokens (attention window: the next
power of two). This runs that prefill eagerly under ``torch.profiler`` (the same kernels a CUDA
graph replays) on the Qwen2-VL-2B language model with random weights, and prints the kernels by
total device time, plus the replayed graph's wall time for comparison.

    python bench/llm_prefill_profile.py --rows 32 --tokens 32 --prefix 271
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import llm_bench  # noqa: E402  (bench/ is on sys.path when this script runs)

from service.llm.cuda_graphs import PrefillRow, PrefillRunner  # noqa: E402
from service.llm.model import TextConfig, allocate_kv_cache, prefill_fused_at, random_model  # noqa: E402

# the benchmark's 2B shapes, with the rope and norm settings its checkpoint writes
TEXT_2B = {**llm_bench.TEXT_2B, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 32768,
           "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prefix", type=int, default=271)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    cfg = TextConfig.from_dict(TEXT_2B)
    lm = random_model(cfg, device=device, dtype=dtype)
    kv = allocate_kv_cache(cfg, args.rows, 1024, device=device, dtype=dtype)
    kv.normal_()
    runner = PrefillRunner(lm, kv, use_graphs=True)
    rows = [PrefillRow(list(range(100, 100 + args.tokens)),
                       torch.arange(args.prefix, args.prefix + args.tokens).expand(3, -1), slot, args.prefix, None)
            for slot in range(args.rows)]
    shape = runner.shape(rows, logits=True)
    out: dict = {"gpu": torch.cuda.get_device_name(), "shape": str(shape)}

    with torch.inference_mode():
        for _ in range(3):
            runner.run(prefill_fused_at, rows)
        torch.cuda.synchronize()
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            runner.run(prefill_fused_at, rows)[1].tolist()  # type: ignore[union-attr]
            times.append((time.perf_counter() - t0) * 1e3)
        out["graph_wall_ms_median"] = sorted(times)[len(times) // 2]

        meta = runner._host_meta(rows, shape).to(device)
        ids, pos, at, _, slots, _ = runner._split(meta, shape.rows, shape.tokens)

        def eager() -> None:
            x = lm.embed(ids)
            prefill_fused_at(lm, kv, x, pos, slots, at, shape.window, causal=shape.causal)

        for _ in range(3):
            eager()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                eager()
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.self_device_time_total for e in events) / 5 / 1e3
    out["device_ms_per_prefill"] = round(total, 3)
    out["kernels"] = [{"name": e.key[:90], "calls": e.count // 5,
                       "ms": round(e.self_device_time_total / 5 / 1e3, 3)} for e in events[: args.top]]
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
