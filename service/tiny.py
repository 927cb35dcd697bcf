"""A small random Qwen2-VL checkpoint in the hub's layout, for tests and offline trials.

Written with transformers' own ``save_pretrained`` (``visual.*``, ``model.*``, ``lm_head.*``;
sharded with an index when asked), plus a byte-level BPE tokenizer with Qwen2-VL's special
tokens, the Qwen2-VL chat template and a ``preprocessor_config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL-Instruct's chat template (the one its processor applies).
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

_CORPUS = [
    "What is in this picture? Describe the image in detail.",
    "How many people are there? What colour is the car? Is it day or night?",
    "The quick brown fox jumps over the lazy dog. A cat sits on the mat.",
    "Answer briefly: yes or no. Is this image safe for work? Does it contain text?",
    "There is a red house, a blue sky, green trees and a small white boat on the lake.",
    "You are a helpful assistant. system user assistant",
    "0123456789 , . ! ? ; : ' \" ( ) [ ] { } - + = * / \\ @ # $ % ^ & _ ~ `",
]


def _build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


def tiny_config(tokenizer, *, tie_word_embeddings: bool = False, depth: int = 2, layers: int = 2):
    from transformers import Qwen2VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = len(tokenizer)
    return Qwen2VLConfig(
        vision_config={
            "depth": depth,
            "embed_dim": 32,
            "hidden_size": 64,  # the LM's hidden size: the merger projects into it
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
            "hidden_act": "quick_gelu",
        },
        text_config={
            "vocab_size": vocab + 7,  # padded like the real checkpoints: rows no token uses
            "hidden_size": 64,
            "intermediate_size": 112,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "tie_word_embeddings": tie_word_embeddings,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        tie_word_embeddings=tie_word_embeddings,
    )


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter distinct random values, so a skipped or misloaded tensor shows.

    HF's init leaves norms at 1 and many biases at 0: a loader that forgot them would still pass.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim == 1 and ("norm" in name or "ln_q" in name):
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.05 * noise)
            else:
                fan_in = p[0].numel()
                p.copy_(noise / fan_in**0.5)


def preprocessor_config(min_pixels: int, max_pixels: int) -> dict:
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }


def make_tiny_checkpoint(
    path: str | Path,
    *,
    seed: int = 0,
    shard_size: str | None = None,
    tie_word_embeddings: bool = False,
    vocab_size: int = 400,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 64,
) -> Path:
    """Write a random Qwen2-VL checkpoint to ``path`` and return it.

    ``shard_size`` (e.g. ``"40KB"``) makes a sharded checkpoint with
    ``model.safetensors.index.json``; the default is one ``model.safetensors``.
    """
    from transformers import Qwen2VLForConditionalGeneration

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(vocab_size)
    config = tiny_config(tokenizer, tie_word_embeddings=tie_word_embeddings)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    perturb_(model, seed)
    if tie_word_embeddings:
        model.tie_weights()
    kwargs = {"max_shard_size": shard_size} if shard_size else {"max_shard_size": "10GB"}
    model.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (path / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(min_pixels, max_pixels), indent=2)
    )
    (path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": config.text_config.eos_token_id, "do_sample": False}, indent=2)
    )
    return path
