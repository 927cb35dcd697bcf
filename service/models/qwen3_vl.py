"""Qwen3-VL: another vision tower, DeepStack features, and the Qwen3 decoder.

How it differs from Qwen2-VL:

- **tower** (HF's ``Qwen3VLVisionModel``): patch 16 with a biased patch embedding, a learned
  absolute position grid resampled bilinearly to each image's grid (beside the 2-D rotary),
  LayerNorm blocks with a GELU-tanh MLP, a merger into ``out_hidden_size``, and one DeepStack
  merger per ``deepstack_visual_indexes`` entry applied to that block's output;
- **stored features**: the merged embeddings and the L DeepStack tensors, one record per image
  ([1 + L, tokens, D] from the encoder);
- **language model**: Qwen3 (per-head RMSNorm on q and k before the rotary, no q/k/v bias, an
  explicit head size) with the interleaved M-RoPE layout, and the DeepStack features added to the
  hidden states at the image's positions after layers 0 .. L-1;
- **preprocessing**: patch 16, mean and std 0.5; checkpoints give the pixel bounds as
  ``size {shortest_edge, longest_edge}``;
- **chat template**: no default system turn.

Images take the same M-RoPE positions as in Qwen2-VL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from service.checkpoint import text_fields
from service.llm.model import TextConfig
from service.models.qwen2_vl import Qwen2VL
from service.preprocess import PreprocessConfig

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

# A Qwen3-VL-style chat template: system turn only when given, the image in the user turn.
CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}"
    "{%- set image_count.value = image_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' + image_count.value|string + ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif content['type'] == 'video' or 'video' in content -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in content -%}{{- content['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


class Qwen3VL(Qwen2VL):
    model_type = "qwen3_vl"
    name = "Qwen3-VL"
    architectures = ("Qwen3VLForConditionalGeneration",)
    hf_config = "transformers:Qwen3VLConfig"
    hf_tower = "transformers.models.qwen3_vl.modeling_qwen3_vl:Qwen3VLVisionModel"
    chat_template = CHAT_TEMPLATE
    preprocess_defaults = PreprocessConfig(patch_size=16, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
                                           min_pixels=65536, max_pixels=16777216)
    published_preprocess = preprocess_defaults  # Qwen3-VL's files give the processor's own bounds

    def out_hidden_size(self, vision_config: PreTrainedConfig) -> int:
        return int(vision_config.out_hidden_size)

    def deepstack_layers(self, vision_config: PreTrainedConfig) -> int:
        return len(vision_config.deepstack_visual_indexes)

    def features(self, output: Any) -> torch.Tensor:
        """[1 + L, S/4, D]: the merged embeddings, then the DeepStack outputs in the order of
        ``deepstack_visual_indexes`` (as HF hands them to the language model). The patched tower
        writes them into one buffer, returned without a copy; HF's separate tensors are stacked."""
        from kernels.qwen3_vl import stacked_features  # no triton import: fine on the CPU path

        return stacked_features(output)

    def text_config(self, config: dict) -> TextConfig:
        """Qwen3: q/k RMSNorm, biases only if ``attention_bias``, explicit ``head_dim``, interleaved
        M-RoPE (HF's Qwen3-VL text rotary always interleaves), DeepStack after the first L layers."""
        text = text_fields(config)
        return TextConfig.from_dict(
            config, qkv_bias=bool(text.get("attention_bias", False)), qk_norm=True, mrope_interleaved=True,
            deepstack_layers=self.deepstack_layers(self.vision_config(config)), default_mrope_section=(24, 20, 20))

    def tiny_vision_config(self) -> dict:
        """A 6x6 position grid that every image resamples; two DeepStack mergers, after blocks 0 and 2."""
        return {
            "depth": 3,
            "hidden_size": 32,
            "intermediate_size": 44,
            "num_heads": 2,
            "hidden_act": "gelu_pytorch_tanh",
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
            "out_hidden_size": 64,
            "num_position_embeddings": 36,
            "deepstack_visual_indexes": [0, 2],
        }

    def tiny_text_config(self, ids: dict[str, int], vocab_size: int, *, tie_word_embeddings: bool) -> dict:
        """An explicit head_dim (24) that is not hidden / heads, no biases, interleaved M-RoPE, three
        layers (DeepStack after the first two)."""
        return super().tiny_text_config(ids, vocab_size, tie_word_embeddings=tie_word_embeddings) | {
            "num_hidden_layers": 3, "head_dim": 24, "attention_bias": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 4, 4],
                                "mrope_interleaved": True}}

    def tiny_preprocessor(self, min_pixels: int, max_pixels: int) -> dict:
        """As Qwen3-VL checkpoints ship it: the pixel bounds as ``size``."""
        raw = super().tiny_preprocessor(min_pixels, max_pixels)
        del raw["min_pixels"], raw["max_pixels"]
        return raw | {"size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
                      "processor_class": "Qwen3VLProcessor"}
