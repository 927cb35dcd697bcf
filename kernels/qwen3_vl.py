"""Qwen3-VL's vision tower (``Qwen3VLVisionModel``) on our kernels (``kernels.patch`` calls ``patch_tower``).

Per forward, for S patches of C = hidden_size (1152 in the released models, 16 heads of 72):

- per grid, built once and cached: cu_seqlens, per-image lengths, the 2-D rotary cos/sin tables
  [S, D/2] (the same axial layout as Qwen2-VL's) and the 4 bilinear taps per patch that resample
  the learned G x G position table onto the image's grid (``pos_embed.resample_taps``);
- the patch embedding: the Conv3d (patch 16, with bias) as one GEMM over the flattened patches;
  then one kernel adds the resampled position embedding (gathered from the live table) and applies
  block 0's ``norm1`` (``pos_embed.pos_embed_add_layer_norm``);
- every block as Qwen2-VL's (``tower.FusedVisionBlock``): ``qkv GEMM -> rotary -> attention ->
  proj GEMM -> fused (residual add + norm2) -> linear_fc1 + bias + GELU(tanh) -> linear_fc2 ->
  fused (residual add + next norm1)``; the last block's second add is fused with the merger's norm;
- DeepStack: after each block in ``deepstack_visual_indexes`` its output (viewed [S/4, 4C]) goes
  through that index's merger (LayerNorm(4C) -> fc1 -> exact GELU -> fc2) before the next block
  updates the stream in place;
- the main merger and the DeepStack mergers write into one [1 + L, S/4, D] buffer, so
  ``stacked_features`` hands the worker (and a CUDA graph) all features without a copy.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from .qwen2_vl import layer_norm_blocks
from .tower import VisionMeta, build_meta, cached_meta, fc_act_fc, fuse_class, require_exact_gelu


class FusedVisionMlp(nn.Module):
    """``linear_fc1 -> GELU(tanh) -> linear_fc2``; same submodule names as ``Qwen3VLVisionMLP``."""

    def __init__(self, orig: nn.Module, act: str, mode: str) -> None:
        super().__init__()
        self.linear_fc1 = orig.linear_fc1
        self.linear_fc2 = orig.linear_fc2
        self.act = act
        self.mode = mode

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return fc_act_fc(y, self.linear_fc1, self.linear_fc2, self.act, self.mode)  # [S, C]


class FusedPatchMerger(nn.Module):
    """``Qwen3VLVisionPatchMerger`` on our kernels: LayerNorm over C (the main merger; in the fused
    forward it is fused upstream with the last residual add) or over the 4C of a merged token
    (DeepStack's ``use_postshuffle_norm``), then fc1 -> exact GELU -> fc2. Same submodule names."""

    def __init__(self, orig: nn.Module, mode: str) -> None:
        super().__init__()
        from .layer_norm import TritonLayerNorm

        require_exact_gelu(orig.act_fn)
        self.hidden_size = orig.hidden_size  # 4C
        self.use_postshuffle_norm = orig.use_postshuffle_norm
        self.norm = TritonLayerNorm.from_torch(orig.norm)
        self.linear_fc1 = orig.linear_fc1
        self.act_fn = orig.act_fn
        self.linear_fc2 = orig.linear_fc2
        self.mode = mode

    def project(self, y: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Normed rows y ([S, C] or [S/4, 4C]) -> [S/4, out_hidden_size]."""
        return fc_act_fc(y.reshape(-1, self.hidden_size), self.linear_fc1, self.linear_fc2, "gelu", self.mode, out)

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [S, C] (a block's output) -> [S/4, out_hidden_size]."""
        return self.project(self.norm(x.view(-1, self.hidden_size) if self.use_postshuffle_norm else x), out)


@dataclasses.dataclass
class Qwen3VisionMeta(VisionMeta):
    pos_index: torch.Tensor  # [S, 4] int32, device: rows of the position table per patch
    pos_weight: torch.Tensor  # [S, 4] fp32, device: their bilinear weights


def deepstack_taps(indexes: list[int] | tuple[int, ...], depth: int) -> dict[int, tuple[int, int]]:
    """{block: (output slot, merger)}, as HF walks them: blocks in order, the merger of the block's
    first position in ``indexes``; indexes outside the tower are never reached."""
    layers = [i for i in range(depth) if i in indexes]
    return {layer: (slot, list(indexes).index(layer)) for slot, layer in enumerate(layers)}


def fused_forward(self: nn.Module, hidden_states: torch.Tensor, grid_thw: torch.Tensor | list, **kwargs: Any) -> Any:
    """Replacement for ``Qwen3VLVisionModel.forward``; same inputs and output type
    (``last_hidden_state`` [S, C], ``pooler_output`` [S/4, D], ``deepstack_features`` L x [S/4, D])."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    from .pos_embed import pos_embed_add_layer_norm

    meta = self.splitvl_meta(grid_thw)
    blocks = self.blocks
    taps = deepstack_taps(self.deepstack_visual_indexes, len(blocks))
    norm1 = blocks[0].norm1
    x = self.patch_embed(hidden_states)  # [S, C], ours: the residual stream, updated in place below
    h, y = pos_embed_add_layer_norm(x, self.pos_embed.weight, meta.pos_index, meta.pos_weight, norm1.weight,
                                    norm1.bias, norm1.eps, out_sum=x)
    fc2 = self.merger.linear_fc2
    feats = torch.empty(1 + len(taps), h.shape[0] // self.spatial_merge_unit, fc2.out_features, dtype=fc2.weight.dtype,
                        device=h.device)  # [1 + L, S/4, D]: main, then DeepStack
    for i, blk in enumerate(blocks):
        nxt = blocks[i + 1].norm1 if i + 1 < len(blocks) else self.merger.norm
        h, y = blk.fused(h, y, meta, nxt)
        if i in taps:  # before the next block overwrites the stream
            slot, j = taps[i]
            self.deepstack_merger_list[j](h, out=feats[1 + slot])
    self.merger.project(y, out=feats[0])
    return BaseModelOutputWithDeepstackFeatures(last_hidden_state=h, pooler_output=feats[0],
                                                deepstack_features=list(feats[1:]))


def stacked_features(out: Any) -> torch.Tensor:
    """Main then DeepStack features, [1 + L, S/4, D]: the patched tower's own output buffer (no
    copy) when the output came from it, else a stack (e.g. of HF's separate tensors). For
    ``VisionGraphs(tower, output=stacked_features)``."""
    parts = [out.pooler_output, *out.deepstack_features]
    base = parts[0]._base
    if (base is not None and base.dim() == 3 and base.shape[0] == len(parts) and base.is_contiguous()
            and all(p._base is base and p.shape == base.shape[1:] and p.data_ptr() == base[i].data_ptr()
                    for i, p in enumerate(parts))):
        return base
    return torch.stack(parts)


def splitvl_meta(self: nn.Module, grid_thw: torch.Tensor | list) -> Qwen3VisionMeta:
    """cu_seqlens / max length / rotary tables / position-table taps for this grid (cached per grid)."""
    from ._utils import to_device_async
    from .pos_embed import resample_taps

    def build(grid: tuple) -> Qwen3VisionMeta:
        meta = build_meta(grid, self.spatial_merge_size, self.rotary_pos_emb)
        index, weight = resample_taps(grid, self.num_grid_per_side, self.spatial_merge_size)
        dev = meta.cos.device
        # head size 72: cuDNN per run of equal-length images beats our varlen kernel on mixed sizes too
        # (H200, vision_bench mixed8: 47.4 vs 50.2 ms; equal sizes: the same within noise)
        return Qwen3VisionMeta(**{**vars(meta), "auto": "cudnn"}, pos_index=to_device_async(index, dev),
                               pos_weight=to_device_async(weight, dev))

    return cached_meta(self, grid_thw, build)


def patch_tower(tower: nn.Module, prefix: str, attention: str, mlp: str, rope_gemm: bool) -> dict[str, str]:
    resample = (getattr(tower, "interpolation_mode", "bilinear"), getattr(tower, "interpolation_align_corners", True))
    if resample != ("bilinear", True):
        raise ValueError(f"position-embedding resampling {resample} unsupported (bilinear, align_corners=True)")
    p = f"{prefix}." if prefix else ""
    done = layer_norm_blocks(tower, p, attention, mlp, rope_gemm, FusedVisionMlp)
    done[f"{p}merger"] = f"{type(tower.merger).__name__} -> FusedPatchMerger"
    tower.merger = FusedPatchMerger(tower.merger, mlp)
    for j, m in enumerate(tower.deepstack_merger_list):
        done[f"{p}deepstack_merger_list.{j}"] = f"{type(m).__name__} -> FusedPatchMerger(postshuffle norm)"
        tower.deepstack_merger_list[j] = FusedPatchMerger(m, mlp)
    old = fuse_class(tower, fused_forward, splitvl_meta)
    done[prefix or "<model>"] = (f"{old}.forward -> fused forward (cached per-grid rotary + position taps, fused "
                                 "position add + LN, residual + LN, DeepStack into one output buffer)")
    return done
