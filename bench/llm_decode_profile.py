"""Where a decode step spends its device time, kernel by kernel, replayed from its CUDA graph (GPU).

The engine's decode step (fused kernels, Triton decode attention) on the Qwen2-VL-2B language
model (or ``--model``, one of ``llm_families.MODELS``) with random bf16 weights, captured by ``DecodeRunner`` at each ``--batch`` with every row
at cache position ``--context``. For each batch it prints the median ms per step of back-to-back
replays (CUDA events, tokens copied to the host as the engine does), the kernels of the replayed
graph by device time per step, their sum, and the difference: the time the GPU spends between
kernels (launch latency inside the graph, ramp-up and tail of each kernel).

    python bench/llm_decode_profile.py --batch 1,32 --out $OUT/decode_profile.json
    python bench/llm_decode_profile.py --model qwen3_vl_2b --batch 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import llm_harness  # noqa: E402  (bench/ is on sys.path when this script runs)
from llm_families import MODELS, text_config  # noqa: E402

from service.llm.cuda_graphs import DecodeRunner  # noqa: E402
from service.llm.model import TextConfig, decode_step_fused, random_model  # noqa: E402


def step_ms(runner: DecodeRunner, fn: partial, batch: int, steps: int) -> list[float]:
    """ms of each of ``steps`` back-to-back replays, by CUDA events around each launch."""
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    events[0].record()
    for i in range(steps):
        runner.launch(fn, batch, runner.max_len)
        events[i + 1].record()
    torch.cuda.synchronize()
    return [events[i].elapsed_time(events[i + 1]) for i in range(steps)]


def profile_batch(lm: torch.nn.Module, batch: int, context: int, max_len: int, steps: int, top: int) -> dict:
    fn = partial(decode_step_fused, attention="triton")
    runner = llm_harness.decode_runner(lm, batch, max_len, graphs=True, window_buckets=False)
    out: dict = {"batch": batch, "context": context}
    with torch.inference_mode():
        # each round re-enters the slots at the same context, so every replay attends as far
        times: list[float] = []
        for _ in range(5):
            llm_harness.enter_slots(runner, context)
            step_ms(runner, fn, batch, 3)  # capture and warm up
            times += step_ms(runner, fn, batch, steps)
        out["ms_per_step_median"] = round(statistics.median(times), 4)
        out["ms_per_step_p10_p90"] = [round(q, 4) for q in statistics.quantiles(times, n=10)[::8]]
        llm_harness.enter_slots(runner, context)
        reps = 20
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step_ms(runner, fn, batch, reps)
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0 and "Memcpy" not in e.key]
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    busy = sum(e.self_device_time_total for e in kernels) / reps / 1e3
    out["kernels_per_step"] = round(sum(e.count for e in kernels) / reps, 1)
    out["kernel_ms_per_step"] = round(busy, 4)
    out["between_kernels_ms_per_step"] = round(out["ms_per_step_median"] - busy, 4)
    out["kernels"] = [{"name": e.key[:80], "per_step": round(e.count / reps, 1),
                       "us_each": round(e.self_device_time_total / e.count, 2),
                       "ms_per_step": round(e.self_device_time_total / reps / 1e3, 4)} for e in kernels[:top]]
    del runner
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2_vl_2b", choices=["qwen2_vl_2b", *MODELS])
    ap.add_argument("--batch", default="1,32", help="comma-separated batch sizes")
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--splits", type=int, default=None, help="decode attention's cache splits (default: its own)")
    ap.add_argument("--gate-up", default=None,
                    help="BLOCK_N,BLOCK_K,stages,warps of the fused gate/up kernel, or 'off' (cuBLAS + silu_mul)")
    ap.add_argument("--down", default=None,
                    help="parts,BLOCK_N,BLOCK_K,stages,warps of the split-K down projection")
    ap.add_argument("--o-parts", action="store_true",
                    help="the o projection split along K into the post-attention norm (model.SPLIT_O_PROJ)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.down is not None:  # a sweep, as for --splits
        from service.llm import gpu_ops
        pt, bn, bk, st, nw = (int(v) for v in args.down.split(","))
        gpu_ops.linear_parts.__kwdefaults__ = {"parts": pt, "block_n": bn, "block_k": bk, "num_stages": st,
                                               "num_warps": nw}
    if args.gate_up is not None:  # a sweep, as for --splits
        import torch.nn.functional as F

        from service.llm import gpu_ops
        if args.gate_up == "off":
            gpu_ops.gate_up_silu = lambda x, w: gpu_ops.silu_mul(F.linear(x, w))
        else:
            bn, bk, st, nw = (int(v) for v in args.gate_up.split(","))
            gpu_ops.gate_up_silu.__kwdefaults__ = {"block_n": bn, "block_k": bk, "num_stages": st, "num_warps": nw}
    if args.o_parts:
        from service.llm import model
        model.SPLIT_O_PROJ = True
    if args.splits is not None:  # a sweep: the engine never passes it, so set the function's default
        from service.llm import gpu_ops
        gpu_ops.decode_attention.__defaults__ = (args.splits,)
    if args.model == "qwen2_vl_2b":
        from llm_prefill_profile import TEXT_2B  # imports llm_bench: the HTTP stack and redis-py

        cfg = TextConfig.from_dict(TEXT_2B)
    else:
        cfg = text_config(args.model)
    lm = random_model(cfg, device=torch.device("cuda"), dtype=torch.bfloat16)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "model": args.model, "o_parts": args.o_parts, "splits": args.splits, "gate_up": args.gate_up, "down": args.down,
              "runs": [profile_batch(lm, int(b), args.context, args.max_len, args.steps, args.top)
                       for b in args.batch.split(",")]}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
