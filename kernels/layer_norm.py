"""Inference LayerNorm, optionally fused with the residual add that precedes it.

The Qwen2-VL vision block is ``h = h + attn(norm1(h)); h = h + mlp(norm2(h))``. Every norm but the
first reads the residual sum that was just formed, so one kernel does "h = x + r; y = LN(h)" and
returns both: one pass over two [S, C] inputs writing two [S, C] outputs, where the unfused
version reads h three times and writes it twice (add, then norm).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from ._utils import install_interpreter_fix, next_pow2, norm_rows, row_warps

install_interpreter_fix()


@triton.jit
def normalize_row(x, cols, mask, W, B, N, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """LayerNorm of one fp32 row held in registers (masked lanes are 0): two-pass mean and
    variance, then the affine; shared with the kernels that form the row themselves."""
    mean = tl.sum(x, axis=0) / N
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / N
    y = xc * tl.math.rsqrt(var + eps)
    if HAS_W:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    return y


@triton.jit
def _layer_norm_kernel(
    X,  # [M, N] input (the block's branch output when HAS_RES)
    R,  # [M, N] residual stream (read only when HAS_RES)
    W,  # [N] weight
    B,  # [N] bias
    H,  # [M, N] out: x + r, in the stream dtype (written only when HAS_RES)
    Y,  # [M, N] out: LayerNorm(x [+ r])
    stride_x,
    stride_r,
    stride_h,
    stride_y,
    N,
    eps,
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One program per row: C = 1280 fits one tile, so mean and variance come from registers
    # (two-pass, exact) and each element is read once and written once.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        # Round the sum to the stream dtype before normalizing it: HF adds in that dtype, and the
        # next block reads the rounded value, so the norm must see the same one.
        hs = (x + r).to(H.dtype.element_ty)
        tl.store(H + row * stride_h + cols, hs, mask=mask)
        x = hs.to(tl.float32)
    y = normalize_row(x, cols, mask, W, B, N, eps, HAS_W, HAS_B)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


def _launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    out: torch.Tensor | None,
    out_sum: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    x2, r2, h2, y2, y = norm_rows(x, residual, out, out_sum)
    m, n = x2.shape
    if m:
        block = next_pow2(n)
        _layer_norm_kernel[(m,)](
            x2, r2, weight if weight is not None else x2, bias if bias is not None else x2, h2, y2,
            x2.stride(0), r2.stride(0), h2.stride(0), y2.stride(0),
            n, eps,
            HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None,
            BLOCK_N=block, num_warps=row_warps(block, x.element_size()),
        )
    return (h2.view(x.shape) if residual is not None else None), y


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-6,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm over the last dim of ``x`` [..., N]; statistics in fp32, output in x's dtype."""
    return _launch(x, None, weight, bias, eps, out, None)[1]


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-6,
    *,
    out: torch.Tensor | None = None,
    out_sum: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual; return h, LayerNorm(h)``. ``out_sum=residual`` updates the stream in place."""
    h, y = _launch(x, residual, weight, bias, eps, out, out_sum)
    assert h is not None
    return h, y


class TritonLayerNorm(nn.Module):
    """Drop-in for ``nn.LayerNorm`` (inference) with an optional fused residual add.

    ``forward(x)`` -> ``LN(x)``; ``forward(x, residual)`` -> ``(x + residual, LN(x + residual))``.
    Parameter names match ``nn.LayerNorm`` so state dicts load either way.
    """

    def __init__(
        self,
        normalized_shape: int,
        eps: float = 1e-6,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.normalized_shape = (normalized_shape,)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(normalized_shape, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(normalized_shape, device=device, dtype=dtype)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    @classmethod
    def from_torch(cls, ln: nn.LayerNorm) -> TritonLayerNorm:
        """Adopt ``ln``'s Parameter objects (no copy: weights stay shared and tied)."""
        if len(ln.normalized_shape) != 1:
            raise ValueError("only a LayerNorm over the last dim is supported")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.normalized_shape = tuple(ln.normalized_shape)
        new.eps = ln.eps
        new.elementwise_affine = ln.elementwise_affine
        new.weight = ln.weight
        new.bias = ln.bias
        return new

    def add(
        self, x: torch.Tensor, residual: torch.Tensor, *, out: torch.Tensor | None = None,
        out_sum: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + residual, LN(x + residual))`` in one pass (``add_layer_norm``)."""
        return add_layer_norm(x, residual, self.weight, self.bias, self.eps, out=out, out_sum=out_sum)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return layer_norm(x, self.weight, self.bias, self.eps)
        return self.add(x, residual)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, triton"
