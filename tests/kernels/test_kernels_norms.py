"""LayerNorm / RMSNorm kernels (plain and fused with the residual add) against fp64 references."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import kernels_ref as ref  # noqa: E402

from kernels.layer_norm import TritonLayerNorm, add_layer_norm, layer_norm  # noqa: E402
from kernels.rms_norm import TritonRMSNorm, add_rms_norm, rms_norm  # noqa: E402

SHAPES = [(1, 32), (7, 80), (129, 1280), (3, 5, 48)]


@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm(shape: tuple[int, ...], device: str) -> None:
    n = shape[-1]
    x = torch.randn(shape, device=device) * 3 + 0.5
    w, b = torch.randn(n, device=device), torch.randn(n, device=device)
    out = ref.poison(shape, torch.float32, device)
    y = layer_norm(x, w, b, 1e-6, out=out)
    assert y is out
    assert ref.rel(y, ref.layer_norm(x, w, b, 1e-6)) < 1e-6


@pytest.mark.parametrize("shape", SHAPES)
def test_add_layer_norm(shape: tuple[int, ...], device: str) -> None:
    n = shape[-1]
    x, r = torch.randn(shape, device=device), torch.randn(shape, device=device) * 2
    w, b = torch.randn(n, device=device), torch.randn(n, device=device)
    h, y = add_layer_norm(x, r, w, b, 1e-6)
    assert ref.rel(h, x.double() + r.double()) < 1e-7
    assert ref.rel(y, ref.layer_norm(x + r, w, b, 1e-6)) < 1e-6


def test_add_layer_norm_in_place(device: str) -> None:
    """out_sum=residual, out=x: the block updates its stream and reuses the branch buffer."""
    x, r = torch.randn(7, 80, device=device), torch.randn(7, 80, device=device)
    w, b = torch.randn(80, device=device), torch.randn(80, device=device)
    want_h, want_y = x + r, ref.layer_norm(x + r, w, b, 1e-6)
    h, y = add_layer_norm(x, r, w, b, 1e-6, out_sum=r, out=x)
    assert h.data_ptr() == r.data_ptr() and y.data_ptr() == x.data_ptr()
    assert ref.rel(h, want_h) < 1e-7 and ref.rel(y, want_y) < 1e-6


def test_layer_norm_module_matches_torch(device: str) -> None:
    ln = torch.nn.LayerNorm(80, eps=1e-6, device=device)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    ours = TritonLayerNorm.from_torch(ln)
    assert ours.weight is ln.weight  # adopted, not copied
    x = torch.randn(7, 80, device=device)
    with torch.no_grad():
        assert ref.rel(ours(x), ln(x)) < 1e-6
        h, y = ours(x, x)
        assert ref.rel(y, ln(x + x)) < 1e-6


@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm(shape: tuple[int, ...], device: str) -> None:
    n = shape[-1]
    x, r, w = torch.randn(shape, device=device), torch.randn(shape, device=device), torch.randn(n, device=device)
    assert ref.rel(rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6)) < 1e-6
    h, y = add_rms_norm(x, r, w, 1e-6)
    assert ref.rel(h, x.double() + r.double()) < 1e-7
    assert ref.rel(y, ref.rms_norm(x + r, w, 1e-6)) < 1e-6


def test_rms_norm_module_matches_hf(device: str) -> None:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm as Qwen2RMSNorm

    hf = Qwen2RMSNorm(80, eps=1e-6).to(device)
    with torch.no_grad():
        hf.weight.normal_()
    ours = TritonRMSNorm.from_module(hf)
    x = torch.randn(7, 80, device=device)
    with torch.no_grad():
        assert ref.rel(ours(x), hf(x)) < 1e-6


@ref.requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 1024, 32768])
def test_norms_gpu(dtype: torch.dtype, rows: int) -> None:
    n = 1280
    x = torch.randn(rows, n, device="cuda", dtype=dtype)
    r = torch.randn(rows, n, device="cuda", dtype=dtype)
    w = torch.randn(n, device="cuda", dtype=dtype)
    b = torch.randn(n, device="cuda", dtype=dtype)
    tol = ref.TOL[dtype]
    h, y = add_layer_norm(x, r, w, b, 1e-6, out=ref.poison((rows, n), dtype, "cuda"))
    assert ref.rel(h, x.double() + r.double()) < tol
    # the kernel normalizes the rounded sum, as the unfused HF block does
    assert ref.rel(y, ref.layer_norm(h, w, b, 1e-6)) < tol
    assert ref.rel(layer_norm(x, w, b, 1e-6), ref.layer_norm(x, w, b, 1e-6)) < tol
    assert ref.rel(rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6)) < tol
    h, y = add_rms_norm(x, r, w, 1e-6)
    assert ref.rel(y, ref.rms_norm(h, w, 1e-6)) < tol
