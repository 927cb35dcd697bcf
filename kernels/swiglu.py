"""SwiGLU: ``silu(gate) * up`` in one pass, and Qwen2.5-VL's vision MLP built on it.

``gate`` and ``up`` may be column slices of one fused [M, 2N] GEMM output (any row stride);
their biases can be added here so the GEMMs run bias-free. fp32 math, one rounding.
``TritonSwiGLUMLP`` runs the MLP either that way (cuBLAS GEMMs + this pass) or with the gating in
the epilogue of one two-weight GEMM (``gemm.linear_act(up=...)``).
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


def aligned_width(n: int, elem_bytes: int) -> int:
    """Elements per row once rows are padded to a multiple of 16 bytes."""
    per = max(1, 16 // elem_bytes)
    return -(-n // per) * per


def empty_aligned_rows(m: int, n: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """An uninitialized [m, n] view whose row stride is padded to a multiple of 16 bytes."""
    width = aligned_width(n, dtype.itemsize)
    return torch.empty(m, width, dtype=dtype, device=device)[:, :n]


# The intermediate width is padded to a multiple of this many elements: with Qwen2.5-VL's I = 3420
# (not a multiple of 8) cuBLAS ran the down projection at 228 TFLOP/s on an H200 (kernel_bench
# mlp25, 32768 rows). Zero weight rows in gate/up and zero columns in down add exact zeros.
PAD_TO = 64


def padded_width(n: int, multiple: int = PAD_TO) -> int:
    return -(-n // multiple) * multiple


@torch.no_grad()
def pad_(p: nn.Parameter, shape: tuple[int, ...]) -> torch.Tensor:
    """Re-home ``p`` into zeros of ``shape`` (each dim at least p's): same Parameter object, same
    values, now a view of the leading block of the returned padded storage."""
    storage = torch.zeros(shape, dtype=p.dtype, device=p.device)
    view = storage[tuple(slice(0, n) for n in p.shape)]
    view.copy_(p.data)
    p.data = view
    return storage


def align_rows_(p: nn.Parameter) -> bool:
    """Re-home a 2-D parameter's storage so each row starts 16-byte aligned (``pad_`` to the aligned
    width); same Parameter object, same values, padding columns never read. Returns whether it moved.

    TMA descriptors need 16-byte row strides: Qwen2.5-VL's down_proj.weight [1280, 3420] in bf16 has
    6840-byte rows. (For cuBLAS aligned rows bought nothing on an H200; ``TritonSwiGLUMLP`` pads the
    width to ``PAD_TO`` instead. kernel_bench --only mlp25 measures both.)"""
    n, k = p.shape
    width = aligned_width(k, p.element_size())
    if p.stride() == (width, 1):
        return False
    pad_(p, (n, width))
    return True


def _contiguous_down_weight(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict() gives the padded down_proj.weight as a contiguous tensor (savable as is)."""
    key = prefix + "down_proj.weight"
    if key in state_dict and not state_dict[key].is_contiguous():
        state_dict[key] = state_dict[key].contiguous()


class TritonSwiGLUMLP(nn.Module):
    """Drop-in for Qwen2.5-VL's ``Qwen2_5_VLMLP``: ``down(silu(gate(x)) * up(x))``, biases on all three.

    ``mode``: ``"triton"``: gate and up in one GEMM kernel with the gating in its epilogue
    (``gemm.linear_act(up=...)``: the [M, I] halves are never written); ``"cublas"``: two bias-free
    cuBLAS GEMMs then one ``swiglu`` pass (biases and gating); ``"auto"``: ``"cublas"`` (with the
    padded width, H200: 1.39 vs 1.56 ms at 32,768 rows, 0.088 vs 0.138 at 1,024). Then cuBLAS for
    down_proj.

    The intermediate width I is padded to a multiple of ``PAD_TO``: the three weights (and the
    biases) are re-homed once into zero-padded storage (``pad_``: same Parameter objects, state
    dicts unchanged), so every GEMM sees aligned shapes and the padding adds exact zeros. Weights
    moved or replaced later (``.to()``) run unpadded, correctly. Submodule names match HF's.
    Inference only.
    """

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, mode: str = "cublas") -> None:
        super().__init__()
        self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj
        self.mode = mode
        inter, hidden = gate_proj.weight.shape
        width = padded_width(inter)
        # [gate W, up W, gate b, up b, down W] -> its zero-padded storage (None: no bias)
        self._padded = [pad_(gate_proj.weight, (width, hidden)), pad_(up_proj.weight, (width, hidden))] + [
            None if lin.bias is None else pad_(lin.bias, (width,)) for lin in (gate_proj, up_proj)] + [
            pad_(down_proj.weight, (down_proj.weight.shape[0], width))]
        self.register_state_dict_post_hook(_contiguous_down_weight)

    @classmethod
    def from_module(cls, mlp: nn.Module, mode: str = "cublas") -> TritonSwiGLUMLP:
        act = getattr(mlp, "act_fn", None)
        name = type(act).__name__.lower() if act is not None else "silu"
        if "silu" not in name and "swish" not in name:
            raise ValueError(f"SwiGLU replacement needs a SiLU MLP, got {type(act).__name__}")
        return cls(mlp.gate_proj, mlp.up_proj, mlp.down_proj, mode)

    def _weights(self) -> tuple[torch.Tensor | None, ...]:
        """(gate W, up W, gate b, up b, down W): the padded storages while the parameters still view
        them, else the parameters themselves (biases None when absent)."""
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        params = (gate.weight, up.weight, gate.bias, up.bias, down.weight)
        intact = all((p is None) == (full is None) and (p is None or (
            p.data_ptr() == full.data_ptr() and p.device == full.device and p.dtype == full.dtype))
            for p, full in zip(params, self._padded, strict=True))
        return tuple(self._padded) if intact else params

    def gated(self, x2: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """x2 [M, C] -> silu(gate(x2)) * up(x2) [M, W] (W: the padded width, or I), rows 16-byte aligned."""
        from .gemm import linear_act

        gate_w, up_w, gate_b, up_b, _ = weights
        m, n = x2.shape[0], gate_w.shape[0]
        g = empty_aligned_rows(m, n, x2.dtype, x2.device)
        if self.mode == "triton":
            return linear_act(x2, gate_w, gate_b, "silu", up=(up_w, up_b), out=g)
        u = empty_aligned_rows(m, n, x2.dtype, x2.device)
        torch.mm(x2, gate_w.t(), out=g)  # (mm writes into the padded rows: no copy)
        torch.mm(x2, up_w.t(), out=u)
        return swiglu(g, u, gate_b, up_b, out=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = as_rows(x, x.shape[-1])
        weights = self._weights()
        y = F.linear(self.gated(x2, weights), weights[4], self.down_proj.bias)  # [M, C]
        return y.view(*x.shape[:-1], y.shape[-1])
