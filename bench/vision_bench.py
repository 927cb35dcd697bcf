"""A Qwen-VL vision tower: our patched tower against every peer, same weights and inputs, one process.

    python bench/vision_bench.py [--family qwen2_vl|qwen2_5_vl|qwen3_vl] [--model 2b|7b|3b|8b] [--out DIR]
                                 [--skip compile,liger,eager,variants,graphs] [--workloads 32x448,1x448,mixed8]
    python bench/vision_bench.py --smoke [--family ...]   # CPU, tiny config, Triton interpreter: code paths only

Builds the family's vision tower with random (perturbed) weights in bf16 -- Qwen2-VL-2B/7B: depth
32, embed 1280, 16 heads, MLP ratio 4, QuickGELU, full attention; Qwen2.5-VL-3B/7B: depth 32,
hidden 1280, 16 heads, SwiGLU 3420, RMSNorm, 112 px windows but full attention in blocks
7/15/23/31; both patch 14, merge 2, temporal 2; Qwen3-VL-8B: depth 27, hidden 1152, 16 heads of
72, MLP 4304 GELU-tanh, patch 16, a 48 x 48 learned position table, DeepStack mergers after blocks
8/16/24 (each of its outputs is checked); ``--model`` picks the merger's output size -- and runs,
on three workloads (32 images of 448x448 in one call; one 448x448 image; 8 mixed sizes from
224x224 to 1288x966 packed in one call; images resized by the family's processor):

- HF eager, HF sdpa (Qwen2.5-VL: one SDPA call per window, HF's loop), HF + Liger-Kernel's norm
  (LayerNorm / RMSNorm swapped in by hand where Liger's monkey-patch refuses a vision-only model),
  HF + torch.compile (each block compiled; bounded by ``--compile-limit-s`` in all);
- ours: ``kernels.patch`` with each attention / MLP variant, and the main ones under CUDA graphs
  (``kernels.graphs.VisionGraphs``).

Reports images/s, median ms (CUDA events), TFLOP/s, MFU against a measured bf16 GEMM peak,
peak activation memory, weights memory, ratios vs each peer, and the relative L2 error of every
bf16 output vs HF in fp32 on the same weights and inputs (the worst of the family's outputs; each
one in the JSON). Rows go to vision_bench.jsonl as they are measured; the summary table, with
each workload's GEMM-peak floor, is printed last.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if "--smoke" in sys.argv:  # must precede any @triton.jit: kernels run in the interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernel_bench import gemm_peak_tflops, processor, sync, time_ms, workloads  # noqa: E402


def qwen2_vl_config(out_hidden: int, smoke: bool) -> Any:
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig

    kw = {"depth": 2, "embed_dim": 160, "num_heads": 2} if smoke else {"depth": 32, "embed_dim": 1280, "num_heads": 16}
    return Qwen2VLVisionConfig(mlp_ratio=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                               in_channels=3, hidden_act="quick_gelu", hidden_size=out_hidden, **kw)


def qwen2_5_vl_config(out_hidden: int, smoke: bool) -> Any:
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

    if smoke:  # 56 px windows: 2 x 2 merge units, ragged on the smoke grids
        kw = {"depth": 2, "hidden_size": 160, "num_heads": 2, "intermediate_size": 86, "window_size": 56,
              "fullatt_block_indexes": [1]}
    else:
        kw = {"depth": 32, "hidden_size": 1280, "num_heads": 16, "intermediate_size": 3420, "window_size": 112,
              "fullatt_block_indexes": [7, 15, 23, 31]}
    return Qwen2_5_VLVisionConfig(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                                  hidden_act="silu", out_hidden_size=out_hidden, **kw)


def qwen3_vl_config(out_hidden: int, smoke: bool) -> Any:
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig

    if smoke:  # head_dim 72 as the real one; a 6 x 6 table resampled onto the smoke grids
        kw = {"depth": 3, "hidden_size": 144, "num_heads": 2, "intermediate_size": 200,
              "num_position_embeddings": 36, "deepstack_visual_indexes": [0, 2]}
    else:
        kw = {"depth": 27, "hidden_size": 1152, "num_heads": 16, "intermediate_size": 4304,
              "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24]}
    return Qwen3VLVisionConfig(patch_size=16, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                               hidden_act="gelu_pytorch_tanh", out_hidden_size=out_hidden, **kw)


def liger_layer_norm(ln: torch.nn.Module) -> torch.nn.Module:
    from liger_kernel.transformers.layer_norm import LigerLayerNorm

    new = LigerLayerNorm(ln.normalized_shape[0], eps=ln.eps, bias=True)
    new.weight, new.bias = ln.weight, ln.bias
    return new


def liger_rms_norm(norm: torch.nn.Module) -> torch.nn.Module:
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    # "llama" casting: weight * normalized.to(input dtype), as Qwen2_5_VLRMSNorm
    new = LigerRMSNorm(norm.weight.shape[0], eps=norm.variance_epsilon, casting_mode="llama")
    new.weight = norm.weight
    return new


@dataclasses.dataclass(frozen=True)
class Family:
    """What the bench needs beyond the family's own module (``service.models``: its name, HF tower
    class and stored features): how to build its tower, count its FLOPs and swap in Liger's norm."""

    model_type: str
    models: dict[str, int]  # --model -> the merger's output size (the language model's hidden size); first: default
    config: Callable[[int, bool], Any]  # (out_hidden, smoke) -> vision config
    width: Callable[[Any], int]  # C, the residual stream's width
    mlp_macs: Callable[[Any], int]  # multiply-adds per token per block in the MLP
    liger_norm: Callable[[torch.nn.Module], torch.nn.Module]  # Liger's module sharing one norm's weights
    liger_name: str
    mergers: Callable[[Any], int] = lambda cfg: 1  # mergers run per forward (Qwen3-VL: + DeepStack)

    @property
    def serving(self) -> Any:
        from service.models import family

        return family(self.model_type)


FAMILIES = {f.model_type: f for f in (
    Family("qwen2_vl", {"2b": 1536, "7b": 3584}, qwen2_vl_config,
           width=lambda cfg: cfg.embed_dim, mlp_macs=lambda cfg: 2 * cfg.embed_dim * int(cfg.embed_dim * cfg.mlp_ratio),
           liger_norm=liger_layer_norm, liger_name="LayerNorm"),
    Family("qwen2_5_vl", {"7b": 3584, "3b": 2048}, qwen2_5_vl_config,
           width=lambda cfg: cfg.hidden_size, mlp_macs=lambda cfg: 3 * cfg.hidden_size * cfg.intermediate_size,
           liger_norm=liger_rms_norm, liger_name="RMSNorm"),
    Family("qwen3_vl", {"8b": 4096}, qwen3_vl_config,
           width=lambda cfg: cfg.hidden_size, mlp_macs=lambda cfg: 2 * cfg.hidden_size * cfg.intermediate_size,
           liger_norm=liger_layer_norm, liger_name="LayerNorm",
           mergers=lambda cfg: 1 + len([i for i in range(cfg.depth) if i in cfg.deepstack_visual_indexes])),
)}


def vision_config(family: Family, model: str, smoke: bool) -> Any:
    cfg = family.config(48 if smoke else family.models[model], smoke)
    cfg._attn_implementation = "sdpa"
    return cfg


@torch.no_grad()
def build_tower(family: Family, cfg: Any, device: str, seed: int = 0) -> torch.nn.Module:
    """Random tower with every parameter perturbed on the device (``service.tiny.perturb_``)."""
    from service.tiny import perturb_

    with torch.device(device):
        model = family.serving.tower_class()(cfg).eval()
    perturb_(model, seed)
    return model


def attention_lengths(cfg: Any, grid: list[tuple[int, int, int]], block: int) -> list[int]:
    """Tokens per attention segment in ``block``: whole frames, or Qwen2.5-VL's windows."""
    windowed = hasattr(cfg, "fullatt_block_indexes") and block not in cfg.fullatt_block_indexes
    if not windowed:
        return [h * w for t, h, w in grid for _ in range(t)]
    from kernels.qwen2_5_vl import window_order

    merge = cfg.spatial_merge_size
    return window_order(tuple(grid), merge, cfg.window_size // merge // cfg.patch_size)[1]


def tower_flops(family: Family, cfg: Any, grid: list[tuple[int, int, int]]) -> float:
    """Matrix FLOPs of one forward (2 per multiply-add): GEMMs + attention (QK^T and PV)."""
    c = family.width(cfg)
    out = getattr(cfg, "out_hidden_size", None) or cfg.hidden_size
    m2 = cfg.spatial_merge_size**2
    s = sum(t * h * w for t, h, w in grid)
    per_tok_block = 2 * (c * (3 * c + c) + family.mlp_macs(cfg))
    attn = sum(4 * c * sum(n * n for n in attention_lengths(cfg, grid, i)) for i in range(cfg.depth))
    embed = 2 * s * c * patch_values(cfg)
    merger = 2 * (s // m2) * (m2 * c) * (m2 * c + out)
    return cfg.depth * s * per_tok_block + attn + embed + family.mergers(cfg) * merger


def patch_values(cfg: Any) -> int:
    """Values per patch: channels x temporal x patch x patch (1176 at patch 14, 1536 at 16)."""
    return getattr(cfg, "in_channels", 3) * cfg.temporal_patch_size * cfg.patch_size**2


def outputs(out: Any) -> list[torch.Tensor]:
    """The tower's features: ``pooler_output``, then Qwen3-VL's DeepStack tensors (if any)."""
    return [out.pooler_output, *(getattr(out, "deepstack_features", None) or [])]


def mergers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [model.merger, *getattr(model, "deepstack_merger_list", [])]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def set_attn_impl(model: torch.nn.Module, impl: str) -> None:
    model.config._attn_implementation = impl
    for blk in model.blocks:
        blk.attn.config._attn_implementation = impl


def swap_liger_norms(model: torch.nn.Module, make: Callable[[torch.nn.Module], torch.nn.Module]) -> Callable[[], None]:
    """Replace norm1/norm2 and every merger's norm (ln_q, Qwen3-VL's norm) by Liger's modules
    sharing the same Parameters; returns undo."""
    saved: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []

    def swap(parent: torch.nn.Module, attr: str) -> None:
        norm = getattr(parent, attr)
        saved.append((parent, attr, norm))
        setattr(parent, attr, make(norm))

    for blk in model.blocks:
        swap(blk, "norm1")
        swap(blk, "norm2")
    for m in mergers(model):
        swap(m, "ln_q" if hasattr(m, "ln_q") else "norm")

    def undo() -> None:
        for parent, attr, norm in saved:
            setattr(parent, attr, norm)

    return undo


def liger_qwen2_5_vl_refuses(model: torch.nn.Module) -> str:
    """Liger's own entry point on a vision-only Qwen2.5-VL tower: what it says (it wants the full model)."""
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2_5_vl

        apply_liger_kernel_to_qwen2_5_vl(rope=False, cross_entropy=False, fused_linear_cross_entropy=False,
                                         rms_norm=True, swiglu=False, model=model)
    except Exception as exc:  # noqa: BLE001
        return f"refused: {repr(exc)[:160]}"
    return "accepted"


def compile_blocks(model: torch.nn.Module) -> Callable[[], None]:
    """HF + torch.compile: each block (and each merger) compiled; one traced graph serves all the
    blocks (same code, parameters as inputs), so the compile takes seconds, not minutes."""
    mods = [*model.blocks, *mergers(model)]
    for m in mods:
        m.compile()

    def undo() -> None:
        for m in mods:
            m._compiled_call_impl = None

    return undo


class TimeLimit:
    """Raise ``TimeoutError`` in the main thread after ``seconds`` (a compile that runs away); 0: none."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds

    def __enter__(self) -> None:
        def fire(signum: int, frame: Any) -> None:
            raise TimeoutError(f"over the {self.seconds} s limit")

        self.old = signal.signal(signal.SIGALRM, fire)
        signal.alarm(self.seconds)

    def __exit__(self, *exc: Any) -> None:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.old)


def set_ours(model: torch.nn.Module, attention: str, mlp: str, rope_gemm: bool) -> None:
    """Switch a patched tower between variants (same weights; q/k rows re-ordered if needed)."""
    for blk in model.blocks:
        blk.attn.backend = attention
        blk.attn.gemm = mlp
        blk.attn.set_rope_gemm(rope_gemm)
        blk.mlp.mode = mlp
    for m in mergers(model):
        m.mode = mlp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="qwen2_vl", choices=sorted(FAMILIES))
    ap.add_argument("--model", default=None,
                    help="qwen2_vl: 2b (default) or 7b; qwen2_5_vl: 7b (default) or 3b; qwen3_vl: 8b")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--skip", default="",
                    help="comma list of peers to skip: eager,sdpa,liger,compile,variants,graphs")
    ap.add_argument("--workloads", default="", help="comma list (default all): 32x448,1x448,mixed8")
    ap.add_argument("--compile-limit-s", type=int, default=300,
                    help="HF + torch.compile: stop after this long in all (compiles included), the row in flight failed")
    ap.add_argument("--smoke", action="store_true", help="CPU + interpreter, tiny config: checks code paths")
    args = ap.parse_args()
    family = FAMILIES[args.family]
    model_name = args.model or next(iter(family.models))  # the first is the default
    if model_name not in family.models:
        ap.error(f"--model {model_name}: {family.serving.name} has {', '.join(family.models)}")
    skip = set(filter(None, args.skip.split(",")))
    smoke = args.smoke
    device = "cpu" if smoke else "cuda"
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("vision_bench needs a CUDA GPU (or --smoke)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = (out_dir / "vision_bench.jsonl").open("w")

    import kernels

    info: dict[str, Any] = {"model": f"{family.serving.name}-{model_name.upper()} vision tower",
                            "torch": torch.__version__}
    if not smoke:
        import triton

        info.update(gpu=torch.cuda.get_device_name(), triton=triton.__version__)
        info["gemm_peak_tflops"] = gemm_peak_tflops()
    import transformers

    info["transformers"] = transformers.__version__
    print(info, flush=True)
    jsonl.write(json.dumps({"info": info}) + "\n")

    cfg = vision_config(family, model_name, smoke)
    dtype = torch.float32 if smoke else torch.bfloat16
    t0 = time.perf_counter()
    hf = build_tower(family, cfg, device).to(dtype)
    weights_gib = sum(p.numel() * p.element_size() for p in hf.parameters()) / 2**30
    print(f"built tower in {time.perf_counter() - t0:.1f}s; weights {weights_gib:.3f} GiB ({dtype})", flush=True)

    wls = workloads(processor(args.family))
    if smoke:  # (Qwen2.5-VL's 2 x 2-unit windows are ragged on the 4 x 6 and 8 x 6 grids)
        wls = {"4x": [(1, 4, 4)] * 4, "1x": [(1, 4, 4)], "mixed": [(1, 4, 6), (1, 2, 2), (1, 8, 6), (2, 4, 4)]}
    if args.workloads:
        wls = {k: v for k, v in wls.items() if k in args.workloads.split(",")}
    gen = torch.Generator(device).manual_seed(1)
    inputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hf_grids: dict[str, torch.Tensor] = {}
    for name, grid in wls.items():
        s = sum(t * h * w for t, h, w in grid)
        x = torch.randn(s, patch_values(cfg), generator=gen, device=device).to(dtype)
        inputs[name] = (x, torch.tensor(grid, dtype=torch.int64))  # ours: grid on the CPU, no device sync
        hf_grids[name] = inputs[name][1].to(device)  # HF builds positions on grid_thw's device

    # fp32 reference on the same weights and the same (bf16-rounded) pixels
    refs: dict[str, list[torch.Tensor]] = {}
    ref32 = copy.deepcopy(hf).float()
    # a true fp32 reference: cuDNN would run HF's Conv3d patch embedding in TF32 (~1e-4 error)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        for name, (x, _grid) in inputs.items():
            refs[name] = outputs(ref32(x.float(), grid_thw=hf_grids[name]))
    del ref32
    torch.backends.cudnn.allow_tf32 = True  # back to torch's defaults for the timed runs
    if not smoke:
        torch.cuda.empty_cache()

    results: list[dict[str, Any]] = []

    def measure(peer: str, wname: str, fn: Callable[[], list[torch.Tensor]], limit_s: int = 0) -> None:
        grid = wls[wname]
        try:
            with torch.no_grad(), TimeLimit(limit_s):
                sync()
                before = torch.cuda.memory_allocated() if not smoke else 0
                t_first = time.perf_counter()
                out = fn()  # first call: compiles / autotunes / captures
                sync()
                first_s = time.perf_counter() - t_first
                errs = [rel_l2(o, r) for o, r in zip(out, refs[wname], strict=True)]
                err = max(errs)
                peak = 0.0
                if not smoke:
                    # memory a first call leaves allocated (a CUDA graph's pool), or the transient
                    # peak of a steady-state call above what was allocated before it
                    kept = torch.cuda.memory_allocated() - before
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    fn()
                    sync()
                    peak = max(kept, torch.cuda.max_memory_allocated() - base) / 2**30
                t = time_ms(fn, budget_ms=1000.0)
        except Exception as exc:  # noqa: BLE001  (one broken peer must not stop the comparison)
            print(f"{wname:>8s} {peer:<28s} FAILED: {repr(exc)[:300]}", flush=True)
            results.append({"peer": peer, "workload": wname, "error": repr(exc)[:500]})
            jsonl.write(json.dumps(results[-1]) + "\n")
            jsonl.flush()
            return
        ms = t["median_ms"]
        fl = tower_flops(family, cfg, grid)
        row = {
            "peer": peer, "workload": wname, "images": len(grid), "patches": sum(t * h * w for t, h, w in grid),
            "ms": ms, "min_ms": t["min_ms"], "p90_ms": t["p90_ms"], "reps": t["reps"],
            "img_per_s": len(grid) / ms * 1e3, "tflops": fl / ms / 1e9, "peak_act_gib": peak,
            "rel_l2_vs_fp32": err, "rel_l2_parts": errs, "first_call_s": first_s,
        }
        if "gemm_peak_tflops" in info:
            row["mfu"] = row["tflops"] / info["gemm_peak_tflops"]
        results.append(row)
        jsonl.write(json.dumps(row) + "\n")
        jsonl.flush()
        print(f"{wname:>8s} {peer:<28s} {ms:9.3f} ms  {row['img_per_s']:8.1f} img/s  {row['tflops']:6.1f} TFLOP/s"
              f"  peak {peak:6.3f} GiB  relL2 {' '.join(f'{e:.2e}' for e in errs)}  (first {first_s:.1f}s, "
              f"{t['reps']} reps)", flush=True)

    # ---- ours first (on a copy, patched in place), so a slow peer cannot starve it of time
    ours: torch.nn.Module | None = copy.deepcopy(hf)
    replaced = kernels.patch(ours)
    print(f"patched {len(replaced)} modules, e.g. {next(iter(replaced.items()))}", flush=True)
    # (attention, mlp/GEMM mode, rotary in the qkv GEMM epilogue); the first is patch()'s default
    variants = [("auto", "auto", False), ("auto", "cublas", False), ("auto", "auto", True),
                ("cudnn", "auto", False), ("fa2", "auto", False), ("triton", "cublas", False)]
    graph_variants = variants[:4]
    if args.family == "qwen2_5_vl":  # (rope in the GEMM and in attention: measured slower on Qwen2-VL)
        variants = [("auto", "auto", False), ("auto", "cublas", False), ("triton_prerope", "auto", False)]
        # under graphs: the MLP's two modes, which differ below 4096 rows (one image)
        graph_variants = [("auto", "auto", False), ("auto", "triton", False)]
    if args.family == "qwen3_vl":  # attention: which backend wins at head_dim 72 (cuDNN for mixed sizes too?)
        variants = graph_variants = [("auto", "auto", False), ("cudnn", "auto", False), ("fa2", "auto", False)]
    if smoke:
        variants = [v for v in variants if v[0] != "fa2"]
    if "variants" in skip:
        variants = graph_variants = variants[:1]

    def vname(v: tuple[str, str, bool]) -> str:
        return f"{v[0]},{v[1]}{',rope-gemm' if v[2] else ''}"

    for wname, (x, grid) in inputs.items():
        for v in variants:
            set_ours(ours, *v)
            measure(f"ours[{vname(v)}]", wname, lambda x=x, grid=grid: outputs(ours(x, grid_thw=grid)))
    if not smoke and "graphs" not in skip:
        from kernels.graphs import VisionGraphs

        # launch gaps dominate small inputs: replay a captured graph (eager ranking does not
        # carry over, so the main variants are all captured)
        for wname, (x, grid) in inputs.items():
            for v in graph_variants:
                set_ours(ours, *v)
                # what the vision worker replays: the family's stored features, [1 + L, S/4, D]
                graphs = VisionGraphs(ours, max_graphs=1, output=family.serving.features)
                measure(f"ours+graphs[{vname(v)}]", wname, lambda x=x, grid=grid, g=graphs: list(g(x, grid)))
                del graphs
                torch.cuda.empty_cache()
    ours = None  # free its weights before the peers run
    if not smoke:
        torch.cuda.empty_cache()

    # ---- peers on the unpatched tower
    def hf_run(x: torch.Tensor, grid: torch.Tensor) -> list[torch.Tensor]:
        return outputs(hf(x, grid_thw=grid))

    inputs_hf = {name: (x, hf_grids[name]) for name, (x, _) in inputs.items()}

    for impl in ("eager", "sdpa"):
        if impl in skip:
            continue
        set_attn_impl(hf, impl)
        for wname, (x, grid) in inputs_hf.items():
            measure(f"HF {impl}", wname, lambda x=x, grid=grid: hf_run(x, grid))
    set_attn_impl(hf, "sdpa")
    if "liger" not in skip:
        try:
            import liger_kernel  # noqa: F401
        except ImportError as exc:
            print(f"liger-kernel not importable ({exc}); skipping that peer", flush=True)
        else:
            if args.family == "qwen2_5_vl":  # (on a copy: it may patch what it accepts)
                info["liger_entry_point"] = liger_qwen2_5_vl_refuses(copy.deepcopy(hf))
                print(f"apply_liger_kernel_to_qwen2_5_vl(model=<vision tower>): {info['liger_entry_point']}; "
                      f"swapping LigerRMSNorm in by hand", flush=True)
            undo = swap_liger_norms(hf, family.liger_norm)
            for wname, (x, grid) in inputs_hf.items():
                measure(f"HF sdpa + Liger {family.liger_name}", wname, lambda x=x, grid=grid: hf_run(x, grid))
            undo()
    if "compile" not in skip and not smoke:
        undo = compile_blocks(hf)
        deadline = time.monotonic() + args.compile_limit_s
        for wname, (x, grid) in inputs_hf.items():
            left = int(deadline - time.monotonic())
            if left <= 0:
                print(f"{wname:>8s} HF sdpa + torch.compile: skipped, past --compile-limit-s", flush=True)
                continue
            measure("HF sdpa + torch.compile", wname, lambda x=x, grid=grid: hf_run(x, grid), left)
        undo()

    # ---- summary
    print("\n== vision_bench summary ==")
    print(f"{info}  weights {weights_gib:.3f} GiB")
    for wname in inputs:
        rows = [r for r in results if r["workload"] == wname and "ms" in r]
        if not rows:
            continue
        ours_best = min((r for r in rows if r["peer"].startswith("ours")), key=lambda r: r["ms"], default=None)
        fl = tower_flops(family, cfg, wls[wname])
        floor = f", GEMM-peak floor {fl / info['gemm_peak_tflops'] / 1e9:.2f} ms" if "gemm_peak_tflops" in info else ""
        print(f"\n[{wname}] {len(wls[wname])} images, {rows[0]['patches']} patches, {fl / 1e12:.2f} TFLOP{floor}")
        print(f"  {'peer':<30s} {'ms':>9s} {'img/s':>8s} {'TFLOP/s':>8s} {'MFU':>6s} {'peakGiB':>8s} "
              f"{'relL2':>9s} {'ours x':>7s}")
        for r in sorted(rows, key=lambda r: r["ms"]):
            ratio = r["ms"] / ours_best["ms"] if ours_best else float("nan")
            print(f"  {r['peer']:<30s} {r['ms']:9.3f} {r['img_per_s']:8.1f} {r['tflops']:8.1f} "
                  f"{r.get('mfu', 0.0):6.1%} {r['peak_act_gib']:8.3f} {r['rel_l2_vs_fp32']:9.2e} {ratio:7.2f}")
    (out_dir / "vision_bench.json").write_text(json.dumps({"info": info, "weights_gib": weights_gib,
                                                           "results": results}, indent=1))


if __name__ == "__main__":
    main()
