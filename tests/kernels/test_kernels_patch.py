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
from service.tiny import perturb_  # noqa: E402


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

    torch.manual_seed(seed)
    m = Qwen2VisionTransformerPretrainedModel(cfg).eval()
    perturb_(m, seed)
    return m.to(device=device, dtype=dtype)


GRID = [[1, 4, 6], [1, 2, 2], [2, 2, 4]]  # mixed sizes, one 2-frame entry


@pytest.mark.parametrize("embed,heads", [(32, 2), (160, 2)])  # head_dim 16 and Qwen2-VL's 80
@pytest.mark.parametrize("mlp,attention,rope_gemm", [("cublas", "cudnn", True), ("triton", "triton", True),
                                                     ("auto", "auto", False)])
def test_patched_tower_equals_hf(embed: int, heads: int, mlp: str, attention: str, rope_gemm: bool,
                                 device: str) -> None:
    hf = _tower(_vision_config(embed, heads), device)
    ours = copy.deepcopy(hf)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    done = kernels.patch(ours, mlp=mlp, attention=attention, rope_gemm=rope_gemm)
    assert "blocks.0" in done and "merger" in done and "patch_embed" in done
    assert kernels.is_patched(ours) and not kernels.is_patched(hf)
    after = ours.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert kernels.patch(ours) == {}  # idempotent

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
        text_config={"vocab_size": 128, "hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 4, "num_key_value_heads": 2,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 3]}},
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    perturb_(model, 5)
    model = model.to(device)
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


def test_patch_qwen2_5_vl_swaps_modules(device: str) -> None:
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    cfg = Qwen2_5_VLVisionConfig(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=40,
                                 window_size=56, fullatt_block_indexes=[1], hidden_act="silu")
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = Qwen2_5_VisionTransformerPretrainedModel(cfg).eval()
    perturb_(hf, 2)
    hf = hf.to(device)
    ours = copy.deepcopy(hf)
    done = kernels.patch(ours)
    assert done["blocks.0.mlp"].endswith("TritonSwiGLUMLP") and "merger.ln_q" in done
    assert set(ours.state_dict()) == set(hf.state_dict())
    grid = torch.tensor([[1, 8, 8]], device=device)
    x = torch.randn(64, 3 * 2 * 14 * 14, device=device)
    with torch.no_grad():
        assert ref.rel(ours(x, grid_thw=grid).pooler_output, hf(x, grid_thw=grid).pooler_output) < 1e-5


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
    cfg = _real_config(depth=8)
    hf32 = _tower(cfg, "cuda", torch.float32)
    ours = copy.deepcopy(hf32).to(torch.bfloat16)
    kernels.patch(ours, mlp=mlp, attention=attention, rope_gemm=rope_gemm)
    grid = torch.tensor([[1, 32, 32]] * 4 + [[1, 16, 24], [1, 92, 70]])  # > 4096 rows: our GEMM paths
    x = torch.randn(int(grid.prod(-1).sum()), 1176, device="cuda")
    with torch.no_grad():
        want = hf32(x, grid_thw=grid.cuda()).pooler_output
        got = ours(x.bfloat16(), grid_thw=grid).pooler_output
    err = ref.rel(got, want)
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
    from kernels.graphs import VisionGraphs

    tower = _tower(_real_config(depth=4), "cuda", torch.bfloat16)
    kernels.patch(tower)
    graphs = VisionGraphs(tower, max_graphs=2)
    three = [[1, 16, 16]] * 3  # the encoder replays batches of up to 4 equal grids
    for grid_rows in ([[1, 32, 32]], [[1, 16, 24]], [[1, 32, 32]], three, [[1, 20, 20]], three):
        grid = torch.tensor(grid_rows)
        x = torch.randn(int(grid.prod(-1).sum()), 1176, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            want = tower(x, grid_thw=grid).pooler_output
        got = graphs(x, grid).clone()
        assert ref.rel(got, want) < 1e-3  # same kernels; only cuBLAS's algorithm choice may differ
    assert len(graphs) == 2  # LRU bound
