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

``PrefillRunner`` does the same for prefills: rows of prompt tokens are padded to a bucket (rows to
a power of two, tokens to 16 / 32 / 64 / 128, then multiples of 64), their per-token rope
positions, cache positions and slots travel to the device in one copy, and on CUDA each bucket's
prefill (embedding, the layers, the LM head and the argmax at each row's real last token) is
replayed from a CUDA graph. Padding tokens write keys and values past their row's real tokens,
where no real token attends and decoding overwrites them; padding rows write only the cache's last
position, which no request reaches (a prompt plus its answer fit in ``max_len``), and attention
never reads past each token's own cache position. A row that holds an image brings its embeddings
and, for Qwen3-VL, its DeepStack features [L, n, hidden]: both land in static buffers at the
image's tokens, and the graph keeps the DeepStack features there and zeros everywhere else (padding
and stale rows of the buffer included), which the layers add after layers 0 .. L-1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from service.llm.model import Qwen2LM

DecodeFn = Callable[[Qwen2LM, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class PrefillFn(Protocol):
    """``prefill_at`` / ``prefill_fused_at``: (model, kv, embeds, positions, slots, at, window, causal, deepstack)."""

    def __call__(self, model: Qwen2LM, kv: torch.Tensor, embeds: torch.Tensor, positions: torch.Tensor,
                 slots: torch.Tensor, at: torch.Tensor, window: int, *, causal: bool = False,
                 deepstack: torch.Tensor | None = None) -> torch.Tensor: ...

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


class _CacheRunner:
    """What both runners hold: the model, its KV cache [layers, 2, slots, kv_heads, max_len, head_dim]
    and whether graphs are on (CUDA only)."""

    def __init__(self, model: Qwen2LM, kv: torch.Tensor, *, use_graphs: bool) -> None:
        self.model = model
        self.kv = kv
        self.slots = kv.shape[2]
        self.max_len = kv.shape[4]
        self.device = kv.device
        self.use_graphs = use_graphs and self.device.type == "cuda"

    def scrub(self, slot: int, end: int) -> None:
        """Zero what a request left in ``slot``: cache positions ``[0, end)`` and the last one, where
        the padding rows of a padded prefill write (``PrefillRunner._host_meta``). Attention reads
        a whole window, the batch's, masked positions included, and a masked NaN still poisons it
        (0 x NaN); zeroed, a slot carries nothing from one request into the next."""
        self.kv[:, :, slot, :, :end].zero_()
        self.kv[:, :, slot, :, -1].zero_()


class DecodeRunner(_CacheRunner):
    """Device-side decode state for ``slots`` cache slots and the per-bucket step functions.

    ``window_buckets``: whether the attention window ``L`` follows the longest active context
    (powers of two from 64; needed by window attention: SDPA / matmul) or is always the whole cache
    (attention that reads only ``[0, cache_pos]`` itself, like the Triton decode kernel).
    """

    def __init__(self, model: Qwen2LM, kv: torch.Tensor, *, use_graphs: bool, window_buckets: bool = True,
                 batch_buckets: Sequence[int] | None = None) -> None:
        super().__init__(model, kv, use_graphs=use_graphs)
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

    def _write(self, rows: slice, slots: Sequence[int], values: Sequence[Sequence[int]]) -> None:
        """``state[rows, slots] = values`` in one host-to-device copy, queued behind the steps on their
        way (no wait for them)."""
        if slots:
            # pinned: from pageable memory the copy may wait for the steps already queued
            host = torch.tensor([list(slots), *(list(v) for v in values)], dtype=torch.long,
                                pin_memory=self.device.type == "cuda")
            both = host.to(self.device, non_blocking=True)
            self.state[rows].index_copy_(1, both[0], both[1:])

    def set_slots(self, slots: Sequence[int], tokens: Sequence[int], cache_pos: Sequence[int],
                  rope_pos: Sequence[int]) -> None:
        """Requests enter ``slots``: their first tokens and where the next ones go."""
        self._write(slice(None), slots, [tokens, cache_pos, rope_pos, [1] * len(slots)])

    def clear_slot(self, slot: int) -> None:
        """The slot leaves the batch. Its whole state is reset, not only ACTIVE: every step still runs
        the rows of idle slots, and a reset one writes only cache position 0, which the slot's next
        request overwrites first."""
        self.state[:, slot] = 0

    def set_tokens(self, slots: Sequence[int], tokens: Sequence[int]) -> None:
        """Overwrite the next input token of some slots (sampled rather than greedy)."""
        self._write(slice(TOKEN, TOKEN + 1), slots, [tokens])

    # -- steps ------------------------------------------------------------------------------------

    def bucket(self, batch: int, window: int) -> tuple[int, int]:
        """The (batch, window) a step over rows ``[0, batch)`` attending ``window`` positions runs at."""
        b = next(s for s in self.batch_buckets if s >= batch)
        return b, window_bucket(window, self.max_len) if self.window_buckets else self.max_len

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


# -- prefill ---------------------------------------------------------------------------------------


def token_bucket(n: int, small: Sequence[int] = (16, 32, 64, 128), step: int = 64) -> int:
    """The padded length of ``n`` prompt tokens: the first of ``small`` that holds them, else the
    next multiple of ``step``."""
    for size in small:
        if n <= size:
            return size
    return -(-n // step) * step


def window_bucket(end: int, max_len: int, smallest: int = 64) -> int:
    """The attention window for cache positions ``[0, end)``: a power of two from ``smallest``,
    at most ``max_len``."""
    size = smallest
    while size < end:
        size *= 2
    return min(size, max_len)


@dataclass
class PrefillRow:
    """One row of a prefill: prompt tokens ``ids`` going to cache positions ``start ..`` of ``slot``."""

    ids: Sequence[int]
    positions: torch.Tensor  # [3, len(ids)] M-RoPE ids, on the CPU
    slot: int
    start: int
    image: tuple[int, torch.Tensor] | None = None  # (index in ids, embeddings [n, hidden]) replacing ids
    deepstack: torch.Tensor | None = None  # the image's DeepStack features [L, n, hidden] (Qwen3-VL)


@dataclass(frozen=True)
class PrefillShape:
    """What one prefill graph is recorded for."""

    rows: int
    tokens: int
    window: int
    causal: bool  # all real rows start at 0 and window == tokens
    images: bool  # some row has image embeddings
    logits: bool  # compute the LM head and argmax at each row's last token
    # padded to a bucket (only those are recorded as graphs: an exact shape is a one-off); the
    # dimensions alone identify the work, so this takes no part in equality
    bucketed: bool = field(default=False, compare=False)


class PrefillRunner(_CacheRunner):
    """Prefills of padded, bucketed rows, replayed from CUDA graphs on CUDA (eager elsewhere).

    ``run(fn, rows, logits=...)`` -> (logits [N, vocab] fp32, greedy tokens [N]) at each row's real
    last token (None, None when ``logits`` is False: a prefix only fills the cache). The tensors
    are the graph's outputs: valid until the next ``run``.

    ``bucketed=False`` (the engine without ``prefill_graphs``; or a batch of more than
    ``max_graph_tokens`` padded tokens) runs the rows as they are, eagerly: rows padded at the end
    to the longest, the window exactly as long as the longest row's end. Graphs are recorded on
    first use of a shape, at most ``max_graphs`` of them (later shapes run eagerly, padded), and
    share one memory pool: only one of them runs at a time, and its outputs are read before the
    next one runs.
    """

    def __init__(self, model: Qwen2LM, kv: torch.Tensor, *, use_graphs: bool, bucketed: bool = True,
                 row_buckets: Sequence[int] | None = None, max_graph_tokens: int = 8192,
                 max_graphs: int = 64) -> None:
        super().__init__(model, kv, use_graphs=use_graphs)
        self.bucketed = bucketed
        self.row_buckets = sorted(set(row_buckets or pow2_buckets(self.slots)))
        self.max_graph_tokens = max_graph_tokens
        self.max_graphs = max_graphs
        self._max_rows = max(self.row_buckets[-1], self.slots)
        self._graphs: dict[tuple[int, PrefillShape], tuple[torch.cuda.CUDAGraph, torch.Tensor | None,
                                                           torch.Tensor | None]] = {}
        self._pool = None
        self._meta: torch.Tensor | None = None  # static inputs of the graphs (lazily, on first capture)
        self._images: torch.Tensor | None = None
        self._deepstack: torch.Tensor | None = None  # [L, max_graph_tokens, hidden] (DeepStack models)
        self.counters = {"graph_runs": 0, "eager_runs": 0}

    @property
    def graphs(self) -> int:
        return len(self._graphs)

    # -- layout -----------------------------------------------------------------------------------

    def shape(self, rows: Sequence[PrefillRow], *, logits: bool) -> PrefillShape:
        """The (padded) shape ``rows`` run at."""
        n = len(rows)
        longest = max(len(r.ids) for r in rows)
        end = max(r.start + len(r.ids) for r in rows)
        from_zero = all(r.start == 0 for r in rows)
        images = any(r.image is not None for r in rows)
        if self.bucketed:
            b = next((s for s in self.row_buckets if s >= n), n)
            t = min(token_bucket(longest), self.max_len)
            if b * t <= self.max_graph_tokens:
                window = t if from_zero else window_bucket(end, self.max_len)
                return PrefillShape(b, t, window, from_zero, images, logits, bucketed=True)
        return PrefillShape(n, longest, end, from_zero and end == longest, images, logits)

    @staticmethod
    def _meta_size(rows: int, tokens: int) -> int:
        return 6 * rows * tokens + 2 * rows

    @staticmethod
    def _split(meta: torch.Tensor, rows: int, tokens: int) -> tuple[torch.Tensor, ...]:
        """ids [R, T], positions [3, R, T], at [R, T], image mask [R, T], slots [R], last [R]."""
        rt = rows * tokens
        return (meta[:rt].view(rows, tokens), meta[rt : 4 * rt].view(3, rows, tokens),
                meta[4 * rt : 5 * rt].view(rows, tokens), meta[5 * rt : 6 * rt].view(rows, tokens),
                meta[6 * rt : 6 * rt + rows], meta[6 * rt + rows : 6 * rt + 2 * rows])

    def _host_meta(self, rows: Sequence[PrefillRow], shape: PrefillShape) -> torch.Tensor:
        """The inputs on the host, in ``_split``'s layout. Padding tokens continue their row's
        positions and cache positions; padding rows (slot of row 0) write only the last position."""
        r, t, n = shape.rows, shape.tokens, len(rows)
        host = torch.zeros(self._meta_size(r, t), dtype=torch.long, pin_memory=self.device.type == "cuda")
        ids, pos, at, image, slots, last = self._split(host, r, t)
        # whole-batch tensor ops (a few per prefill, not a few per row): the rows' tokens and
        # positions go in through one mask, the padding is computed for all rows at once
        lengths = torch.tensor([len(row.ids) for row in rows])
        steps = torch.arange(t)
        real = steps < lengths[:, None]  # [n, t]
        ids[:n][real] = torch.tensor([i for row in rows for i in row.ids], dtype=torch.long)
        # padding token j of a row of length m continues the row's positions: last + j - m + 1
        ends = torch.stack([row.positions[:, -1] for row in rows], dim=1)  # [3, n]
        pos[:, :n] = ends[:, :, None] + (steps - lengths[:, None] + 1)
        pos[:, :n][:, real] = torch.cat([row.positions for row in rows], dim=1)
        at[:n] = torch.tensor([row.start for row in rows])[:, None] + steps
        at[n:] = self.max_len - 1
        slots[:n] = torch.tensor([row.slot for row in rows])
        slots[n:] = rows[0].slot
        last[:n] = lengths - 1
        for b, row in enumerate(rows):
            if row.image is not None:
                lo, embeds = row.image
                image[b, lo : lo + embeds.shape[0]] = 1
        return host

    # -- running ----------------------------------------------------------------------------------

    def _body(self, fn: PrefillFn, shape: PrefillShape, meta: torch.Tensor, images: torch.Tensor | None,
              deepstack: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        r, t = shape.rows, shape.tokens
        ids, pos, at, image, slots, last = self._split(meta, r, t)
        x = self.model.embed(ids)  # [R, T, hidden]
        stack = None
        if shape.images:
            assert images is not None
            at_image = image[:, :, None] != 0  # [R, T, 1]
            x = torch.where(at_image, images, x)
            if deepstack is not None:  # [L, R, T, hidden], zero away from the images
                stack = deepstack.masked_fill(~at_image, 0)
        hidden = fn(self.model, self.kv, x, pos, slots, at, shape.window, causal=shape.causal, deepstack=stack)
        if not shape.logits:
            return None, None
        logits = self.model.logits(hidden[torch.arange(r, device=hidden.device), last])
        return logits, torch.argmax(logits, dim=-1)

    def _static(self, shape: PrefillShape) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Views of the graphs' static inputs for ``shape`` (allocated once, at the largest size):
        meta, and the images and DeepStack buffers (None when the shape has no image or the model no
        DeepStack layers)."""
        cfg = self.model.cfg
        if self._meta is None:
            self._meta = torch.zeros(6 * self.max_graph_tokens + 2 * self._max_rows, dtype=torch.long,
                                     device=self.device)
            self._images = torch.zeros(self.max_graph_tokens, cfg.hidden_size, dtype=self.model.dtype,
                                       device=self.device)
            if cfg.deepstack_layers:
                self._deepstack = torch.zeros(cfg.deepstack_layers, self.max_graph_tokens, cfg.hidden_size,
                                              dtype=self.model.dtype, device=self.device)
        assert self._images is not None
        rt = shape.rows * shape.tokens
        meta = self._meta[: self._meta_size(shape.rows, shape.tokens)]
        if not shape.images:
            return meta, None, None
        images = self._images[:rt].view(shape.rows, shape.tokens, -1)
        stack = None if self._deepstack is None else self._deepstack[:, :rt].view(-1, shape.rows, shape.tokens,
                                                                                   cfg.hidden_size)
        return meta, images, stack

    def _capture(self, fn: PrefillFn, shape: PrefillShape, meta: torch.Tensor, images: torch.Tensor | None,
                 deepstack: torch.Tensor | None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor | None, torch.Tensor | None]:
        """Record ``shape``'s prefill. The warm-up runs (Triton compiles, cuBLAS picks algorithms)
        really run this call's prefill: they write the same keys and values the replay writes."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._body(fn, shape, meta, images, deepstack)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits, tokens = self._body(fn, shape, meta, images, deepstack)
        return graph, logits, tokens

    def run(self, fn: PrefillFn, rows: Sequence[PrefillRow], *, logits: bool = True
            ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Prefill ``rows`` (one per slot) without waiting for the device; see the class doc."""
        shape = self.shape(rows, logits=logits)
        key = (id(fn), shape)
        # a bucketed shape runs on the static inputs, graphed or not (the CPU tests exercise the
        # graphs' bookkeeping, stale buffer rows included)
        static = shape.bucketed and shape.rows <= self._max_rows
        graphed = self.use_graphs and static and (key in self._graphs or len(self._graphs) < self.max_graphs)
        host = self._host_meta(rows, shape)
        if static:
            meta, images, deepstack = self._static(shape)
            meta.copy_(host, non_blocking=True)  # pinned: the host allocator keeps it until the copy ran
        else:
            meta = host.to(self.device, non_blocking=True)
            images = deepstack = None
            if shape.images:
                cfg, dtype = self.model.cfg, self.model.dtype
                images = torch.zeros(shape.rows, shape.tokens, cfg.hidden_size, dtype=dtype, device=self.device)
                if cfg.deepstack_layers:
                    deepstack = torch.zeros(cfg.deepstack_layers, *images.shape, dtype=dtype, device=self.device)
        if images is not None:
            for b, row in enumerate(rows):
                if row.image is not None:
                    lo, embeds = row.image
                    images[b, lo : lo + embeds.shape[0]].copy_(embeds, non_blocking=True)
                    if deepstack is not None:
                        if row.deepstack is None:
                            raise ValueError("a row holds an image but not its DeepStack features")
                        deepstack[:, b, lo : lo + embeds.shape[0]].copy_(row.deepstack, non_blocking=True)
        if graphed:
            self.counters["graph_runs"] += 1
            if key not in self._graphs:
                self._graphs[key] = self._capture(fn, shape, meta, images, deepstack)
            graph, out, tokens = self._graphs[key]
            graph.replay()
        else:
            self.counters["eager_runs"] += 1
            out, tokens = self._body(fn, shape, meta, images, deepstack)
        if out is None or tokens is None:
            return None, None
        return out[: len(rows)], tokens[: len(rows)]
