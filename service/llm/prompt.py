"""Prompts for one image and one question, exactly as HF's Qwen-VL processors build them.

The checkpoint's chat template is rendered once, with a sentinel in place of the question, and
split into three fixed parts around it:

- the **prefix**: everything up to and including ``<|vision_end|>``, with ``<|image_pad|>``
  repeated once per image embedding. It depends only on the image's token count, so its KV is
  computed once per image and reused by every question on it;
- the **question**, tokenized as plain text: ``<|im_end|>`` typed by a user stays text, never a
  control token;
- the **suffix** (``<|im_end|>\\n<|im_start|>assistant\\n`` for the Qwen-VL templates).

HF tokenizes the whole rendered string at once; special tokens split it into segments that
are tokenized separately, so cutting at the template's special tokens gives the same ids.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from service.checkpoint import Checkpoint, CheckpointError, open_checkpoint, text_fields

SENTINEL = "\x00splitvl-question\x00"


@dataclass(frozen=True)
class Prompt:
    ids: list[int]  # the whole prompt
    prefix_len: int  # ids[:prefix_len] is the per-image prefix (ends with <|vision_end|>)
    image_start: int  # index of the first <|image_pad|>
    num_image_tokens: int


def _read_template(path: Path) -> str:
    """chat_template.jinja, chat_template.json, or the template inside tokenizer_config.json."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        if (path / name).is_file():
            template = json.loads((path / name).read_text()).get("chat_template")
            if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
                template = next((t["template"] for t in template if t.get("name") == "default"), None)
            if isinstance(template, str):
                return template
    raise CheckpointError(f"{path} has no chat template (chat_template.jinja or tokenizer_config.json)")


def render_template(template: str, question: str, variables: dict[str, str]) -> str:
    """Render as HF's ``apply_chat_template`` does: the image in the user turn, then the question."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, **variables)


def positions(prefix_len: int, grid_thw: Sequence[int] | torch.Tensor, spatial_merge_size: int, total_len: int,
              *, image_start: int | None = None) -> tuple[torch.Tensor, int]:
    """M-RoPE position ids [3, total_len] (t, h, w rows) and the rope delta, as HF's ``get_rope_index``.

    Text before the image counts 0, 1, ...; the image's merged grid gets (t, h, w) offsets from
    the next position; text after it continues from start + max(grid_h, grid_w). The image tokens
    end right before the prefix's last token (``<|vision_end|>``) unless ``image_start`` says
    otherwise. Token ``i >= total_len`` (generated) has position ``i + delta`` on all three rows.
    """
    t, h, w = (int(x) for x in grid_thw)
    gh, gw = h // spatial_merge_size, w // spatial_merge_size
    n = t * gh * gw
    start = prefix_len - 1 - n if image_start is None else image_start
    if start < 0 or start + n > total_len:
        raise ValueError(f"image of {n} tokens at {start} does not fit a prompt of {total_len} tokens")
    before = torch.arange(start).expand(3, -1)
    grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij"))
    image = grid.reshape(3, -1) + start
    after = torch.arange(total_len - start - n).expand(3, -1) + start + max(gh, gw)
    pos = torch.cat([before, image, after], dim=1)  # [3, total_len]
    return pos, int(pos.max()) + 1 - total_len


class StreamDecoder:
    """Token ids in, text out, never half a character: bytes of a split UTF-8 character wait."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._start = 0  # ids[start:done] were emitted and give context for the next decode
        self._done = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """What is still held at the end (an incomplete character decodes as U+FFFD, as HF's does)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        seen = self._decode(self._ids[self._start : self._done])
        text = self._decode(self._ids[self._start :])
        if (not final and text.endswith("\ufffd")) or not text.startswith(seen):
            return "" if not final else text[len(seen) :]
        self._start, self._done = self._done, len(self._ids)
        return text[len(seen) :]


class PromptBuilder:
    def __init__(self, tokenizer: Tokenizer, template: str, *, image_token_id: int, vision_end_token_id: int,
                 eos_token_ids: Sequence[int], variables: dict[str, str] | None = None) -> None:
        self.tokenizer = tokenizer
        self._plain = Tokenizer.from_str(tokenizer.to_str())
        self._plain.encode_special_tokens = True  # special-token strings in a question stay text
        self.image_token_id = image_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        added = [t.content for t in tokenizer.get_added_tokens_decoder().values()]
        image_pad = tokenizer.id_to_token(image_token_id)
        vision_end = tokenizer.id_to_token(vision_end_token_id)
        rendered = render_template(template, SENTINEL, variables or {})
        if rendered.count(SENTINEL) != 1:
            raise CheckpointError("the chat template does not show the question text exactly once")
        head, tail = rendered.split(SENTINEL)
        if head.count(image_pad) != 1 or vision_end not in head[head.index(image_pad) :]:
            raise CheckpointError(f"the chat template does not put one {image_pad}…{vision_end} before the question")
        cut = head.index(vision_end, head.index(image_pad)) + len(vision_end)
        prefix, middle = head[:cut], head[cut:]
        # text touching the question (no special token in between) is tokenized with it, as HF does
        left = max((middle.rfind(a) + len(a) for a in added if a in middle), default=0)
        right = min((tail.find(a) for a in added if a in tail), default=len(tail))
        self._prefix_ids = self._encode(prefix)  # one <|image_pad|>, expanded per image
        if self._prefix_ids.count(image_token_id) != 1:
            raise CheckpointError(f"{image_pad} does not encode to image_token_id {image_token_id}")
        self._image_at = self._prefix_ids.index(image_token_id)
        self._middle_ids = self._encode(middle[:left])
        self._around = (middle[left:], tail[:right])
        self._suffix_ids = self._encode(tail[right:])

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    @classmethod
    def from_checkpoint(cls, model: str | Path | Checkpoint) -> PromptBuilder:
        checkpoint = open_checkpoint(model)
        path = checkpoint.path
        if not (path / "tokenizer.json").is_file():
            raise CheckpointError(f"{path / 'tokenizer.json'} is missing")
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        config = checkpoint.config
        text = text_fields(config)
        tok_config = checkpoint.json("tokenizer_config.json") or {}
        gen = checkpoint.json("generation_config.json") or {}
        eos = gen.get("eos_token_id", config.get("eos_token_id", text.get("eos_token_id")))
        if eos is None and isinstance(tok_config.get("eos_token"), str):
            eos = tokenizer.token_to_id(tok_config["eos_token"])
        if eos is None:
            raise CheckpointError("no EOS token id in generation_config.json, config.json or the tokenizer config")
        variables = {}  # HF hands the tokenizer's special tokens to the template
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = tok_config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                variables[key] = value
        for key in ("image_token_id", "vision_end_token_id"):
            if key not in text:
                raise CheckpointError(f"config.json lacks {key}")
        return cls(tokenizer, _read_template(path), image_token_id=int(text["image_token_id"]),
                   vision_end_token_id=int(text["vision_end_token_id"]),
                   eos_token_ids=[eos] if isinstance(eos, int) else list(eos), variables=variables)

    def prefix_ids(self, num_image_tokens: int) -> list[int]:
        """Everything up to and including ``<|vision_end|>``; the same for every question on an image."""
        ids = self._prefix_ids
        return ids[: self._image_at] + [self.image_token_id] * num_image_tokens + ids[self._image_at + 1 :]

    def question_ids(self, question: str) -> list[int]:
        """The rest of the prompt after the prefix: the question as plain text and the suffix."""
        before, after = self._around
        return self._middle_ids + self._plain.encode(before + question + after, add_special_tokens=False).ids + \
            self._suffix_ids

    def build(self, question: str, num_image_tokens: int) -> Prompt:
        prefix = self.prefix_ids(num_image_tokens)
        return Prompt(prefix + self.question_ids(question), len(prefix), self._image_at, num_image_tokens)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def decoder(self) -> StreamDecoder:
        return StreamDecoder(self.tokenizer)
