"""The vision tower of a Qwen2-VL checkpoint, loaded from its ``visual.*`` tensors alone.

Model contract (after infinity): ``preprocess`` (bytes -> patches, CPU threads or GPU),
``forward`` (packed patches of several images -> merged embeddings, one call), ``postprocess``
(split per image), and ``warmup``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from service.checkpoint import (
    CheckpointError,
    check_state_dict,
    is_visual,
    load_json,
    read_tensors,
    resolve_model_path,
)
from service.fingerprint import model_fingerprint, model_key, weights_digest
from service.preprocess import ImageLimits, PreprocessConfig, decode_image, preprocess

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Patches:
    """One image ready for the tower."""

    pixel_values: torch.Tensor  # [grid_t*grid_h*grid_w, 3*tp*ps*ps] float32
    grid_thw: tuple[int, int, int]

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w


def vision_config_dict(config: dict) -> dict:
    vision = dict(config.get("vision_config") or {})
    if not vision:
        raise CheckpointError("config.json has no vision_config: not a Qwen2-VL checkpoint")
    return vision


class VisionEncoder:
    """Qwen2-VL's vision tower on ``device`` in ``dtype``; Triton-patched on CUDA when asked."""

    def __init__(self, model: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 use_kernels: bool = True, limits: ImageLimits | None = None) -> None:
        from transformers import Qwen2VLConfig
        from transformers.models.qwen2_vl.modeling_qwen2_vl import (
            Qwen2VisionTransformerPretrainedModel,
            Qwen2VLVisionRotaryEmbedding,
        )

        self.path = resolve_model_path(model)
        self.name = str(model)
        self.device = torch.device(device)
        self.dtype = dtype
        self.limits = limits or ImageLimits()
        raw_config = load_json(self.path, "config.json")
        self.vision_config = vision_config_dict(raw_config)
        self.preprocess_config = PreprocessConfig.from_checkpoint(self.path)

        config = Qwen2VLConfig.from_pretrained(self.path).vision_config
        tensors = read_tensors(self.path, is_visual, strip_prefix="visual.")
        with torch.device("meta"):
            tower = Qwen2VisionTransformerPretrainedModel._from_config(config, attn_implementation="sdpa")
        check_state_dict(tower, tensors, "visual.")
        self.model_key = model_key(self.path)
        self.fingerprint = model_fingerprint(self.vision_config, self.preprocess_config, weights_digest(tensors))
        tensors = {k: v.to(device=self.device, dtype=dtype) for k, v in tensors.items()}
        tower.load_state_dict(tensors, assign=True, strict=True)
        # inv_freq is a non-persistent buffer: not in the checkpoint, so still on meta after assign.
        with torch.device(self.device):
            tower.rotary_pos_emb = Qwen2VLVisionRotaryEmbedding(config)
        self.tower = tower.eval().requires_grad_(False)
        self.spatial_merge_size: int = config.spatial_merge_size
        self.hidden_size: int = config.hidden_size
        self.patched: dict[str, str] | list[str] | None = None
        if use_kernels and self.device.type == "cuda":
            import kernels

            self.patched = kernels.patch(self.tower)
            log.info("vision tower patched with splitvl kernels: %s", self.patched)
        # One forward at a time: the batcher already serialises, this guards direct callers.
        self._lock = threading.Lock()

    # -- model contract -------------------------------------------------------------------------
    def preprocess(self, data: bytes, limits: ImageLimits | None = None) -> Patches:
        """Decode and patchify one upload (runs on a CPU thread; resize on the GPU when there is one).

        ``limits`` (the calling worker's settings) override the encoder's own."""
        image = decode_image(data, limits or self.limits)
        pixel_values, grid_thw = preprocess(image, self.preprocess_config, self.device)
        t, h, w = (int(x) for x in grid_thw.reshape(-1).tolist())
        return Patches(pixel_values=pixel_values, grid_thw=(t, h, w))

    @torch.inference_mode()
    def forward(self, batch: list[Patches]) -> list[torch.Tensor]:
        """Several images packed into one forward (block-diagonal attention by cu_seqlens)."""
        pixel_values = torch.cat([p.pixel_values.to(self.device, non_blocking=True) for p in batch])
        grid_thw = torch.tensor([p.grid_thw for p in batch], dtype=torch.long, device=self.device)
        with self._lock:
            out = self.tower(pixel_values.to(self.dtype), grid_thw=grid_thw)
        merged = out.pooler_output  # [sum(tokens), hidden_size]
        return self.postprocess(merged, batch)

    def postprocess(self, merged: torch.Tensor, batch: list[Patches]) -> list[torch.Tensor]:
        sizes = [p.num_patches // self.spatial_merge_size**2 for p in batch]
        return [t.contiguous() for t in torch.split(merged, sizes)]

    def num_tokens(self, patches: Patches) -> int:
        return patches.num_patches // self.spatial_merge_size**2

    def warmup(self) -> None:
        """Run the smallest image once so the first request pays no lazy initialisation."""
        side = self.preprocess_config.patch_size * self.preprocess_config.merge_size
        t = self.preprocess_config.temporal_patch_size
        dim = 3 * t * self.preprocess_config.patch_size**2
        n = (side // self.preprocess_config.patch_size) ** 2
        grid = (1, side // self.preprocess_config.patch_size, side // self.preprocess_config.patch_size)
        self.forward([Patches(torch.zeros(n, dim), grid)])
