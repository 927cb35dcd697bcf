"""RMSNorm for inference, optionally fused with the residual add before it (Qwen2.5-VL's vision tower).

Same shape of work as ``layer_norm.py``: one program per row, fp32 statistics, one pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from ._utils import install_interpreter_fix, next_pow2, norm_rows, row_warps

install_interpreter_fix()


@triton.jit
def _rms_norm_kernel(
    X,  # [M, N] input (branch output when HAS_RES)
    R,  # [M, N] residual stream (HAS_RES)
    W,  # [N] weight
    H,  # [M, N] out: x + r (HAS_RES)
    Y,  # [M, N] out: RMSNorm(x [+ r])
    stride_x,
    stride_r,
    stride_h,
    stride_y,
    N,
    eps,
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        # the stream is kept in its own dtype (as HF does): normalize the rounded sum
        hs = (x + r).to(H.dtype.element_ty)
        tl.store(H + row * stride_h + cols, hs, mask=mask)
        x = hs.to(tl.float32)
    ms = tl.sum(x * x, axis=0) / N
    y = x * tl.math.rsqrt(ms + eps)
    if HAS_W:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


def _launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    eps: float,
    out: torch.Tensor | None,
    out_sum: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    x2, r2, h2, y2, y = norm_rows(x, residual, out, out_sum)
    m, n = x2.shape
    if m:
        block = next_pow2(n)
        _rms_norm_kernel[(m,)](
            x2, r2, weight if weight is not None else x2, h2, y2,
            x2.stride(0), r2.stride(0), h2.stride(0), y2.stride(0),
            n, eps,
            HAS_RES=residual is not None, HAS_W=weight is not None,
            BLOCK_N=block, num_warps=row_warps(block, x.element_size()),
        )
    return (h2.view(x.shape) if residual is not None else None), y


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` [..., N]; fp32 statistics, output in x's dtype."""
    return _launch(x, None, weight, eps, out, None)[1]


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-6,
    *,
    out: torch.Tensor | None = None,
    out_sum: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual; return h, RMSNorm(h)``."""
    h, y = _launch(x, residual, weight, eps, out, out_sum)
    assert h is not None
    return h, y


class TritonRMSNorm(nn.Module):
    """Drop-in for HF's ``Qwen2RMSNorm`` (``weight``, ``variance_epsilon``), inference only."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps

    @classmethod
    def from_module(cls, norm: nn.Module) -> TritonRMSNorm:
        """Adopt an HF RMSNorm's weight Parameter (shared, not copied)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.weight = norm.weight
        eps = getattr(norm, "variance_epsilon", None)
        new.variance_epsilon = float(eps if eps is not None else getattr(norm, "eps", 1e-6))
        return new

    def add(
        self, x: torch.Tensor, residual: torch.Tensor, *, out: torch.Tensor | None = None,
        out_sum: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + residual, RMSNorm(x + residual))`` in one pass (``add_rms_norm``)."""
        return add_rms_norm(x, residual, self.weight, self.variance_epsilon, out=out, out_sum=out_sum)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return rms_norm(x, self.weight, self.variance_epsilon)
        return self.add(x, residual)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, triton"
