"""Attention over packed images: block-diagonal by ``cu_seqlens``, non-causal, head_dim 80.

Candidates (``attention(..., backend=...)``); ``bench/kernel_bench.py`` times them all:

- ``"triton"``: our flash-attention kernel below, reading q, k, v straight from the fused qkv
  output [S, 3*H*D] (strided, no split/transpose copies) and applying the 2-D vision rotary to
  q and k as it loads them (no separate rope pass). Output [S, H*D], ready for the proj GEMM.
  Measured slow: k is re-rotated for every q block (cos/sin tables triple its loads).
- ``"triton_prerope"``: the same kernel on q, k rotated once by ``rope_vision.rope_qk``.
- ``"cudnn"``: cuDNN's fused attention through SDPA, one batched [B, H, L, D] call per run of
  equal-length images, on strided views (no copies in or out).
- ``"fa2"``: PyTorch's FlashAttention-2 varlen kernel (``aten._flash_attention_forward`` with
  cu_seqlens, the op behind ``torch.nn.attention.varlen``).
- ``"sdpa"``: ``scaled_dot_product_attention`` per image (HF's own loop);
  ``"sdpa_batched"``: one SDPA call over [B, H, L, D] when every image has the same length.
- ``"auto"`` (the default of ``patch``): ``cudnn`` when all images share one length (H100,
  32 x 1024 tokens, rope excluded: 0.47 ms vs 0.70 for FA2 and 0.65 for our kernel), else
  ``triton_prerope`` (8 mixed sizes, rope pass included: 1.59 ms vs 1.79 for FA2 and 1.88 for
  one SDPA call per image).

head_dim 80 is not a power of two, and a tile dimension must be. Padding q and k to 128 would
waste 60% of the QK matrix work, so the kernel splits the rotary halves: with HALF = D/2 = 40,
each half is a 32-wide piece plus an 8-wide piece (padded to 16, the smallest dot K), and the
rotation pairs piece with piece: (x[0:32], x[40:72]) and (x[32:40], x[72:80]). q.k is the sum of
the four piece products (K = 32 + 32 + 16 + 16 = 96, the same padding FA2 uses for 80). V and the
output split 64 + 16. Exact for any even D (Qwen3-VL's 72: 32 + 4 per half, V 64 + 8).

Row and head strides that are multiples of 8 but not 16 elements (head_dim 72: a head starts every
144 bytes) are not specialized by Triton, which then assumes 2-byte alignment: no vector loads, no
cp.async pipelining. The host passes the strides' power-of-two alignment (``ALIGN``) and the kernel
asserts it on the row offsets.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._utils import check_device, install_interpreter_fix, interpreting, next_pow2, prev_pow2
from .rope_vision import qkv_views, rope_qk, rope_tables

install_interpreter_fix()

BACKENDS = ("auto", "triton", "triton_prerope", "cudnn", "fa2", "sdpa", "sdpa_batched")


def _layout(d: int) -> dict[str, int]:
    """Piece widths for head_dim d (see module doc)."""
    if d % 2:
        raise ValueError(f"head_dim must be even, got {d}")
    half = d // 2
    p1 = prev_pow2(half) if half >= 16 else 0
    r = half - p1
    rp = max(16, next_pow2(r)) if r else 16
    v1 = prev_pow2(d) if d >= 16 else 0
    vr = d - v1
    vrp = max(16, next_pow2(vr)) if vr else 16
    return {"HALF": half, "P1": max(p1, 16), "HAS_P1": p1 > 0, "R": r, "RP": rp, "HAS_R": r > 0,
            "V1": max(v1, 16), "HAS_V1": v1 > 0, "VR": vr, "VRP": vrp, "HAS_VR": vr > 0}


@triton.jit
def _load_pair(
    X, x_rows, mask_r, C, S, c_rows,
    OFF: tl.constexpr, HALF: tl.constexpr, WIDTH: tl.constexpr, REAL: tl.constexpr, ROPE: tl.constexpr,
):
    """Load x[:, OFF:OFF+REAL] and x[:, HALF+OFF:HALF+OFF+REAL] (padded to WIDTH), rotated when ROPE."""
    cols = tl.arange(0, WIDTH)
    m = mask_r[:, None] & (cols[None, :] < REAL)
    lo = tl.load(X + x_rows[:, None] + (OFF + cols)[None, :], mask=m, other=0.0)
    hi = tl.load(X + x_rows[:, None] + (HALF + OFF + cols)[None, :], mask=m, other=0.0)
    if ROPE:
        c = tl.load(C + c_rows[:, None] + (OFF + cols)[None, :], mask=m, other=0.0)
        s = tl.load(S + c_rows[:, None] + (OFF + cols)[None, :], mask=m, other=0.0)
        lo32 = lo.to(tl.float32)
        hi32 = hi.to(tl.float32)
        # (one return: the static branch changes the dtype, and Triton wants one return type)
        lo = lo32 * c - hi32 * s
        hi = hi32 * c + lo32 * s
    return lo, hi


@triton.jit
def _varlen_attn_kernel(
    Q, K, V,  # [S, H, D] views (last dim contiguous), e.g. slices of the fused qkv output
    Out,  # [S, H, D] out
    COS, SIN,  # [S, HALF] fp32 (ROPE)
    CU,  # [n_seq + 1] int32 cumulative lengths
    stride_qs, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_os, stride_oh, stride_cs,
    qk_scale,  # softmax scale * log2(e): scores go straight to exp2
    MAX_BUCKET,  # next pow2 of the longest image: unused here, an autotune key
    HALF: tl.constexpr, P1: tl.constexpr, HAS_P1: tl.constexpr, R: tl.constexpr, RP: tl.constexpr,
    HAS_R: tl.constexpr, V1: tl.constexpr, HAS_V1: tl.constexpr, VR: tl.constexpr, VRP: tl.constexpr,
    HAS_VR: tl.constexpr, ROPE: tl.constexpr, PREC: tl.constexpr,
    ALIGN: tl.constexpr,  # every row/head stride is a multiple of ALIGN elements (a power of two)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    start = tl.load(CU + seq)
    seqlen = tl.load(CU + seq + 1) - start
    if pid_m * BLOCK_M >= seqlen:
        return  # grid is sized by the longest image; shorter ones have fewer q blocks
    DT = Q.dtype.element_ty

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < seqlen
    rows_q = (start + offs_m).to(tl.int64)
    q_rows = tl.multiple_of(rows_q * stride_qs + head * stride_qh, ALIGN)
    cq_rows = rows_q * stride_cs

    # q pieces, rotated, pre-scaled by scale*log2e (fp32, rounded once to the input dtype)
    if HAS_P1:
        qa, qb = _load_pair(Q, q_rows, mask_m, COS, SIN, cq_rows, 0, HALF, P1, P1, ROPE)
        qa = (qa.to(tl.float32) * qk_scale).to(DT)
        qb = (qb.to(tl.float32) * qk_scale).to(DT)
    if HAS_R:
        qc, qd = _load_pair(Q, q_rows, mask_m, COS, SIN, cq_rows, P1 * HAS_P1, HALF, RP, R, ROPE)
        qc = (qc.to(tl.float32) * qk_scale).to(DT)
        qd = (qd.to(tl.float32) * qk_scale).to(DT)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_V1:
        acc1 = tl.zeros([BLOCK_M, V1], dtype=tl.float32)
    if HAS_VR:
        acc2 = tl.zeros([BLOCK_M, VRP], dtype=tl.float32)
    cols_v1 = tl.arange(0, V1)
    cols_vr = tl.arange(0, VRP)

    for n0 in range(0, seqlen, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < seqlen
        rows_k = (start + offs_n).to(tl.int64)
        k_rows = tl.multiple_of(rows_k * stride_ks + head * stride_kh, ALIGN)
        ck_rows = rows_k * stride_cs
        qk = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if HAS_P1:
            ka, kb = _load_pair(K, k_rows, mask_n, COS, SIN, ck_rows, 0, HALF, P1, P1, ROPE)
            qk = tl.dot(qa, tl.trans(ka.to(DT)), qk, input_precision=PREC)
            qk = tl.dot(qb, tl.trans(kb.to(DT)), qk, input_precision=PREC)
        if HAS_R:
            kc, kd = _load_pair(K, k_rows, mask_n, COS, SIN, ck_rows, P1 * HAS_P1, HALF, RP, R, ROPE)
            qk = tl.dot(qc, tl.trans(kc.to(DT)), qk, input_precision=PREC)
            qk = tl.dot(qd, tl.trans(kd.to(DT)), qk, input_precision=PREC)
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(DT)
        v_rows = tl.multiple_of(rows_k * stride_vs + head * stride_vh, ALIGN)
        if HAS_V1:
            v1 = tl.load(V + v_rows[:, None] + cols_v1[None, :], mask=mask_n[:, None], other=0.0)
            acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=PREC)
        if HAS_VR:
            v2 = tl.load(V + v_rows[:, None] + (V1 * HAS_V1 + cols_vr)[None, :],
                         mask=mask_n[:, None] & (cols_vr[None, :] < VR), other=0.0)
            acc2 = tl.dot(p, v2, acc2 * alpha[:, None], input_precision=PREC)
        m_i = m_new

    inv_l = 1.0 / l_i
    o_rows = tl.multiple_of(rows_q * stride_os + head * stride_oh, ALIGN)
    if HAS_V1:
        tl.store(Out + o_rows[:, None] + cols_v1[None, :], (acc1 * inv_l[:, None]).to(DT), mask=mask_m[:, None])
    if HAS_VR:
        tl.store(Out + o_rows[:, None] + (V1 * HAS_V1 + cols_vr)[None, :], (acc2 * inv_l[:, None]).to(DT),
                 mask=mask_m[:, None] & (cols_vr[None, :] < VR))


def _configs() -> list[triton.Config]:
    # Few, Hopper-plausible tiles: each config costs a compile on first use (device time).
    # (4 warps on a 128-row tile hit 255 registers in an sm_90 compile: left out.)
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    ]


_varlen_attn_tuned = triton.autotune(configs=_configs(), key=["HALF", "ROPE", "PREC", "MAX_BUCKET"])(
    _varlen_attn_kernel
)

# Set by kernel_bench / tests to pin a config (dict with BLOCK_M, BLOCK_N, num_warps, num_stages).
FIXED_CONFIG: dict[str, int] | None = None


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-diagonal attention of q, k, v [S, H, D] (strided views allowed) -> out [S, H, D].

    With ``cos``/``sin`` [S, D/2] fp32, q and k are rotated (vision rope) as they are loaded.
    ``cu_seqlens`` [n + 1] int32 on the device; ``max_seqlen`` the longest image (host int).
    """
    s_len, heads, d = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError("q, k, v must have the same [S, H, D] shape")
    for t in (q, k, v):
        if t.stride(-1) != 1:
            raise ValueError("q, k, v need a contiguous last dim")
    check_device(q, k, v)
    rope = cos is not None
    if rope:
        assert sin is not None
        cos, sin = rope_tables(cos, sin, d)
    else:
        cos = sin = q  # unused
    cu = cu_seqlens.to(torch.int32) if cu_seqlens.dtype != torch.int32 else cu_seqlens
    o = out if out is not None else torch.empty(q.shape, dtype=q.dtype, device=q.device)
    n_seq = cu.numel() - 1
    if s_len == 0 or n_seq == 0:
        return o
    lay = _layout(d)
    sm_scale = scale if scale is not None else d**-0.5
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    args = (
        q, k, v, o, cos, sin, cu,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        o.stride(0), o.stride(1), cos.stride(0) if rope else 0,
        sm_scale * math.log2(math.e), next_pow2(max_seqlen),
    )
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1))
    align = math.gcd(16, *strides)  # a power of two <= 16 (see module doc)
    meta = dict(lay, ROPE=rope, PREC=prec, ALIGN=align)
    if interpreting():
        bm = bn = 16
        _varlen_attn_kernel[(triton.cdiv(max_seqlen, bm), n_seq, heads)](*args, **meta, BLOCK_M=bm, BLOCK_N=bn)
    elif FIXED_CONFIG is not None or q.dtype == torch.float32:
        # fp32 ("ieee" dots, tests only) gets one small fixed config: no autotune compiles
        cfg = dict(FIXED_CONFIG or {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2})
        bm = cfg.pop("BLOCK_M")
        bn = cfg.pop("BLOCK_N")
        _varlen_attn_kernel[(triton.cdiv(max_seqlen, bm), n_seq, heads)](
            *args, **meta, BLOCK_M=bm, BLOCK_N=bn, **cfg
        )
    else:
        def grid(m: dict) -> tuple[int, int, int]:
            return (triton.cdiv(max_seqlen, m["BLOCK_M"]), n_seq, heads)

        _varlen_attn_tuned[grid](*args, **meta)
    return o


def _fa2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_seqlen: int,
         scale: float) -> torch.Tensor:
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, cu, cu, max_seqlen, max_seqlen, 0.0, False, False, scale=scale
    )
    return out[0]


def _sdpa_batched(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: int, n: int, scale: float,
                  backends: list | None) -> torch.Tensor:
    """Equal-length images as one [B, H, L, D] SDPA call on strided views (no copies in)."""
    from torch.nn.attention import sdpa_kernel

    qb, kb, vb = (t.unflatten(0, (b, n)).transpose(1, 2) for t in (q, k, v))
    if backends is None:
        o = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, scale=scale)
    else:
        with sdpa_kernel(backends, set_priority=True):
            o = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, scale=scale)
    # cuDNN allocates o with q's stride order ([B, L, H, D] in memory): this is then a view
    return o.transpose(1, 2).reshape(b * n, q.shape[1], q.shape[2])


def _cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int], scale: float) -> torch.Tensor:
    """cuDNN's fused attention: one batched call per run of equal-length images (all 32 images of
    one size are one call; distinct sizes become one call each).

    (cuDNN's ragged mode -- ``aten._cudnn_attention_forward`` with cu_seqlens -- was tried on
    torch 2.11: non-finite outputs on small odd lengths and ~1.5 s per call on mixed sizes.)"""
    from torch.nn.attention import SDPBackend

    # cuDNN first; the others only where it refuses (MATH keeps CPU runs working)
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    outs = []
    start = 0
    i = 0
    while i < len(lengths):
        j = i
        while j < len(lengths) and lengths[j] == lengths[i]:
            j += 1
        n = lengths[i]
        sl = slice(start, start + n * (j - i))
        outs.append(_sdpa_batched(q[sl], k[sl], v[sl], j - i, n, scale, order))
        start += n * (j - i)
        i = j
    return outs[0] if len(outs) == 1 else torch.cat(outs, 0)


def auto_backend(lengths: list[int]) -> str:
    """What ``backend="auto"`` runs on segments of these lengths. Measured on an H100
    (bench/RESULTS.md): cuDNN wins when the images share one size (one batched call); across sizes
    our varlen kernel beats one cuDNN call per image."""
    return "cudnn" if len(set(lengths)) == 1 else "triton_prerope"


def attention(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    num_heads: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    backend: str = "triton",
    lengths: list[int] | None = None,
    prerotated: bool = False,
    interleaved: bool = False,
) -> torch.Tensor:
    """Rotary + block-diagonal attention from the fused qkv output [S, 3*H*D] -> [S, H*D].

    Backends other than ``"triton"`` first rotate q and k into a new [S, 2*H*D] buffer
    (``rope_qk``: one streaming pass) and read v from ``qkv`` in place.
    ``prerotated``: the qkv GEMM already applied the rotary (``gemm.linear_act(rope=...)``);
    ``interleaved``: q/k columns are in ``rope_vision.interleave_qk_rows`` order (attention
    itself does not care: q.k is invariant under a shared permutation of q and k).
    ``lengths`` (host ints, one per image) avoids a device sync for the SDPA/cuDNN backends.
    """
    s_len = qkv.shape[0]
    q, k, v = qkv_views(qkv, num_heads)
    heads, d = q.shape[1], q.shape[2]
    scale = d**-0.5
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; known: {BACKENDS}")
    if backend == "auto":
        if lengths is None:
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        backend = auto_backend(lengths)
    if backend == "triton" and not (prerotated or interleaved):
        o = varlen_attention(q, k, v, cu_seqlens, max_seqlen, cos=cos, sin=sin, scale=scale)
        return o.view(s_len, -1)
    if backend == "triton":  # the fused-rope kernel knows only HF's order
        backend = "triton_prerope"
    if not prerotated:
        qk = rope_qk(qkv, cos, sin, num_heads, interleaved=interleaved)
        q = qk[:, : heads * d].view(s_len, heads, d)
        k = qk[:, heads * d :].view(s_len, heads, d)
    if lengths is None and backend in ("sdpa", "sdpa_batched", "cudnn"):
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    if backend == "triton_prerope":
        o = varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale=scale)
    elif backend == "fa2":
        o = _fa2(q, k, v, cu_seqlens.to(torch.int32), max_seqlen, scale)
    elif backend == "cudnn":
        assert lengths is not None
        o = _cudnn(q, k, v, lengths, scale)
    elif backend == "sdpa_batched" and lengths is not None and len(set(lengths)) == 1:
        o = _sdpa_batched(q, k, v, len(lengths), lengths[0], scale, None)
    else:  # "sdpa" (and sdpa_batched on mixed lengths): HF's per-image loop
        assert lengths is not None
        outs = [
            torch.nn.functional.scaled_dot_product_attention(
                qi.transpose(0, 1)[None], ki.transpose(0, 1)[None], vi.transpose(0, 1)[None], scale=scale
            )[0].transpose(0, 1)
            for qi, ki, vi in zip(q.split(lengths), k.split(lengths), v.split(lengths), strict=True)
        ]
        o = torch.cat(outs, dim=0)
    return o.reshape(s_len, -1)
