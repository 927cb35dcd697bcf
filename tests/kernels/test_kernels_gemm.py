"""GEMM with the bias + activation epilogue."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import kernels_ref as ref  # noqa: E402

from kernels.gemm import linear_act  # noqa: E402

ACTS = {"none": lambda x: x, "quick_gelu": ref.quick_gelu, "gelu": ref.gelu}


@pytest.mark.parametrize("m,n,k", [(1, 32, 32), (7, 80, 48), (129, 64, 80)])
@pytest.mark.parametrize("act", list(ACTS))
def test_linear_act(m: int, n: int, k: int, act: str, device: str) -> None:
    x = torch.randn(m, k, device=device)
    w = torch.randn(n, k, device=device) / k**0.5
    b = torch.randn(n, device=device)
    y = linear_act(x, w, b, act, out=ref.poison((m, n), torch.float32, device))
    assert ref.rel(y, ACTS[act](x.double() @ w.double().T + b.double())) < 1e-5


@pytest.mark.parametrize("m,heads,d", [(7, 2, 16), (33, 2, 80)])
def test_linear_rope_epilogue(m: int, heads: int, d: int, device: str) -> None:
    """qkv GEMM with interleaved q/k rows + rotary epilogue == HF-order GEMM then rotary."""
    from kernels.rope_vision import interleave_perm, interleave_qk_rows, qkv_views

    k_in = 48
    x = torch.randn(m, k_in, device=device)
    w = torch.randn(3 * heads * d, k_in, device=device) / k_in**0.5
    b = torch.randn(3 * heads * d, device=device)
    ang = torch.randn(m, d // 2, device=device) * 4
    cos, sin = ang.cos(), ang.sin()
    want = x.double() @ w.double().T + b.double()
    q, k, v = qkv_views(want, heads)
    wi, bi = interleave_qk_rows(w.clone(), heads), interleave_qk_rows(b.clone(), heads)
    got = linear_act(x, wi, bi, rope=(cos, sin, 2 * heads * d, d))
    gq, gk, gv = qkv_views(got, heads)
    perm = torch.argsort(interleave_perm(d))  # back to HF's column order within each head
    assert ref.rel(gq[..., perm.to(device)], ref.rope(q, cos, sin)) < 1e-5
    assert ref.rel(gk[..., perm.to(device)], ref.rope(k, cos, sin)) < 1e-5
    assert ref.rel(gv, v) < 1e-5


def _glu_ref(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, w2: torch.Tensor,
             b2: torch.Tensor | None) -> torch.Tensor:
    g = x.double() @ w.double().T + (b.double() if b is not None else 0)
    u = x.double() @ w2.double().T + (b2.double() if b2 is not None else 0)
    return torch.nn.functional.silu(g) * u


@pytest.mark.parametrize("m,n,k", [(1, 16, 32), (7, 42, 48), (70, 50, 72)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_glu(m: int, n: int, k: int, with_bias: bool, device: str) -> None:
    """Gated epilogue: silu(x W^T + b) * (x W2^T + b2), into an output with padded rows."""
    from kernels.swiglu import empty_aligned_rows

    x = torch.randn(m, k, device=device)
    w, w2 = (torch.randn(n, k, device=device) / k**0.5 for _ in range(2))
    b, b2 = (torch.randn(n, device=device) if with_bias else None for _ in range(2))
    out = empty_aligned_rows(m, n, torch.float32, device).fill_(float("nan"))
    y = linear_act(x, w, b, "silu", up=(w2, b2), out=out)
    assert y is out
    assert ref.rel(y, _glu_ref(x, w, b, w2, b2)) < 1e-5


def test_linear_glu_refuses_mismatches(device: str) -> None:
    x, w = torch.randn(3, 16, device=device), torch.randn(8, 16, device=device)
    with pytest.raises(ValueError, match="match"):
        linear_act(x, w, None, "silu", up=(torch.randn(4, 16, device=device), None))
    with pytest.raises(ValueError, match="both biases"):
        linear_act(x, w, torch.randn(8, device=device), "silu", up=(w, None))


def test_linear_no_bias_3d(device: str) -> None:
    x = torch.randn(2, 3, 32, device=device)
    w = torch.randn(48, 32, device=device)
    assert ref.rel(linear_act(x, w), x.double() @ w.double().T) < 1e-5


@ref.requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m", [1, 1024, 8192])
@pytest.mark.parametrize("n,k,act", [(5120, 1280, "quick_gelu"), (5120, 5120, "gelu"), (1280, 1176, "none")])
def test_linear_act_gpu(dtype: torch.dtype, m: int, n: int, k: int, act: str) -> None:
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = (torch.randn(n, k, device="cuda") / k**0.5).to(dtype)
    b = torch.randn(n, device="cuda", dtype=dtype)
    y = linear_act(x, w, b, act, out=ref.poison((m, n), dtype, "cuda"))
    tol = 2e-3 if dtype == torch.float32 else ref.TOL[dtype]
    assert ref.rel(y, ACTS[act](x.double() @ w.double().T + b.double())) < tol


@ref.requires_cuda
@pytest.mark.parametrize("impl", ["tma", "pointer"])
@pytest.mark.parametrize("m", [1, 1000, 4096])
def test_linear_act_gpu_both_impls(impl: str, m: int) -> None:
    import kernels.gemm as G

    x = torch.randn(m, 1280, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(3840, 1280, device="cuda") / 1280**0.5).to(torch.bfloat16)
    b = torch.randn(3840, device="cuda", dtype=torch.bfloat16)
    G.GEMM_IMPL = impl
    try:
        y = linear_act(x, w, b, "quick_gelu", out=ref.poison((m, 3840), torch.bfloat16, "cuda"))
        # the rotary epilogue on the real qkv shape (16 heads x 80), against rotating afterwards
        from kernels.rope_vision import interleave_perm, interleave_qk_rows, qkv_views

        ang = torch.rand(m, 40, device="cuda") * 40
        cos, sin = ang.cos(), ang.sin()
        wi, bi = interleave_qk_rows(w.clone(), 16), interleave_qk_rows(b.clone(), 16)
        got = linear_act(x, wi, bi, rope=(cos, sin, 2560, 80))
    finally:
        G.GEMM_IMPL = None
    assert ref.rel(y, ref.quick_gelu(x.double() @ w.double().T + b.double())) < ref.TOL[torch.bfloat16]
    want = x.double() @ w.double().T + b.double()
    q, k, v = qkv_views(want, 16)
    gq, gk, gv = qkv_views(got, 16)
    inv = torch.argsort(interleave_perm(80)).cuda()  # back to HF's column order within each head
    assert ref.rel(gq[..., inv], ref.rope(q, cos, sin)) < ref.TOL[torch.bfloat16]
    assert ref.rel(gk[..., inv], ref.rope(k, cos, sin)) < ref.TOL[torch.bfloat16]
    assert ref.rel(gv, v) < ref.TOL[torch.bfloat16]


@ref.requires_cuda
@pytest.mark.parametrize("impl", ["tma", "pointer"])
@pytest.mark.parametrize("dtype,m", [(torch.bfloat16, 1), (torch.bfloat16, 1000), (torch.bfloat16, 8200),
                                     (torch.float16, 4096)])
def test_linear_glu_gpu(impl: str, dtype: torch.dtype, m: int) -> None:
    """Qwen2.5-VL's gate|up shapes (N = 3420: rows of 6840 bytes, padded to 6848 for TMA)."""
    import kernels.gemm as G
    from kernels.swiglu import empty_aligned_rows

    n, k = 3420, 1280
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w, w2 = ((torch.randn(n, k, device="cuda") / k**0.5).to(dtype) for _ in range(2))
    b, b2 = (torch.randn(n, device="cuda", dtype=dtype) for _ in range(2))
    G.GEMM_IMPL = impl
    try:
        y = linear_act(x, w, b, "silu", up=(w2, b2), out=empty_aligned_rows(m, n, dtype, "cuda").fill_(float("nan")))
    finally:
        G.GEMM_IMPL = None
    assert ref.rel(y, _glu_ref(x, w, b, w2, b2)) < ref.TOL[dtype]
