"""The fused GPU path (Triton kernels) against the plain PyTorch path, on the CPU in the Triton
interpreter (fp16: the interpreter's bf16 is not faithful), and the decode runner's bookkeeping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from service.llm.cuda_graphs import DecodeRunner, pow2_buckets
from service.llm.engine import LLMEngine
from service.llm.model import (
    allocate_kv_cache,
    load_model,
    prefill,
    prefill_fused,
)
from service.llm.prompt import PromptBuilder, positions

from . import DEVICE, FUSED_DTYPES, assert_fused_decode_steps, fused_tolerance, oracle, random_image, rel_err

pytest.importorskip("triton")


@pytest.mark.parametrize("dtype", FUSED_DTYPES)
def test_elementwise_kernels_round_like_eager_ops(dtype: torch.dtype) -> None:
    from service.llm import gpu_ops as ops

    x, r = torch.randn(3, 96, dtype=dtype, device=DEVICE), torch.randn(3, 96, dtype=dtype, device=DEVICE)
    w = (1 + 0.1 * torch.randn(96, device=DEVICE)).to(dtype)
    h, y = ops.rms_norm(x, w, 1e-6, residual=r)
    ref = x + r
    ref32 = ref.float()
    assert torch.equal(h, ref)
    torch.testing.assert_close(y, w * (ref32 * torch.rsqrt(ref32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype),
                               atol=2e-3, rtol=2e-3)
    same, y0 = ops.rms_norm(x, w, 1e-6)
    assert same.data_ptr() == x.data_ptr() and y0.shape == x.shape

    gu = torch.randn(2, 3000, dtype=dtype, device=DEVICE)
    g, u = gu.chunk(2, dim=-1)
    torch.testing.assert_close(ops.silu_mul(gu), F.silu(g) * u, atol=2e-3, rtol=2e-3)


def _tol(dtype: torch.dtype) -> dict[str, float]:
    """The interpreter rounds each product as the eager ops do; compiled, the GPU may contract a
    rope product and the sum into one FMA, and its rsqrt may flip the last bit of a q/k-normed
    value: one rounding of the output's size apart."""
    return {"rtol": 2 * torch.finfo(dtype).eps, "atol": 16 * torch.finfo(dtype).eps}


def _qk_norm(d: int, dtype: torch.dtype, norm: bool) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """Qwen3's q and k RMSNorm weights [d] and eps, or None (Qwen2)."""
    if not norm:
        return None
    q_w, k_w = ((1 + 0.3 * torch.randn(d, device=DEVICE)).to(dtype) for _ in range(2))
    return q_w, k_w, 1e-6


def _head_norm(x: torch.Tensor, qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None, which: int) -> torch.Tensor:
    """HF's Qwen3 q (which=0) or k (1) norm over each head: fp32 RMSNorm, rounded, times the weight."""
    if qk_norm is None:
        return x
    x32 = x.float()
    return qk_norm[which] * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + qk_norm[2])).to(x.dtype)


@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "d", "norm"), [(4, 2, 16, False), (4, 2, 24, True), (3, 1, 24, False),
                                                               (16, 8, 128, True), (2, 2, 40, True)])
def test_rope_kv_rotates_and_scatters_into_the_cache(heads: int, kv_heads: int, d: int, norm: bool,
                                                     dtype: torch.dtype) -> None:
    """Any even head size (the tiny Qwen3-VL checkpoint's is 24), with Qwen3's q/k norm or without."""
    from service.llm import gpu_ops as ops
    from service.llm.model import _rotate

    slots, length, n = 3, 40, 5
    qkv = (3 * torch.randn(n, (heads + 2 * kv_heads) * d, device=DEVICE)).to(dtype)
    angle = 10 * torch.randn(n, d, device=DEVICE)
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    k_cache = torch.full((slots, kv_heads, length, d), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = k_cache.clone()
    slot = torch.tensor([0, 2, 2, 1, 0], device=DEVICE)
    at = torch.tensor([3, 7, 8, 39, 50], device=DEVICE)  # the last one is clamped to length - 1
    qk_norm = _qk_norm(d, dtype, norm)
    q = ops.rope_kv(qkv, cos, sin, k_cache, v_cache, slot, at, heads, kv_heads, qk_norm=qk_norm)
    qr, kr, vr = qkv.view(n, -1, d).split([heads, kv_heads, kv_heads], dim=1)
    qr, kr = _head_norm(qr, qk_norm, 0), _head_norm(kr, qk_norm, 1)
    c, s = cos[:, None, None], sin[:, None, None]
    torch.testing.assert_close(q, _rotate(qr[:, :, None], c, s)[:, :, 0], **_tol(dtype))
    k_ref = _rotate(kr[:, :, None], c, s)[:, :, 0]
    for i in range(n):
        p = min(int(at[i]), length - 1)
        torch.testing.assert_close(k_cache[slot[i], :, p], k_ref[i], **_tol(dtype))
        assert torch.equal(v_cache[slot[i], :, p], vr[i])
    assert int((~k_cache.isnan()).sum()) == n * kv_heads * d  # nothing else written


@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "d", "splits", "norm"),  # splits None: the default
                         [(12, 2, 32, 8, False), (28, 4, 32, 3, False), (4, 4, 32, 1, False), (12, 2, 32, 1, False),
                          (12, 2, 32, None, False), (4, 2, 24, 3, True), (4, 2, 24, 1, False),
                          (16, 8, 128, None, True), (32, 8, 128, 1, True), (6, 2, 40, 2, True)])
def test_decode_attention_rotates_writes_the_cache_and_attends(heads: int, kv_heads: int, d: int, splits: int | None,
                                                                norm: bool, dtype: torch.dtype) -> None:
    """Any even head size, Qwen3's q/k norm or not (Qwen3-VL-2B: 16 / 8 heads, 8B: 32 / 8, of 128)."""
    from service.llm import gpu_ops as ops
    from service.llm.model import _rotate

    b, length = 4, 150
    # larger q/k where the norm scales them back; unnormed, x3 makes the softmax so sharp that bf16's
    # rounding of the probabilities alone is over the bound (H200: 2.2-5e-3)
    qkv = ((3 if norm else 1) * torch.randn(b, (heads + 2 * kv_heads) * d, device=DEVICE)).to(dtype)
    angle = 10 * torch.randn(b, d, device=DEVICE)
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    k_cache = torch.randn(b + 1, kv_heads, length, d, dtype=dtype, device=DEVICE)
    v_cache = torch.randn(b + 1, kv_heads, length, d, dtype=dtype, device=DEVICE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    # nothing before it; fewer positions than splits; a ragged split; past the window (clamped)
    at = torch.tensor([0, 5, 70, 400], device=DEVICE)
    qk_norm = _qk_norm(d, dtype, norm)
    out = ops.decode_attention(qkv, cos, sin, k_cache, v_cache, at, heads, splits=splits, qk_norm=qk_norm)

    q, k, v = qkv.view(b, -1, d).split([heads, kv_heads, kv_heads], dim=1)
    q, k = _head_norm(q, qk_norm, 0), _head_norm(k, qk_norm, 1)
    c, s = cos[:, None, None], sin[:, None, None]
    q, k = _rotate(q[:, :, None], c, s), _rotate(k[:, :, None], c, s)  # [B, heads, 1, D]
    end = at.clamp(max=length - 1)
    for i in range(b):
        k_ref[i, :, end[i]], v_ref[i, :, end[i]] = k[i, :, 0], v[i]
    torch.testing.assert_close(k_cache, k_ref, **_tol(dtype))
    assert torch.equal(v_cache, v_ref)  # and nothing else in either cache moved
    mask = (torch.arange(length, device=DEVICE)[None] <= end[:, None])[:, None, None]
    ref = F.scaled_dot_product_attention(q.float(), k_ref[:b].float(), v_ref[:b].float(), attn_mask=mask,
                                         enable_gqa=True)[:, :, 0]
    assert out.shape == (b, heads * d)
    assert rel_err(out.view(b, heads, d), ref) < 2e-3


def _inputs(path: Path, dtype: torch.dtype):
    hf = oracle(path)
    feats = hf.features(random_image(0, 150, 100))
    prompt = PromptBuilder.from_checkpoint(path).build("What is in the picture?", feats.num_tokens)
    pos, delta = positions(prompt.prefix_len, feats.grid[0], 2, len(prompt.ids))
    model = load_model(path, device=DEVICE, dtype=dtype)
    x = model.embed(torch.tensor(prompt.ids, device=DEVICE))
    x[prompt.image_start : prompt.image_start + prompt.num_image_tokens] = feats.embeds.to(DEVICE, dtype)
    return model, prompt, pos.to(DEVICE), delta, x[None]


@torch.no_grad()
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("attention", ["triton", "sdpa", "matmul"])
def test_fused_steps_match_the_plain_steps(tiny_checkpoint: Path, attention: str, dtype: torch.dtype) -> None:
    model, prompt, pos, delta, x = _inputs(tiny_checkpoint, dtype)
    t, p = x.shape[1], prompt.prefix_len
    caches = [allocate_kv_cache(model.cfg, 3, 128, device=DEVICE, dtype=dtype) for _ in range(2)]
    slots = torch.tensor([1], device=DEVICE)
    # prefix then the rest (a masked prefill), in both paths
    outs = []
    for kv, fn in zip(caches, (prefill, prefill_fused), strict=True):
        fn(model, kv, x[:, :p], pos[:, None, :p], slots, 0)
        outs.append(fn(model, kv, x[:, p:], pos[:, None, p:], slots, [p]))
    tol = fused_tolerance(dtype)
    assert rel_err(outs[1], outs[0]) < tol
    assert rel_err(caches[1][:, :, 1, :, :t], caches[0][:, :, 1, :, :t]) < tol
    assert_fused_decode_steps(model, caches, t, delta, attention, dtype)


def test_runner_state_advances_only_active_slots() -> None:
    assert pow2_buckets(8) == [1, 2, 4, 8] and pow2_buckets(6) == [1, 2, 4, 6] and pow2_buckets(1) == [1]
    calls = []

    def fake_decode(model, kv, tokens, positions, cache_pos):  # type: ignore[no-untyped-def]
        calls.append((kv.shape[2], kv.shape[4], tokens.tolist(), positions[0].tolist(), cache_pos.tolist()))
        logits = torch.zeros(tokens.shape[0], 10)
        logits[torch.arange(tokens.shape[0]), (tokens + 1) % 10] = 1.0
        return logits

    kv = torch.zeros(2, 2, 3, 1, 100, 4)
    runner = DecodeRunner(None, kv, use_graphs=True)  # type: ignore[arg-type]  # no CUDA: eager
    assert runner.batch_buckets == [1, 2, 3]
    assert runner.bucket(3, 65) == (3, 100) and runner.bucket(2, 10) == (2, 64)
    runner.set_slots([0, 2], [4, 8], [10, 99], [12, 120])
    first = runner.launch(fake_decode, 3, 64)
    assert first.tokens() == [5, 1, 9]
    second = runner.launch(fake_decode, 3, 64)
    assert second.tokens() == [6, 2, 0]
    # slot 1 is idle: its position stays; slot 2's cache position is clamped to the window
    assert calls[0][2:] == ([4, 0, 8], [12, 0, 120], [10, 0, 63])
    assert calls[1][2:] == ([5, 1, 9], [13, 0, 121], [11, 0, 63])
    runner.set_tokens([2], [3])
    runner.clear_slot(0)  # its whole state is reset: an idle row writes cache position 0 only
    runner.launch(fake_decode, 3, 100)
    assert calls[2][2:] == ([0, 2, 3], [0, 0, 122], [0, 0, 99])
    assert runner.state[1].tolist() == [0, 0, 102]


def test_engine_on_the_fused_path_answers_like_the_plain_path(tiny_checkpoint: Path) -> None:
    hf = oracle(tiny_checkpoint)
    feats = [hf.features(random_image(seed, *size)) for seed, size in [(0, (150, 100)), (1, (56, 56))]]
    answers = {}
    for fused in (False, True):
        engine = LLMEngine(tiny_checkpoint, device=DEVICE, dtype=FUSED_DTYPES[-1], max_batch_slots=3, max_seq_len=256,
                           fused=fused, attention="triton" if fused else "sdpa")
        try:
            streams = [engine.generate(f.embeds, f.grid[0], f"img{i}", q, 8)
                       for i, f in enumerate(feats) for q in ("What is it?", "Describe it.")]
            answers[fused] = [s.result().token_ids for s in streams]
        finally:
            engine.close()
    agree = sum(a == b for a, b in zip(answers[False], answers[True], strict=True))
    assert agree >= 3, answers  # fp16 rounding order may flip a near tie; most answers must agree


@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize(("rows", "inter", "k"), [(1, 40, 96), (5, 33, 200), (16, 64, 64)])
def test_gate_up_silu_matches_the_two_step_path(rows: int, inter: int, k: int, dtype: torch.dtype) -> None:
    from service.llm import gpu_ops as ops

    x = torch.randn(rows, k, dtype=dtype, device=DEVICE)
    w = (torch.randn(2 * inter, k, device=DEVICE) / k**0.5).to(dtype)
    got = ops.gate_up_silu(x, w, block_n=16, block_k=64)  # ragged N and K tiles
    gate, up = F.linear(x.float(), w.float()).chunk(2, dim=-1)
    assert got.shape == (rows, inter) and got.dtype == dtype
    assert rel_err(got, F.silu(gate) * up) < 5e-3


@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize(("rows", "n", "k", "parts"), [(1, 40, 300, 4), (7, 33, 96, 3), (16, 64, 64, 1)])
def test_linear_parts_then_rms_norm_of_parts(rows: int, n: int, k: int, parts: int, dtype: torch.dtype) -> None:
    from service.llm import gpu_ops as ops

    x = torch.randn(rows, k, dtype=dtype, device=DEVICE)
    w = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    got = ops.linear_parts(x, w, parts=parts, block_n=16, block_k=32)  # ragged K slices and N tiles
    assert got.shape == (parts, rows, n) and got.dtype == torch.float32
    product = F.linear(x.float(), w.float())
    assert rel_err(got.sum(0), product) < 1e-3
    residual = torch.randn(rows, n, dtype=dtype, device=DEVICE)
    norm_w = (1 + 0.1 * torch.randn(n, device=DEVICE)).to(dtype)
    h, y = ops.rms_norm_of_parts(got, norm_w, 1e-6, residual)
    want_h, want_y = ops.rms_norm(got.sum(0).to(dtype), norm_w, 1e-6, residual=residual)
    torch.testing.assert_close(h, want_h, atol=2 * torch.finfo(dtype).eps, rtol=2 * torch.finfo(dtype).eps)
    torch.testing.assert_close(y, want_y, atol=4e-3, rtol=4e-3)



@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize(("rows", "n", "parts"), [(5, 96, 3), (1, 200, 8), (16, 64, 1)])
def test_rms_norm_adds_deepstack_after_the_residual(rows: int, n: int, parts: int, dtype: torch.dtype) -> None:
    """h = (x + residual) + add, each add rounded as the eager ops round it (HF adds the DeepStack
    features to a layer's output); a zero ``add`` row leaves h exactly as without one."""
    from service.llm import gpu_ops as ops

    x, r, a = (torch.randn(rows, n, dtype=dtype, device=DEVICE) for _ in range(3))
    a[0] = 0  # a row away from the image
    w = (1 + 0.1 * torch.randn(n, device=DEVICE)).to(dtype)
    h, y = ops.rms_norm(x, w, 1e-6, residual=r, add=a)
    assert torch.equal(h, (x + r) + a)
    assert torch.equal(h[0], ops.rms_norm(x, w, 1e-6, residual=r)[0][0])
    h32 = h.float()
    torch.testing.assert_close(y, w * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype),
                               atol=4e-3, rtol=4e-3)
    # the few-row form: a projection's partial sums, summed and rounded, then the same two adds
    partial = torch.randn(parts, rows, n, device=DEVICE)
    h2, y2 = ops.rms_norm_of_parts(partial, w, 1e-6, r, add=a)
    want_h, want_y = ops.rms_norm(partial.sum(0).to(dtype), w, 1e-6, residual=r, add=a)
    torch.testing.assert_close(h2, want_h, **_tol(dtype))
    torch.testing.assert_close(y2, want_y, atol=4e-3, rtol=4e-3)
