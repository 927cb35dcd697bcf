"""The oracle for the LLM tests: HF's own ``*ForConditionalGeneration`` of the checkpoint's family
on the same checkpoint, fp32, CPU.

Image features come from HF's vision tower (as the vision worker would store them: the merged
embeddings and, for Qwen3-VL, the DeepStack features); prompt ids are built as the family's
processor builds them (the tokenizer's chat template, ``<|image_pad|>`` expanded to the image's
token count, the whole text tokenized at once), since ``AutoProcessor`` needs torchvision, which
we lack.

It also sets up the fused path's tests, before any of their modules is imported: on a machine
without CUDA the Triton kernels run in the interpreter (``TRITON_INTERPRET`` must be set before any
``@triton.jit`` is defined), in fp16 only (``FUSED_DTYPES``: the interpreter's bf16 is not
faithful, with truncating casts and wrong dots); on a GPU in fp16 and bf16.
"""

from __future__ import annotations

import functools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
FUSED_DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float16]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def fused_tolerance(dtype: torch.dtype) -> float:
    return 5e-3 if dtype == torch.float16 else 3e-2  # bf16 keeps 8 bits: 8x fp16's rounding


def assert_fused_decode_steps(model: Any, caches: list[torch.Tensor], prompt_len: int, delta: int,
                              attention: str, dtype: torch.dtype) -> None:
    """Three decode steps over slots 0..2 (slot 1 holds a prompt of ``prompt_len`` tokens whose image
    moved text positions by ``delta``; the others hold other prefixes): the fused step equals the
    plain one, caches[0] serving the plain step and caches[1] the fused one."""
    from service.llm.model import decode_step, decode_step_fused

    tokens = torch.tensor([5, 6, 7], device=DEVICE)
    at = torch.tensor([3, prompt_len, 9], device=DEVICE)
    for _ in range(3):
        step_pos = (at + torch.tensor([0, delta, 0], device=DEVICE)).expand(3, -1)
        plain = decode_step(model, caches[0], tokens, step_pos, at)
        window = caches[1] if attention == "triton" else caches[1][..., :64, :]
        fused = decode_step_fused(model, window, tokens, step_pos, at, attention=attention)
        assert rel_err(fused, plain) < fused_tolerance(dtype)
        if dtype == torch.float16:  # bf16's rounding may flip a near tie of this tiny model
            assert torch.equal(fused.argmax(-1), plain.argmax(-1))
        tokens, at = plain.argmax(-1), at + 1


def random_image(seed: int, width: int, height: int) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@dataclass
class Features:
    embeds: torch.Tensor  # [num_tokens, hidden]
    grid: torch.Tensor  # [1, 3]
    pixel_values: torch.Tensor
    deepstack: torch.Tensor | None = None  # [L, num_tokens, hidden] (Qwen3-VL)

    @property
    def num_tokens(self) -> int:
        return int(self.grid.prod()) // 4


class Oracle:
    def __init__(self, path: Path) -> None:
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        from service.checkpoint import open_checkpoint

        self.path = path
        model_class = open_checkpoint(path).family.hf_model_class()
        self.model = model_class.from_pretrained(path, dtype=torch.float32).eval()
        self.images = Qwen2VLImageProcessorPil.from_pretrained(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.image_token_id = self.model.config.image_token_id

    @torch.no_grad()
    def features(self, image: Image.Image) -> Features:
        out = self.images(images=[image], return_tensors="pt")
        features = self.model.model.get_image_features(out["pixel_values"], out["image_grid_thw"])
        deepstack = getattr(features, "deepstack_features", None)
        return Features(torch.cat(list(features.pooler_output)), out["image_grid_thw"], out["pixel_values"],
                        torch.stack(deepstack) if deepstack else None)

    def input_ids(self, question: str, num_tokens: int) -> torch.Tensor:
        """[1, T], as Qwen2VLProcessor builds them."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        text = text.replace("<|image_pad|>", "<|image_pad|>" * num_tokens)
        return torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]])

    def kwargs(self, feats: Features, ids: torch.Tensor) -> dict:
        return {"input_ids": ids, "pixel_values": feats.pixel_values, "image_grid_thw": feats.grid,
                "mm_token_type_ids": (ids == self.image_token_id).int()}

    @torch.no_grad()
    def logits(self, feats: Features, question: str) -> torch.Tensor:
        """[T, vocab] of the whole prompt"""
        ids = self.input_ids(question, feats.num_tokens)
        return self.model(**self.kwargs(feats, ids)).logits[0]

    @torch.no_grad()
    def generate(self, feats: Features, question: str, max_new_tokens: int) -> list[int]:
        ids = self.input_ids(question, feats.num_tokens)
        out = self.model.generate(**self.kwargs(feats, ids), max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, ids.shape[1] :].tolist()


@functools.cache
def oracle(path: Path) -> Oracle:
    return Oracle(path)


class PromptCase:
    """A question about one image as the engine lays it out: ids, M-RoPE positions, the image's
    embeddings (and DeepStack features) in the model's dtype, and the dense inputs of a one-row
    prefill: ``embeds`` [1, T, hidden] and, with DeepStack, ``stack`` [L, 1, T, hidden]."""

    def __init__(self, path: Path, model: Any, feats: Features, question: str) -> None:
        from service.checkpoint import open_checkpoint
        from service.llm.prompt import PromptBuilder

        self.feats, self.question = feats, question
        self.prompt = PromptBuilder.from_checkpoint(path).build(question, feats.num_tokens)
        lo, n = self.prompt.image_start, self.prompt.num_image_tokens
        self.positions, self.delta = open_checkpoint(path).family.positions(
            self.prompt.prefix_len, feats.grid[0].tolist(), 2, len(self.prompt.ids), image_start=lo)
        self.image = feats.embeds.to(model.dtype)
        x = model.embed(torch.tensor(self.prompt.ids, device=model.device))
        x[lo : lo + n] = self.image.to(model.device)
        self.embeds = x[None]  # [1, T, hidden]
        self.deepstack = self.stack = None
        if feats.deepstack is not None:
            self.deepstack = feats.deepstack.to(model.dtype)
            self.stack = x.new_zeros((len(feats.deepstack), *self.embeds.shape))  # [L, 1, T, hidden]
            self.stack[:, 0, lo : lo + n] = self.deepstack.to(model.device)

    @property
    def total(self) -> int:
        return len(self.prompt.ids)

    def row(self, slot: int, start: int, end: int) -> Any:
        """Tokens ``[start, end)`` as the engine hands them to ``PrefillRunner``."""
        from service.llm.engine import prefill_row

        return prefill_row(self.prompt, self.positions, slot, start, end, self.image, self.deepstack)


def prompt_cases(path: Path, model: Any, specs: list[tuple[int, tuple[int, int], str]]) -> list[PromptCase]:
    """(image seed, (width, height), question) -> cases with the oracle's image features."""
    hf = oracle(path)
    return [PromptCase(path, model, hf.features(random_image(seed, *size)), question) for seed, size, question in specs]


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
