"""``kernels.patch`` on Qwen2.5-VL's vision tower: windows as cu_seqlens segments, RMSNorm, SwiGLU.

Same function as HF's tower (fp32, CPU interpreter) on tiny configs where windows are ragged and
both windowed and full-attention blocks occur; same state dict; bf16 at the real shapes and CUDA
graphs on a GPU.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import kernels_ref as ref  # noqa: E402

import kernels  # noqa: E402
from kernels.qwen2_5_vl import window_order  # noqa: E402

PATCH_IN = 3 * 2 * 14 * 14
# mixed sizes: windows of 2x2 merge units (window_size 56) are ragged at the right and bottom of the
# 6x10 and 2x3-unit grids; one 2-frame entry
GRID = [[1, 6, 10], [1, 2, 2], [2, 4, 6]]


def _config(hidden: int = 32, heads: int = 2, depth: int = 4, intermediate: int = 42, out: int = 40,
            window: int = 56, fullatt: tuple[int, ...] = (1, 3)):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

    # intermediate 42: fp32 rows of 168 bytes, not 16-byte aligned (like 3420 in bf16)
    cfg = Qwen2_5_VLVisionConfig(depth=depth, hidden_size=hidden, intermediate_size=intermediate, num_heads=heads,
                                 out_hidden_size=out, window_size=window, fullatt_block_indexes=list(fullatt),
                                 hidden_act="silu", patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    cfg._attn_implementation = "sdpa"
    return cfg


def _tower(cfg, device: str, dtype: torch.dtype = torch.float32, seed: int = 3):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    return ref.random_model(Qwen2_5_VisionTransformerPretrainedModel, cfg, device, dtype, seed)


@pytest.mark.parametrize("grid", [[[1, 8, 8]], GRID, [[1, 32, 32], [1, 16, 24]], [[3, 6, 6], [1, 16, 22]]])
@pytest.mark.parametrize("side", [1, 2, 3, 4])
def test_window_order_is_hfs(grid: list[list[int]], side: int) -> None:
    from transformers.vision_utils import get_vision_window_index

    want_index, want_cu = get_vision_window_index(torch.tensor(grid), spatial_merge_size=2, window_size=28 * side,
                                                  patch_size=14)
    units, lengths = window_order(tuple(map(tuple, grid)), 2, side)
    assert torch.equal(units, want_index)
    assert [0, *torch.tensor(lengths).cumsum(0).tolist()] == want_cu.tolist()


@pytest.mark.parametrize("hidden,heads,mlp,attention,rope_gemm", [
    (32, 2, "cublas", "cudnn", True),  # cuDNN's batched path falls back to SDPA's math kernel on the CPU
    (32, 2, "triton", "triton", False),
    (160, 2, "auto", "auto", False),  # head_dim 80 as the real tower
])
def test_patched_tower_equals_hf(hidden: int, heads: int, mlp: str, attention: str, rope_gemm: bool,
                                 device: str) -> None:
    hf = _tower(_config(hidden, heads), device)
    # (parameters adopted, not copied: down_proj.weight keeps its object; its rows were re-homed)
    ours, done = ref.patch_copy(hf, mlp=mlp, attention=attention, rope_gemm=rope_gemm)
    assert "window attention" in done["blocks.0"] and "full attention" in done["blocks.1"]
    down = ours.blocks[0].mlp.down_proj.weight
    assert down.stride(0) * down.element_size() % 16 == 0

    grid = torch.tensor(GRID)
    x = torch.randn(int(grid.prod(-1).sum()), PATCH_IN, device=device)
    with torch.no_grad():
        want = hf(x, grid_thw=grid.to(device))
        got = ours(x, grid_thw=grid)  # the grid on the host: no device sync
        again = ours(x, grid_thw=grid.to(device))  # or on the device; the cached metadata
    assert ref.rel(got.pooler_output, want.pooler_output) < 1e-5
    assert ref.rel(got.last_hidden_state, want.last_hidden_state) < 1e-5  # both in window order
    assert torch.equal(again.pooler_output, got.pooler_output)


def test_packed_batch_equals_one_image_at_a_time(device: str) -> None:
    """Each image's rows of a packed forward equal its own forward (windows never cross images)."""
    tower = _tower(_config(depth=2, fullatt=(1,), window=84), device)  # 3x3-unit windows
    kernels.patch(tower)
    grid = [[1, 6, 10], [2, 4, 6], [1, 8, 8]]
    xs = [torch.randn(t * h * w, PATCH_IN, device=device) for t, h, w in grid]
    with torch.no_grad():
        packed = tower(torch.cat(xs), grid_thw=torch.tensor(grid)).pooler_output
        alone = [tower(x, grid_thw=torch.tensor([g])).pooler_output for x, g in zip(xs, grid, strict=True)]
    assert ref.rel(packed, torch.cat(alone)) < 1e-5  # (on a GPU the backends differ: ragged vs equal windows)


def test_fused_blocks_under_hfs_own_forward(device: str) -> None:
    """The fused blocks keep HF's block signature: HF's own forward (its window order, its per-window
    cu_seqlens, its rotary tables) over the patched modules is HF's."""
    grid = torch.tensor(GRID, device=device)
    x = torch.randn(int(grid.prod(-1).sum()), PATCH_IN, device=device)
    assert max(ref.hf_loop_errors(_tower(_config(), device), x, grid)) < 1e-5


def test_patch_full_model_equals_get_image_features(device: str) -> None:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        vision_config=_config(depth=2, fullatt=(0,), out=48).to_dict(),
        text_config=ref.TINY_TEXT_CONFIG,
    )
    model = ref.random_model(Qwen2_5_VLForConditionalGeneration, cfg, device, seed=5)
    grid = torch.tensor([[1, 6, 10], [1, 4, 4]], device=device)
    x = torch.randn(int(grid.prod(-1).sum()), PATCH_IN, device=device)
    with torch.no_grad():
        want = torch.cat(model.model.get_image_features(x, grid).pooler_output)
    done = kernels.patch(model)
    assert any(k.endswith("visual.blocks.0") for k in done)
    with torch.no_grad():
        got = torch.cat(model.model.get_image_features(x, grid).pooler_output)
    assert ref.rel(got, want) < 1e-5


def test_state_dict_round_trip(device: str) -> None:
    """Weights loaded into a patched tower land in the re-homed (padded) storage and are used."""
    cfg = _config(depth=2, fullatt=(1,))
    ours = _tower(cfg, device)
    kernels.patch(ours, rope_gemm=True)
    other = _tower(cfg, device, seed=9)
    ours.load_state_dict(other.state_dict())
    sd = ours.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in other.state_dict().items())
    grid = torch.tensor([[1, 6, 10]])
    x = torch.randn(60, PATCH_IN, device=device)
    with torch.no_grad():
        want = other(x, grid_thw=grid.to(device)).pooler_output
        assert ref.rel(ours(x, grid_thw=grid).pooler_output, want) < 1e-5


def test_patch_refuses_a_window_under_one_unit() -> None:
    with pytest.raises(ValueError, match="window_size"):
        kernels.patch(_tower(_config(depth=1, window=14, fullatt=()), "cpu"))


# ---------------------------------------------------------------------------------------------- GPU


def _real_config(depth: int, fullatt: tuple[int, ...]):
    # Qwen2.5-VL-7B's vision tower dims (hidden 1280, 16 heads of 80, SwiGLU 3420, 112 px windows)
    return _config(1280, 16, depth=depth, intermediate=3420, out=3584, window=112, fullatt=fullatt)


@ref.requires_cuda
@pytest.mark.parametrize("mlp,attention", [("auto", "auto"), ("cublas", "cudnn"), ("triton", "triton_prerope")])
def test_patched_tower_gpu_bf16_vs_hf_fp32(mlp: str, attention: str) -> None:
    hf32 = _tower(_real_config(depth=8, fullatt=(3, 7)), "cuda", torch.float32)
    # > 4096 rows (our GEMM paths), full and ragged windows (a 92 x 70 grid: 46 x 35 units)
    grid = [[1, 32, 32]] * 4 + [[1, 16, 24], [1, 92, 70]]
    err, hf_err = ref.patched_error(hf32, grid, with_hf=True, mlp=mlp, attention=attention)
    print(f"Qwen2.5-VL bf16 patched vs fp32 HF (depth 8, {mlp}, {attention}): rel L2 {err:.2e} "
          f"(HF's own bf16: {hf_err:.2e})")
    # On these random weights bf16 rounding alone costs HF 1.5-2e-2 (H200, 2026-12-02): ours must be
    # no worse than HF's own bf16 forward, and in the range the rounding explains.
    assert err < 1.1 * hf_err and err < 3e-2


@ref.requires_cuda
def test_patched_tower_gpu_fp32_equals_hf() -> None:
    hf = _tower(_real_config(depth=2, fullatt=(1,)), "cuda", torch.float32)
    # fp32 on both sides (the conftest turns TF32 off); cuBLAS vs our kernels' summation orders
    assert ref.patched_error(hf, [[1, 32, 32], [1, 16, 24], [2, 8, 12]], torch.float32, attention="triton") < 1e-3


@ref.requires_cuda
def test_cuda_graphs_match_eager() -> None:
    tower = _tower(_real_config(depth=4, fullatt=(1, 3)), "cuda", torch.bfloat16)
    kernels.patch(tower)
    ref.check_graphs_match_eager(tower)
