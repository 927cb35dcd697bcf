"""Per-kernel microbenchmarks of ``kernels/`` against PyTorch and Liger-Kernel (GPU).

    python bench/kernel_bench.py [--out DIR] [--quick]

Shapes are the Qwen2-VL-2B vision tower's (C = 1280, 16 heads x 80, MLP 5120) for 32 images of
448x448 (S = 32768 patches), one image (S = 1024) and 8 mixed sizes packed; ``windows`` and
``mlp25`` are Qwen2.5-VL's (attention within 112-px windows; the SwiGLU MLP with I = 3420). Also
measures the two ceilings (bf16 GEMM TFLOP/s and device-to-device copy GB/s) that vision_bench.py reports MFU
against. Prints one table; writes kernel_bench.json under --out.

``vision_bench.py`` imports the timing helpers from here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from service.preprocess import PreprocessConfig

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# 8 images from 224x224 to 1288x966 (h, w in pixels), resized by the family's processor
MIXED_SIZES = [(224, 224), (320, 480), (448, 448), (480, 640), (768, 1024), (720, 1280), (375, 500), (1288, 966)]


def processor(model_type: str = "qwen2_vl") -> PreprocessConfig:
    """The family's image processor settings (``service.models``) as its published checkpoints set them."""
    from service.models import family

    return family(model_type).published_preprocess


def smart_grid(h: int, w: int, cfg: PreprocessConfig) -> tuple[int, int, int]:
    """(t, h, w) patch grid of one image after the processor's resize, as the vision worker computes it."""
    from service.preprocess import target_size

    rh, rw = target_size(h, w, cfg)
    return (1, rh // cfg.patch_size, rw // cfg.patch_size)


def workloads(cfg: PreprocessConfig | None = None) -> dict[str, list[tuple[int, int, int]]]:
    """The three tower workloads, resized by ``cfg`` (default Qwen2-VL's: 448 x 448 is 32 x 32 patches)."""
    cfg = cfg or processor()
    one = smart_grid(448, 448, cfg)
    return {
        "32x448": [one] * 32,
        "1x448": [one],
        "mixed8": [smart_grid(h, w, cfg) for h, w in MIXED_SIZES],
    }


# ------------------------------------------------------------------------------------------ timing


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], Any], *, warmup: int = 2, min_reps: int = 5, max_reps: int = 200,
            budget_ms: float = 1500.0) -> dict[str, float]:
    """Median / min / spread of per-call device time (CUDA events around each call).

    For whole-tower calls (milliseconds to hundreds of ms) where per-call events are accurate;
    the rep count adapts so each measurement costs about ``budget_ms``.
    """
    for _ in range(warmup):
        fn()
    sync()
    if not torch.cuda.is_available():  # smoke runs on CPU
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        return {"median_ms": ms, "min_ms": ms, "p90_ms": ms, "reps": 1}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    sync()
    est = max(start.elapsed_time(end), 1e-3)
    reps = int(min(max_reps, max(min_reps, budget_ms / est)))
    evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in evs:
        a.record()
        fn()
        b.record()
    sync()
    times = sorted(a.elapsed_time(b) for a, b in evs)
    return {"median_ms": statistics.median(times), "min_ms": times[0],
            "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))], "reps": reps}


def bench_kernel(fn: Callable[[], Any]) -> float:
    """Median ms of a short kernel: triton's do_bench (flushes L2 between reps)."""
    if not torch.cuda.is_available():
        return time_ms(fn)["median_ms"]
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def gemm_peak_tflops() -> float:
    """bf16 8192^3 GEMM through cuBLAS on random data: the MFU denominator."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = bench_kernel(lambda: a @ b)
    return 2 * n**3 / ms / 1e9


def copy_gbps() -> float:
    x = torch.empty(1 << 29, device="cuda", dtype=torch.uint8).random_()  # 512 MiB
    y = torch.empty_like(x)
    ms = bench_kernel(lambda: y.copy_(x))
    return 2 * x.numel() / ms / 1e6


# ----------------------------------------------------------------------------------------- benches


def _try(name: str, fn: Callable[[], float], rows: list[dict], *, flops: float | None = None,
         nbytes: float | None = None) -> None:
    """Time ``fn`` (returns ms) into ``rows``, with TFLOP/s or GB/s when the work is given."""
    try:
        ms = fn()
        row: dict[str, Any] = {"name": name, "ms": ms}
        extra = ""
        if flops:
            row["TFLOPs"] = flops / ms / 1e9
            extra = f"{row['TFLOPs']:6.0f} TFLOP/s"
        if nbytes:
            row["GBps"] = nbytes / ms / 1e6
            extra = f"{row['GBps']:6.0f} GB/s"
        rows.append(row)
        print(f"  {name:<56s} {ms:9.4f} ms  {extra}", flush=True)
    except Exception as exc:  # noqa: BLE001  (a missing backend must not stop the sweep)
        rows.append({"name": name, "error": repr(exc)[:300]})
        print(f"  {name:<48s} FAILED {repr(exc)[:200]}", flush=True)


def bench_norms(rows: list[dict], s: int) -> None:
    from kernels.layer_norm import add_layer_norm, layer_norm
    from kernels.rms_norm import add_rms_norm, rms_norm

    c = 1280
    x = torch.randn(s, c, device="cuda", dtype=torch.bfloat16)
    r = torch.randn_like(x)
    w = torch.randn(c, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(w)
    nbytes_ln = 2 * x.numel() * 2  # read x, write y
    nbytes_add = 4 * x.numel() * 2  # read x, r; write h, y
    F = torch.nn.functional
    print(f"[norms] S={s} C={c} bf16", flush=True)

    for name, fn, nb in [
        ("torch layer_norm", lambda: F.layer_norm(x, (c,), w, b, 1e-6), nbytes_ln),
        ("ours layer_norm", lambda: layer_norm(x, w, b, 1e-6), nbytes_ln),
        ("torch add + layer_norm", lambda: F.layer_norm(x + r, (c,), w, b, 1e-6), nbytes_add),
        ("ours add_layer_norm (fused)", lambda: add_layer_norm(x, r, w, b, 1e-6), nbytes_add),
    ]:
        _try(f"S={s} {name}", lambda fn=fn: bench_kernel(fn), rows, nbytes=nb)
    try:
        from liger_kernel.transformers.layer_norm import LigerLayerNorm
        from liger_kernel.transformers.rms_norm import LigerRMSNorm

        lln = LigerLayerNorm(c, eps=1e-6, bias=True).to("cuda", torch.bfloat16)
        lrms = LigerRMSNorm(c, eps=1e-6).to("cuda", torch.bfloat16)
        with torch.no_grad():
            _try(f"S={s} liger layer_norm", lambda: bench_kernel(lambda: lln(x)), rows)
            _try(f"S={s} liger add + layer_norm", lambda: bench_kernel(lambda: lln(x + r)), rows)
            _try(f"S={s} liger rms_norm", lambda: bench_kernel(lambda: lrms(x)), rows)
    except ImportError as exc:
        print(f"  liger not importable: {exc}", flush=True)

    def torch_rms() -> torch.Tensor:
        v = x.float().pow(2).mean(-1, keepdim=True)
        return w * (x.float() * torch.rsqrt(v + 1e-6)).to(x.dtype)

    _try(f"S={s} torch (HF) rms_norm", lambda: bench_kernel(torch_rms), rows)
    _try(f"S={s} ours rms_norm", lambda: bench_kernel(lambda: rms_norm(x, w, 1e-6)), rows)
    _try(f"S={s} ours add_rms_norm (fused)", lambda: bench_kernel(lambda: add_rms_norm(x, r, w, 1e-6)), rows)


def bench_acts(rows: list[dict], s: int) -> None:
    from kernels.activations import bias_gelu, bias_quick_gelu
    from kernels.swiglu import swiglu

    n = 5120
    x = torch.randn(s, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    print(f"[activations] S={s} N={n} bf16", flush=True)

    def hf_quick() -> torch.Tensor:  # HF: Linear adds the bias, then ACT2FN["quick_gelu"]
        y = x + b
        return y * torch.sigmoid(1.702 * y)

    _try(f"S={s} torch bias + quick_gelu", lambda: bench_kernel(hf_quick), rows)
    _try(f"S={s} ours bias_quick_gelu", lambda: bench_kernel(lambda: bias_quick_gelu(x, b)), rows)
    _try(f"S={s} ours bias_quick_gelu in place", lambda: bench_kernel(lambda: bias_quick_gelu(x, b, out=x)), rows)
    xm = x[: max(1, s // 4)]
    _try(f"S/4={xm.shape[0]} torch bias + gelu(erf)",
         lambda: bench_kernel(lambda: torch.nn.functional.gelu(xm + b)), rows)
    _try(f"S/4={xm.shape[0]} ours bias_gelu", lambda: bench_kernel(lambda: bias_gelu(xm, b)), rows)
    g = torch.randn_like(x)
    _try(f"S={s} torch silu(g) * u", lambda: bench_kernel(lambda: torch.nn.functional.silu(g) * x), rows)
    _try(f"S={s} ours swiglu", lambda: bench_kernel(lambda: swiglu(g, x)), rows)
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        _try(f"S={s} liger silu_mul", lambda: bench_kernel(lambda: LigerSiLUMulFunction.apply(g, x)), rows)
    except ImportError:
        pass


def bench_rope(rows: list[dict], s: int) -> None:
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    from kernels.rope_vision import apply_vision_rope_, qkv_views, rope_qk

    heads, d = 16, 80
    qkv = torch.randn(s, 3 * heads * d, device="cuda", dtype=torch.bfloat16)
    ang = torch.rand(s, d // 2, device="cuda") * 30
    cos, sin = ang.cos(), ang.sin()
    cos_f, sin_f = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    q, k, _ = qkv_views(qkv, heads)
    print(f"[rope] S={s} H={heads} D={d} bf16", flush=True)
    _try(f"S={s} HF apply_rotary_pos_emb_vision",
         lambda: bench_kernel(lambda: apply_rotary_pos_emb_vision(q, k, cos_f, sin_f)), rows)
    nb = 4 * s * heads * d * 2  # read q, k; write q, k (bf16)
    _try(f"S={s} ours rope in place on qkv (per-head tiles)",
         lambda: bench_kernel(lambda: apply_vision_rope_(qkv, cos, sin, heads)), rows, nbytes=nb)
    _try(f"S={s} ours rope_qk (row tiles, out of place)", lambda: bench_kernel(lambda: rope_qk(qkv, cos, sin, heads)),
         rows, nbytes=nb)


def _attn_flops(lengths: list[int], heads: int, d: int) -> float:
    return 4.0 * sum(n * n for n in lengths) * heads * d


def bench_attention(rows: list[dict], name: str, lengths: list[int], with_flex: bool = True) -> None:
    from kernels.attention import attention

    heads, d = 16, 80
    s = sum(lengths)
    qkv0 = torch.randn(s, 3 * heads * d, device="cuda", dtype=torch.bfloat16)
    qkv = qkv0.clone()
    ang = torch.rand(s, d // 2, device="cuda") * 30
    cos, sin = ang.cos(), ang.sin()
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    mx = max(lengths)
    fl = _attn_flops(lengths, heads, d)
    print(f"[attention] {name}: {len(lengths)} images, S={s}, max={mx}, H={heads}, D={d}, bf16", flush=True)

    for backend in ("triton", "triton_prerope", "cudnn", "fa2", "sdpa", "sdpa_batched"):
        if backend == "sdpa_batched" and len(set(lengths)) > 1:
            continue
        _try(f"{name} attn+rope {backend}",
             lambda b=backend: bench_kernel(lambda: attention(qkv, cu, mx, heads, cos, sin, backend=b,
                                                              lengths=lengths)), rows, flops=fl)
    # SDPA backends on the padded-free batch (equal lengths only), rope excluded
    if len(set(lengths)) == 1:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        b, n = len(lengths), lengths[0]
        q, k, v = (qkv0.view(s, 3, heads, d)[:, i].unflatten(0, (b, n)).transpose(1, 2) for i in range(3))
        for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            def run(be: Any = be) -> torch.Tensor:
                with sdpa_kernel([be]):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v)

            _try(f"{name} sdpa[{be.name}] batched (no rope)", lambda run=run: bench_kernel(run), rows, flops=fl)
    # torch.nn.attention.varlen (FA2 varlen behind a public API), rope excluded
    try:
        from torch.nn.attention.varlen import varlen_attn

        q, k, v = (qkv0.view(s, 3, heads, d)[:, i] for i in range(3))
        _try(f"{name} torch varlen_attn (no rope)",
             lambda: bench_kernel(lambda: varlen_attn(q, k, v, cu, cu, mx, mx)), rows, flops=fl)
    except ImportError as exc:
        print(f"  torch.nn.attention.varlen: {exc}", flush=True)
    if with_flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            doc = torch.repeat_interleave(torch.arange(len(lengths), device="cuda"),
                                          torch.tensor(lengths, device="cuda"))

            def mask_mod(b: Any, h: Any, qi: Any, ki: Any) -> Any:
                return doc[qi] == doc[ki]

            bm = create_block_mask(mask_mod, None, None, s, s, device="cuda")
            flex = torch.compile(flex_attention)
            q, k, v = (qkv0.view(s, 3, heads, d)[:, i].transpose(0, 1)[None] for i in range(3))
            t0 = time.perf_counter()
            flex(q, k, v, block_mask=bm)
            sync()
            print(f"  (flex compile {time.perf_counter() - t0:.1f}s)", flush=True)
            _try(f"{name} flex_attention block mask (no rope)",
                 lambda: bench_kernel(lambda: flex(q, k, v, block_mask=bm)), rows, flops=fl)
        except Exception as exc:  # noqa: BLE001
            print(f"  flex_attention: {repr(exc)[:200]}", flush=True)


def bench_gemms(rows: list[dict], s: int) -> None:
    import kernels.gemm as G
    from kernels.activations import bias_act, bias_quick_gelu
    from kernels.gemm import linear_act

    F = torch.nn.functional
    c, hid = 1280, 5120
    x = torch.randn(s, c, device="cuda", dtype=torch.bfloat16)
    print(f"[gemm] S={s} bf16", flush=True)
    shapes = {"qkv": (3 * c, c), "proj": (c, c), "fc1": (hid, c), "fc2": (c, hid)}
    total = {"cublas": 0.0, "tma": 0.0}
    for nm, (n, k) in shapes.items():
        a = torch.randn(s, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / math.sqrt(k)
        bb = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        fl = 2 * s * n * k
        _try(f"S={s} cuBLAS linear {nm} [{n}x{k}]", lambda a=a, w=w, bb=bb: bench_kernel(lambda: F.linear(a, w, bb)),
             rows, flops=fl)
        total["cublas"] += rows[-1].get("ms", 0.0)
        G.GEMM_IMPL = "tma"
        _try(f"S={s} ours TMA linear {nm} [{n}x{k}]", lambda a=a, w=w, bb=bb: bench_kernel(lambda: linear_act(a, w, bb)),
             rows, flops=fl)
        total["tma"] += rows[-1].get("ms", 0.0)
        G.GEMM_IMPL = None
    for impl, t in total.items():
        print(f"  {impl} GEMMs of one block: {t:.3f} ms -> x32 blocks {32 * t:.2f} ms", flush=True)
        rows.append({"name": f"S={s} {impl} block GEMMs x32", "ms": 32 * t})
    # qkv GEMM + vision rotary: cuBLAS then a rope pass, vs the rotary in our GEMM's epilogue
    from kernels.rope_vision import interleave_qk_rows, rope_qk

    wq = torch.randn(3 * c, c, device="cuda", dtype=torch.bfloat16) / math.sqrt(c)
    bq = torch.randn(3 * c, device="cuda", dtype=torch.bfloat16)
    ang = torch.rand(s, 40, device="cuda") * 30
    cos, sin = ang.cos(), ang.sin()
    flq = 2 * s * 3 * c * c

    def qkv_then_rope() -> torch.Tensor:
        return rope_qk(F.linear(x, wq, bq), cos, sin, 16)

    _try(f"S={s} qkv: cuBLAS linear + ours rope_qk", lambda: bench_kernel(qkv_then_rope), rows, flops=flq)
    wqi, bqi = interleave_qk_rows(wq.clone(), 16), interleave_qk_rows(bq.clone(), 16)
    _try(f"S={s} qkv: ours TMA linear + rope epilogue",
         lambda: bench_kernel(lambda: linear_act(x, wqi, bqi, rope=(cos, sin, 2 * c, 80))), rows, flops=flq)
    w1 = torch.randn(hid, c, device="cuda", dtype=torch.bfloat16) / math.sqrt(c)
    b1 = torch.randn(hid, device="cuda", dtype=torch.bfloat16)

    def unfused() -> torch.Tensor:
        f = F.linear(x, w1)
        return bias_quick_gelu(f, b1, out=f)

    fl = 2 * s * hid * c
    _try(f"S={s} fc1: cuBLAS linear (bias, no act)", lambda: bench_kernel(lambda: F.linear(x, w1, b1)), rows, flops=fl)
    _try(f"S={s} fc1: cuBLAS mm + ours bias_quick_gelu", lambda: bench_kernel(unfused), rows, flops=fl)
    for impl in ("tma", "pointer"):
        G.GEMM_IMPL = impl
        _try(f"S={s} fc1: ours {impl} linear_act (QuickGELU epilogue)",
             lambda: bench_kernel(lambda: linear_act(x, w1, b1, "quick_gelu")), rows, flops=fl)
    G.GEMM_IMPL = None
    xm = torch.randn(max(1, s // 4), 4 * c, device="cuda", dtype=torch.bfloat16)
    wm = torch.randn(4 * c, 4 * c, device="cuda", dtype=torch.bfloat16) / math.sqrt(4 * c)
    bm = torch.randn(4 * c, device="cuda", dtype=torch.bfloat16)
    flm = 2 * xm.shape[0] * (4 * c) ** 2

    def merger_unfused() -> torch.Tensor:
        f = F.linear(xm, wm)
        return bias_act(f, bm, "gelu", out=f)

    _try(f"S/4={xm.shape[0]} merger fc: cuBLAS mm + ours bias_gelu", lambda: bench_kernel(merger_unfused), rows,
         flops=flm)
    _try(f"S/4={xm.shape[0]} merger fc: ours TMA linear_act (GELU epilogue)",
         lambda: bench_kernel(lambda: linear_act(xm, wm, bm, "gelu")), rows, flops=flm)


def bench_swiglu_mlp(rows: list[dict], s: int) -> None:
    """Qwen2.5-VL's vision MLP (C 1280, I 3420, biases): what padding the 3420-element rows to 16 bytes
    buys cuBLAS, and our two MLP modes against HF's three Linear calls."""
    import copy

    import kernels.swiglu as SW

    F = torch.nn.functional
    c, inter = 1280, 3420
    x = torch.randn(s, c, device="cuda", dtype=torch.bfloat16)
    hf = torch.nn.ModuleDict({n: torch.nn.Linear(*dims, device="cuda", dtype=torch.bfloat16)
                              for n, dims in [("gate_proj", (c, inter)), ("up_proj", (c, inter)),
                                              ("down_proj", (inter, c))]})
    fl_mlp = 2 * s * 3 * c * inter
    print(f"[qwen2.5-vl mlp] S={s} C={c} I={inter} bf16", flush=True)
    a = torch.randn(s, inter, device="cuda", dtype=torch.bfloat16)
    a_pad = SW.empty_aligned_rows(s, inter, torch.bfloat16, "cuda").copy_(a)
    wd = hf["down_proj"].weight.detach()
    wd_pad = torch.nn.Parameter(wd.clone())
    SW.align_rows_(wd_pad)
    fl_down = 2 * s * c * inter
    _try(f"S={s} down: cuBLAS, rows of 6840 B (contiguous)", lambda: bench_kernel(lambda: F.linear(a, wd)), rows,
         flops=fl_down)
    _try(f"S={s} down: cuBLAS, rows padded to 6848 B", lambda: bench_kernel(lambda: F.linear(a_pad, wd_pad)), rows,
         flops=fl_down)
    width = SW.padded_width(inter)  # what TritonSwiGLUMLP runs: K padded with zeros to a multiple of 64
    a_wide = torch.nn.functional.pad(a, (0, width - inter))
    wd_wide = torch.nn.functional.pad(wd, (0, width - inter))
    _try(f"S={s} down: cuBLAS, K zero-padded to {width}", lambda: bench_kernel(lambda: F.linear(a_wide, wd_wide)),
         rows, flops=fl_down)

    def hf_mlp() -> torch.Tensor:
        return hf["down_proj"](F.silu(hf["gate_proj"](x)) * hf["up_proj"](x))

    _try(f"S={s} MLP: HF (3 Linear, silu, mul)", lambda: bench_kernel(hf_mlp), rows, flops=fl_mlp)
    for mode in ("cublas", "triton"):
        mlp = SW.TritonSwiGLUMLP(*(copy.deepcopy(hf[n]) for n in ("gate_proj", "up_proj", "down_proj")), mode=mode)
        with torch.no_grad():
            _try(f"S={s} MLP: ours mode={mode}", lambda mlp=mlp: bench_kernel(lambda: mlp(x)), rows, flops=fl_mlp)
            _try(f"S={s} gate|up + SwiGLU only: ours mode={mode}",
                 lambda mlp=mlp: bench_kernel(lambda: mlp.gated(x, mlp._weights())), rows, flops=2 * s * 2 * c * inter)


def window_lengths(grid: list[tuple[int, int, int]]) -> list[int]:
    """Qwen2.5-VL's attention windows (112 px: 4 x 4 merge units) of a workload."""
    from kernels.qwen2_5_vl import window_order

    return window_order(tuple(grid), 2, 4)[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="skip flex_attention (its compile costs ~1 min)")
    ap.add_argument("--only", default="",
                    help="comma list: peaks,norms,acts,rope,attention,gemm,windows,mlp25 (the last two: Qwen2.5-VL)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernel_bench needs a CUDA GPU")
    only = set(filter(None, args.only.split(",")))

    def want(x: str) -> bool:
        return not only or x in only

    rows: list[dict] = []
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    import triton

    info["triton"] = triton.__version__
    print(info, flush=True)
    if want("peaks"):
        info["gemm_peak_tflops"] = gemm_peak_tflops()
        info["copy_GBps"] = copy_gbps()
        print(f"bf16 GEMM 8192^3: {info['gemm_peak_tflops']:.0f} TFLOP/s; copy {info['copy_GBps']:.0f} GB/s",
              flush=True)
    wl = workloads()
    if want("attention"):
        for name, grid in wl.items():
            bench_attention(rows, name, [h * w for t, h, w in grid for _ in range(t)], with_flex=not args.quick)
    if want("windows"):
        for name, grid in wl.items():
            bench_attention(rows, f"{name} windows", window_lengths(grid), with_flex=False)
    if want("mlp25"):
        for s in (32768, 1024):
            bench_swiglu_mlp(rows, s)
    if want("norms"):
        for s in (32768, 1024):
            bench_norms(rows, s)
    if want("acts"):
        bench_acts(rows, 32768)
    if want("rope"):
        bench_rope(rows, 32768)
    if want("gemm"):
        for s in (32768, 1024):
            bench_gemms(rows, s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel_bench.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    print("\n== kernel_bench summary ==")
    print(info)
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<56s} ERROR")
        else:
            extra = f"  {r['TFLOPs']:.0f} TFLOP/s" if "TFLOPs" in r else (f"  {r['GBps']:.0f} GB/s" if r.get("GBps") else "")
            print(f"{r['name']:<56s} {r['ms']:9.4f} ms{extra}")


if __name__ == "__main__":
    main()
