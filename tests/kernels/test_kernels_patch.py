"""``kernels.patch`` on HF towers: same function as the unpatched tower, same state dict."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

import kernels_ref as ref  # noqa: E402

import kernels  # noqa: E402


def _vision_config(embed: int, heads: int, depth: int = 2, hidden: int = 48):
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig

    cfg = Qwen2VLVisionConfig(
        depth=depth, embed_dim=embed, hidden_size=hidden, num_heads=heads, mlp_ratio=2 if embed < 256 else 4,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3, hidden_act="quick_gelu",
    )
    cfg._attn_implementation = "sdpa"
    return cfg


def _tower(cfg, device: str, dtype: torch.dtype = torch.float32, seed: int = 3):
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    return ref.random_model(Qwen2VisionTransformerPretrainedModel, cfg, device, dtype, seed)


GRID = [[1, 4, 6], [1, 2, 2], [2, 2, 4]]  # mixed sizes, one 2-frame entry


@pytest.mark.parametrize("embed,heads", [(32, 2), (160, 2)])  # head_dim 16 and Qwen2-VL's 80
@pytest.mark.parametrize("mlp,attention,rope_gemm", [("cublas", "cudnn", True), ("triton", "triton", True),
                                                     ("auto", "auto", False)])
def test_patched_tower_equals_hf(embed: int, heads: int, mlp: str, attention: str, rope_gemm: bool,
                                 device: str) -> None:
    hf = _tower(_vision_config(embed, heads), device)
    ours, done = ref.patch_copy(hf, mlp=mlp, attention=attention, rope_gemm=rope_gemm)
    assert "blocks.0" in done and "merger" in done and "patch_embed" in done

    grid = torch.tensor(GRID)
    x = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, device=device)
    with torch.no_grad():
        want = hf(x, grid_thw=grid.to(device))  # HF builds positions on grid_thw's device
        got = ours(x, grid_thw=grid)  # ours takes the grid on the CPU (no device sync)...
        again = ours(x, grid_thw=grid.to(device))  # ...or on the device; cached metadata path
    assert ref.rel(got.pooler_output, want.pooler_output) < 1e-5
    assert ref.rel(got.last_hidden_state, want.last_hidden_state) < 1e-5
    assert torch.equal(again.pooler_output, got.pooler_output)


def test_state_dict_round_trip_with_rope_gemm(device: str) -> None:
    """q/k rows are stored interleaved after patching; state dicts still speak HF's order."""
    hf = _tower(_vision_config(160, 2), device)
    ours = copy.deepcopy(hf)
    kernels.patch(ours, rope_gemm=True)
    w_stored = ours.blocks[0].attn.qkv.weight
    assert not torch.equal(w_stored, hf.blocks[0].attn.qkv.weight)  # interleaved in place
    other = _tower(_vision_config(160, 2), device, seed=9)
    ours.load_state_dict(other.state_dict())  # HF order in, interleaved inside
    sd = ours.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in other.state_dict().items())
    grid = torch.tensor([[1, 4, 4]])
    x = torch.randn(16, 3 * 2 * 14 * 14, device=device)
    with torch.no_grad():
        want = other(x, grid_thw=grid.to(device)).pooler_output
        assert ref.rel(ours(x, grid_thw=grid).pooler_output, want) < 1e-5


def test_patch_full_model_finds_visual(device: str) -> None:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    cfg = Qwen2VLConfig(
        vision_config=_vision_config(32, 2).to_dict(),
        text_config=ref.TINY_TEXT_CONFIG,
    )
    model = ref.random_model(Qwen2VLForConditionalGeneration, cfg, device, seed=5)
    grid = torch.tensor([[1, 4, 4]])
    x = torch.randn(16, 3 * 2 * 14 * 14, device=device)
    grid = grid.to(device)
    with torch.no_grad():
        want = model.model.get_image_features(x, grid).pooler_output[0].clone()
    done = kernels.patch(model)
    assert any(k.endswith("visual.blocks.0") for k in done)
    with torch.no_grad():
        got = model.model.get_image_features(x, grid).pooler_output[0]
    assert ref.rel(got, want) < 1e-5


def test_fused_blocks_under_hfs_own_forward(device: str) -> None:
    """The fused blocks keep HF's block signature: HF's own forward over the patched modules is HF's."""
    grid = torch.tensor(GRID, device=device)
    x = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, device=device)
    assert max(ref.hf_loop_errors(_tower(_vision_config(32, 2), device), x, grid)) < 1e-5


def test_patch_rejects_other_models() -> None:
    with pytest.raises(TypeError):
        kernels.patch(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError):
        kernels.patch(_tower(_vision_config(32, 2), "cpu"), attention="nope")


def test_import_without_triton() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # import triton -> ImportError
        import torch, kernels
        try:
            kernels.patch(torch.nn.Linear(2, 2))
        except RuntimeError as e:
            assert "triton" in str(e)
            print("ok")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


# ---------------------------------------------------------------------------------------------- GPU


def _real_config(depth: int):
    # Qwen2-VL-2B's vision tower dims (embed 1280, 16 heads of 80, merger into 1536)
    return _vision_config(1280, 16, depth=depth, hidden=1536)


@ref.requires_cuda
@pytest.mark.parametrize("mlp,attention,rope_gemm", [("auto", "auto", True), ("cublas", "cudnn", False),
                                                     ("triton", "triton_prerope", True), ("cublas", "triton", False)])
def test_patched_tower_gpu_bf16_vs_hf_fp32(mlp: str, attention: str, rope_gemm: bool) -> None:
    hf32 = _tower(_real_config(depth=8), "cuda", torch.float32)
    grid = [[1, 32, 32]] * 4 + [[1, 16, 24], [1, 92, 70]]  # > 4096 rows: our GEMM paths
    err = ref.patched_error(hf32, grid, mlp=mlp, attention=attention, rope_gemm=rope_gemm)
    print(f"bf16 patched vs fp32 HF (depth 8, {mlp}, {attention}, rope_gemm={rope_gemm}): rel L2 {err:.2e}")
    assert err < 1e-2


@ref.requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_patched_tower_gpu_dtypes(dtype: torch.dtype) -> None:
    cfg = _real_config(depth=2)
    hf32 = _tower(cfg, "cuda", torch.float32)
    ours = copy.deepcopy(hf32).to(dtype)
    kernels.patch(ours, attention="triton" if dtype == torch.float32 else "cudnn")
    grid = torch.tensor([[1, 32, 32], [1, 16, 24]])
    x = torch.randn(int(grid.prod(-1).sum()), 1176, device="cuda")
    with torch.no_grad():
        want = hf32(x, grid_thw=grid.cuda()).pooler_output
        got = ours(x.to(dtype), grid_thw=grid).pooler_output
    assert ref.rel(got, want) < (3e-3 if dtype == torch.float16 else 1e-3)


@ref.requires_cuda
def test_cuda_graphs_match_eager() -> None:
    tower = _tower(_real_config(depth=4), "cuda", torch.bfloat16)
    kernels.patch(tower)
    ref.check_graphs_match_eager(tower)
