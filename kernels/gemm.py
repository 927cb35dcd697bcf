"""``act(x @ W^T + b)`` with the bias and activation (and optionally the vision rotary) in the
GEMM's epilogue.

The vision MLP's fc1 output (S x 5120) is the largest activation in the tower. cuBLAS can add the
bias in its epilogue but not QuickGELU, so an unfused MLP writes that tensor, reads it back for
the activation and writes it again (~0.2 ms per block for 32 images on an H100). Here the
activation runs on the fp32 accumulator tile before the single store.

Gated mode (``up=``): a second weight W2 of the same shape is multiplied in the same K loop (the
A tile is loaded once for both), and the epilogue writes ``act(x W^T + b) * (x W2^T + b2)``: the
SwiGLU MLP's gate, up and gating in one kernel, so neither [M, N] half is ever written.

Two kernels: on Hopper a persistent TMA kernel (descriptors, wgmma, the tile loop flattened so
the next tile's loads overlap this tile's epilogue); elsewhere (and in the CPU interpreter) a
plain tiled pointer kernel. H100, 32768 rows: fc1 + QuickGELU 0.74 ms vs 0.85 for cuBLAS + the
separate pass; below ~4096 rows cuBLAS wins (``patch``'s ``mlp="auto"`` switches).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import as_rows, check_device, install_interpreter_fix, interpreting, next_pow2
from .activations import act_code, apply_act

install_interpreter_fix()


@triton.jit
def _rope_epilogue(acc, off_m, off_n, M, COS, SIN, stride_cs, ROPE_COLS, D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Vision rotary on an fp32 output tile of the qkv GEMM whose q/k rows were permuted so each
    rotation pair is adjacent (columns 2j, 2j+1 of a head hold x[j], x[j + D/2]; angle j).
    Tiles at or past ROPE_COLS (the v section) pass through; BLOCK_N divides ROPE_COLS, so a
    tile is all q/k or all v."""
    if off_n < ROPE_COLS:
        rows = off_m + tl.arange(0, BLOCK_M)
        j = (off_n % D + 2 * tl.arange(0, BLOCK_N // 2)) % D // 2  # angle of each column pair
        m = (rows < M)[:, None]
        c = tl.load(COS + rows[:, None].to(tl.int64) * stride_cs + j[None, :], mask=m, other=0.0)
        s = tl.load(SIN + rows[:, None].to(tl.int64) * stride_cs + j[None, :], mask=m, other=0.0)
        xe, xo = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))
        acc = tl.reshape(tl.join(xe * c - xo * s, xo * c + xe * s), (BLOCK_M, BLOCK_N))
    return acc


@triton.jit
def _glu_epilogue(act_gate, up, BIAS2, cols, N, HAS_BIAS: tl.constexpr):
    """act(gate) * (up + b2) on fp32 tiles: one rounding, at the store."""
    if HAS_BIAS:
        up = up + tl.load(BIAS2 + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    return act_gate * up


@triton.jit
def _linear_act_kernel(
    A,  # [M, K] activations (row stride stride_am, unit col stride)
    W,  # [N, K] nn.Linear weight (row stride stride_wn)
    BIAS,  # [N] (HAS_BIAS)
    C,  # [M, N] out
    M,
    N,
    K,
    stride_am,
    stride_wn,
    stride_cm,
    M_BUCKET,  # autotune key only
    COS,  # [M, D/2] fp32 rope tables (ROPE)
    SIN,
    stride_cs,
    ROPE_COLS,  # columns [0, ROPE_COLS) are rotated (q and k)
    W2,  # [N, K] the up weight (GLU), same strides as W
    BIAS2,  # [N] (GLU and HAS_BIAS)
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROPE: tl.constexpr,
    D: tl.constexpr,
    GLU: tl.constexpr,
    EVEN_K: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # GROUP_M row-tiles sweep the N tiles together, so a W column panel is reused from L2.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    # Wrap edge rows/cols (modulo) instead of masking the hot loop's loads; the store is masked.
    offs_am = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_wn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_am = tl.max_contiguous(tl.multiple_of(offs_am, BLOCK_M), BLOCK_M)
    offs_wn = tl.max_contiguous(tl.multiple_of(offs_wn, BLOCK_N), BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + offs_am[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    w_off = offs_wn[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N] view of W^T
    w_ptrs = W + w_off

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GLU:
        w2_ptrs = W2 + w_off
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - kt * BLOCK_K
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PREC)
        if GLU:
            w2 = tl.load(w2_ptrs) if EVEN_K else tl.load(w2_ptrs, mask=k_mask[:, None], other=0.0)
            acc2 = tl.dot(a, w2, acc2, input_precision=PREC)
            w2_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    offs_cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        acc = acc + tl.load(BIAS + offs_cn, mask=offs_cn < N, other=0.0).to(tl.float32)[None, :]
    if ROPE:
        acc = _rope_epilogue(acc, pid_m * BLOCK_M, pid_n * BLOCK_N, M, COS, SIN, stride_cs, ROPE_COLS, D,
                             BLOCK_M, BLOCK_N)
    acc = apply_act(acc, ACT)
    if GLU:
        acc = _glu_epilogue(acc, acc2, BIAS2, offs_cn, N, HAS_BIAS)
    c_ptrs = C + offs_cm[:, None].to(tl.int64) * stride_cm + offs_cn[None, :]
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=(offs_cm[:, None] < M) & (offs_cn[None, :] < N))


@triton.jit
def _linear_act_tma_kernel(
    a_desc,  # TMA descriptor of A [M, K], block [BLOCK_M, BLOCK_K]
    w_desc,  # W [N, K], block [BLOCK_N, BLOCK_K]
    c_desc,  # C [M, N], block [BLOCK_M, BLOCK_N // (2 if EPI_SPLIT else 1)]
    BIAS,  # [N] (HAS_BIAS)
    M,
    N,
    K,
    M_BUCKET,  # autotune key only
    COS,  # [M, D/2] fp32 rope tables (ROPE)
    SIN,
    stride_cs,
    ROPE_COLS,
    w2_desc,  # the up weight W2 [N, K] (GLU), block [BLOCK_N, BLOCK_K]
    BIAS2,  # [N] (GLU and HAS_BIAS)
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROPE: tl.constexpr,
    D: tl.constexpr,
    GLU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr,
    EPI_SPLIT: tl.constexpr,
):
    # Hopper path: a persistent grid (one program per SM walks the tiles), operands fetched by the
    # TMA engine into NVMMA-swizzled shared memory (no per-thread address math, bounds handled by
    # the descriptor), wgmma on them, and the flattened tile loop lets the next tile's loads overlap
    # this tile's epilogue (bias + activation + TMA store).
    start_pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    num_pid_in_group = GROUP_M * num_pid_n
    for tile_id in tl.range(start_pid, num_tiles, NUM_SMS, flatten=True):
        group_id = tile_id // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((tile_id % num_pid_in_group) % group_size_m)
        pid_n = (tile_id % num_pid_in_group) // group_size_m
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if GLU:
            acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            off_k = ki * BLOCK_K
            a = a_desc.load([off_m, off_k])
            w = w_desc.load([off_n, off_k])
            acc = tl.dot(a, w.T, acc)
            if GLU:
                w2 = w2_desc.load([off_n, off_k])
                acc2 = tl.dot(a, w2.T, acc2)
        cols = off_n + tl.arange(0, BLOCK_N)
        if HAS_BIAS:
            acc = acc + tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if ROPE:
            acc = _rope_epilogue(acc, off_m, off_n, M, COS, SIN, stride_cs, ROPE_COLS, D, BLOCK_M, BLOCK_N)
        acc = apply_act(acc, ACT)
        if GLU:
            acc = _glu_epilogue(acc, acc2, BIAS2, cols, N, HAS_BIAS)
        if EPI_SPLIT:
            # two half-width stores: half the epilogue's shared-memory staging buffer
            acc3 = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            c0, c1 = tl.split(acc3)
            c_desc.store([off_m, off_n], c0.to(c_desc.dtype))
            c_desc.store([off_m, off_n + BLOCK_N // 2], c1.to(c_desc.dtype))
        else:
            c_desc.store([off_m, off_n], acc.to(c_desc.dtype))


def _tma_hook(nargs: dict) -> None:
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bm, bk]
    nargs["w_desc"].block_shape = [bn, bk]
    nargs["w2_desc"].block_shape = [bn, bk]  # (the same descriptor as w_desc when not GLU)
    nargs["c_desc"].block_shape = [bm, bn // 2 if nargs["EPI_SPLIT"] else bn]


def _tma_configs() -> list[triton.Config]:
    cfg = triton.Config
    out = []
    for bm, bn, st, split in [(128, 256, 3, True), (128, 256, 4, True), (128, 128, 4, False), (256, 128, 3, True),
                              (128, 128, 5, False)]:
        out.append(cfg({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64, "GROUP_M": 8, "EPI_SPLIT": split},
                       num_warps=8, num_stages=st, pre_hook=_tma_hook))
    return out


_linear_act_tma_tuned = triton.autotune(configs=_tma_configs(), key=["N", "K", "M_BUCKET", "ACT", "HAS_BIAS"])(
    _linear_act_tma_kernel
)


def _tma_rope_configs() -> list[triton.Config]:
    # With the rotary epilogue the cos/sin tiles ([BLOCK_M, BLOCK_N/2] fp32 each) live beside the
    # accumulator: 128-wide N tiles keep that within the register file.
    cfg = triton.Config
    return [cfg({"BLOCK_M": bm, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "EPI_SPLIT": False},
                num_warps=8, num_stages=st, pre_hook=_tma_hook) for bm, st in [(128, 3), (128, 4), (128, 5)]]
    # (256 x 128 spills 240 B of stack in an sm_90 compile with the epilogue's cos/sin tiles)


_linear_rope_tma_tuned = triton.autotune(configs=_tma_rope_configs(), key=["N", "K", "M_BUCKET", "HAS_BIAS"])(
    _linear_act_tma_kernel
)


def _tma_glu_configs() -> list[triton.Config]:
    # Two fp32 accumulators: 128 x 128 (x 2) at 8 warps is the register budget of the plain kernel's
    # 128 x 256; three operand tiles per stage (48 KB at 128 x 128 x 64) bound the stages at 4.
    cfg = triton.Config
    return [cfg({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64, "GROUP_M": 8, "EPI_SPLIT": split},
                num_warps=8, num_stages=st, pre_hook=_tma_hook)
            for bm, bn, st, split in [(128, 128, 3, True), (128, 128, 4, True), (128, 64, 4, False),
                                      (128, 64, 5, False)]]


_linear_glu_tma_tuned = triton.autotune(configs=_tma_glu_configs(), key=["N", "K", "M_BUCKET", "ACT", "HAS_BIAS"])(
    _linear_act_tma_kernel
)

_NUM_SMS: dict[int, int] = {}


def hopper(x: torch.Tensor) -> bool:
    """A CUDA tensor on a Hopper-or-newer GPU, compiled (not interpreted): the TMA path applies."""
    return (not interpreting() and x.device.type == "cuda"
            and torch.cuda.get_device_capability(x.device)[0] >= 9)


def _tma_ok(x2: torch.Tensor, *others: torch.Tensor) -> bool:
    """TMA needs Hopper+, 16-bit operands, 16-byte aligned bases and row strides."""
    if x2.dtype not in (torch.bfloat16, torch.float16) or not hopper(x2):
        return False
    es = x2.element_size()
    return all(t.data_ptr() % 16 == 0 and (t.stride(0) * es) % 16 == 0 for t in (x2, *others))


def _launch_tma(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, y2: torch.Tensor, code: int,
                rope: tuple | None = None, up: tuple | None = None) -> None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    m, k = x2.shape
    n = w.shape[0]
    dev = x2.device.index or 0
    if dev not in _NUM_SMS:
        _NUM_SMS[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
    sms = _NUM_SMS[dev]
    dummy = [8, 8]  # real block shapes are set per config by _tma_hook
    a_desc = TensorDescriptor(x2, list(x2.shape), list(x2.stride()), dummy)
    w_desc = TensorDescriptor(w, list(w.shape), list(w.stride()), dummy)
    c_desc = TensorDescriptor(y2, list(y2.shape), list(y2.stride()), dummy)
    w2_desc, bias2 = w_desc, w  # stand-ins the kernel never reads unless GLU
    if up is not None:
        w2_desc = TensorDescriptor(up[0], list(up[0].shape), list(up[0].stride()), dummy)
        bias2 = up[1] if up[1] is not None else w

    def grid(meta: dict) -> tuple[int]:
        return (min(sms, triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])),)

    cos, sin, rope_cols, d = rope if rope is not None else (w, w, 0, 2)
    kern = _linear_rope_tma_tuned if rope is not None else _linear_act_tma_tuned
    if up is not None:
        kern = _linear_glu_tma_tuned
    kern[grid](
        a_desc, w_desc, c_desc, bias if bias is not None else w, m, n, k, min(next_pow2(m), 1 << 16),
        cos, sin, cos.stride(0) if rope is not None else 0, rope_cols, w2_desc, bias2,
        ACT=code, HAS_BIAS=bias is not None, ROPE=rope is not None, D=d, GLU=up is not None, NUM_SMS=sms,
    )


# "tma" (Hopper persistent TMA kernel) or "pointer" (portable kernel); tests/bench may pin one.
GEMM_IMPL: str | None = None


def _configs() -> list[triton.Config]:
    # Hopper-sized tiles (wgmma wants BLOCK_M a multiple of 64 per warpgroup); a short list because
    # each one is a compile on first use.
    cfg = triton.Config
    return [
        cfg({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        cfg({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        cfg({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
        cfg({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    ]


_linear_act_tuned = triton.autotune(configs=_configs(), key=["N", "K", "M_BUCKET", "ACT", "HAS_BIAS"])(
    _linear_act_kernel
)


def linear_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    act: str | int = "none",
    *,
    out: torch.Tensor | None = None,
    rope: tuple[torch.Tensor, torch.Tensor, int, int] | None = None,
    up: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """``act(x @ weight^T + bias)``: x [..., K], weight [N, K] (nn.Linear layout) -> [..., N].

    ``rope=(cos, sin, rope_cols, head_dim)``: rotate output columns [0, rope_cols) with the vision
    rotary in the epilogue, for a qkv weight whose q/k rows are in the pair-adjacent order of
    ``rope_vision.interleave_qk_rows`` (cos/sin [M, head_dim/2] fp32).
    ``up=(weight2, bias2)``: gated, ``act(x @ weight^T + bias) * (x @ weight2^T + bias2)`` (SwiGLU
    with ``act="silu"``); weight2 has weight's shape and strides, bias2 is given iff bias is. The
    TMA path needs 16-byte aligned rows of x, both weights and the output: pass an ``out`` whose
    row stride is padded when N * element size is not a multiple of 16.
    """
    code = act if isinstance(act, int) else act_code(act)
    if up is not None:
        if rope is not None:
            raise ValueError("the gated epilogue and the rope epilogue do not combine")
        if up[0].shape != weight.shape or up[0].stride() != weight.stride():
            raise ValueError(f"up weight {tuple(up[0].shape)} must match weight {tuple(weight.shape)} and its strides")
        if (up[1] is None) != (bias is None):
            raise ValueError("give both biases or neither")
    if rope is not None:
        from .rope_vision import rope_tables

        cos, sin, rope_cols, d = rope
        cos, sin = rope_tables(cos, sin, d)
        # a tile must be all q/k or all v: BLOCK_N has to divide rope_cols
        if rope_cols % 16 or d % 2:
            raise ValueError("rope epilogue needs rope_cols % 16 == 0 and an even head_dim")
        rope = (cos, sin, rope_cols, d)
    k = x.shape[-1]
    n, k_w = weight.shape
    if k_w != k:
        raise ValueError(f"x has K={k}, weight has K={k_w}")
    x2, w = as_rows(x, k), as_rows(weight, k)
    check_device(x2, w)
    if up is not None:
        up = (as_rows(up[0], k), up[1])
    m = x2.shape[0]
    y = out if out is not None else torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    y2 = y.view(-1, n)
    if m == 0:
        return y
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    cos, sin, rope_cols, d = rope if rope is not None else (w, w, 0, 2)
    args = (x2, w, bias if bias is not None else w, y2, m, n, k, x2.stride(0), w.stride(0), y2.stride(0),
            min(next_pow2(m), 1 << 16), cos, sin, cos.stride(0) if rope is not None else 0, rope_cols,
            up[0] if up is not None else w, up[1] if up is not None and up[1] is not None else w)
    flags = {"ACT": code, "HAS_BIAS": bias is not None, "ROPE": rope is not None, "D": d, "GLU": up is not None,
             "PREC": prec}
    # widest N tile (<= 64) that keeps rope tiles all-q/k or all-v (rope_cols % 16 == 0 checked)
    rope_bn = next(b for b in (64, 32, 16) if rope_cols % b == 0) if rope is not None else 64
    if interpreting():
        bm, bn, bk = 16, min(32, rope_bn), 32
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        _linear_act_kernel[grid](*args, **flags, EVEN_K=k % bk == 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=4)
        return y
    weights = (w,) if up is None else (w, up[0])
    if GEMM_IMPL != "pointer" and _tma_ok(x2, *weights, y2) and (rope is None or rope_cols % 128 == 0):
        _launch_tma(x2, w, bias, y2, code, rope, up)
        return y
    if x.dtype == torch.float32 or rope is not None or up is not None:
        # fp32 (exact "ieee" dots, tests), and the rope / gated epilogues where the TMA path does
        # not apply (off Hopper, q/k widths the 128-wide TMA tiles do not divide, rows not
        # 16-byte aligned): fixed config, two accumulators fit
        bm, bn, bk = 64, rope_bn, 32
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        _linear_act_kernel[grid](*args, **flags, EVEN_K=k % bk == 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                 GROUP_M=8, num_warps=4, num_stages=2)
        return y

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _linear_act_tuned[grid](*args, **flags, EVEN_K=k % 64 == 0)
    return y
