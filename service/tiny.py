"""A small random checkpoint of any supported family, for tests and offline trials.

Written with transformers' own ``save_pretrained`` of the family's ``*ForConditionalGeneration``
(the hub's tensor names; sharded with an index when asked), plus a byte-level BPE tokenizer with
the Qwen-VL special tokens, the family's chat template and ``preprocessor_config.json``. The
family module (``service.models``) says the config; this module writes the files.
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


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter distinct random values, so a skipped or misloaded tensor shows.

    HF's init leaves norms at 1 and many biases at 0: a loader that forgot them would still pass.
    """
    device = next(model.parameters()).device  # drawn where the model is (a GPU bench's ~670M values)
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32, device=device)
            if p.ndim == 1 and ("norm" in name or "ln_q" in name):
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.05 * noise)
            else:
                fan_in = p[0].numel()
                p.copy_(noise / fan_in**0.5)


def make_tiny_checkpoint(
    path: str | Path,
    *,
    family: str = "qwen2_vl",
    seed: int = 0,
    shard_size: str | None = None,
    tie_word_embeddings: bool = False,
    vocab_size: int = 400,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 64,
    **sizes: int,
) -> Path:
    """Write a random checkpoint of ``family`` (one of ``service.models.FAMILY_NAMES``) to
    ``path`` and return it.

    ``shard_size`` (e.g. ``"40KB"``) makes a sharded checkpoint with
    ``model.safetensors.index.json``; the default is one ``model.safetensors``. ``sizes`` pass on to
    the family's ``tiny_config`` (e.g. ``depth``, ``layers``).
    """
    from service.models import FAMILY_NAMES, supported
    from service.models import family as family_named

    if family not in FAMILY_NAMES:
        raise ValueError(f"unknown family {family!r}; splitvl serves {supported()}")
    fam = family_named(family)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = fam.tiny_config(ids, len(tokenizer), tie_word_embeddings=tie_word_embeddings, **sizes)
    torch.manual_seed(seed)
    model = fam.hf_model_class()(config).eval()
    perturb_(model, seed)
    if tie_word_embeddings:
        model.tie_weights()
    kwargs = {"max_shard_size": shard_size} if shard_size else {"max_shard_size": "10GB"}
    model.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").write_text(fam.chat_template)
    (path / "preprocessor_config.json").write_text(json.dumps(fam.tiny_preprocessor(min_pixels, max_pixels), indent=2))
    (path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": ids["<|im_end|>"], "do_sample": False}, indent=2)
    )
    return path
