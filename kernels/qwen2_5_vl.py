"""Qwen2.5-VL's vision tower: module swaps on our kernels (``kernels.patch`` calls ``patch_tower``).

Its window-attention forward stays HF's.
"""

from __future__ import annotations

from torch import nn


def patch_tower(tower: nn.Module, prefix: str, attention: str, mlp: str, rope_gemm: bool) -> dict[str, str]:
    """RMSNorm and SwiGLU modules swapped in place (``attention``, ``mlp``, ``rope_gemm`` unused yet)."""
    from .rms_norm import TritonRMSNorm
    from .swiglu import TritonSwiGLUMLP

    done: dict[str, str] = {}
    p = f"{prefix}." if prefix else ""
    for i, blk in enumerate(tower.blocks):
        for name in ("norm1", "norm2"):
            done[f"{p}blocks.{i}.{name}"] = f"{type(getattr(blk, name)).__name__} -> TritonRMSNorm"
            setattr(blk, name, TritonRMSNorm.from_module(getattr(blk, name)))
        done[f"{p}blocks.{i}.mlp"] = f"{type(blk.mlp).__name__} -> TritonSwiGLUMLP"
        blk.mlp = TritonSwiGLUMLP.from_module(blk.mlp)
    done[f"{p}merger.ln_q"] = f"{type(tower.merger.ln_q).__name__} -> TritonRMSNorm"
    tower.merger.ln_q = TritonRMSNorm.from_module(tower.merger.ln_q)
    tower._splitvl_modules_patched = True  # module swaps only: no fused forward to graph
    return done


