"""Qwen2-VL's vision tower on our kernels (``kernels.patch`` calls ``patch_tower``).

Per forward, for S patches of C = embed_dim:

- the tower's forward: cu_seqlens, per-image lengths and the rotary cos/sin tables [S, D/2] are
  built once per forward and cached per grid (HF rebuilds positions with a Python loop and keeps
  [S, D] tables); the residual stream is updated in place;
- every block: ``qkv GEMM (cuBLAS) -> rotary pass (rope_qk) -> attention (cuDNN for equal-size
  batches, our Triton varlen kernel for mixed sizes) -> proj GEMM -> fused (residual add + norm2)
  -> fc1 GEMM with bias + QuickGELU (our TMA GEMM's epilogue from 4096 rows, else cuBLAS + one
  bias/act pass) -> fc2 GEMM -> fused (residual add + next block's norm1)``; the last block's
  second add is fused with the merger's ``ln_q``;
- the patch embedding: the Conv3d whose kernel equals its stride is one GEMM over the flattened
  patches (same weight tensor, viewed);
- the merger: GEMM + (bias + exact GELU) + GEMM.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .tower import (
    FusedPatchMerger,
    FusedVisionBlock,
    VisionMeta,
    build_meta,
    cached_meta,
    fc_act_fc,
    fuse_class,
    hidden_act,
    patch_embed_and_blocks,
)


class FusedVisionMlp(nn.Module):
    """``fc1 -> act -> fc2``; same submodule names as ``Qwen2VLVisionMLP`` (``VisionMlp``)."""

    def __init__(self, orig: nn.Module, act: str, mode: str) -> None:
        super().__init__()
        self.fc1 = orig.fc1
        self.fc2 = orig.fc2
        self.act = act
        self.mode = mode

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return fc_act_fc(y, self.fc1, self.fc2, self.act, self.mode)  # [S, C]


def fused_forward(self: nn.Module, hidden_states: torch.Tensor, grid_thw: torch.Tensor | list,
                  **kwargs: Any) -> Any:
    """Replacement for ``Qwen2VisionTransformerPretrainedModel.forward``; same inputs and output
    type (``last_hidden_state`` [S, C] before the merger, ``pooler_output`` [S/4, hidden_size])."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    meta = self.splitvl_meta(grid_thw)
    blocks = self.blocks
    h = self.patch_embed(hidden_states)  # [S, C], ours: updated in place below
    y = blocks[0].norm1(h)
    for i, blk in enumerate(blocks):
        nxt = blocks[i + 1].norm1 if i + 1 < len(blocks) else self.merger.ln_q
        h, y = blk.fused(h, y, meta, nxt)
    merged = self.merger.project(y)
    return BaseModelOutputWithPooling(last_hidden_state=h, pooler_output=merged)


def splitvl_meta(self: nn.Module, grid_thw: torch.Tensor | list) -> VisionMeta:
    """cu_seqlens / max length / rotary tables for this grid (cached per grid)."""
    return cached_meta(self, grid_thw, lambda grid: build_meta(grid, self.spatial_merge_size, self.rotary_pos_emb))


def layer_norm_blocks(tower: nn.Module, p: str, attention: str, mlp: str, rope_gemm: bool,
                      mlp_class: type[nn.Module] = FusedVisionMlp) -> dict[str, str]:
    """The patch embedding and every block (LayerNorms, ``mlp_class(orig.mlp, act, mode)``) swapped in
    place (``tower.patch_embed_and_blocks``); Qwen3-VL's blocks differ only in their MLP's names."""
    from .layer_norm import TritonLayerNorm

    act = hidden_act(tower)

    def block(orig: nn.Module) -> FusedVisionBlock:
        return FusedVisionBlock(orig, TritonLayerNorm.from_torch, mlp_class(orig.mlp, act, mlp), attention, mlp,
                                rope_gemm)

    return patch_embed_and_blocks(
        tower, p, block, lambda i: f"attention={attention}, mlp={mlp}, act={act}, rope_gemm={rope_gemm}")


def patch_tower(tower: nn.Module, prefix: str, attention: str, mlp: str, rope_gemm: bool) -> dict[str, str]:
    from .layer_norm import TritonLayerNorm

    p = f"{prefix}." if prefix else ""
    done = layer_norm_blocks(tower, p, attention, mlp, rope_gemm)
    done[f"{p}merger"] = f"{type(tower.merger).__name__} -> FusedPatchMerger"
    tower.merger = FusedPatchMerger(tower.merger, mlp, TritonLayerNorm.from_torch(tower.merger.ln_q))
    old = fuse_class(tower, fused_forward, splitvl_meta)
    done[prefix or "<model>"] = f"{old}.forward -> fused forward (cached cu_seqlens + rotary, fused residual+LN)"
    return done
