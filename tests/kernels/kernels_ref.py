"""fp64 PyTorch references for the kernel tests (imported by the test files in this folder)."""

from __future__ import annotations

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# relative L2 tolerance by dtype (METHOD.md: fp32 far under 1e-3; bf16 operands 1e-3..1e-2)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


# a one-layer language model for the full ``*ForConditionalGeneration`` models of the tests
TINY_TEXT_CONFIG = {"vocab_size": 128, "hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 1,
                    "num_attention_heads": 4, "num_key_value_heads": 2,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 3]}}


def random_model(model_class: type, cfg: object, device: str, dtype: torch.dtype = torch.float32,
                 seed: int = 3) -> torch.nn.Module:
    """An HF model (a vision tower, a full model) with every parameter perturbed (``service.tiny.perturb_``),
    in eval mode."""
    from service.tiny import perturb_

    torch.manual_seed(seed)
    m = model_class(cfg).eval()
    perturb_(m, seed)
    return m.to(device=device, dtype=dtype)


def patch_copy(hf: torch.nn.Module, **patch_kw: object) -> tuple[torch.nn.Module, dict[str, str]]:
    """A ``kernels.patch``-ed deep copy of ``hf`` and patch's report, checked as every family's patch
    must be: the copy patched (``hf`` not), its parameters adopted (the same objects), its state dict
    unchanged (keys, values, all contiguous), and patching it again a no-op."""
    import copy

    import kernels

    ours = copy.deepcopy(hf)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    params = dict(ours.named_parameters())
    done = kernels.patch(ours, **patch_kw)
    assert kernels.is_patched(ours) and not kernels.is_patched(hf)
    assert kernels.patch(ours) == {}  # idempotent
    after = ours.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert all(v.is_contiguous() for v in after.values())
    assert all(p is params[name] for name, p in ours.named_parameters())  # adopted, not copied
    return ours, done


def patched_error(hf32: torch.nn.Module, grid_rows: list[list[int]], dtype: torch.dtype = torch.bfloat16,
                  *, with_hf: bool = False, **patch_kw: object) -> float | tuple[float, float]:
    """rel L2 of ``kernels.patch``-ed copy of ``hf32`` in ``dtype`` against ``hf32`` (fp32, HF) on random
    pixels of ``grid_rows`` (CUDA; ours gets the grid on the host, HF on the device). ``with_hf``: also
    HF's own error in ``dtype`` on the same weights and pixels (what rounding alone costs this model)."""
    import copy

    import kernels

    ours = copy.deepcopy(hf32).to(dtype)
    hf_low = copy.deepcopy(ours) if with_hf else None
    kernels.patch(ours, **patch_kw)
    grid = torch.tensor(grid_rows)
    x = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, device="cuda")
    with torch.no_grad():
        want = hf32(x, grid_thw=grid.cuda()).pooler_output
        got = rel(ours(x.to(dtype), grid_thw=grid).pooler_output, want)
        if hf_low is None:
            return got
        return got, rel(hf_low(x.to(dtype), grid_thw=grid.cuda()).pooler_output, want)


def hf_loop_errors(hf: torch.nn.Module, x: torch.Tensor, grid: torch.Tensor) -> list[float]:
    """rel L2 of each output (``pooler_output``, then any DeepStack features) of HF's own tower forward
    run over a ``kernels.patch``-ed copy of ``hf`` (HF's loop and rotary tables driving our fused
    blocks and mergers through their HF signatures) against ``hf`` itself; ``grid`` on x's device."""
    ours, _ = patch_copy(hf)
    with torch.no_grad():
        want = hf(x, grid_thw=grid)
        got = type(hf).forward(ours, x, grid_thw=grid)  # the unpatched class's forward

    def outputs(out: object) -> list[torch.Tensor]:
        return [out.pooler_output, *(getattr(out, "deepstack_features", None) or [])]

    return [rel(g, w) for g, w in zip(outputs(got), outputs(want), strict=True)]


def check_graphs_match_eager(tower: torch.nn.Module) -> None:
    """``VisionGraphs`` on a patched bf16 tower: replays equal eager forwards over new, evicted and
    repeated grids (one, three images), within an LRU of two."""
    from kernels.graphs import VisionGraphs

    graphs = VisionGraphs(tower, max_graphs=2)
    three = [[1, 16, 16]] * 3  # the encoder replays batches of up to 8 equal grids
    for grid_rows in ([[1, 32, 32]], [[1, 22, 30]], [[1, 32, 32]], three, [[1, 20, 20]], three):
        grid = torch.tensor(grid_rows)
        x = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            want = tower(x, grid_thw=grid).pooler_output
        got = graphs(x, grid).clone()
        assert rel(got, want) < 1e-3  # same kernels; only cuBLAS's algorithm choice may differ
    assert len(graphs) == 2  # LRU bound


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all(), "non-finite output"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def poison(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> torch.Tensor:
    """An output buffer full of NaN: any element the kernel forgets to write fails the check."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def layer_norm(x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, eps: float) -> torch.Tensor:
    x = x.double()
    y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    if w is not None:
        y = y * w.double()
    if b is not None:
        y = y + b.double()
    return y


def rms_norm(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    x = x.double()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y * w.double() if w is not None else y


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x * torch.sigmoid(1.702 * x)


def gelu(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x.double())


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [S, H, D], cos/sin [S, D/2]: HF's rotate_half rotation in fp64."""
    x = x.double()
    half = x.shape[-1] // 2
    c = torch.cat([cos, cos], -1).double()[:, None]
    s = torch.cat([sin, sin], -1).double()[:, None]
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * c + rot * s


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Block-diagonal softmax attention in fp64; q, k, v [S, H, D] -> [S, H, D]."""
    d = q.shape[-1]
    outs = []
    o = 0
    for n in lengths:
        qi, ki, vi = (t[o : o + n].double().transpose(0, 1) for t in (q, k, v))
        p = torch.softmax(qi @ ki.transpose(-1, -2) / d**0.5, -1)
        outs.append((p @ vi).transpose(0, 1))
        o += n
    return torch.cat(outs, 0)
