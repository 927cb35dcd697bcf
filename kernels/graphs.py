"""CUDA graphs of a patched vision tower, one per image grid ("shape bucket").

A 448x448 image is ~230 kernel launches through the tower; at a few microseconds of launch cost
each that is a large share of a ~4 ms forward. Capturing the forward once per grid and replaying
it removes the launch gaps. The worker's preprocessing yields a small set of grids (images are
resized to multiples of 28 px), so a bounded LRU of graphs covers the common sizes.

Usage (CUDA only, tower already ``kernels.patch``-ed, eval mode, bf16)::

    graphs = VisionGraphs(tower, max_graphs=16)
    embeds = graphs(pixel_values, grid_thw)  # [S/4, hidden] -- a view of a static buffer:
                                             # copy it (or consume it) before the next call

Inputs must have the same grid as a captured bucket to replay; new grids are captured on first
sight (a warm-up forward plus the capture, tens of milliseconds). Calls must come from one thread
at a time (the static buffers are shared).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import torch
from torch import nn

from .patch import _grid_key


@dataclasses.dataclass
class _Entry:
    graph: torch.cuda.CUDAGraph
    static_in: torch.Tensor
    out: torch.Tensor  # pooler_output [S/4, hidden]
    last_hidden: torch.Tensor
    keep: Any  # the per-grid metadata the graph reads (kept alive with it)


class VisionGraphs:
    def __init__(self, tower: nn.Module, max_graphs: int = 16, warmup: int = 2) -> None:
        if not getattr(tower, "_splitvl_patched", False):
            raise ValueError("VisionGraphs needs a tower patched with kernels.patch (Qwen2-VL)")
        self.tower = tower
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
            res = tower(static_in, grid_thw=grid_cpu)
        return _Entry(graph, static_in, res.pooler_output, res.last_hidden_state, meta)

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | list) -> torch.Tensor:
        key = _grid_key(grid_thw)
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
