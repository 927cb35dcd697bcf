"""bias + QuickGELU / exact GELU / SwiGLU kernels against fp64 references."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import kernels_ref as ref  # noqa: E402

from kernels.activations import TritonBiasAct, bias_act, bias_gelu, bias_quick_gelu  # noqa: E402
from kernels.swiglu import TritonSwiGLUMLP, align_rows_, empty_aligned_rows, padded_width, swiglu  # noqa: E402

SHAPES = [(1, 32), (7, 80), (129, 1280), (2, 3, 48)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_quick_gelu(shape: tuple[int, ...], with_bias: bool, device: str) -> None:
    x = torch.randn(shape, device=device) * 3
    b = torch.randn(shape[-1], device=device) if with_bias else None
    y = bias_quick_gelu(x, b, out=ref.poison(shape, torch.float32, device))
    assert ref.rel(y, ref.quick_gelu(x + b if b is not None else x)) < 1e-6


@pytest.mark.parametrize("shape", SHAPES)
def test_bias_gelu_exact(shape: tuple[int, ...], device: str) -> None:
    x = torch.randn(shape, device=device) * 3
    b = torch.randn(shape[-1], device=device)
    assert ref.rel(bias_gelu(x, b), ref.gelu(x + b)) < 1e-6


def test_other_acts_and_in_place(device: str) -> None:
    x = torch.randn(7, 80, device=device)
    assert ref.rel(bias_act(x, None, "silu"), torch.nn.functional.silu(x.double())) < 1e-6
    want = torch.nn.functional.gelu(x.double(), approximate="tanh")
    assert ref.rel(bias_act(x, None, "gelu_pytorch_tanh"), want) < 1e-6
    assert ref.rel(TritonBiasAct("quick_gelu")(x), ref.quick_gelu(x)) < 1e-6
    want = ref.quick_gelu(x)
    y = bias_quick_gelu(x, None, out=x)
    assert y.data_ptr() == x.data_ptr() and ref.rel(y, want) < 1e-6
    with pytest.raises(ValueError):
        bias_act(x, None, "relu6")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_swiglu(shape: tuple[int, ...], with_bias: bool, device: str) -> None:
    g, u = torch.randn(shape, device=device) * 2, torch.randn(shape, device=device)
    n = shape[-1]
    bg, bu = (torch.randn(n, device=device), torch.randn(n, device=device)) if with_bias else (None, None)
    y = swiglu(g, u, bg, bu, out=ref.poison(shape, torch.float32, device))
    gg = g.double() + (bg.double() if bg is not None else 0)
    uu = u.double() + (bu.double() if bu is not None else 0)
    assert ref.rel(y, torch.nn.functional.silu(gg) * uu) < 1e-6


def test_swiglu_strided_halves(device: str) -> None:
    """gate and up as column slices of one fused [M, 2N] GEMM output."""
    gu = torch.randn(7, 160, device=device)
    g, u = gu[:, :80], gu[:, 80:]
    assert ref.rel(swiglu(g, u), torch.nn.functional.silu(g.double()) * u.double()) < 1e-6


@pytest.mark.parametrize("mode", ["cublas", "triton"])
def test_swiglu_mlp_matches_hf(mode: str, device: str) -> None:
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLMLP

    # intermediate 78: fp32 rows of 312 bytes, not 16-byte aligned (as 3420 in bf16)
    cfg = Qwen2_5_VLConfig(vision_config={"hidden_size": 48, "intermediate_size": 78, "hidden_act": "silu"})
    hf = Qwen2_5_VLMLP(cfg.vision_config, bias=True).to(device)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 7, 48, device=device)
    with torch.no_grad():
        want = hf(x)
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    ours = TritonSwiGLUMLP.from_module(hf, mode)
    assert ours.down_proj.weight is hf.down_proj.weight  # adopted: re-homed into zero-padded storage
    assert ours.down_proj.weight.stride(0) == padded_width(78) == 128
    assert [w.shape[0] for w in ours._weights()[:4]] == [128] * 4  # the GEMMs run the padded width
    after = ours.state_dict()
    assert all(torch.equal(after[k], v) and after[k].is_contiguous() for k, v in before.items())
    with torch.no_grad():
        assert ref.rel(ours(x), want) < 1e-5
        other = {k: torch.randn_like(v) for k, v in before.items()}  # loaded after patching: still used
        ours.load_state_dict(other)
        hf_other = Qwen2_5_VLMLP(cfg.vision_config, bias=True).to(device)
        hf_other.load_state_dict(other)
        assert ours._weights()[0].shape[0] == 128 and ref.rel(ours(x), hf_other(x)) < 1e-5
        # a parameter replaced (as .to() to another device or dtype does): the unpadded path, still right
        ours.up_proj.weight = torch.nn.Parameter(ours.up_proj.weight.detach().clone())
        assert ours._weights()[0].shape[0] == 78 and ref.rel(ours(x), hf_other(x)) < 1e-5


def test_align_rows(device: str) -> None:
    w = torch.nn.Parameter(torch.randn(5, 13, device=device, dtype=torch.bfloat16))
    want = w.detach().clone()
    assert align_rows_(w) and w.stride() == (16, 1) and torch.equal(w, want)
    assert not align_rows_(w)  # already aligned
    rows = empty_aligned_rows(3, 13, torch.bfloat16, device)
    assert rows.shape == (3, 13) and rows.stride() == (16, 1)


@ref.requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 1024, 32768])
def test_activations_gpu(dtype: torch.dtype, rows: int) -> None:
    x = torch.randn(rows, 5120, device="cuda", dtype=dtype)
    b = torch.randn(5120, device="cuda", dtype=dtype)
    tol = ref.TOL[dtype]
    xb = x.double() + b.double()
    assert ref.rel(bias_quick_gelu(x, b, out=ref.poison(x.shape, dtype, "cuda")), ref.quick_gelu(xb)) < tol
    assert ref.rel(bias_gelu(x, b), ref.gelu(xb)) < tol
    assert ref.rel(swiglu(x, x, b, b), torch.nn.functional.silu(xb) * xb) < tol
