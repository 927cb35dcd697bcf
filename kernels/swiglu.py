"""SwiGLU: ``silu(gate) * up`` in one pass (Qwen2.5-VL's vision MLP).

``gate`` and ``up`` may be column slices of one fused [M, 2N] GEMM output (any row stride);
their biases can be added here so the GEMMs run bias-free. fp32 math, one rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from ._utils import as_rows, check_device, elementwise_tiles, install_interpreter_fix

install_interpreter_fix()


@triton.jit
def _swiglu_kernel(
    G,  # [M, N] gate (pre-activation)
    U,  # [M, N] up
    BG,  # [N] gate bias (HAS_BG)
    BU,  # [N] up bias (HAS_BU)
    Y,  # [M, N] out
    M,
    N,
    stride_g,
    stride_u,
    stride_y,
    HAS_BG: tl.constexpr,
    HAS_BU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BG:
        g = g + tl.load(BG + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BU:
        u = u + tl.load(BU + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    y = g * tl.sigmoid(g) * u
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


def swiglu(
    gate: torch.Tensor,
    up: torch.Tensor,
    gate_bias: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``silu(gate + bg) * (up + bu)`` over [..., N] inputs (either bias may be None)."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} != up {tuple(up.shape)}")
    n = gate.shape[-1]
    g2, u2 = as_rows(gate, n), as_rows(up, n)
    check_device(g2, u2)
    m = g2.shape[0]
    y = out if out is not None else torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    y2 = y.view(-1, n)
    if m == 0:
        return y
    block_m, block_n, grid = elementwise_tiles(m, n)
    _swiglu_kernel[grid](
        g2, u2, gate_bias if gate_bias is not None else g2, up_bias if up_bias is not None else g2, y2, m, n,
        g2.stride(0), u2.stride(0), y2.stride(0),
        HAS_BG=gate_bias is not None, HAS_BU=up_bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )
    return y


class TritonSwiGLUMLP(nn.Module):
    """Drop-in for Qwen2.5-VL's ``Qwen2_5_VLMLP`` (gate_proj, up_proj, down_proj; SiLU).

    The gate and up GEMMs run bias-free through cuBLAS; both biases and the gating happen in one
    pass of ``swiglu``. Submodule names match HF's, so state dicts are unchanged.
    """

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear) -> None:
        super().__init__()
        self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj

    @classmethod
    def from_module(cls, mlp: nn.Module) -> TritonSwiGLUMLP:
        act = getattr(mlp, "act_fn", None)
        name = type(act).__name__.lower() if act is not None else "silu"
        if "silu" not in name and "swish" not in name:
            raise ValueError(f"SwiGLU replacement needs a SiLU MLP, got {type(act).__name__}")
        return cls(mlp.gate_proj, mlp.up_proj, mlp.down_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = F.linear(x, self.gate_proj.weight)
        u = F.linear(x, self.up_proj.weight)
        return self.down_proj(swiglu(g, u, self.gate_proj.bias, self.up_proj.bias))
