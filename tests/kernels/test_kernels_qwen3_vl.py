"""``kernels.patch`` on Qwen3-VL's vision tower: the same function as HF's (main output, every
DeepStack output, last hidden state), the same state dict, weights reloaded, CUDA graphs."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("triton")

import kernels_ref as ref  # noqa: E402

import kernels  # noqa: E402
from kernels.qwen3_vl import stacked_features  # noqa: E402

PATCH_IN = 3 * 2 * 16 * 16


def _vision_config(hidden: int, heads: int, depth: int = 3, deepstack: tuple[int, ...] = (0, 1, 2), out: int = 40,
                   intermediate: int | None = None, positions: int = 25):
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig

    cfg = Qwen3VLVisionConfig(
        depth=depth, hidden_size=hidden, num_heads=heads, intermediate_size=intermediate or hidden + 56,
        out_hidden_size=out, num_position_embeddings=positions, deepstack_visual_indexes=list(deepstack),
        patch_size=16, spatial_merge_size=2, temporal_patch_size=2, in_channels=3, hidden_act="gelu_pytorch_tanh",
    )
    cfg._attn_implementation = "sdpa"
    return cfg


def _tower(cfg, device: str, dtype: torch.dtype = torch.float32, seed: int = 3):
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    return ref.random_model(Qwen3VLVisionModel, cfg, device, dtype, seed)


# a 5 x 5 position table resampled to 4 x 6 (between table points on both axes: all 4 taps
# weigh), 2 x 2 (the corners) and 4 x 2 (2 frames)
GRID = [[1, 4, 6], [1, 2, 2], [2, 4, 2]]


def _inputs(grid: list[list[int]], device: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.tensor(grid)
    return torch.randn(int(g.prod(-1).sum()), PATCH_IN, device=device).to(dtype), g


def _assert_same(got, want, tol: float) -> None:  # noqa: ANN001
    assert type(got).__name__ == "BaseModelOutputWithDeepstackFeatures"
    assert len(got.deepstack_features) == len(want.deepstack_features)
    assert ref.rel(got.pooler_output, want.pooler_output) < tol
    for g, w in zip(got.deepstack_features, want.deepstack_features, strict=True):
        assert g.shape == w.shape and ref.rel(g, w) < tol
    assert ref.rel(got.last_hidden_state, want.last_hidden_state) < tol


@pytest.mark.parametrize("hidden,heads,mlp,attention,rope_gemm", [
    (144, 2, "auto", "auto", False),  # head_dim 72, as Qwen3-VL's
    (144, 2, "cublas", "cudnn", True),
    (144, 2, "triton", "triton", False),
    (32, 2, "auto", "triton_prerope", False),  # head_dim 16
])
def test_patched_tower_equals_hf(hidden: int, heads: int, mlp: str, attention: str, rope_gemm: bool,
                                 device: str) -> None:
    hf = _tower(_vision_config(hidden, heads), device)
    ours, done = ref.patch_copy(hf, mlp=mlp, attention=attention, rope_gemm=rope_gemm)
    assert {"patch_embed", "blocks.2", "merger", "deepstack_merger_list.2"} <= set(done)

    x, grid = _inputs(GRID, device)
    with torch.no_grad():
        want = hf(x, grid_thw=grid.to(device))  # HF builds its tables on grid_thw's device
        got = ours(x, grid_thw=grid)  # ours takes the grid on the CPU (no device sync)...
        again = ours(x, grid_thw=grid.to(device))  # ...or on the device: the cached per-grid path
    _assert_same(got, want, 1e-5)
    assert torch.equal(stacked_features(again), stacked_features(got))


def test_deepstack_indexes_as_hf_walks_them(device: str) -> None:
    """Unsorted indexes (merger j serves block indexes[j]; outputs in block order) and one past the
    last block (never reached: HF returns fewer features)."""
    hf = _tower(_vision_config(32, 2, depth=3, deepstack=(2, 0, 9)), device)
    ours = copy.deepcopy(hf)
    kernels.patch(ours)
    x, grid = _inputs([[1, 4, 6], [1, 8, 2]], device)
    with torch.no_grad():
        want = hf(x, grid_thw=grid.to(device))
        got = ours(x, grid_thw=grid)
    assert len(want.deepstack_features) == 2
    _assert_same(got, want, 1e-5)


def test_stacked_features_is_the_output_buffer(device: str) -> None:
    hf = _tower(_vision_config(32, 2), device)
    ours = copy.deepcopy(hf)
    kernels.patch(ours)
    x, grid = _inputs(GRID, device)
    with torch.no_grad():
        got, want = ours(x, grid_thw=grid), hf(x, grid_thw=grid.to(device))
    s = stacked_features(got)  # [1 + L, S/4, D]
    assert s.shape == (4, 44 // 4, 40) and s.data_ptr() == got.pooler_output.data_ptr()  # no copy
    w = stacked_features(want)  # HF's separate tensors: stacked
    assert torch.equal(w[0], want.pooler_output) and torch.equal(w[3], want.deepstack_features[2])
    assert ref.rel(s, w) < 1e-5


def test_weights_loaded_after_patching(device: str) -> None:
    """The resampled position embedding follows the live table: only grid-dependent taps are cached."""
    cfg = _vision_config(32, 2)
    ours = _tower(cfg, device)
    kernels.patch(ours)
    x, grid = _inputs(GRID, device)
    with torch.no_grad():
        ours(x, grid_thw=grid)  # builds and caches this grid's metadata
        other = _tower(cfg, device, seed=9)
        ours.load_state_dict(other.state_dict())
        _assert_same(ours(x, grid_thw=grid), other(x, grid_thw=grid.to(device)), 1e-5)


def test_fused_blocks_under_hfs_own_forward(device: str) -> None:
    """The fused blocks and mergers keep HF's signatures: HF's own forward (its position resampling,
    its DeepStack loop) over the patched modules is HF's, every output."""
    x, grid = _inputs(GRID, device)
    errs = ref.hf_loop_errors(_tower(_vision_config(32, 2), device), x, grid.to(device))
    assert len(errs) == 4 and max(errs) < 1e-5


def test_patch_full_model_finds_visual(device: str) -> None:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    cfg = Qwen3VLConfig(
        vision_config=_vision_config(32, 2, depth=2, deepstack=(0, 1), out=48).to_dict(),
        text_config={"vocab_size": 128, "hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 12,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2],
                                         "mrope_interleaved": True}},
    )
    model = ref.random_model(Qwen3VLForConditionalGeneration, cfg, device, seed=5)
    x, grid = _inputs([[1, 4, 4], [1, 6, 2]], device)
    grid = grid.to(device)
    with torch.no_grad():
        want = model.model.get_image_features(x, grid)
        want_main = [t.clone() for t in want.pooler_output]
        want_ds = [t.clone() for t in want.deepstack_features]
    done = kernels.patch(model)
    assert any(k.endswith("visual.deepstack_merger_list.1") for k in done)
    with torch.no_grad():
        got = model.model.get_image_features(x, grid)
    for g, w in zip([*got.pooler_output, *got.deepstack_features], [*want_main, *want_ds], strict=True):
        assert ref.rel(g, w) < 1e-5


def test_patch_refuses_other_resampling() -> None:
    tower = _tower(_vision_config(32, 2, depth=1, deepstack=(0,)), "cpu")
    tower.interpolation_mode = "bicubic"
    with pytest.raises(ValueError, match="bicubic"):
        kernels.patch(tower)


# ---------------------------------------------------------------------------------------------- GPU


def _real_config(depth: int, deepstack: tuple[int, ...]):
    # Qwen3-VL-8B's vision tower dims (hidden 1152, 16 heads of 72, MLP 4304, 48 x 48 positions,
    # merger into 4096)
    return _vision_config(1152, 16, depth=depth, deepstack=deepstack, out=4096, intermediate=4304, positions=2304)


# > 4096 rows (our GEMM's TMA path), equal sizes and odd sizes; 448 x 448 is 28 x 28 patches
GPU_GRID = [[1, 28, 28]] * 4 + [[1, 16, 24], [1, 80, 60]]


@ref.requires_cuda
@pytest.mark.parametrize("mlp,attention,rope_gemm", [("auto", "auto", False), ("auto", "auto", True),
                                                     ("cublas", "cudnn", False), ("triton", "triton_prerope", False)])
def test_patched_tower_gpu_bf16_vs_hf_fp32(mlp: str, attention: str, rope_gemm: bool) -> None:
    hf32 = _tower(_real_config(depth=6, deepstack=(1, 3, 5)), "cuda", torch.float32)
    ours = copy.deepcopy(hf32).to(torch.bfloat16)
    kernels.patch(ours, mlp=mlp, attention=attention, rope_gemm=rope_gemm)
    x, grid = _inputs(GPU_GRID, "cuda")
    with torch.no_grad():
        want = hf32(x, grid_thw=grid.cuda())
        got = ours(x.bfloat16(), grid_thw=grid)
    errs = [ref.rel(g, w) for g, w in zip(stacked_features(got), stacked_features(want), strict=True)]
    print(f"bf16 patched vs fp32 HF (depth 6, {mlp}, {attention}, rope_gemm={rope_gemm}): rel L2 main + "
          f"DeepStack {' '.join(f'{e:.2e}' for e in errs)}")
    assert max(errs) < 1e-2


@ref.requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_patched_tower_gpu_dtypes(dtype: torch.dtype) -> None:
    hf32 = _tower(_real_config(depth=2, deepstack=(0,)), "cuda", torch.float32)
    ours = copy.deepcopy(hf32).to(dtype)
    kernels.patch(ours, attention="triton" if dtype == torch.float32 else "cudnn")
    x, grid = _inputs([[1, 28, 28], [1, 16, 24]], "cuda")
    with torch.no_grad():
        want = stacked_features(hf32(x, grid_thw=grid.cuda()))
        got = stacked_features(ours(x.to(dtype), grid_thw=grid))
    assert ref.rel(got, want) < (3e-3 if dtype == torch.float16 else 1e-3)


@ref.requires_cuda
def test_cuda_graphs_match_eager() -> None:
    from kernels.graphs import VisionGraphs

    tower = _tower(_real_config(depth=4, deepstack=(0, 2)), "cuda", torch.bfloat16)
    kernels.patch(tower)
    graphs = VisionGraphs(tower, max_graphs=2, output=stacked_features)
    three = [[1, 16, 16]] * 3
    for grid_rows in ([[1, 28, 28]], [[1, 16, 24]], [[1, 28, 28]], three, [[1, 20, 20]], three):
        x, grid = _inputs(grid_rows, "cuda", torch.bfloat16)
        with torch.no_grad():
            want = stacked_features(tower(x, grid_thw=grid)).clone()
        got = graphs(x, grid).clone()  # [1 + L, S/4, D]
        assert got.shape == (3, x.shape[0] // 4, 4096)
        assert ref.rel(got, want) < 1e-3  # same kernels; only cuBLAS's algorithm choice may differ
    assert len(graphs) == 2  # LRU bound
