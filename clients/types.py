"""What the client returns and raises."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class SplitVLError(Exception):
    """A request failed. ``status`` is the HTTP status (None when no answer came: connection
    failure or timeout); ``code`` and ``message`` come from the service's error body."""

    def __init__(self, status: int | None, code: str, message: str, *, request_id: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{status or 'no response'} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        self.retry_after = retry_after


@dataclass(frozen=True)
class ImageInfo:
    """An image's stored features, as ``POST /v1/images`` and ``GET /v1/images/{id}`` describe them."""

    image_id: str
    model: str
    fingerprint: str
    grid_thw: tuple[int, int, int]
    num_tokens: int
    hidden_size: int
    dtype: str
    cached: bool | None = None  # upload only: true when nothing was computed
    deepstack_layers: int = 0  # Qwen3-VL: DeepStack feature tensors stored beside the embeddings

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> ImageInfo:
        t, h, w = (int(x) for x in body["grid_thw"])
        return cls(body["image_id"], body["model"], body["fingerprint"], (t, h, w), int(body["num_tokens"]),
                   int(body["hidden_size"]), body["dtype"], body.get("cached"), int(body.get("deepstack_layers", 0)))


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Answer:
    image_id: str
    answer: str
    finish_reason: str  # "stop" (end token) or "length" (max_tokens)
    usage: Usage

    def __str__(self) -> str:
        return self.answer


@dataclass(frozen=True)
class Embeddings:
    """An image's embeddings file (safetensors): ``image_embeds`` [num_tokens, hidden_size] in the
    stored dtype, ``image_grid_thw`` [1, 3] int64 and, for Qwen3-VL, ``deepstack_image_embeds``
    [deepstack_layers, num_tokens, hidden_size] (in the order of the model's ``deepstack_visual_indexes``)."""

    info: ImageInfo
    data: bytes

    def tensors(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load

        return load(self.data)

    @property
    def image_embeds(self) -> torch.Tensor:
        return self.tensors()["image_embeds"]

    @property
    def image_grid_thw(self) -> torch.Tensor:
        return self.tensors()["image_grid_thw"]

    @property
    def deepstack_image_embeds(self) -> torch.Tensor | None:
        """[L, num_tokens, hidden_size] for a model with DeepStack features (Qwen3-VL), else None."""
        return self.tensors().get("deepstack_image_embeds")

    def save(self, path: str | Path) -> Path:
        out = Path(path)
        out.write_bytes(self.data)
        return out
