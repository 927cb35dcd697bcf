"""Qwen2.5-VL's vision tower on our kernels (``kernels.patch`` calls ``patch_tower``).

What differs from Qwen2-VL (``qwen2_vl.py``) and how it runs here, for S patches of C = hidden_size:

- window attention: every block but ``fullatt_block_indexes`` attends within windows of n x n
  merge units (n = window_size // merge // patch: 112 px -> 4), ragged at the right and bottom
  edges. HF permutes the tokens into window order before block 0, runs one SDPA call per window
  (a Python loop: 512 calls per block for 32 images of 448^2) and puts the merged output back in
  image order. Here the windows are the segments of a second ``cu_seqlens`` (``attention="auto"``:
  our varlen Triton kernel, rotating q and k as it loads them, the fastest on small windows); the
  full-attention blocks use the per-frame segments. Both, the window order and the rotary tables
  (built in window order) are made once per grid and cached. The permutation is one row gather of
  the input patches before the patch-embedding GEMM, its inverse one row gather of the merger's
  output: each [S, 1176] / [S/4, D] bf16 pass costs ~1 % of a block's GEMM time.
- RMSNorm (eps 1e-6) for norm1, norm2 and the merger's ln_q, each fused with the residual add
  before it (``rms_norm.add_rms_norm``; the stream is updated in place);
- the SwiGLU MLP with biases (``swiglu.TritonSwiGLUMLP``): gate and up as two cuBLAS GEMMs and
  one ``swiglu`` pass (or, ``mlp="triton"``, one two-weight GEMM with the gating in its epilogue),
  then cuBLAS for down_proj; the intermediate width zero-padded to a multiple of 64 (I = 3420 is
  not even a multiple of 8, which cost the down projection two thirds of its speed: 1.26 vs 0.41
  ms at 32,768 rows on an H200).

Per block: ``qkv GEMM -> rope_qk -> attention (windows or whole frames) -> proj GEMM -> fused
(residual add + norm2) -> gate|up GEMM + SwiGLU epilogue -> down GEMM -> fused (residual add +
next norm1)``; the last block's second add is fused with the merger's ``ln_q``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from .tower import (
    FusedPatchMerger,
    FusedVisionBlock,
    VisionMeta,
    build_meta,
    cached_meta,
    fuse_class,
    patch_embed_and_blocks,
    segments,
)


def window_order(grid: tuple[tuple[int, int, int], ...], merge: int, side: int) -> tuple[torch.Tensor, list[int]]:
    """Merge units in window order and the tokens of each window, as HF's ``get_vision_window_index``.

    Returns ``units`` [S / merge^2] int64 (host): the image-order index of the unit at each window-order
    position; and ``lengths``: tokens (units x merge^2) per window. Per image and frame the windows
    of side x side units run in raster order, the last row and column of windows ragged; the units
    inside a window are in raster order too (a stable sort by window id keeps it).
    """
    units, lengths = [], []
    base = 0
    for t, h, w in grid:
        hu, wu = h // merge, w // merge
        across, down = -(-wu // side), -(-hu // side)
        rows = torch.arange(hu).view(hu, 1) // side
        cols = torch.arange(wu).view(1, wu) // side
        window = (rows * across + cols).reshape(-1)  # [hu * wu] window of each unit within a frame
        window = (torch.arange(t).view(t, 1) * (down * across) + window).reshape(-1)  # frames in turn
        units.append(torch.argsort(window, stable=True) + base)
        lengths += (torch.bincount(window, minlength=t * down * across) * merge * merge).tolist()
        base += t * hu * wu
    return (torch.cat(units) if units else torch.zeros(0, dtype=torch.long)), lengths


@dataclasses.dataclass
class WindowedMeta:
    """Per-grid data of a Qwen2.5-VL forward; the tokens are in window order throughout."""

    full: VisionMeta  # per-frame segments (``fullatt_block_indexes``); rotary tables in window order
    window: VisionMeta  # per-window segments, the same tables
    patch_rows: torch.Tensor  # [S] int64, device: the input row (image order) at each window-order position
    unit_rows: torch.Tensor  # [S / m^2] int64, device: the window-order row of each merged unit, image order


def windowed_meta(grid: tuple[tuple[int, int, int], ...], merge: int, side: int, rotary: nn.Module) -> WindowedMeta:
    from ._utils import to_device_async

    units, lengths = window_order(grid, merge, side)
    m2 = merge * merge
    rows = (units[:, None] * m2 + torch.arange(m2)).reshape(-1)  # a unit's m^2 patches stay together
    full = build_meta(grid, merge, rotary, order=rows)
    dev = rotary.inv_freq.device
    cu, longest = segments(lengths, dev)
    # H200 (kernel_bench --only windows): on <= 64-token windows our kernel with the rotary in its loads
    # beats cuDNN (0.28 vs 0.52 ms, 32 x 448^2) and the pre-rotated Triton and FA2 paths (0.37, 0.33)
    window = dataclasses.replace(full, lengths=lengths, cu_seqlens=cu, max_seqlen=longest, auto="triton")
    return WindowedMeta(full=full, window=window, patch_rows=to_device_async(rows, dev),
                        unit_rows=to_device_async(torch.argsort(units), dev))


def fused_forward(self: nn.Module, hidden_states: torch.Tensor, grid_thw: torch.Tensor | list,
                  **kwargs: Any) -> Any:
    """Replacement for ``Qwen2_5_VisionTransformerPretrainedModel.forward``; same inputs and output
    type: ``last_hidden_state`` [S, C] in window order (as HF's), ``pooler_output`` [S/4, out_hidden]
    in image order."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    meta = self.splitvl_meta(grid_thw)
    blocks = self.blocks
    full = self.fullatt_block_indexes
    w = self.patch_embed.proj.weight
    x = hidden_states.reshape(meta.patch_rows.shape[0], -1).to(w.dtype).index_select(0, meta.patch_rows)
    h = self.patch_embed(x)  # [S, C] in window order; ours: updated in place below
    y = blocks[0].norm1(h)
    for i, blk in enumerate(blocks):
        nxt = blocks[i + 1].norm1 if i + 1 < len(blocks) else self.merger.ln_q
        h, y = blk.fused(h, y, meta.full if i in full else meta.window, nxt)
    merged = self.merger.project(y).index_select(0, meta.unit_rows)  # [S/4, out_hidden], image order
    return BaseModelOutputWithPooling(last_hidden_state=h, pooler_output=merged)


def window_side(tower: nn.Module) -> int:
    """Merge units per window side (4 for the real configs: 112 px // 2 // 14)."""
    return tower.window_size // tower.spatial_merge_size // tower.patch_size


def splitvl_meta(self: nn.Module, grid_thw: torch.Tensor | list) -> WindowedMeta:
    """Window order, both segmentations and the rotary tables for this grid (cached per grid)."""
    side = window_side(self)
    merge, rotary = self.spatial_merge_size, self.rotary_pos_emb
    return cached_meta(self, grid_thw, lambda grid: windowed_meta(grid, merge, side, rotary))


def patch_tower(tower: nn.Module, prefix: str, attention: str, mlp: str, rope_gemm: bool) -> dict[str, str]:
    from .rms_norm import TritonRMSNorm
    from .swiglu import TritonSwiGLUMLP

    if window_side(tower) < 1:
        raise ValueError(f"window_size {tower.window_size} is under one merge unit "
                         f"({tower.spatial_merge_size} x {tower.patch_size} px)")
    p = f"{prefix}." if prefix else ""
    full = tower.fullatt_block_indexes

    def block(orig: nn.Module) -> FusedVisionBlock:
        return FusedVisionBlock(orig, TritonRMSNorm.from_module, TritonSwiGLUMLP.from_module(orig.mlp, mlp), attention,
                                mlp, rope_gemm)

    done = patch_embed_and_blocks(tower, p, block, lambda i: (
        f"attention={attention}, mlp={mlp}, rope_gemm={rope_gemm}, {'full' if i in full else 'window'} attention"))
    done[f"{p}merger"] = f"{type(tower.merger).__name__} -> FusedPatchMerger"
    tower.merger = FusedPatchMerger(tower.merger, mlp, TritonRMSNorm.from_module(tower.merger.ln_q))
    old = fuse_class(tower, fused_forward, splitvl_meta)
    done[prefix or "<model>"] = (f"{old}.forward -> fused forward (windows as cu_seqlens segments, cached window "
                                 "order + rotary, fused residual+RMSNorm)")
    return done
