"""Fused Triton kernels for the language model's GPU path (bf16 / fp16 only).

Each one replaces a chain of small PyTorch ops that would otherwise cost a kernel launch apiece
(a decode step at batch 1 is launch-bound, not bandwidth-bound, without them):

- ``rms_norm(x, weight, eps, residual, add)``: optional residual add (and a second add: the
  DeepStack features after a layer), then RMSNorm, in one pass;
- ``rope_kv(qkv, cos, sin, k_cache, v_cache, slots, cache_pos, qk_norm)``: rotates q and k (M-RoPE
  cos/sin already selected per frequency; Qwen3's per-head RMSNorm of q and k first), writes k and
  v straight into the static cache, and returns q;
- ``silu_mul(gate_up)``: SiLU(gate) * up;
- ``gate_up_silu(x, weight)``: the gate/up projection and SiLU(gate) * up in one kernel, for up to
  16 rows (a decode step): narrower tiles than cuBLAS picks there, and no [rows, 2 I] round trip;
- ``linear_parts(x, weight)`` then ``rms_norm_of_parts(parts, ...)``: a few-row projection split
  along K into fp32 partial sums, which the residual-add + RMSNorm kernel adds up (the down
  projection: no separate reduction kernel, deterministic);
- ``decode_attention(qkv, cos, sin, k_cache, v_cache, cache_pos, qk_norm)``: a decode step's
  attention from the qkv projection: q and k (normed, for Qwen3, then) rotated, k and v written
  into the cache, then one query token
  per batch row over the row's cache ``[0, cache_pos]`` (the bound is read on the device, so one
  CUDA graph serves every length), split along the cache into parts attended in parallel
  (flash-decoding; at batch 1 there would be only one program per KV head), grouped-query heads
  sharing one pass over their KV head, online softmax in fp32, then the parts combined.

The elementwise kernels round to the activation dtype wherever PyTorch's eager ops do (HF's
numerics: RMSNorm in fp32 cast back before the weight, rope products rounded one by one), so the
fused path differs from the eager one only by reduction order. Any even head size works (tiles of
the next power of two, masked). Import this module lazily: under
``TRITON_INTERPRET=1`` (CPU tests) the environment must be set before the kernels are defined.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._utils import install_interpreter_fix, next_pow2

install_interpreter_fix()  # loop bounds read from memory, under TRITON_INTERPRET=1 (CPU tests)


# -- RMSNorm (+ residual) -------------------------------------------------------------------------


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, add_ptr, w_ptr, y_ptr, res_out_ptr, n_cols, eps, part_stride,
                     HAS_RES: tl.constexpr, HAS_ADD: tl.constexpr, PARTS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < n_cols
    if PARTS == 0:
        x = tl.load(x_ptr + row * n_cols + cols, mask=m, other=0.0)
    else:  # x is a projection's fp32 partial sums [PARTS, rows, n_cols]: summed, then rounded as its output
        acc = tl.zeros([BLOCK], tl.float32)
        for part in tl.static_range(PARTS):
            acc += tl.load(x_ptr + part * part_stride + row * n_cols + cols, mask=m, other=0.0)
        x = acc.to(y_ptr.dtype.element_ty)
    if HAS_RES:
        r = tl.load(res_ptr + row * n_cols + cols, mask=m, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
        if HAS_ADD:  # a second add, rounded on its own as the eager ``(x + r) + a`` rounds
            a = tl.load(add_ptr + row * n_cols + cols, mask=m, other=0.0)
            x = (x.to(tl.float32) + a.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * n_cols + cols, x, mask=m)
    h = x.to(tl.float32)
    var = tl.sum(h * h, axis=0) / n_cols
    normed = (h * tl.rsqrt(var + eps)).to(y_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * n_cols + cols, (w * normed).to(y_ptr.dtype.element_ty), mask=m)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             add: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., n] -> (h, y): h = (x + residual) + add (x itself without a residual; ``add``, shaped
    like x, needs one), y = weight * RMSNorm(h)."""
    n = x.shape[-1]
    x2 = _rows(x, n)
    y = torch.empty_like(x2)
    if residual is not None:
        r2 = _rows(residual, n)
        h = torch.empty_like(x2)
    else:
        assert add is None, "add comes after a residual add"
        r2, h = x2, x2
    _launch_rms_norm(x2, r2, weight, y, h, eps, has_res=residual is not None, add=add)
    return h.view(x.shape), y.view(x.shape)


def rms_norm_of_parts(parts: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor,
                      add: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``rms_norm(sum(parts).to(residual.dtype), weight, eps, residual, add)`` in one kernel: parts
    [P, rows, n] fp32 (``linear_parts``), residual [rows, n] -> (h, y) as ``rms_norm``."""
    assert parts.is_contiguous() and residual.is_contiguous() and residual.shape == parts.shape[1:]
    y, h = torch.empty_like(residual), torch.empty_like(residual)
    _launch_rms_norm(parts, residual, weight, y, h, eps, has_res=True, parts=parts.shape[0], add=add)
    return h, y


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` [..., n] as contiguous rows [M, n] (a copy only when it is not contiguous)."""
    t2 = t.reshape(-1, n)
    return t2 if t2.is_contiguous() else t2.contiguous()


def _launch_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, h: torch.Tensor,
                     eps: float, *, has_res: bool, parts: int = 0, add: torch.Tensor | None = None) -> None:
    """One program per row of y [rows, n]; x is [rows, n], or [parts, rows, n] fp32 partial sums;
    ``add`` rows like y, or None."""
    rows, n = y.shape
    block = next_pow2(n)
    a2 = residual if add is None else _rows(add, n)
    assert a2.shape == y.shape
    _rms_norm_kernel[(rows,)](x, residual, a2, weight, y, h, n, eps, rows * n, HAS_RES=has_res,
                              HAS_ADD=add is not None, PARTS=parts, BLOCK=block,
                              num_warps=max(1, min(8, block // 256)))


# -- rotary embedding + KV-cache write ------------------------------------------------------------


@triton.jit
def _rope_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, slot_ptr, pos_ptr, q_norm_ptr, k_norm_ptr,
                    qkv_stride, cs_stride, q_stride_row, q_stride_head,
                    c_stride_s, c_stride_h, c_stride_l, max_pos, eps,
                    H: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, BLOCK_D: tl.constexpr,
                    QK_NORM: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    dm = d < 2 * HALF
    src = qkv_ptr + row * qkv_stride + head * (2 * HALF) + d
    slot = tl.load(slot_ptr + row).to(tl.int64)
    pos = tl.minimum(tl.load(pos_ptr + row), max_pos - 1).to(tl.int64)
    if head < H + HKV:
        c = tl.load(cos_ptr + row * cs_stride + d, mask=dm, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + row * cs_stride + d, mask=dm, other=0.0).to(tl.float32)
        if head < H:
            dst = q_ptr + row * q_stride_row + head * q_stride_head
            norm = q_norm_ptr
        else:
            dst = k_ptr + slot * c_stride_s + (head - H) * c_stride_h + pos * c_stride_l
            norm = k_norm_ptr
        tl.store(dst + d, _rotate_row(src, d, dm, c, s, norm, eps, HALF, QK_NORM), mask=dm)
    else:
        dst = v_ptr + slot * c_stride_s + (head - H - HKV) * c_stride_h + pos * c_stride_l
        tl.store(dst + d, tl.load(src, mask=dm), mask=dm)


def rope_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            slots: torch.Tensor, cache_pos: torch.Tensor, num_heads: int, num_kv_heads: int,
            qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
    """Rotate and scatter one layer's projections of ``N`` tokens.

    qkv [N, (H + 2 Hkv) * D] (q, k, v heads stacked); cos, sin [N, D] in qkv's dtype;
    k_cache, v_cache [S, Hkv, L, D] (a layer's cache, last dim contiguous, same strides);
    slots, cache_pos [N] long: where token n's key and value go (positions past L - 1 are clamped);
    qk_norm (Qwen3): the q and k RMSNorm weights [D] and eps, applied to each head before the rotary.
    Returns q [N, H, D], rotated.
    """
    n = qkv.shape[0]
    d = k_cache.shape[-1]
    assert qkv.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride(-1) == 1 and k_cache.stride(-1) == 1
    assert k_cache.stride() == v_cache.stride() and cos.stride() == sin.stride() and d % 2 == 0
    q_norm, k_norm, eps = qk_norm if qk_norm is not None else (cos, cos, 0.0)
    q = torch.empty(n, num_heads, d, device=qkv.device, dtype=qkv.dtype)
    _rope_kv_kernel[(n, num_heads + 2 * num_kv_heads)](
        qkv, cos, sin, q, k_cache, v_cache, slots, cache_pos, q_norm, k_norm,
        qkv.stride(0), cos.stride(0), q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.shape[2], eps,
        H=num_heads, HKV=num_kv_heads, HALF=d // 2, BLOCK_D=next_pow2(d), QK_NORM=qk_norm is not None,
        num_warps=1)
    return q


# -- SiLU(gate) * up ------------------------------------------------------------------------------


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < n_cols
    dtype = out_ptr.dtype.element_ty
    g = tl.load(gu_ptr + row * 2 * n_cols + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * n_cols + n_cols + cols, mask=m, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (act * u).to(dtype), mask=m)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2 I] (gate, then up) -> SiLU(gate) * up [..., I]"""
    two_i = gate_up.shape[-1]
    gu = _rows(gate_up, two_i)
    inter = two_i // 2
    out = torch.empty(gu.shape[0], inter, device=gu.device, dtype=gu.dtype)
    block = 1024
    _silu_mul_kernel[(gu.shape[0], triton.cdiv(inter, block))](gu, out, inter, BLOCK=block, num_warps=4)
    return out.view(*gate_up.shape[:-1], inter)


# -- decode attention (with the rotary embedding and the cache write) ----------------------------


@triton.jit
def _rotate_row(x_ptr, d, dm, c, s, norm_ptr, eps, HALF: tl.constexpr, NORM: tl.constexpr):
    """Heads of ``x`` (pointers ``x_ptr`` [..., BLOCK_D], column d, ``dm`` the real columns) rotated:
    x * cos + rotate_half(x) * sin, each product rounded as the eager ops round it. ``NORM``
    (Qwen3): each head RMS-normed first (fp32, rounded, then times ``norm_ptr``'s weight, rounded)."""
    dtype = x_ptr.dtype.element_ty
    other = tl.where(d < HALF, HALF, -HALF)  # the partner column
    x = tl.load(x_ptr, mask=dm, other=0.0).to(tl.float32)
    partner = tl.load(x_ptr + other, mask=dm, other=0.0).to(tl.float32)
    if NORM:
        rstd = tl.rsqrt(tl.sum(x * x, axis=-1, keep_dims=True) / (2 * HALF) + eps)
        w = tl.load(norm_ptr + d, mask=dm, other=0.0).to(tl.float32)
        w_partner = tl.load(norm_ptr + d + other, mask=dm, other=0.0).to(tl.float32)
        x = (w * (x * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        partner = (w_partner * (partner * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    turned = tl.where(d < HALF, -partner, partner)
    return ((x * c).to(dtype).to(tl.float32) + (turned * s).to(dtype).to(tl.float32)).to(dtype)


@triton.jit
def _decode_attn_split_kernel(qkv_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, at_ptr, part_ptr, q_norm_ptr, k_norm_ptr,
                              qkv_stride, cs_stride, c_stride_s, c_stride_h, c_stride_l, n_max, scale, eps,
                              H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr,
                              SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                              QK_NORM: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    n = tl.arange(0, BLOCK_N)
    heads = kvh * G + tl.where(g < G, g, 0)  # padded rows read head kvh * G and are never stored
    c = tl.load(cos_ptr + b * cs_stride + d, mask=dm, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + b * cs_stride + d, mask=dm, other=0.0).to(tl.float32)
    row = qkv_ptr + b * qkv_stride
    q = _rotate_row(row + heads[:, None] * D + d[None, :], d[None, :], dm[None, :], c[None, :], s[None, :],
                    q_norm_ptr, eps, D // 2, QK_NORM)  # [BLOCK_G, BLOCK_D], zero past D
    at = tl.minimum(tl.load(at_ptr + b), n_max - 1)
    k_base = k_ptr + b * c_stride_s + kvh * c_stride_h
    v_base = v_ptr + b * c_stride_s + kvh * c_stride_h
    # split 0 owns the new token: it writes the rotated key and the value to the cache position and
    # takes the token's score from registers, so every split reads only older positions [0, at)
    if split == 0:
        k_new = _rotate_row(row + (H + kvh) * D + d, d, dm, c, s, k_norm_ptr, eps, D // 2, QK_NORM)  # [BLOCK_D]
        v_new = tl.load(row + (H + HKV + kvh) * D + d, mask=dm, other=0.0)
        tl.store(k_base + at * c_stride_l + d, k_new, mask=dm)
        tl.store(v_base + at * c_stride_l + d, v_new, mask=dm)
        m_i = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale  # [G]
        l_i = tl.full([BLOCK_G], 1.0, tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32) + v_new.to(tl.float32)[None, :]
    else:
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    chunk = tl.cdiv(at, SPLITS)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, at)
    for start in range(lo, hi, BLOCK_N):
        cols = start + n
        cm = cols < hi
        tile = cm[:, None] & dm[None, :]
        k = tl.load(k_base + cols[:, None] * c_stride_l + d[None, :], mask=tile, other=0.0)
        sc = tl.dot(q, tl.trans(k)) * scale
        sc = tl.where(cm[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * c_stride_l + d[None, :], mask=tile, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if SPLITS == 1:  # nothing to combine: part_ptr is the output [B, H * D]
        tl.store(part_ptr + b * H * D + heads[:, None] * D + d[None, :], (acc / l_i[:, None]).to(qkv_ptr.dtype.element_ty),
                 mask=(g < G)[:, None] & dm[None, :])
        return
    # partials [B, HKV, SPLITS, BLOCK_G, D + 2] fp32: acc, then the running max and sum
    out = part_ptr + ((b * HKV + kvh) * SPLITS + split) * BLOCK_G * (D + 2) + g[:, None] * (D + 2)
    tl.store(out + d[None, :], acc, mask=dm[None, :])
    tl.store(out + D, m_i[:, None])
    tl.store(out + D + 1, l_i[:, None])


@triton.jit
def _decode_attn_combine_kernel(part_ptr, out_ptr, o_stride_b, HKV: tl.constexpr, G: tl.constexpr,
                                BLOCK_G: tl.constexpr, SPLITS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    base = part_ptr + (b * HKV + kvh) * SPLITS * BLOCK_G * (D + 2) + g * (D + 2)  # [BLOCK_G]
    m = tl.load(base + D)
    for split in tl.static_range(1, SPLITS):
        m = tl.maximum(m, tl.load(base + split * BLOCK_G * (D + 2) + D))
    total = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for split in tl.static_range(SPLITS):
        part = base + split * BLOCK_G * (D + 2)
        w = tl.exp(tl.load(part + D) - m)  # an empty split's max is -inf: weight 0
        total += tl.load(part + D + 1) * w
        acc += tl.load(part[:, None] + d[None, :], mask=dm[None, :], other=0.0) * w[:, None]
    heads = kvh * G + g
    tl.store(out_ptr + b * o_stride_b + heads[:, None] * D + d[None, :], (acc / total[:, None]).to(out_ptr.dtype.element_ty),
             mask=(g < G)[:, None] & dm[None, :])


def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, cache_pos: torch.Tensor, num_heads: int, splits: int | None = None,
                     qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
    """One decode token per batch row, from its qkv projection to its attention output.

    qkv [B, (H + 2 Hkv) * D] (q, k, v heads stacked); cos, sin [B, D] in qkv's dtype (the step's
    M-RoPE tables); k_cache, v_cache [>=B, Hkv, L, D] (row b is slot b); cache_pos [B]: row b's
    rotated key and its value go to position ``p = min(cache_pos[b], L - 1)`` and its rotated query
    attends to ``[0, p]``; qk_norm (Qwen3): the q and k RMSNorm weights [D] and eps, applied to each
    head before the rotary. The positions before ``p`` are cut into ``splits`` parts attended in
    parallel, then combined (default: enough parts for ~64 programs, at most 8; one part, and no
    combining kernel, from 33 (row, KV head) pairs: batch 32 of 2 KV heads). Returns [B, H * D].
    """
    b = qkv.shape[0]
    hkv, d = k_cache.shape[1], k_cache.shape[-1]
    assert d % 2 == 0 and qkv.stride(-1) == 1 and k_cache.stride(-1) == 1 and cos.stride() == sin.stride()
    assert k_cache.stride() == v_cache.stride() and qkv.shape[1] == (num_heads + 2 * hkv) * d and cos.stride(-1) == 1
    if splits is None:
        splits = max(1, min(8, 64 // (b * hkv)))
    group = num_heads // hkv
    block_g = max(16, next_pow2(group))
    q_norm, k_norm, eps = qk_norm if qk_norm is not None else (cos, cos, 0.0)
    out = torch.empty(b, num_heads * d, device=qkv.device, dtype=qkv.dtype)
    parts = out if splits == 1 else torch.empty(b, hkv, splits, block_g, d + 2, device=qkv.device,
                                                dtype=torch.float32)
    block_d = max(16, next_pow2(d))  # a tl.dot's smallest K
    _decode_attn_split_kernel[(b, hkv, splits)](
        qkv, cos, sin, k_cache, v_cache, cache_pos, parts, q_norm, k_norm,
        qkv.stride(0), cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.shape[2],
        d**-0.5, eps, H=num_heads, HKV=hkv, G=group, BLOCK_G=block_g, SPLITS=splits, BLOCK_N=64, D=d,
        BLOCK_D=block_d, QK_NORM=qk_norm is not None, num_warps=4, num_stages=3)
    if splits > 1:
        _decode_attn_combine_kernel[(b, hkv)](parts, out, out.stride(0), HKV=hkv, G=group, BLOCK_G=block_g,
                                              SPLITS=splits, D=d, BLOCK_D=block_d, num_warps=4)
    return out


# the most rows gate_up_silu and linear_parts take: one 16-row tile (a tl.dot's smallest M)
FEW_ROWS = 16


# -- gate/up projection with SwiGLU, for few rows -------------------------------------------------


@triton.jit
def _gate_up_silu_kernel(x_ptr, w_ptr, out_ptr, M, N_INTER, K,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    k = tl.arange(0, BLOCK_K)
    nm = n < N_INTER
    gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        km = (k0 + k) < K
        x = tl.load(x_ptr + m[:, None] * K + (k0 + k)[None, :], mask=(m < M)[:, None] & km[None, :], other=0.0)
        wg = tl.load(w_ptr + n[:, None] * K + (k0 + k)[None, :], mask=nm[:, None] & km[None, :], other=0.0)
        wu = tl.load(w_ptr + (n + N_INTER)[:, None] * K + (k0 + k)[None, :], mask=nm[:, None] & km[None, :], other=0.0)
        gate += tl.dot(x, tl.trans(wg))
        up += tl.dot(x, tl.trans(wu))
    dtype = out_ptr.dtype.element_ty
    # rounded where the unfused ops round: the GEMM outputs, then SiLU(gate), then the product
    g = gate.to(dtype).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    y = act * up.to(dtype).to(tl.float32)
    tl.store(out_ptr + m[:, None] * N_INTER + n[None, :], y.to(dtype), mask=(m < M)[:, None] & nm[None, :])


def gate_up_silu(x: torch.Tensor, weight: torch.Tensor, *, block_n: int = 64, block_k: int = 128,
                 num_stages: int = 3, num_warps: int = 4) -> torch.Tensor:
    """``silu_mul(F.linear(x, weight))`` in one kernel for at most 16 rows (a decode step).

    x [M, K]; weight [2 I, K] (gate rows, then up rows) -> [M, I]. Each program reads a gate tile
    and its matching up tile, so the activation is applied in the epilogue and the [M, 2 I]
    projection never reaches memory.
    """
    m, k = x.shape
    inter = weight.shape[0] // 2
    assert m <= FEW_ROWS and x.is_contiguous() and weight.is_contiguous() and weight.shape[1] == k
    assert weight.numel() < 2**31, "the kernel's offsets are 32-bit"
    out = torch.empty(m, inter, device=x.device, dtype=x.dtype)
    _gate_up_silu_kernel[(triton.cdiv(inter, block_n),)](
        x, weight, out, m, inter, k, BLOCK_M=FEW_ROWS, BLOCK_N=block_n, BLOCK_K=block_k,
        num_stages=num_stages, num_warps=num_warps)
    return out


# -- split-K projection for few rows (its partial sums go to rms_norm_of_parts) -------------------


@triton.jit
def _linear_parts_kernel(x_ptr, w_ptr, out_ptr, M, N, K, k_per_part,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    part = tl.program_id(1)
    m = tl.arange(0, BLOCK_M)
    k = tl.arange(0, BLOCK_K)
    nm = n < N
    lo = part * k_per_part
    hi = tl.minimum(lo + k_per_part, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(lo, hi, BLOCK_K):
        km = (k0 + k) < hi
        x = tl.load(x_ptr + m[:, None] * K + (k0 + k)[None, :], mask=(m < M)[:, None] & km[None, :], other=0.0)
        w = tl.load(w_ptr + n[:, None] * K + (k0 + k)[None, :], mask=nm[:, None] & km[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w))
    tl.store(out_ptr + part * M * N + m[:, None] * N + n[None, :], acc, mask=(m < M)[:, None] & nm[None, :])


def linear_parts(x: torch.Tensor, weight: torch.Tensor, *, parts: int = 8, block_n: int = 32, block_k: int = 128,
                 num_stages: int = 3, num_warps: int = 4) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T for at most 16 rows, as ``parts`` fp32 partial sums [parts, M, N]
    over slices of K (their sum is the product; ``rms_norm_of_parts`` adds them up).

    A decode step's down projection has few output columns (hidden) and a long K: split along K,
    many more programs read the weights at once, and no separate reduction kernel runs (cuBLAS's
    split-K adds one).
    """
    m, k = x.shape
    n = weight.shape[0]
    assert m <= FEW_ROWS and x.is_contiguous() and weight.is_contiguous() and weight.shape[1] == k
    assert weight.numel() < 2**31, "the kernel's offsets are 32-bit"
    k_per_part = triton.cdiv(triton.cdiv(k, parts), block_k) * block_k
    out = torch.empty(parts, m, n, device=x.device, dtype=torch.float32)
    _linear_parts_kernel[(triton.cdiv(n, block_n), parts)](
        x, weight, out, m, n, k, k_per_part, BLOCK_M=FEW_ROWS, BLOCK_N=block_n, BLOCK_K=block_k,
        num_stages=num_stages, num_warps=num_warps)
    return out

