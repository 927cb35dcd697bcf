"""Qwen2.5-VL: Qwen2-VL with another vision tower; the rest of the family is unchanged.

The tower (HF's ``Qwen2_5_VisionTransformerPretrainedModel``): RMSNorm blocks, a SwiGLU MLP with
bias, window attention except in ``fullatt_block_indexes``, and a merger into ``out_hidden_size``
(the vision config's ``hidden_size`` is the tower's own width). The language model is Qwen2 with
the same M-RoPE sections, images take the same positions, and the image processor is Qwen2-VL's.
Hub checkpoints ship a flat ``config.json`` (text fields at the top, ``rope_scaling {"type":
"mrope"}``, ``in_chans`` in the vision config); HF's config class reads both layouts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.models.qwen2_vl import Qwen2VL

if TYPE_CHECKING:
    from transformers import PreTrainedConfig


class Qwen2_5_VL(Qwen2VL):  # noqa: N801 - the family's own spelling
    model_type = "qwen2_5_vl"
    name = "Qwen2.5-VL"
    architectures = ("Qwen2_5_VLForConditionalGeneration",)
    hf_config = "transformers:Qwen2_5_VLConfig"
    hf_tower = "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VisionTransformerPretrainedModel"

    def out_hidden_size(self, vision_config: PreTrainedConfig) -> int:
        return int(vision_config.out_hidden_size)

    def tiny_vision_config(self) -> dict:
        """Sizes where windows are ragged and both kinds of block occur: window 56 px = 2x2 merged
        units, so any image whose merged grid is not even on a side has ragged windows; blocks 0 and
        2 attend in windows, block 1 over the whole image."""
        return {
            "depth": 3,
            "hidden_size": 32,
            "intermediate_size": 44,
            "num_heads": 2,
            "hidden_act": "silu",
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
            "window_size": 56,
            "fullatt_block_indexes": [1],
            "out_hidden_size": 64,
            "tokens_per_second": 2,
        }
