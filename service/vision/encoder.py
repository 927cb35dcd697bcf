"""The vision tower of a checkpoint of any family, loaded from its ``visual.*`` tensors alone.

Model contract (after infinity): ``preprocess`` (bytes -> patches, CPU threads or GPU),
``forward`` (packed patches of several images -> each image's features, one call), ``postprocess``
(split per image), and ``warmup``. An image's features are [K, tokens, D]: row 0 the merged
embeddings, rows 1.. the family's further stored features (Qwen3-VL's DeepStack); K = 1 for most.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import PIL.Image
import torch

if TYPE_CHECKING:
    from kernels.graphs import VisionGraphs

from service.checkpoint import Checkpoint, check_state_dict, is_visual, open_checkpoint
from service.fingerprint import model_fingerprint, model_key, weights_digest
from service.preprocess import (
    ImageLimits,
    decode_image,
    image_to_tensor,
    patchify,
    preprocess,
    target_size,
)

log = logging.getLogger(__name__)


# by default, the largest batch of equal grids that is replayed from a CUDA graph (VisionEncoder.graphable)
GRAPH_MAX_IMAGES = 8


@dataclass(frozen=True)
class Patches:
    """One image ready for the tower: its patches, or (on a GPU) its decoded pixels, which the
    forward resizes and patchifies on its own stream."""

    pixel_values: torch.Tensor  # [grid_t*grid_h*grid_w, 3*tp*ps*ps] float32, or uint8 [3, H, W] pixels
    grid_thw: tuple[int, int, int]  # after the resize

    @property
    def decoded_only(self) -> bool:
        return self.pixel_values.dtype == torch.uint8

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w


@dataclass(frozen=True)
class Launched:
    """A forward queued on the device (``VisionEncoder.launch``); ``finish`` waits for it."""

    host: torch.Tensor  # [K, sum(tokens), hidden_size] on the CPU (pinned), complete once ``done`` is
    done: torch.cuda.Event | None  # None: already complete (CPU)
    batch: list[Patches]


class VisionEncoder:
    """A family's vision tower on ``device`` in ``dtype``; Triton-patched on CUDA when asked."""

    def __init__(self, model: str | Path | Checkpoint, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 use_kernels: bool = True, limits: ImageLimits | None = None,
                 graph_max_images: int = GRAPH_MAX_IMAGES) -> None:
        checkpoint = open_checkpoint(model)
        family = checkpoint.family
        self.checkpoint = checkpoint
        self.family = family
        self.name = checkpoint.name
        self.device = torch.device(device)
        self.dtype = dtype
        self.limits = limits or ImageLimits()
        self.vision_config = checkpoint.vision_config_dict()
        self.preprocess_config = family.preprocess_config(checkpoint.preprocessor)

        config = family.vision_config(checkpoint.config)
        tensors = checkpoint.read_tensors(is_visual, strip_prefix="visual.")
        with torch.device("meta"):
            tower = family.build_tower(config)
        check_state_dict(tower, tensors, "visual.")
        self.model_key = model_key(checkpoint)
        self.fingerprint = model_fingerprint(family.model_type, self.vision_config, self.preprocess_config,
                                             weights_digest(tensors))
        tensors = {k: v.to(device=self.device, dtype=dtype) for k, v in tensors.items()}
        tower.load_state_dict(tensors, assign=True, strict=True)
        family.restore_buffers(tower, config, self.device)
        self.tower = tower.eval().requires_grad_(False)
        self.spatial_merge_size: int = config.spatial_merge_size
        self.hidden_size: int = family.out_hidden_size(config)
        self.deepstack_layers: int = family.deepstack_layers(config)
        self.patched: dict[str, str] | None = None
        self.graphs: VisionGraphs | None = None
        self.graph_max_images = graph_max_images
        if use_kernels and self.device.type == "cuda":
            import kernels
            from kernels.graphs import VisionGraphs

            self.patched = kernels.patch(self.tower)
            log.info("vision tower patched with splitvl kernels: %s", self.patched)
            # One CUDA graph per batch of up to graph_max_images equal grids: removes the launch gaps
            # that dominate small forwards. Room for the graphs warmup records and 16 more for other
            # sizes, so serving never evicts the warmed ones.
            warmed = sum(1 for _, count in self._warm_plan() if count <= graph_max_images)
            self.graphs = VisionGraphs(self.tower, max_graphs=warmed + 16, output=family.features)
        # One forward at a time: the batcher already serialises, this guards direct callers.
        self._lock = threading.Lock()

    # -- model contract -------------------------------------------------------------------------
    def preprocess(self, data: bytes | PIL.Image.Image, limits: ImageLimits | None = None) -> Patches:
        """Decode and patchify one upload (runs on a CPU thread). On a GPU only the decode: the
        forward resizes and patchifies (``Patches.decoded_only``).

        ``data``: the upload's bytes, or the image ``preprocess.open_image`` opened from them.
        ``limits`` (the calling worker's settings) override the encoder's own."""
        image = decode_image(data, limits or self.limits)
        cfg = self.preprocess_config
        if self.device.type != "cuda":
            pixel_values, grid_thw = preprocess(image, cfg, self.device)
            t, h, w = (int(x) for x in grid_thw.reshape(-1).tolist())
            return Patches(pixel_values=pixel_values, grid_thw=(t, h, w))
        # Only the decode here. The resize, normalize and patchify (a few small kernels) run in the
        # forward, on its stream: done here on a side stream, each image waited behind the forwards
        # of every worker process sharing the GPU (a 15 ms p50 under load for ~1 ms of work).
        # pinned: the forward's copy to the device is then asynchronous; from pageable memory it would
        # wait for everything queued on the stream first (the batch in flight), undoing launch/finish
        pixels = image_to_tensor(image, pin=True)
        return Patches(pixel_values=pixels, grid_thw=self.grid_of(image.height, image.width))

    def forward(self, batch: list[Patches]) -> list[torch.Tensor]:
        """Several images packed into one forward (block-diagonal attention by cu_seqlens) -> each
        image's features [K, tokens, hidden_size] on the CPU (row 0: the merged embeddings)."""
        return self.finish(self.launch(batch))

    @torch.inference_mode()
    def launch(self, batch: list[Patches]) -> Launched:
        """The forward's first half: everything queued on the device, the embeddings on their way to
        the host; returns without waiting for them (``finish`` does). The batcher launches the next
        batch while this one finishes, so the device never waits for the host in between."""
        pixel_values = torch.cat([self.ready(p).pixel_values for p in batch])
        # the patched tower reads grid_thw on the host (no device sync); HF's wants it on the device
        grid_device = "cpu" if self.patched else self.device
        grid_thw = torch.tensor([p.grid_thw for p in batch], dtype=torch.long, device=grid_device)
        with self._lock:
            if self.graphs is not None and self.graphable(batch):
                # the graph's output is a buffer the next replay reuses: the copy to the host below is
                # queued on this stream before any later replay, so it needs no clone on the device
                merged = self.graphs(pixel_values, grid_thw)
            else:
                merged = self.family.features(self.tower(pixel_values.to(self.dtype), grid_thw=grid_thw))
        # merged: [K, sum(tokens), hidden_size]; one device-to-host copy per batch, never on the event loop
        if self.device.type != "cuda":
            return Launched(merged.cpu(), None, batch)
        host = torch.empty(merged.shape, dtype=merged.dtype, pin_memory=True)
        host.copy_(merged, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return Launched(host, done, batch)

    def finish(self, launched: Launched) -> list[torch.Tensor]:
        """The forward's second half: wait for the embeddings on the host, split them per image."""
        if launched.done is not None:
            launched.done.synchronize()
        return self.postprocess(launched.host, launched.batch)

    def ready(self, patches: Patches) -> Patches:
        """The patches on the device, [num_patches, 3*tp*ps*ps] float32: decoded pixels are resized and
        patchified here, exactly as ``preprocess`` does (the forward calls this for every image)."""
        if not patches.decoded_only:
            return Patches(patches.pixel_values.to(self.device, non_blocking=True), patches.grid_thw)
        pixel_values, _ = patchify(patches.pixel_values.to(self.device, non_blocking=True), self.preprocess_config)
        return Patches(pixel_values, patches.grid_thw)

    def graphable(self, batch: list[Patches]) -> bool:
        """Whether the forward replays a CUDA graph: up to ``graph_max_images`` images of one grid.
        Small batches are where launches cost most (a lone 448² image: ~230 launches for ~4 ms of
        work, and several worker processes share one host); one grid bounds the graphs to
        ``graph_max_images`` per image size, where mixed grids would need one per combination."""
        return len(batch) <= self.graph_max_images and all(p.grid_thw == batch[0].grid_thw for p in batch)

    def postprocess(self, merged: torch.Tensor, batch: list[Patches]) -> list[torch.Tensor]:
        """[K, sum(tokens), D] -> each image's [K, tokens, D]."""
        sizes = [self.num_tokens(p) for p in batch]
        return [t.contiguous() for t in torch.split(merged, sizes, dim=1)]

    def num_tokens(self, patches: Patches) -> int:
        return patches.num_patches // self.spatial_merge_size**2

    def grid_of(self, height: int, width: int) -> tuple[int, int, int]:
        """The patch grid (t, h, w) of an image of this size once resized, as ``preprocess`` gives it."""
        cfg = self.preprocess_config
        height, width = target_size(height, width, cfg)
        return 1, height // cfg.patch_size, width // cfg.patch_size

    def _warm_plan(self) -> list[tuple[tuple[int, int, int], int]]:
        """(grid, images) of the forwards ``warmup`` runs: on CUDA the kernels' patch-count buckets
        and the graphs of 1 to graph_max_images images of 448² (and 1, 2 of 224²), in the grids such
        uploads get (the checkpoint's pixel bounds may resize them); else one small one."""
        if not self.patched:
            side = self.preprocess_config.merge_size  # the smallest grid: one merge window
            return [((1, side, side), 1)]
        large, small = self.grid_of(448, 448), self.grid_of(224, 224)
        counts = sorted({*range(1, self.graph_max_images + 1), 8, 16})
        return [(small, n) for n in (1, 2)] + [(large, n) for n in counts]

    def warmup(self, max_patches: int = 16384) -> None:
        """Pay lazy initialisation before serving: on CUDA, every patch-count bucket the kernels tune
        for (powers of two) and the CUDA graphs of 1 to graph_max_images images of the common grids; on
        CPU, one small forward."""
        cfg = self.preprocess_config
        dim = 3 * cfg.temporal_patch_size * cfg.patch_size**2
        for grid, count in self._warm_plan():
            patches = grid[0] * grid[1] * grid[2]
            if patches * count > max_patches and count > 1:
                continue
            self.forward([Patches(torch.randn(patches, dim), grid) for _ in range(count)])
