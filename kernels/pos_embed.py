"""Qwen3-VL's learned position embedding, resampled to each image's grid and added to the patch
embeddings, fused with the first block's LayerNorm.

The tower holds a square table of G x G position vectors (``pos_embed``, G = 48 for the real
configs) and resamples it bilinearly (``align_corners=True``) onto every image's h x w patch grid,
in the tower's 2x2 merge-block token order. That is a fixed 4-tap stencil per patch: 4 table rows
and 4 weights that depend only on the grid. ``resample_taps`` builds them once per grid (cached
with the rest of the per-grid metadata); the kernel gathers the 4 rows (the table, 5 MB in bf16,
stays in L2), adds the weighted sum to the patch embedding and normalizes the result with block
0's ``norm1``, writing the residual stream and the normed rows in one pass. HF instead gathers
[S, 4, C], multiplies, sums, adds and normalizes: five passes over S x C or more.

The kernel reads the table at every call, so reloading the weights needs no invalidation; only
the grid-dependent taps are cached.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import as_rows, check_device, install_interpreter_fix, next_pow2, row_warps
from .layer_norm import normalize_row

install_interpreter_fix()

TAPS = 4  # bilinear: 2 rows x 2 columns of the table per patch


def _axis_taps(n: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Taps [n, 2] int64 and weights [n, 2] fp32 of linear resampling (align_corners=True) from
    ``side`` points onto ``n``; the same fp32 ops as transformers' ``vision_utils`` so the weights
    are bitwise HF's."""
    src = torch.arange(n, dtype=torch.float32) * (side - 1) / max(n - 1, 1)
    floor = src.floor()
    off = torch.arange(2)
    taps = (floor.long()[:, None] + off).clamp(0, side - 1)
    weights = (1 - (src[:, None] - floor[:, None] - off).abs()).clamp(min=0)
    return taps, weights


def resample_taps(
    grid: tuple[tuple[int, int, int], ...] | list, side: int, spatial_merge_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Table rows [S, 4] int32 and weights [S, 4] fp32 that resample a ``side`` x ``side`` table onto
    every patch of ``grid`` (rows ``(t, h, w)``), in the tower's merge-block order, frames repeated;
    on the CPU. Tap k of a patch is (row tap k // 2, column tap k % 2), as in HF."""
    from .rope_vision import rope_positions

    index, weight = [], []
    for t, h, w in grid:
        th, wh = _axis_taps(h, side)
        tw, ww = _axis_taps(w, side)
        idx = (th[:, None, :, None] * side + tw[None, :, None, :]).reshape(h, w, TAPS)  # [h, w, 4]
        wt = (wh[:, None, :, None] * ww[None, :, None, :]).reshape(h, w, TAPS)
        pos = rope_positions([(1, h, w)], spatial_merge_size)  # [h*w, 2] (row, col), merge-block order
        index.append(idx[pos[:, 0], pos[:, 1]].repeat(t, 1))
        weight.append(wt[pos[:, 0], pos[:, 1]].repeat(t, 1))
    if not index:
        return torch.zeros(0, TAPS, dtype=torch.int32), torch.zeros(0, TAPS)
    return torch.cat(index).to(torch.int32), torch.cat(weight)


@triton.jit
def _pos_embed_layer_norm_kernel(
    X,  # [S, N] patch embeddings
    T,  # [G*G, N] learned position table
    IDX,  # [S, TAPS] int32 table rows per patch
    WT,  # [S, TAPS] fp32 weights per patch
    W,  # [N] LayerNorm weight
    B,  # [N] LayerNorm bias
    H,  # [S, N] out: x + resampled embedding (the residual stream; may be X)
    Y,  # [S, N] out: LayerNorm(h)
    stride_x,
    stride_t,
    stride_h,
    stride_y,
    N,
    eps,
    TAPS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One program per patch: the TAPS table rows are L2-resident gathers, the patch row is read once
    # and the stream row and its normed row are written once.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    pe = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k in tl.static_range(TAPS):
        i = tl.load(IDX + row * TAPS + k).to(tl.int64)
        w = tl.load(WT + row * TAPS + k)
        pe += w * tl.load(T + i * stride_t + cols, mask=mask, other=0.0).to(tl.float32)
    # HF rounds the resampled embedding to the patch embeddings' dtype and adds in that dtype; the
    # blocks read the rounded sum, so the norm must see the same one.
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    pe = pe.to(x.dtype).to(tl.float32)
    hs = (x.to(tl.float32) + pe).to(H.dtype.element_ty)
    tl.store(H + row * stride_h + cols, hs, mask=mask)
    y = normalize_row(hs.to(tl.float32), cols, mask, W, B, N, eps, HAS_W, HAS_B)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


def pos_embed_add_layer_norm(
    x: torch.Tensor,
    table: torch.Tensor,
    index: torch.Tensor,
    weight: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    eps: float = 1e-6,
    *,
    out: torch.Tensor | None = None,
    out_sum: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + sum_k weight[:, k] * table[index[:, k]]; return h, LayerNorm(h)``.

    x [S, N] (patch embeddings), table [R, N], index [S, TAPS] int32 and weight [S, TAPS] fp32 on
    x's device (``resample_taps``). ``out_sum=x`` updates x in place.
    """
    n = x.shape[-1]
    x2 = as_rows(x, n)
    s_len = x2.shape[0]
    if table.shape[-1] != n or table.stride(-1) != 1:
        raise ValueError(f"table {tuple(table.shape)} must be [rows, {n}] with a contiguous last dim")
    if index.shape != (s_len, TAPS) or weight.shape != (s_len, TAPS):
        raise ValueError(f"index/weight must be [{s_len}, {TAPS}], got {tuple(index.shape)}, {tuple(weight.shape)}")
    index = index.to(torch.int32).contiguous()
    weight = weight.to(torch.float32).contiguous()
    check_device(x2, table, index, weight)
    h = out_sum if out_sum is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y = out if out is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h2, y2 = h.view(-1, n), y.view(-1, n)
    if s_len:
        block = next_pow2(n)
        _pos_embed_layer_norm_kernel[(s_len,)](
            x2, table, index, weight, ln_weight if ln_weight is not None else x2,
            ln_bias if ln_bias is not None else x2, h2, y2,
            x2.stride(0), table.stride(0), h2.stride(0), y2.stride(0), n, eps,
            TAPS=TAPS, HAS_W=ln_weight is not None, HAS_B=ln_bias is not None,
            BLOCK_N=block, num_warps=row_warps(block, x.element_size()),
        )
    return h, y
