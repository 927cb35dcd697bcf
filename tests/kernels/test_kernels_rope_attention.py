"""Vision rotary and packed (block-diagonal) attention kernels."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import kernels_ref as ref  # noqa: E402

from kernels.attention import attention, varlen_attention  # noqa: E402
from kernels.rope_vision import (  # noqa: E402
    apply_vision_rope,
    apply_vision_rope_,
    qkv_views,
    rope_angles,
    rope_positions,
    rope_qk,
)


def _cu(lengths: list[int], device: str) -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def test_positions_and_tables_match_hf() -> None:
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLVisionRotaryEmbedding
    from transformers.vision_utils import get_vision_position_ids

    grid = torch.tensor([[1, 4, 6], [2, 2, 2], [1, 8, 4]])
    pos = rope_positions(grid, 2)
    assert torch.equal(pos, get_vision_position_ids(grid, 2))
    cfg = Qwen2VLVisionConfig(embed_dim=160, num_heads=2)  # head_dim 80
    rot = Qwen2VLVisionRotaryEmbedding(cfg)
    cos_hf, sin_hf = rot(torch.zeros(1), pos)  # [S, 80]
    cos, sin = rope_angles(pos, rot.inv_freq)  # [S, 40]
    assert torch.equal(cos, cos_hf[:, :40]) and torch.equal(cos, cos_hf[:, 40:])
    assert torch.equal(sin, sin_hf[:, :40])


@pytest.mark.parametrize("s_len,heads,d", [(1, 1, 16), (7, 2, 80), (129, 3, 32)])
def test_rope_matches_hf(s_len: int, heads: int, d: int, device: str) -> None:
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    qkv = torch.randn(s_len, 3 * heads * d, device=device)
    q, k, _ = qkv_views(qkv, heads)
    ang = torch.randn(s_len, d // 2, device=device) * 5
    cos, sin = ang.cos(), ang.sin()
    q_hf, k_hf = apply_rotary_pos_emb_vision(q, k, torch.cat([cos, cos], -1), torch.cat([sin, sin], -1))
    qo, ko = apply_vision_rope(q, k, cos, sin, q_out=ref.poison(q.shape, q.dtype, device))
    assert ref.rel(qo, q_hf) < 1e-6 and ref.rel(ko, k_hf) < 1e-6
    # in place inside the fused buffer, v untouched
    v_before = qkv_views(qkv, heads)[2].clone()
    apply_vision_rope_(qkv, cos, sin, heads)
    q2, k2, v2 = qkv_views(qkv, heads)
    assert ref.rel(q2, q_hf) < 1e-6 and ref.rel(k2, k_hf) < 1e-6 and torch.equal(v2, v_before)


@pytest.mark.parametrize("s_len,heads,d", [(1, 1, 16), (7, 2, 80), (33, 3, 32)])
def test_rope_qk_rows(s_len: int, heads: int, d: int, device: str) -> None:
    qkv = torch.randn(s_len, 3 * heads * d, device=device)
    ang = torch.randn(s_len, d // 2, device=device) * 5
    cos, sin = ang.cos(), ang.sin()
    q, k, _ = qkv_views(qkv, heads)
    out = rope_qk(qkv, cos, sin, heads, out=ref.poison((s_len, 2 * heads * d), torch.float32, device))
    assert ref.rel(out[:, : heads * d], ref.rope(q, cos, sin).reshape(s_len, -1)) < 1e-6
    assert ref.rel(out[:, heads * d :], ref.rope(k, cos, sin).reshape(s_len, -1)) < 1e-6


CASES = [([1], 1, 16), ([7, 33], 2, 80), ([17, 5, 40], 1, 32), ([20], 2, 48), ([9, 23], 2, 72)]


@pytest.mark.parametrize("lengths,heads,d", CASES)
@pytest.mark.parametrize("backend", ["triton", "triton_prerope", "cudnn", "sdpa", "sdpa_batched"])
def test_attention_backends(lengths: list[int], heads: int, d: int, backend: str, device: str) -> None:
    s_len = sum(lengths)
    qkv = torch.randn(s_len, 3 * heads * d, device=device)
    ang = torch.randn(s_len, d // 2, device=device) * 5
    cos, sin = ang.cos(), ang.sin()
    q, k, v = qkv_views(qkv, heads)
    want = ref.attention(ref.rope(q, cos, sin), ref.rope(k, cos, sin), v, lengths).reshape(s_len, -1)
    got = attention(qkv.clone(), _cu(lengths, device), max(lengths), heads, cos, sin, backend=backend)
    assert got.shape == (s_len, heads * d)
    assert ref.rel(got, want) < 1e-5


def test_varlen_attention_without_rope_writes_every_row(device: str) -> None:
    lengths, heads, d = [3, 16, 1], 2, 80
    s_len = sum(lengths)
    q, k, v = (torch.randn(s_len, heads, d, device=device) for _ in range(3))
    out = ref.poison((s_len, heads, d), torch.float32, device)
    got = varlen_attention(q, k, v, _cu(lengths, device), max(lengths), out=out)
    assert ref.rel(got, ref.attention(q, k, v, lengths)) < 1e-5


@ref.requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("s_len", [1, 1024, 32768])
def test_rope_gpu(dtype: torch.dtype, s_len: int) -> None:
    heads, d = 16, 80
    qkv = torch.randn(s_len, 3 * heads * d, device="cuda", dtype=dtype)
    ang = torch.rand(s_len, d // 2, device="cuda") * 40
    cos, sin = ang.cos(), ang.sin()
    q, k, _ = qkv_views(qkv, heads)
    out = rope_qk(qkv, cos, sin, heads, out=ref.poison((s_len, 2 * heads * d), dtype, "cuda"))
    assert ref.rel(out[:, : heads * d], ref.rope(q, cos, sin).reshape(s_len, -1)) < ref.TOL[dtype]
    assert ref.rel(out[:, heads * d :], ref.rope(k, cos, sin).reshape(s_len, -1)) < ref.TOL[dtype]
    qo, ko = apply_vision_rope(q, k, cos, sin)
    assert ref.rel(qo, ref.rope(q, cos, sin)) < ref.TOL[dtype] and ref.rel(ko, ref.rope(k, cos, sin)) < ref.TOL[dtype]


@ref.requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("lengths", [[1024], [1024] * 8, [256, 6348, 1036, 64, 4096]])
@pytest.mark.parametrize("backend", ["triton", "triton_prerope", "fa2", "cudnn"])
def test_attention_gpu(dtype: torch.dtype, lengths: list[int], backend: str) -> None:
    if backend in ("fa2", "cudnn") and dtype == torch.float32:
        pytest.skip("FlashAttention-2 / cuDNN attention have no fp32 path")
    heads, d = 16, 80
    s_len = sum(lengths)
    qkv = torch.randn(s_len, 3 * heads * d, device="cuda", dtype=dtype)
    ang = torch.rand(s_len, d // 2, device="cuda") * 40
    cos, sin = ang.cos(), ang.sin()
    q, k, v = qkv_views(qkv, heads)
    want = ref.attention(ref.rope(q, cos, sin), ref.rope(k, cos, sin), v, lengths).reshape(s_len, -1)
    got = attention(qkv.clone(), _cu(lengths, "cuda"), max(lengths), heads, cos, sin, backend=backend)
    tol = 3e-3 if dtype == torch.float32 else ref.TOL[dtype]  # fp32 runs on tf32-free ieee dots
    assert ref.rel(got, want) < tol


@ref.requires_cuda
@pytest.mark.parametrize("lengths", [[784] * 4, [256, 4800, 784, 3520]])
@pytest.mark.parametrize("backend", ["triton", "triton_prerope", "fa2", "cudnn"])
def test_attention_gpu_head_dim_72(lengths: list[int], backend: str) -> None:
    """Qwen3-VL's heads (16 x 72): head strides are multiples of 8, not 16, elements."""
    heads, d = 16, 72
    s_len = sum(lengths)
    qkv = torch.randn(s_len, 3 * heads * d, device="cuda", dtype=torch.bfloat16)
    ang = torch.rand(s_len, d // 2, device="cuda") * 40
    cos, sin = ang.cos(), ang.sin()
    q, k, v = qkv_views(qkv, heads)
    want = ref.attention(ref.rope(q, cos, sin), ref.rope(k, cos, sin), v, lengths).reshape(s_len, -1)
    got = attention(qkv.clone(), _cu(lengths, "cuda"), max(lengths), heads, cos, sin, backend=backend)
    assert ref.rel(got, want) < ref.TOL[torch.bfloat16]
