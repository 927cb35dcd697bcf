"""Qwen2-VL: everything the pipeline needs to know about the family, in one place.

Later families subclass ``Qwen2VL`` and state only how they differ (as transformers' modular
models do): ``qwen2_5_vl.py`` changes the vision tower, ``qwen3_vl.py`` the tower, the stored
features and the language model. What no family changes (HTTP, store, batching, scheduler, CUDA
graphs) never asks which family it serves.

A family answers four kinds of questions:

- **vision**: the HF config object and tower class to build from ``config.json``'s
  ``vision_config`` (on the meta device; the weights are assigned later), the buffers to rebuild
  on the device, the merged hidden size, and which tensors make up an image's stored features
  (``features``: [K, tokens, D], row 0 the merged embeddings);
- **preprocessing**: the image processor's defaults (a checkpoint's ``preprocessor_config.json``
  overrides them);
- **language model**: the decoder variant (``TextConfig``: biases, q/k norms, head size, M-RoPE
  layout, DeepStack layers) and the M-RoPE position rule of a prompt with one image;
- **a tiny checkpoint**: the HF config and chat template that ``splitvl make-tiny`` and the tests
  use, so every family is tested against HF's own ``*ForConditionalGeneration`` on the CPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from service.llm.model import TextConfig
from service.llm.prompt import positions
from service.models import load
from service.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PreprocessConfig

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

# Qwen2-VL-Instruct's chat template (the one its processor applies); Qwen2.5-VL's is the same.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Qwen2VL:
    """Qwen2-VL (``model_type`` qwen2_vl): patch 14, LayerNorm + QuickGELU blocks, full attention,
    merger into the LM's hidden size; a Qwen2 decoder with contiguous t/h/w M-RoPE sections."""

    model_type = "qwen2_vl"
    name = "Qwen2-VL"
    architectures: tuple[str, ...] = ("Qwen2VLForConditionalGeneration",)
    # HF's config and vision tower classes, as "module:name" (imported on first use)
    hf_config = "transformers:Qwen2VLConfig"
    hf_tower = "transformers.models.qwen2_vl.modeling_qwen2_vl:Qwen2VisionTransformerPretrainedModel"
    chat_template = CHAT_TEMPLATE
    # the processor's defaults, where a checkpoint's preprocessor_config.json is silent
    preprocess_defaults = PreprocessConfig(patch_size=14, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
    # what the published checkpoints' preprocessor_config.json set (benchmarks and capacity size images
    # with it): Qwen2-VL's and Qwen2.5-VL's files raise max_pixels to 12845056 (28 x 28 x 16384)
    published_preprocess = dataclasses.replace(preprocess_defaults, max_pixels=12845056)

    # -- HF classes (the oracle, and the vision tower we build) ----------------------------------

    def hf_config_class(self) -> type[PreTrainedConfig]:
        return load(self.hf_config)

    def hf_model_class(self) -> type[nn.Module]:
        """``*ForConditionalGeneration`` (``architectures[0]``): what tests compare against and
        ``make-tiny`` saves."""
        return load(f"transformers:{self.architectures[0]}")

    def tower_class(self) -> type[nn.Module]:
        return load(self.hf_tower)

    # -- vision ------------------------------------------------------------------------------------

    def vision_config(self, config: dict) -> PreTrainedConfig:
        """HF's vision config object from ``config.json`` (either layout: the hub's or the one the
        current transformers' ``save_pretrained`` writes)."""
        return self.hf_config_class().from_dict(config).vision_config

    def build_tower(self, vision_config: PreTrainedConfig) -> nn.Module:
        """The tower with HF's sdpa attention; call under ``torch.device("meta")`` and assign weights."""
        return self.tower_class()._from_config(vision_config, attn_implementation="sdpa")

    def restore_buffers(self, tower: nn.Module, vision_config: PreTrainedConfig, device: torch.device) -> None:
        """Rebuild on ``device`` what the checkpoint does not hold (non-persistent buffers stay on meta
        after ``load_state_dict(assign=True)``): the rotary ``inv_freq``."""
        with torch.device(device):
            tower.rotary_pos_emb = type(tower.rotary_pos_emb)(vision_config)

    def out_hidden_size(self, vision_config: PreTrainedConfig) -> int:
        """D: the merged embeddings' width (the language model's hidden size)."""
        return int(vision_config.hidden_size)

    def deepstack_layers(self, vision_config: PreTrainedConfig) -> int:
        """L: DeepStack feature tensors stored beside the merged embeddings (none before Qwen3-VL)."""
        return 0

    def features(self, output: Any) -> torch.Tensor:
        """The tower's output -> what an image stores, stacked: [K, S/4, D] (K = 1 + L; row 0 the
        merged embeddings). A view, no copy, when K is 1."""
        return output.pooler_output.unsqueeze(0)

    # -- preprocessing -----------------------------------------------------------------------------

    def preprocess_config(self, preprocessor: dict | None) -> PreprocessConfig:
        """The checkpoint's ``preprocessor_config.json`` over this family's defaults."""
        if preprocessor is None:
            from service.checkpoint import CheckpointError

            raise CheckpointError("the checkpoint has no preprocessor_config.json (the vision worker needs it)")
        return PreprocessConfig.from_dict(preprocessor, defaults=self.preprocess_defaults)

    # -- language model ----------------------------------------------------------------------------

    def text_config(self, config: dict) -> TextConfig:
        """Qwen2: q/k/v with bias, head size hidden / heads, contiguous M-RoPE sections."""
        return TextConfig.from_dict(config)

    def positions(self, prefix_len: int, grid_thw: Sequence[int], spatial_merge_size: int, total_len: int,
                  *, image_start: int) -> tuple[torch.Tensor, int]:
        """M-RoPE position ids [3, total_len] and the rope delta of a prompt with one image (HF's
        ``get_rope_index`` for a still image; the same rule in Qwen2.5-VL and Qwen3-VL)."""
        return positions(prefix_len, grid_thw, spatial_merge_size, total_len, image_start=image_start)

    # -- a tiny random checkpoint (make-tiny, tests) -------------------------------------------------

    def tiny_config(self, ids: dict[str, int], vocab_size: int, *, tie_word_embeddings: bool,
                    **sizes: Any) -> PreTrainedConfig:
        """A small config of this family (hidden 64). ``ids`` maps the special tokens to their ids;
        ``sizes`` override the vision ``depth`` or the text ``layers``."""
        vision = self.tiny_vision_config()
        text = self.tiny_text_config(ids, vocab_size, tie_word_embeddings=tie_word_embeddings)
        vision["depth"] = sizes.get("depth", vision["depth"])
        text["num_hidden_layers"] = sizes.get("layers", text["num_hidden_layers"])
        return self.hf_config_class()(vision_config=vision, text_config=text, **self.tiny_token_ids(ids),
                                      tie_word_embeddings=tie_word_embeddings)

    def tiny_vision_config(self) -> dict:
        return {
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 64,  # the LM's hidden size: the merger projects into it
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
            "hidden_act": "quick_gelu",
        }

    def tiny_text_config(self, ids: dict[str, int], vocab_size: int, *, tie_word_embeddings: bool) -> dict:
        return {
            "vocab_size": vocab_size + 7,  # padded like the real checkpoints: rows no token uses
            "hidden_size": 64,
            "intermediate_size": 112,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "tie_word_embeddings": tie_word_embeddings,
        }

    @staticmethod
    def tiny_token_ids(ids: dict[str, int]) -> dict[str, int]:
        return {
            "image_token_id": ids["<|image_pad|>"],
            "video_token_id": ids["<|video_pad|>"],
            "vision_start_token_id": ids["<|vision_start|>"],
            "vision_end_token_id": ids["<|vision_end|>"],
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
        }

    def tiny_preprocessor(self, min_pixels: int, max_pixels: int) -> dict:
        """A ``preprocessor_config.json`` as the family's checkpoints ship it."""
        d = self.preprocess_defaults
        return {
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2VLProcessor",
            "do_resize": True,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "do_convert_rgb": True,
            "image_mean": list(d.image_mean),
            "image_std": list(d.image_std),
            "min_pixels": min_pixels,
            "max_pixels": max_pixels,
            "patch_size": d.patch_size,
            "temporal_patch_size": d.temporal_patch_size,
            "merge_size": d.merge_size,
        }
