"""Triton kernels for the Qwen-VL vision towers (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), and
``patch(model)`` to swap them in.

Importable without triton (CPU machines run the tower unpatched); ``patch`` then raises
``RuntimeError``. The kernel files import triton and are loaded only when used.

Vision worker, on CUDA::

    import kernels
    replaced = kernels.patch(tower)  # in place; {module name: "Old -> New"}
    out = tower(pixel_values, grid_thw=grid_thw_on_cpu)  # same call and output type as HF
    embeds = out.pooler_output  # [S / 4, hidden_size]

    from kernels.graphs import VisionGraphs  # one CUDA graph per image grid, for small requests
    graphs = VisionGraphs(tower, max_graphs=16)
    embeds = graphs(pixel_values, grid_thw_on_cpu).clone()  # static buffer: copy before next call

Qwen3-VL's tower also returns ``deepstack_features`` (L tensors [S / 4, hidden_size]); all of them
come from one buffer::

    from kernels.qwen3_vl import stacked_features
    feats = stacked_features(tower(pixel_values, grid_thw=grid))  # [1 + L, S / 4, hidden_size], no copy
    graphs = VisionGraphs(tower, output=stacked_features)  # the same from a CUDA graph
"""

from __future__ import annotations

from .patch import is_patched, patch

__all__ = ["is_patched", "patch"]
