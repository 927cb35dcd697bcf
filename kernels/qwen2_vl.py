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
    FusedVisionAttention,
    LinearPatchEmbed,
    VisionMeta,
    build_meta,
    cached_meta,
    fc_act_fc,
    fuse_class,
)


class FusedVisionMlp(nn.Module):
    def __init__(self, orig: nn.Module, act: str, mode: str) -> None:
        super().__init__()
        self.fc1 = orig.fc1
        self.fc2 = orig.fc2
        self.act = act
        self.mode = mode

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return fc_act_fc(y, self.fc1, self.fc2, self.act, self.mode)  # [S, C]


class FusedVisionBlock(nn.Module):
    """Qwen2-VL vision block on our kernels; same submodule names as ``Qwen2VLVisionBlock``."""

    mlp_class: type[nn.Module] = FusedVisionMlp  # a family whose MLP names its linears otherwise swaps it

    def __init__(self, orig: nn.Module, act: str, attention: str, mlp: str, rope_gemm: bool = False) -> None:
        super().__init__()
        from .layer_norm import TritonLayerNorm

        self.norm1 = TritonLayerNorm.from_torch(orig.norm1)
        self.norm2 = TritonLayerNorm.from_torch(orig.norm2)
        self.attn = FusedVisionAttention(orig.attn, attention, rope_gemm=rope_gemm, gemm=mlp)
        self.mlp = self.mlp_class(orig.mlp, act, mlp)

    def fused(
        self, h: torch.Tensor, y: torch.Tensor, meta: VisionMeta, next_norm: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, norm1(h)) -> (h', next_norm(h')), updating the stream h [S, C] in place."""
        from .layer_norm import add_layer_norm

        a = self.attn(y, meta)
        h, y = add_layer_norm(a, h, self.norm2.weight, self.norm2.bias, self.norm2.eps, out_sum=h, out=a)
        m = self.mlp(y)
        return add_layer_norm(m, h, next_norm.weight, next_norm.bias, next_norm.eps, out_sum=h, out=m)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        max_seqlen: int | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """HF's block signature (used only if something drives the blocks with HF's own loop)."""
        from .layer_norm import add_layer_norm

        if position_embeddings is None:
            raise ValueError("FusedVisionBlock needs position_embeddings=(cos, sin)")
        from .rope_vision import rope_tables

        cos, sin = rope_tables(*position_embeddings, self.attn.head_dim)
        cu = cu_seqlens.to(torch.int32)
        lengths = (cu[1:] - cu[:-1]).tolist()
        meta = VisionMeta(grid=(), lengths=lengths, cu_seqlens=cu, max_seqlen=max(lengths), cos=cos, sin=sin)
        h = hidden_states
        a = self.attn(self.norm1(h), meta)
        h, y = add_layer_norm(a, h, self.norm2.weight, self.norm2.bias, self.norm2.eps)
        return h + self.mlp(y)


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
    rot = self.rotary_pos_emb
    scaling = float(getattr(rot, "attention_scaling", 1.0))
    return cached_meta(self, grid_thw, lambda grid: build_meta(grid, self.spatial_merge_size, rot.inv_freq, scaling))


def patch_embed_and_blocks(tower: nn.Module, p: str, attention: str, mlp: str, rope_gemm: bool,
                           block_class: type[FusedVisionBlock] = FusedVisionBlock) -> dict[str, str]:
    """Swap the patch embedding and every block (``block_class``) in place; ``p``: the tower's
    qualified name plus a dot, or empty. Returns the ``patch`` report entries."""
    from .activations import act_code

    act = tower.config.hidden_act
    act_code(act)  # raises for an activation we have no kernel for
    done = {f"{p}patch_embed": f"{type(tower.patch_embed).__name__} -> LinearPatchEmbed"}
    tower.patch_embed = LinearPatchEmbed(tower.patch_embed)
    for i, blk in enumerate(tower.blocks):
        done[f"{p}blocks.{i}"] = (
            f"{type(blk).__name__} -> {block_class.__name__}(attention={attention}, mlp={mlp}, act={act}, "
            f"rope_gemm={rope_gemm})"
        )
        tower.blocks[i] = block_class(blk, act, attention, mlp, rope_gemm)
    return done


def patch_tower(tower: nn.Module, prefix: str, attention: str, mlp: str, rope_gemm: bool) -> dict[str, str]:
    from .layer_norm import TritonLayerNorm

    p = f"{prefix}." if prefix else ""
    done = patch_embed_and_blocks(tower, p, attention, mlp, rope_gemm)
    done[f"{p}merger"] = f"{type(tower.merger).__name__} -> FusedPatchMerger"
    tower.merger = FusedPatchMerger(tower.merger, mlp, TritonLayerNorm.from_torch(tower.merger.ln_q))
    old = fuse_class(tower, fused_forward, splitvl_meta)
    done[prefix or "<model>"] = f"{old}.forward -> fused forward (cached cu_seqlens + rotary, fused residual+LN)"
    return done


