"""CUDA graphs of a patched vision tower, one per image grid ("shape bucket").

A 448x448 image is ~230 kernel launches through the tower; at a few microseconds of launch cost
each that is a large share of a ~4 ms forward. Capturing the forward once per grid and replaying
it removes the launch gaps. The worker's preprocessing yields a small set of grids (images are
resized to multiples of 28 px), so a bounded LRU of graphs covers the common sizes.

Usage (CUDA only, tower already ``kernels.patch``-ed, eval mode, bf16)::

    graphs = VisionGraphs(tower, max_graphs=16)
    embeds = graphs(pixel_values, grid_thw)  # [S/4, hidden] -- a view of a static buffer:
                                             # copy it (or consume it) before the next call

``output`` picks what the graph returns from the tower's output (default: ``pooler_output``); a
family with more features per image (Qwen3-VL's DeepStack) returns them stacked, [K, S/4, hidden].

Inputs must have the same grid as a captured bucket to replay; new grids are captured on first
sight (a warm-up forward plus the capture, tens of milliseconds). Calls must come from one thread
at a time (the static buffers are shared).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .tower import grid_key


@dataclasses.dataclass
class _Entry:
    graph: torch.cuda.CUDAGraph
    static_in: torch.Tensor
    out: torch.Tensor  # output(tower(...)), e.g. pooler_output [S/4, hidden]
    keep: Any  # the per-grid metadata the graph reads (kept alive with it)


class VisionGraphs:
    def __init__(self, tower: nn.Module, max_graphs: int = 16, warmup: int = 2,
                 output: Callable[[Any], torch.Tensor] | None = None) -> None:
        if not getattr(tower, "_splitvl_patched", False):
            raise ValueError("VisionGraphs needs a tower with a fused forward (kernels.patch)")
        self.tower = tower
        self.output = output or (lambda out: out.pooler_output)
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool shared by all buckets
        self._graphs: collections.OrderedDict[tuple, _Entry] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._graphs)

    def _capture(self, key: tuple, pixel_values: torch.Tensor) -> _Entry:
        tower = self.tower
        grid_cpu = torch.tensor(key, dtype=torch.int64)
        dtype = tower.patch_embed.proj.weight.dtype
        static_in = pixel_values.to(dtype).clone()
        meta = tower.splitvl_meta(grid_cpu)  # built outside the capture (host work, H2D copies)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            # warm-up: Triton compiles/autotunes and cuBLAS picks its kernels outside the capture
            for _ in range(self.warmup):
                tower(static_in, grid_thw=grid_cpu)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=self.pool):
            out = self.output(tower(static_in, grid_thw=grid_cpu))
        return _Entry(graph, static_in, out, meta)

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | list) -> torch.Tensor:
        key = grid_key(grid_thw)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(key, pixel_values)
            self._graphs[key] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
            entry.static_in.copy_(pixel_values)
        entry.graph.replay()
        return entry.out
