"""The decode loop's device-side state, and its steps replayed from CUDA graphs.

``DecodeRunner`` keeps, on the device, everything one decode step reads and advances: per slot the
last token, its cache position, its rope position and whether the slot is active. One step is

    logits = decode_fn(model, kv[:, :, :B, :, :L], tokens[:B], rope_pos[:B] x3, cache_pos[:B])
    tokens[:B] = argmax(logits)                 # greedy, on the device
    cache_pos[:B] += active[:B]; rope_pos[:B] += active[:B]

so consecutive greedy steps need nothing from the host: the engine launches step t+1 before it
reads step t's tokens (copied to pinned host memory once per step, behind an event). Sampled
requests overwrite their slot's token after the step (``set_tokens``).

On CUDA each (batch bucket, window bucket) is captured once in a ``torch.cuda.CUDAGraph`` and
replayed; on the CPU (and with ``use_graphs=False``) the same step runs eagerly, so the CPU tests
exercise the same bookkeeping. Rows past the active slots, and finished rows, compute harmlessly:
their cache positions are clamped to the window, and their outputs are ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from service.llm.model import Qwen2LM

DecodeFn = Callable[[Qwen2LM, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

TOKEN, CACHE_POS, ROPE_POS, ACTIVE = range(4)


def pow2_buckets(limit: int, smallest: int = 1) -> list[int]:
    """smallest, 2 smallest, 4 smallest, ... and ``limit`` itself (the last bucket)."""
    sizes, size = [], smallest
    while size < limit:
        sizes.append(size)
        size *= 2
    return [*sizes, limit]


@dataclass
class Step:
    """One launched decode step: its logits (valid until the next launch) and its tokens on the host."""

    batch: int
    logits: torch.Tensor  # [batch, vocab] fp32 on the device
    _host: torch.Tensor  # [batch] long (pinned on CUDA)
    _event: torch.cuda.Event | None

    def tokens(self) -> list[int]:
        """The step's greedy tokens; waits for the step on CUDA (the one host sync per step)."""
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


class DecodeRunner:
    """Device-side decode state for ``slots`` cache slots and the per-bucket step functions.

    ``window_buckets``: whether the attention window ``L`` follows the longest active context
    (powers of two from 64; needed by window attention: SDPA / matmul) or is always the whole cache
    (attention that reads only ``[0, cache_pos]`` itself, like the Triton decode kernel).
    """

    def __init__(self, model: Qwen2LM, kv: torch.Tensor, *, use_graphs: bool, window_buckets: bool = True,
                 batch_buckets: Sequence[int] | None = None) -> None:
        self.model = model
        self.kv = kv
        self.slots = kv.shape[2]
        self.max_len = kv.shape[4]
        self.device = kv.device
        self.use_graphs = use_graphs and self.device.type == "cuda"
        self.window_buckets = window_buckets
        self.batch_buckets = sorted(set(batch_buckets or pow2_buckets(self.slots)))
        if self.batch_buckets[-1] < self.slots:
            self.batch_buckets.append(self.slots)
        self.state = torch.zeros(4, self.slots, dtype=torch.long, device=self.device)
        pin = self.device.type == "cuda"
        # two host buffers: step t's tokens are read while step t+1 runs
        self._host = [torch.zeros(self.slots, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self._flip = 0
        self._graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    # -- host -> device state ---------------------------------------------------------------------

    def set_slot(self, slot: int, token: int, cache_pos: int, rope_pos: int) -> None:
        """A request enters ``slot``: its first token and where the next one goes."""
        self.state[:, slot] = torch.tensor([token, cache_pos, rope_pos, 1], dtype=torch.long)

    def clear_slot(self, slot: int) -> None:
        self.state[ACTIVE, slot] = 0

    def set_tokens(self, slots: Sequence[int], tokens: Sequence[int]) -> None:
        """Overwrite the next input token of some slots (sampled rather than greedy)."""
        if slots:
            index = torch.tensor(list(slots), dtype=torch.long, device=self.device)
            self.state[TOKEN].index_copy_(0, index, torch.tensor(list(tokens), dtype=torch.long, device=self.device))

    # -- steps ------------------------------------------------------------------------------------

    def bucket(self, batch: int, window: int) -> tuple[int, int]:
        """The (batch, window) a step over rows ``[0, batch)`` attending ``window`` positions runs at."""
        b = next(s for s in self.batch_buckets if s >= batch)
        if not self.window_buckets:
            return b, self.max_len
        size = 64
        while size < window:
            size *= 2
        return b, min(size, self.max_len)

    def _body(self, fn: DecodeFn, batch: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.state
        cache_pos = state[CACHE_POS, :batch].clamp(max=window - 1)
        rope_pos = state[ROPE_POS, :batch]
        logits = fn(self.model, self.kv[:, :, :batch, :, :window], state[TOKEN, :batch],
                    rope_pos.expand(3, batch), cache_pos)
        nxt = torch.argmax(logits, dim=-1)
        state[TOKEN, :batch].copy_(nxt)
        state[CACHE_POS : ROPE_POS + 1, :batch] += state[ACTIVE, :batch]
        return logits, nxt

    def capture(self, fn: DecodeFn, batch: int, window: int) -> None:
        """Record the step for one bucket (a no-op without graphs or when recorded already).

        The warm-up run that capture needs (it compiles the Triton kernels, picks cuBLAS
        algorithms) really executes a step: the state is restored afterwards, and the keys and
        values it wrote are those the next real step writes again.
        """
        key = (id(fn), batch, window)
        if not self.use_graphs or key in self._graphs:
            return
        saved = self.state.clone()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._body(fn, batch, window)
                self.state.copy_(saved)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            logits, nxt = self._body(fn, batch, window)
        self.state.copy_(saved)
        self._graphs[key] = (graph, logits, nxt)

    @property
    def graphs(self) -> int:
        return len(self._graphs)

    def launch(self, fn: DecodeFn, batch: int, window: int) -> Step:
        """Run one step over rows ``[0, batch)`` (a bucket, see ``bucket``) without waiting for it."""
        if self.use_graphs:
            self.capture(fn, batch, window)
            graph, logits, nxt = self._graphs[(id(fn), batch, window)]
            graph.replay()
        else:
            logits, nxt = self._body(fn, batch, window)
        host = self._host[self._flip][:batch]
        self._flip ^= 1
        event = None
        if self.device.type == "cuda":
            host.copy_(nxt, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host.copy_(nxt)
        return Step(batch, logits, host, event)
