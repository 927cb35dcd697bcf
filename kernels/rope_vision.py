"""Qwen2-VL's 2-D vision rotary embedding, applied to q and k straight from the fused qkv output.

HF builds cos/sin of shape [S, D] as ``cat(cat(f_h, f_w), cat(f_h, f_w))`` (f_h = h * inv_freq,
f_w = w * inv_freq, D/4 frequencies each) and rotates with ``rotate_half``: the pairs are
(d, d + D/2). So one table of D/2 angles per token is all that is needed:
``y1 = x1 cos - x2 sin; y2 = x2 cos + x1 sin`` with x1 = x[:D/2], x2 = x[D/2:].

``rope_angles`` builds those [S, D/2] tables once per forward (cached per grid: ``tower.cached_meta``);
``apply_vision_rope_`` rotates q and k inside the [S, 3*H*D] qkv buffer in place (one read and
one write of q and k, no split/transpose copies). The attention kernel in ``attention.py`` can
instead apply the same rotation as it loads q and k, which skips this pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from ._utils import check_device, install_interpreter_fix, next_pow2, to_device_async

install_interpreter_fix()


def rope_positions(grid_thw: list[list[int]] | torch.Tensor, spatial_merge_size: int) -> torch.Tensor:
    """(h, w) patch coordinates [S, 2] int64 in the tower's token order (merge-block major), on CPU.

    Same order as HF's ``get_vision_position_ids``: within each image the tokens of one m x m merge
    block are consecutive; frames (t) repeat the spatial ids.
    """
    rows = grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else grid_thw
    m = spatial_merge_size
    out = []
    cache: dict[tuple[int, int], torch.Tensor] = {}
    for t, h, w in rows:
        key = (h, w)
        if key not in cache:
            hp = torch.arange(h).view(h // m, m, 1, 1).expand(h // m, m, w // m, m)
            wp = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, w // m, m)
            # block-major: (h_blk, w_blk, h_in, w_in)
            hp = hp.permute(0, 2, 1, 3).reshape(-1)
            wp = wp.permute(0, 2, 1, 3).reshape(-1)
            cache[key] = torch.stack([hp, wp], dim=-1)
        out.append(cache[key].repeat(t, 1))
    return torch.cat(out, dim=0) if out else torch.zeros(0, 2, dtype=torch.long)


def rope_angles(
    positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [S, D/2] fp32 from positions [S, 2] and inv_freq [D/4], on inv_freq's device.

    Column j < D/4 is h * inv_freq[j], column D/4 + j is w * inv_freq[j]: exactly HF's first D/2
    columns, computed with the same fp32 ops.
    """
    pos = to_device_async(positions, inv_freq.device).float()  # [S, 2]
    freqs = pos[:, :, None] * inv_freq.float()[None, None, :]  # [S, 2, D/4]
    ang = freqs.reshape(pos.shape[0], -1)  # [S, D/2] = cat(f_h, f_w)
    return padded_table(ang.cos()), padded_table(ang.sin())


def padded_table(t: torch.Tensor) -> torch.Tensor:
    """fp32 [S, D/2] view whose row stride is a multiple of 16 elements.

    Triton specializes integer arguments divisible by 16; with a row stride of 40 (D = 80) it can
    only assume 4-byte alignment and loads the table one float at a time. Padding rows to 48
    gives it 16-byte vector loads. The padding columns are never read.
    """
    t = t.float()
    s_len, half = t.shape
    if t.stride(-1) == 1 and (t.stride(0) % 16 == 0 or s_len <= 1):
        return t
    width = -(-half // 16) * 16
    out = torch.empty(s_len, width, dtype=torch.float32, device=t.device)[:, :half]
    out.copy_(t)
    return out


def rope_tables(cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin as every kernel here reads them: [S, D/2] fp32 with padded rows (``padded_table``)
    and one row stride. HF's full [S, D] tables are accepted too (their two halves are equal)."""
    if cos.shape[-1] == head_dim:
        half = head_dim // 2
        cos, sin = cos[:, :half], sin[:, :half]
    cos, sin = padded_table(cos), padded_table(sin)
    if cos.stride(0) != sin.stride(0):
        raise ValueError("cos and sin need the same row stride")
    return cos, sin


@triton.jit
def _vision_rope_kernel(
    Q,  # q input [S, H, D] (any row/head stride, last dim contiguous)
    K,  # k input
    QO,  # q output (may be Q: in place)
    KO,  # k output
    COS,  # [S, D/2] fp32
    SIN,
    S,
    stride_qs,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_qos,
    stride_qoh,
    stride_kos,
    stride_koh,
    stride_cs,
    HALF: tl.constexpr,
    HALF_P: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    head = tl.program_id(1)
    which = tl.program_id(2)  # 0: q, 1: k
    rows = (pid * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    cols = tl.arange(0, HALF_P)
    mask = (rows[:, None] < S) & (cols[None, :] < HALF)
    if which == 0:
        src = Q + rows[:, None] * stride_qs + head * stride_qh + cols[None, :]
        dst = QO + rows[:, None] * stride_qos + head * stride_qoh + cols[None, :]
    else:
        src = K + rows[:, None] * stride_ks + head * stride_kh + cols[None, :]
        dst = KO + rows[:, None] * stride_kos + head * stride_koh + cols[None, :]
    c = tl.load(COS + rows[:, None] * stride_cs + cols[None, :], mask=mask, other=0.0)
    s = tl.load(SIN + rows[:, None] * stride_cs + cols[None, :], mask=mask, other=0.0)
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * c - x2 * s
    y2 = x2 * c + x1 * s
    tl.store(dst, y1.to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, y2.to(dst.dtype.element_ty), mask=mask)


def apply_vision_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    q_out: torch.Tensor | None = None,
    k_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q, k [S, H, D] (strided views allowed) with cos, sin [S, D/2] (or HF's [S, D]).

    ``q_out=q, k_out=k`` rotates in place. fp32 math, outputs in the inputs' dtype (like HF's
    ``apply_rotary_pos_emb_vision``, which upcasts, rotates and casts back).
    """
    s_len, heads, d = q.shape
    half = d // 2
    if k.shape != q.shape:
        raise ValueError(f"k {tuple(k.shape)} != q {tuple(q.shape)}")
    cos, sin = rope_tables(cos, sin, d)
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q and k need a contiguous last dim")
    check_device(q, k, cos)
    qo = q_out if q_out is not None else torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = k_out if k_out is not None else torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if s_len == 0:
        return qo, ko
    half_p = next_pow2(half)
    block_s = max(1, min(64, 2048 // half_p))
    grid = (triton.cdiv(s_len, block_s), heads, 2)
    _vision_rope_kernel[grid](
        q, k, qo, ko, cos, sin, s_len,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1), cos.stride(0),
        HALF=half, HALF_P=half_p, BLOCK_S=block_s, num_warps=4,
    )
    return qo, ko


@triton.jit
def _rope_rows_kernel(
    X,  # [S, >= NCOL] the fused qkv output: q then k in the first NCOL = 2*H*D columns
    Y,  # [S, NCOL] out: rotated q | k
    COS,  # [S, HALF] fp32 (row stride stride_cs)
    SIN,
    S,
    stride_x,
    stride_y,
    stride_cs,
    NCOL: tl.constexpr,
    D: tl.constexpr,
    HALF: tl.constexpr,
    INTERLEAVED: tl.constexpr,  # pairs (2j, 2j+1) instead of (j, j + D/2): see interleave_qk_rows
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Whole-row tiles: each program streams BLOCK_S x BLOCK_C contiguous elements (16-B vectors);
    # the rotation partner (d +- D/2 in the same head) is a second, shifted load of the same
    # cache lines, and the cos/sin rows are tiny L1-resident gathers. Out of place, so a partner
    # owned by a neighbouring program is never read after being rotated.
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = (pid_s * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < S) & (cols[None, :] < NCOL)
    d = cols % D
    if INTERLEAVED:
        lo = d % 2 == 0
        j = d // 2
        partner = tl.where(lo, cols + 1, cols - 1)
    else:
        lo = d < HALF
        j = tl.where(lo, d, d - HALF)
        partner = tl.where(lo, cols + HALF, cols - HALF)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(X + rows[:, None] * stride_x + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    c = tl.load(COS + rows[:, None] * stride_cs + j[None, :], mask=mask, other=0.0)
    sn = tl.load(SIN + rows[:, None] * stride_cs + j[None, :], mask=mask, other=0.0)
    y = x * c + tl.where(lo[None, :], -xp, xp) * sn
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


def rope_qk(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, *, out: torch.Tensor | None = None,
    interleaved: bool = False,
) -> torch.Tensor:
    """Rotated q | k [S, 2*H*D] from the fused qkv output [S, 3*H*D] (v is left where it is).

    ``interleaved``: q/k columns are in ``interleave_qk_rows`` order (pairs adjacent)."""
    s_len, width = qkv.shape
    hd = width // 3
    d = hd // num_heads
    half = d // 2
    if qkv.stride(-1) != 1:
        raise ValueError("qkv needs a contiguous last dim")
    cos, sin = rope_tables(cos, sin, d)
    check_device(qkv, cos)
    y = out if out is not None else torch.empty(s_len, 2 * hd, dtype=qkv.dtype, device=qkv.device)
    if s_len == 0:
        return y
    block_c = 512
    block_s = 8
    grid = (triton.cdiv(s_len, block_s), triton.cdiv(2 * hd, block_c))
    _rope_rows_kernel[grid](
        qkv, y, cos, sin, s_len, qkv.stride(0), y.stride(0), cos.stride(0),
        NCOL=2 * hd, D=d, HALF=half, INTERLEAVED=interleaved, BLOCK_S=block_s, BLOCK_C=block_c, num_warps=4,
    )
    return y


def interleave_perm(head_dim: int) -> torch.Tensor:
    """Row order inside one head that puts each rotation pair side by side: new row 2j is old row
    j, new row 2j+1 is old row j + D/2. q.k is unchanged when q and k share the order."""
    half = head_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)


@torch.no_grad()
def interleave_qk_rows(t: torch.Tensor, num_heads: int, inverse: bool = False) -> torch.Tensor:
    """Permute the q and k rows of a qkv weight [3*H*D, K] or bias [3*H*D] in place (v untouched).

    With this order the rotary pairs are adjacent output columns of the qkv GEMM, so its epilogue
    (``gemm.linear_act(rope=...)``) can rotate them. ``inverse`` restores HF's order."""
    hd = t.shape[0] // 3
    d = hd // num_heads
    perm = interleave_perm(d).to(t.device)
    if inverse:
        perm = torch.argsort(perm)
    qk = t[: 2 * hd].reshape(2 * num_heads, d, *t.shape[1:])
    qk.copy_(qk[:, perm].clone())
    return t


def qkv_views(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [S, H, D] strided views of the fused qkv output [S, 3*H*D] (no copies)."""
    s_len = qkv.shape[0]
    v3 = qkv.view(s_len, 3, num_heads, -1)
    return v3[:, 0], v3[:, 1], v3[:, 2]


def apply_vision_rope_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Rotate the q and k parts of qkv [S, 3*H*D] in place; returns qkv."""
    q, k, _ = qkv_views(qkv, num_heads)
    apply_vision_rope(q, k, cos, sin, q_out=q, k_out=k)
    return qkv


class VisionRotary(nn.Module):
    """Caches nothing itself; holds ``inv_freq`` [D/4] and builds the [S, D/2] tables for a grid."""

    def __init__(self, inv_freq: torch.Tensor, spatial_merge_size: int) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.spatial_merge_size = spatial_merge_size

    def forward(self, grid_thw: torch.Tensor | list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_angles(rope_positions(grid_thw, self.spatial_merge_size), self.inv_freq)
