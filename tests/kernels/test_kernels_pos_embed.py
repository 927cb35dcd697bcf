"""Qwen3-VL's resampled position embedding: the per-grid taps against HF and against
``F.interpolate``, and the fused (position add + LayerNorm) kernel against an fp64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import kernels_ref as ref  # noqa: E402

from kernels.pos_embed import TAPS, pos_embed_add_layer_norm, resample_taps  # noqa: E402
from kernels.rope_vision import rope_positions  # noqa: E402

# (grid, table side): grids smaller and larger than the table, non-square, 1- and 2-row images,
# a 2-frame entry, and the real 48 x 48 table onto a 448 x 448 image (28 x 28 patches)
GRIDS = [
    ([(1, 4, 6)], 6),
    ([(1, 2, 2), (2, 6, 4), (1, 10, 8)], 6),
    ([(1, 2, 14), (1, 12, 2)], 5),
    ([(1, 28, 28), (1, 16, 16)], 48),
]


@pytest.mark.parametrize("grid,side", GRIDS)
def test_resample_taps_equal_hf(grid: list[tuple[int, int, int]], side: int) -> None:
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    want_idx, want_w = get_vision_interpolation_indices_and_weights(
        torch.tensor(grid), num_grid_per_side=side, mode="bilinear", align_corners=True, spatial_merge_size=2
    )
    idx, w = resample_taps(grid, side, 2)
    assert idx.dtype == torch.int32 and w.dtype == torch.float32 and idx.shape == (want_idx.shape[0], TAPS)
    assert torch.equal(idx.long(), want_idx)
    assert torch.equal(w, want_w)  # same fp32 ops: bitwise


@pytest.mark.parametrize("grid,side", GRIDS[:3])
def test_resample_taps_are_bilinear_interpolation(grid: list[tuple[int, int, int]], side: int) -> None:
    """Independent of HF's helper: the taps resample like ``F.interpolate(bilinear, align_corners)``,
    in the tower's merge-block order."""
    c = 5
    table = torch.randn(side * side, c, dtype=torch.float64)
    idx, w = resample_taps(grid, side, 2)
    got = (table[idx.long()] * w.double()[:, :, None]).sum(1)  # [S, c]
    want = []
    for t, h, wd in grid:
        img = F.interpolate(table.T.reshape(1, c, side, side), size=(h, wd), mode="bilinear", align_corners=True)[0]
        pos = rope_positions([(1, h, wd)], 2)
        want.append(img[:, pos[:, 0], pos[:, 1]].T.repeat(t, 1))
    assert ref.rel(got, torch.cat(want)) < 1e-6  # the weights are fp32, as HF's


def _reference(x, table, idx, w, lw, lb, eps):  # noqa: ANN001, ANN202
    """HF's arithmetic: the fp32 resampled embedding rounded to x's dtype, added in that dtype, LN in fp64."""
    pe = (table[idx.long()].float() * w[:, :, None]).sum(1).to(x.dtype)
    h = x + pe
    return h, ref.layer_norm(h, lw, lb, eps)


@pytest.mark.parametrize("s_len,n,side", [(1, 32, 2), (13, 72, 6), (37, 144, 5), (9, 1152, 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pos_embed_add_layer_norm(s_len: int, n: int, side: int, dtype: torch.dtype, device: str) -> None:
    x = (torch.randn(s_len, n, device=device) * 2).to(dtype)
    table = torch.randn(side * side, n, device=device).to(dtype)
    idx = torch.randint(0, side * side, (s_len, TAPS), device=device, dtype=torch.int32)
    w = torch.rand(s_len, TAPS, device=device)
    lw = (1 + 0.1 * torch.randn(n, device=device)).to(dtype)
    lb = (0.1 * torch.randn(n, device=device)).to(dtype)
    want_h, want_y = _reference(x, table, idx, w, lw, lb, 1e-6)
    out, out_sum = ref.poison((s_len, n), dtype, device), ref.poison((s_len, n), dtype, device)
    h, y = pos_embed_add_layer_norm(x, table, idx, w, lw, lb, 1e-6, out=out, out_sum=out_sum)
    assert h is out_sum and y is out
    # (16-bit: the interpreter's fp32 -> bf16 cast truncates where the GPU rounds to nearest)
    assert ref.rel(h, want_h) < ref.TOL[dtype]
    assert ref.rel(y, want_y) < ref.TOL[dtype]


def test_pos_embed_add_layer_norm_in_place_no_affine(device: str) -> None:
    """out_sum=x updates the patch embeddings in place (the tower's residual stream)."""
    table = torch.randn(16, 48, device=device)
    idx, w = resample_taps([(1, 2, 2), (1, 2, 6)], 4, 2)  # 16 patches
    idx, w = idx.to(device), w.to(device)
    with pytest.raises(ValueError, match="index/weight"):
        pos_embed_add_layer_norm(torch.randn(11, 48, device=device), table, idx, w, None, None)
    x = torch.randn(16, 48, device=device)
    want_h, want_y = _reference(x, table, idx, w, None, None, 1e-5)
    h, y = pos_embed_add_layer_norm(x, table, idx, w, None, None, 1e-5, out_sum=x)
    assert h.data_ptr() == x.data_ptr()
    assert ref.rel(h, want_h) < 1e-7 and ref.rel(y, want_y) < 1e-6
