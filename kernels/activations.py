"""Bias + activation in one pass: QuickGELU for the vision MLP, exact GELU for the patch merger.

The GEMM before it runs without its bias (cuBLAS or ``gemm.py``), and this kernel adds the bias and
applies the activation while the [M, N] tile is in registers: one read and one write of the
largest activation in the tower (S x 5120), computed in fp32 and rounded once.
``gemm.py`` can also do the same in the GEMM's epilogue, which skips this pass entirely.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from ._utils import as_rows, check_device, elementwise_tiles, install_interpreter_fix

install_interpreter_fix()

ACT_NONE = 0
ACT_QUICK_GELU = 1
ACT_GELU = 2  # exact (erf) GELU, as nn.GELU() with approximate="none"
ACT_GELU_TANH = 3
ACT_SILU = 4

_ACT_BY_NAME = {
    "none": ACT_NONE,
    "identity": ACT_NONE,
    "quick_gelu": ACT_QUICK_GELU,
    "gelu": ACT_GELU,
    "gelu_pytorch_tanh": ACT_GELU_TANH,
    "gelu_tanh": ACT_GELU_TANH,
    "silu": ACT_SILU,
    "swish": ACT_SILU,
}


def act_code(name: str) -> int:
    try:
        return _ACT_BY_NAME[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(_ACT_BY_NAME)}") from None


@triton.jit
def apply_act(x, ACT: tl.constexpr):
    """fp32 activation, shared with the GEMM epilogue in ``gemm.py``."""
    if ACT == 1:
        # QuickGELU: x * sigmoid(1.702 x)
        x = x * tl.sigmoid(1.702 * x)
    elif ACT == 2:
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 3:
        # tanh(u) = 2 sigmoid(2u) - 1, so 0.5 x (1 + tanh(u)) = x sigmoid(2u)
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = x * tl.sigmoid(2.0 * u)
    elif ACT == 4:
        x = x * tl.sigmoid(x)
    return x


@triton.jit
def _bias_act_kernel(
    X,  # [M, N]
    B,  # [N] bias (HAS_BIAS)
    Y,  # [M, N] out (may alias X)
    M,
    N,
    stride_x,
    stride_y,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x = x + tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    y = apply_act(x, ACT)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


def bias_act(
    x: torch.Tensor, bias: torch.Tensor | None, act: str | int, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``act(x + bias)`` over x [..., N]; ``out=x`` works in place."""
    code = act if isinstance(act, int) else act_code(act)
    n = x.shape[-1]
    x2 = as_rows(x, n)
    check_device(x2)
    m = x2.shape[0]
    y = out if out is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y2 = y.view(-1, n)
    if m == 0:
        return y
    block_m, block_n, grid = elementwise_tiles(m, n)
    _bias_act_kernel[grid](
        x2, bias if bias is not None else x2, y2, m, n, x2.stride(0), y2.stride(0),
        ACT=code, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )
    return y


def bias_quick_gelu(x: torch.Tensor, bias: torch.Tensor | None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``q = x + bias; q * sigmoid(1.702 q)``."""
    return bias_act(x, bias, ACT_QUICK_GELU, out=out)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``GELU(x + bias)``, exact (erf) form."""
    return bias_act(x, bias, ACT_GELU, out=out)


class TritonBiasAct(nn.Module):
    """``act(x + bias)`` as a module; called with x alone it is a drop-in for ``ACT2FN[act]``.

    The bias is an argument, not a parameter: it belongs to the Linear before it, and registering it
    here too would add a second state-dict key for the same tensor.
    """

    def __init__(self, act: str = "quick_gelu") -> None:
        super().__init__()
        self.act = act
        self.code = act_code(act)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return bias_act(x, bias, self.code)

    def extra_repr(self) -> str:
        return f"act={self.act}, triton"


class TritonQuickGELU(TritonBiasAct):
    def __init__(self) -> None:
        super().__init__("quick_gelu")


class TritonGELU(TritonBiasAct):
    def __init__(self) -> None:
        super().__init__("gelu")
