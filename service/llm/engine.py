"""The LLM engine: answers questions about images whose features are already computed.

API (all that the HTTP layer needs)::

    engine = LLMEngine(model_dir, device="cuda", dtype=torch.bfloat16, max_batch_slots=8,
                       max_seq_len=4096, prefix_cache_entries=32, max_waiting=256)
    stream = engine.generate(image_embeds, grid_thw, image_key, question, max_tokens,
                             temperature=0.0, top_p=1.0, seed=None)      # -> Generation, at once
    for event in stream: ...            # blocking; or `async for event in stream` in a coroutine
    final = stream.result()             # blocking: the Finish event
    engine.stats(); engine.close()

``generate`` validates and tokenizes in the caller's thread and raises ``ApiError`` there
(422 ``invalid_request`` / ``context_length_exceeded``, 409 ``feature_mismatch``, 503
``overloaded`` / ``engine_closed``), so an HTTP handler can answer with an error before it starts
a stream. It is thread-safe and cheap (no model work). The returned ``Generation`` yields one
``Delta`` per generated token (``text`` is the new text, "" while a UTF-8 character is
incomplete; the EOS gets no delta) and then one ``Finish`` (finish_reason "stop" at an EOS of
the checkpoint or "length" at ``max_tokens``; the whole text; prompt/completion token counts,
the EOS counted). Consume it once, from one thread or one event loop; ``async for`` awaits a
future the scheduler resolves with ``call_soon_threadsafe``, so it never blocks the loop.
Leaving the loop early, or ``cancel()``, frees the request's slot. An engine failure is
raised from the iteration.

All model work happens on one scheduler thread that owns the model and a static KV cache of
``max_batch_slots`` slots. Each iteration it admits waiting requests into free slots, then
decodes one token for every active slot in a single ``decode_step`` batch, so concurrent
requests share each decode step. Admission prefills in batches: the image prefixes that no
cache holds (one row per image), then every admitted question (rows padded at the end). The
prompt's per-image prefix (up to ``<|vision_end|>``) has its KV computed once per ``image_key``
and kept in a bounded LRU on the device; later questions on that image copy it into their slot
and prefill only the question and the suffix.

Decoding keeps its state on the device (``cuda_graphs.DecodeRunner``): the last token, cache
and rope positions of each slot advance inside the step, greedy tokens are picked there, and
with only greedy requests the next step is launched before the host reads this one's tokens
(one copy to pinned memory per step). On CUDA the step is replayed from a CUDA graph per batch
bucket, with the Triton-fused kernels (``gpu_ops``) for bf16/fp16; on the CPU it runs eagerly.
Prefills go through ``cuda_graphs.PrefillRunner``: with ``prefill_graphs`` (the default there) rows and
tokens padded to buckets, one CUDA graph per (rows, tokens, attention window) bucket, the first
token's logits and argmax inside the graph; without (the CPU's default) the rows as they are,
padded at the end to the longest.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from service.checkpoint import Checkpoint, open_checkpoint
from service.errors import ApiError, internal_error, unavailable
from service.llm.cuda_graphs import DecodeFn, DecodeRunner, PrefillFn, PrefillRow, PrefillRunner, Step
from service.llm.generation import Delta, Finish, Generation, batched_wakeups
from service.llm.model import (
    Qwen2LM,
    allocate_kv_cache,
    decode_step,
    decode_step_fused,
    fused_supported,
    load_model,
    prefill_at,
    prefill_fused_at,
)
from service.llm.prompt import Prompt, PromptBuilder, StreamDecoder

log = logging.getLogger(__name__)


class PrefixNotCached(LookupError):
    """``generate`` got shape-only (meta) embeddings for an image whose prefix KV the engine no
    longer holds: call it again with the embeddings."""


@functools.lru_cache(maxsize=64)
def position_table(rule: Callable[..., tuple[torch.Tensor, int]], prefix_len: int, grid: tuple[int, int, int],
                   merge: int, max_len: int, image_start: int) -> tuple[torch.Tensor, int]:
    """M-RoPE positions [3, max_len] and rope delta of every prompt with this image layout (read only).

    The text after the image counts up from one fixed offset, so a prompt of any length takes a
    slice, and the delta is the same for all of them (they all end after the image). Cached: it
    was about half of ``generate``'s time, which runs on the thread that serves HTTP. ``rule`` is
    the family's position rule (``Family.positions``).
    """
    return rule(prefix_len, grid, merge, max_len, image_start=image_start)


def prefill_row(prompt: Prompt, positions: torch.Tensor, slot: int, start: int, end: int, embeds: torch.Tensor,
                deepstack: torch.Tensor | None) -> PrefillRow:
    """Tokens ``[start, end)`` of ``prompt`` (positions [3, len(prompt.ids)]) going into ``slot``, with the
    image's embeddings [n, hidden] and DeepStack features [L, n, hidden] when the row holds the image
    (a prefix or a whole prompt; a question after its image's prefix holds none)."""
    lo = prompt.image_start - start
    holds = lo >= 0 and lo + prompt.num_image_tokens <= end - start
    return PrefillRow(prompt.ids[start:end], positions[:, start:end], slot, start,
                      (lo, embeds) if holds else None, deepstack if holds else None)


# -- sampling -------------------------------------------------------------------------------------


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """logits [vocab] fp32 -> a token id. Temperature 0 is greedy (argmax, ties to the lowest id);
    otherwise sample from softmax(logits / temperature) restricted to the smallest set of most
    likely tokens whose mass reaches ``top_p`` (the most likely token is always kept)."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax((logits.double() - logits.max()) / temperature, dim=-1).float()  # no overflow at t>0
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = (sorted_probs.cumsum(0) - sorted_probs) < top_p  # mass strictly before each token
        keep[0] = True  # a top_p below float32's smallest value would otherwise keep nothing
        choice = torch.multinomial(sorted_probs * keep, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


# -- the engine -----------------------------------------------------------------------------------


@dataclass
class _Prefix:
    kv: torch.Tensor  # [layers, 2, kv_heads, prefix_len, head_dim]
    grid: tuple[int, int, int]


@dataclass
class _Request:
    prompt: Prompt
    embeds: torch.Tensor  # [num_image_tokens, hidden] as given (any device, any dtype)
    deepstack: torch.Tensor | None  # [L, num_image_tokens, hidden] (Qwen3-VL), as given
    grid: tuple[int, int, int]
    image_key: str
    positions: torch.Tensor  # [3, prompt_len] on the CPU
    rope_delta: int
    max_tokens: int
    temperature: float
    top_p: float
    generator: torch.Generator | None
    stream: Generation
    decoder: StreamDecoder | None  # None: no deltas, the answer is decoded once at the end
    prefix: _Prefix | None = None  # pinned at submission when the caller sent no embeddings
    slot: int = -1
    cache_len: int = 0  # tokens whose KV is in the slot (or will be, once launched steps ran)
    written: int = 0  # its prefills wrote cache positions [0, written) of the slot, padding included
    tokens: list[int] = field(default_factory=list)  # generated so far
    text: list[str] = field(default_factory=list)


@dataclass
class _Launched:
    """A decode step on its way: which request each row served when it was launched."""

    rows: dict[int, _Request]  # slot -> request
    step: Step


class LLMEngine:
    """Greedy/sampled answers about one image, streamed; thread-safe ``generate``.

    ``max_seq_len`` is the context (prompt + max_tokens) a request may use, ``max_batch_slots``
    how many requests decode together (the rest wait), ``prefix_cache_entries`` how many image
    prefixes stay in device memory (0 turns reuse off: every prompt is prefilled whole).

    The GPU path (defaults on CUDA): ``fused`` Triton kernels for bf16/fp16 (``prefill_fused``,
    ``decode_step_fused``), decode steps replayed from ``cuda_graphs``, ``attention`` for decode
    ``"triton"`` (fused only), ``"sdpa"`` or ``"matmul"``, and ``prefill_graphs`` (default: on
    when decode uses CUDA graphs): prefills padded to buckets and replayed from CUDA graphs (on the
    CPU, or without ``cuda_graphs``, ``prefill_graphs=True`` runs the same padded prefills
    eagerly). On the CPU all of it is off and the steps are the plain ``prefill_at`` /
    ``decode_step``; the decode and prefill bookkeeping is the same.
    ``lm`` hands in a model already built (benchmarks); ``model`` then supplies only the config,
    tokenizer and chat template.
    """

    def __init__(self, model: str | Path | Checkpoint, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32,
                 max_batch_slots: int = 8, max_seq_len: int | None = None, prefix_cache_entries: int = 32,
                 max_waiting: int = 256, cuda_graphs: bool | None = None, fused: bool | None = None,
                 attention: str | None = None, lm: Qwen2LM | None = None, prefill_graphs: bool | None = None) -> None:
        checkpoint = open_checkpoint(model)
        self.checkpoint = checkpoint
        self.family = checkpoint.family
        self.device = torch.device(device)
        self.dtype = dtype
        self.model: Qwen2LM = lm if lm is not None else load_model(checkpoint, device=self.device, dtype=dtype)
        self.prompts = PromptBuilder.from_checkpoint(checkpoint)
        self.spatial_merge_size = int((checkpoint.config.get("vision_config") or {}).get("spatial_merge_size", 2))
        self.deepstack_layers = self.model.cfg.deepstack_layers
        self.hidden_size = self.model.cfg.hidden_size
        self.max_seq_len = min(max_seq_len or 4096, self.model.cfg.max_position_embeddings)
        self.max_batch_slots = max_batch_slots
        self.prefix_cache_entries = prefix_cache_entries
        self.max_waiting = max_waiting
        self.eos_token_ids = frozenset(self.prompts.eos_token_ids)
        self.kv = allocate_kv_cache(self.model.cfg, max_batch_slots, self.max_seq_len, device=self.device, dtype=dtype)
        self.fused = fused_supported(self.device, dtype) if fused is None else fused
        self.attention = attention or ("triton" if self.fused else "sdpa")
        if self.attention == "triton" and not self.fused:
            raise ValueError("attention 'triton' needs the fused path (CUDA, bf16/fp16, Triton)")
        # the two model steps, replaceable by other versions with the same signatures (a decode_fn
        # that reads the whole cache window should come with runner.window_buckets = False)
        self.prefill_fn: PrefillFn = prefill_fused_at if self.fused else prefill_at
        self.decode_fn: DecodeFn = partial(decode_step_fused if self.fused else decode_step, attention=self.attention)
        use_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.runner = DecodeRunner(self.model, self.kv, use_graphs=use_graphs,
                                   window_buckets=self.attention != "triton")
        if self.runner.use_graphs and not self.runner.window_buckets:  # one graph per batch bucket: record now
            with torch.inference_mode():
                for batch in self.runner.batch_buckets:
                    self.runner.capture(self.decode_fn, *self.runner.bucket(batch, 1))
        if prefill_graphs is None:
            prefill_graphs = self.runner.use_graphs
        # bucketed: a prefill graph is recorded on first use of each bucket; else the rows run as they are
        self.prefiller = PrefillRunner(self.model, self.kv, use_graphs=self.runner.use_graphs, bucketed=prefill_graphs)
        self._prefixes: OrderedDict[str, _Prefix] = OrderedDict()
        self.counters = {"prefix_hits": 0, "prefix_misses": 0, "prefill_tokens": 0, "decode_steps": 0,
                         "generated_tokens": 0, "admissions": 0}
        # the latest admissions (perf_counter at start, requests, seconds): how bursts were admitted
        self.admissions: deque[tuple[float, int, float]] = deque(maxlen=256)
        self._cond = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._staged: list[_Request] = []  # queued from an event loop, waiting for its round to end (_wake)
        self._active: dict[int, _Request] = {}  # slot -> request
        self._pending: _Launched | None = None  # launched, tokens not read yet
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self._thread.start()

    # -- public API ------------------------------------------------------------------------------

    def generate(self, image_embeds: torch.Tensor, grid_thw: Sequence[int] | torch.Tensor, image_key: str,
                 question: str, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, max_question_tokens: int | None = None, deltas: bool = True,
                 deepstack: torch.Tensor | None = None) -> Generation:
        """Queue one question about one image; returns its event stream at once.

        ``deltas=False``: no ``Delta`` events, only the ``Finish`` (its text decoded once, at the end),
        for callers that want the whole answer: the scheduler thread then does no per-token decoding.

        image_embeds [num_tokens, hidden] as the vision worker stored them (any dtype, any device);
        deepstack [L, num_tokens, hidden] the image's DeepStack features for a model that has L > 0
        DeepStack layers (Qwen3-VL), else None (also None, with meta embeddings, when the prefix is cached);
        grid_thw the image's patch grid (t, h, w); image_key names the image's features (the
        caller makes it from fingerprint + image id) and keys the prefix-KV cache.
        Raises ``ApiError`` 422 for an empty question, parameters out of range or a prompt that
        with ``max_tokens`` exceeds ``max_seq_len`` (code ``context_length_exceeded``) or whose question
        part (question + closing template) is over ``max_question_tokens`` (``question_too_long``), 409 when the
        embeddings do not fit this model, 503 when the queue is full or the engine is closed.
        """
        if not question.strip():
            raise ApiError(422, "invalid_request", "question is empty")
        if max_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
            raise ApiError(422, "invalid_request", "need max_tokens >= 1, temperature >= 0 and 0 < top_p <= 1")
        grid = tuple(int(x) for x in torch.as_tensor(grid_thw).reshape(-1).tolist())  # [3], [1, 3] or a list
        merge = self.spatial_merge_size
        if len(grid) != 3 or grid[1] % merge or grid[2] % merge:
            raise ApiError(409, "feature_mismatch", f"grid_thw {list(grid)} does not fit merge size {merge}")
        num_tokens = grid[0] * grid[1] * grid[2] // merge**2
        if tuple(image_embeds.shape) != (num_tokens, self.hidden_size):
            raise ApiError(409, "feature_mismatch", f"image embeddings {tuple(image_embeds.shape)} do not fit this "
                           f"model: grid {list(grid)} needs ({num_tokens}, {self.hidden_size})")
        layers = self.deepstack_layers
        want = (layers, num_tokens, self.hidden_size)
        if (deepstack is None and layers and not image_embeds.is_meta) or (
                deepstack is not None and tuple(deepstack.shape) != want):
            got = "none" if deepstack is None else tuple(deepstack.shape)
            raise ApiError(409, "feature_mismatch", f"DeepStack features {got} do not fit this model: it needs "
                           + (f"{want}" if layers else "none"))
        prompt = self.prompts.build(question, num_tokens)  # the only tokenization of the question
        prefix = None
        if image_embeds.is_meta:  # the caller skipped fetching the embeddings: pin the cached prefix now
            prefix = self._prefixes.get(image_key)
            if prefix is None or prefix.grid != grid or prefix.kv.shape[3] != prompt.prefix_len:
                raise PrefixNotCached(image_key)
        total = len(prompt.ids)
        if max_question_tokens is not None and total - prompt.prefix_len > max_question_tokens:
            raise ApiError(422, "question_too_long", f"the question is {total - prompt.prefix_len} tokens; "
                           f"the limit is {max_question_tokens}")
        if total + max_tokens > self.max_seq_len:
            raise ApiError(422, "context_length_exceeded", f"the prompt has {total} tokens; with max_tokens "
                           f"{max_tokens} it exceeds the context length of {self.max_seq_len}")
        pos, delta = position_table(self.family.positions, prompt.prefix_len, grid, merge, self.max_seq_len,
                                    prompt.image_start)
        pos = pos[:, :total]  # [3, total]
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=self.device)
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)
        stream = Generation(total, self._wake)
        # tensors reach the device on the scheduler thread, and only when a prefill needs them (a copy
        # here would wait for the decode step running on the device)
        request = _Request(prompt, image_embeds, deepstack, grid, image_key, pos, delta, max_tokens, temperature,
                           top_p, generator, stream, self.prompts.decoder() if deltas else None, prefix)
        with self._cond:
            if self._closed:
                raise unavailable("engine_closed", "the LLM engine is shutting down")
            if len(self._waiting) + len(self._staged) >= self.max_waiting:
                raise unavailable("overloaded", "too many questions are waiting; retry later")
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is None:
                self._waiting.append(request)
                self._cond.notify()
            else:
                # From an event loop, the question is staged and reaches the scheduler when the loop's
                # current round of callbacks is done: the questions that one round submits (a burst of
                # HTTP requests, clients whose answers came in the same step) are then admitted
                # together, in one prefill, even if the scheduler looks in the middle of the round
                # (it takes the GIL every few ms). The cost is one loop iteration. One wake per
                # question, not one per round: a loop that stops before its wake runs must not leave
                # a flag that keeps later questions (from any loop) staged.
                self._staged.append(request)
                loop.call_soon(self._wake)
        return stream

    def _wake(self) -> None:
        """Hand the staged questions to the scheduler."""
        with self._cond:
            if self._staged:
                self._waiting.extend(self._staged)
                self._staged.clear()
                self._cond.notify()

    def prefix_grid(self, image_key: str) -> tuple[int, int, int] | None:
        """The grid of the image whose prefix KV is cached now under ``image_key``, or None. With it
        ``generate`` may get shape-only (meta) embeddings, and the fetch of the real ones can be
        skipped (it may still raise ``PrefixNotCached`` if the entry is evicted in between)."""
        entry = self._prefixes.get(image_key)
        return None if entry is None else entry.grid

    def shape_only_embeds(self, grid: Sequence[int]) -> torch.Tensor:
        """Meta embeddings [num_tokens, hidden] of an image of this grid: no data, for ``generate``
        on an image whose prefix KV is cached."""
        t, h, w = grid
        return torch.empty((t * h * w // self.spatial_merge_size**2, self.hidden_size), device="meta")

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {**self.counters, "active": len(self._active), "waiting": len(self._waiting) + len(self._staged),
                    "prefix_entries": len(self._prefixes), "cuda_graphs": self.runner.graphs,
                    "prefill_graphs": self.prefiller.graphs}

    def close(self) -> None:
        """Stop the scheduler; requests still queued or running fail with 503."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    # -- scheduler thread ------------------------------------------------------------------------

    def _run(self) -> None:
        closing = unavailable("engine_closed", "the LLM engine is shutting down")
        try:
            self._schedule()
        except BaseException:  # a step's error escaped its requests (say a sticky CUDA error): stop for good
            log.exception("LLM engine scheduler failed; the engine is closed")
            closing = unavailable("engine_closed", "the LLM engine stopped after an internal error")
        finally:  # nothing queued or running may wait forever, and nothing new is queued
            with self._cond:
                self._closed = True
                for request in [*self._waiting, *self._staged, *self._active.values()]:
                    request.stream._put(closing)
                self._waiting.clear()
                self._staged.clear()
                self._active.clear()

    def _schedule(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._closed and not self._waiting and not self._active and self._pending is None:
                        self._cond.wait()
                    if self._closed:
                        break
                    admitted = []
                    while self._waiting and len(self._active) + len(admitted) < self.max_batch_slots:
                        request = self._waiting.popleft()
                        if not request.stream.cancelled:
                            admitted.append(request)
                    free = [s for s in range(self.max_batch_slots) if s not in self._active]
                    for request, slot in zip(admitted, free[: len(admitted)], strict=True):
                        request.slot = slot
                        self._active[slot] = request
                if admitted:
                    started = time.perf_counter()
                    self._guard(admitted, lambda a=admitted: self._start(a))
                    self.admissions.append((started, len(admitted), time.perf_counter() - started))
                    self.counters["admissions"] += 1
                self._drop_cancelled()
                self._guard(list(self._active.values()), self._decode)

    def _guard(self, requests: list[_Request], work: Callable[[], None]) -> None:
        with batched_wakeups():
            try:
                work()
            except Exception as exc:  # noqa: BLE001 - the consumers get the error; the engine carries on
                log.exception("LLM engine step failed")
                error = exc if isinstance(exc, ApiError) else internal_error("the LLM engine")
                for request in requests:  # told first: releasing touches the device, which may fail again
                    request.stream._put(error)
                for request in requests:
                    self._release(request)

    def _next_tokens(self, rows: Sequence[tuple[_Request, int]], greedy: Sequence[int], logits: torch.Tensor
                     ) -> list[tuple[_Request, int]]:
        """Each request's next token from its row ``i`` of a step's outputs: ``greedy[i]``, or sampled
        from ``logits[i]`` [vocab]. A request whose own token fails (sampling from scores that are
        not finite, say) gets the error and leaves; the others go on."""
        picked = []
        for request, i in rows:
            try:
                token = greedy[i] if request.temperature <= 0 else sample_token(
                    logits[i], request.temperature, request.top_p, request.generator)
            except Exception:  # noqa: BLE001 - this request's failure, not its batch's
                log.exception("LLM engine: one question's next token failed")
                request.stream._put(internal_error("this question's answer"))
                self._release(request)
                continue
            picked.append((request, token))
        return picked

    def _release(self, request: _Request) -> None:
        with self._cond:
            if self._active.get(request.slot) is request:
                del self._active[request.slot]
                self.runner.clear_slot(request.slot)
                self.runner.scrub(request.slot, min(self.max_seq_len, max(request.written, request.cache_len)))

    def _drop_cancelled(self) -> None:
        for request in list(self._active.values()):
            if request.stream.cancelled:
                self._release(request)
        with self._cond:
            if any(r.stream.cancelled for r in self._waiting):  # runs every step: rebuild only when needed
                self._waiting = deque(r for r in self._waiting if not r.stream.cancelled)

    # -- prefill ---------------------------------------------------------------------------------

    def _prefill(self, rows: list[tuple[_Request, int, int]], *, logits: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Prompt tokens ``[start, end)`` of each request into its slot, all in one batch (padded to a
        bucket, a CUDA graph replay on CUDA, with ``prefill_graphs``) -> the logits [N, vocab] fp32
        and greedy tokens [N] at each row's last token (None without ``logits``: a prefix only fills
        the cache)."""
        batch = [prefill_row(r.prompt, r.positions, r.slot, start, end, r.embeds, r.deepstack) for r, start, end in rows]
        padded = self.prefiller.shape(batch, logits=logits).tokens
        for r, start, _ in rows:  # padding included: what _release scrubs
            r.written = max(r.written, start + padded)
        out, greedy = self.prefiller.run(self.prefill_fn, batch, logits=logits)
        self.counters["prefill_tokens"] += sum(end - start for _, start, end in rows)
        return None if out is None or greedy is None else (out, greedy)

    def _start(self, requests: list[_Request]) -> None:
        """Admit requests: image prefixes (reused, or computed once per image in one batch), then
        every question in one batch, then each request's first token."""
        if self.prefix_cache_entries <= 0:
            first = self._prefill([(r, 0, len(r.prompt.ids)) for r in requests])
        else:
            computing: dict[tuple[str, tuple[int, int, int], int], _Request] = {}
            copies: list[tuple[_Request, _Request]] = []
            for r in requests:
                p = r.prompt.prefix_len
                entry = self._prefixes.get(r.image_key)
                if r.prefix is not None and entry is not r.prefix:  # evicted since submission: pinned copy
                    entry = self._prefixes[r.image_key] = r.prefix
                r.prefix = None
                source = computing.get((r.image_key, r.grid, p))
                if entry is not None and entry.grid == r.grid and entry.kv.shape[3] == p:
                    self._prefixes.move_to_end(r.image_key)
                    self.kv[:, :, r.slot, :, :p] = entry.kv
                    self.counters["prefix_hits"] += 1
                elif source is not None:  # another request of this batch computes it
                    copies.append((r, source))
                    self.counters["prefix_hits"] += 1
                else:
                    computing[(r.image_key, r.grid, p)] = r
                    self.counters["prefix_misses"] += 1
            if computing:
                self._prefill([(r, 0, r.prompt.prefix_len) for r in computing.values()], logits=False)
                for r in computing.values():
                    p = r.prompt.prefix_len
                    self._prefixes[r.image_key] = _Prefix(self.kv[:, :, r.slot, :, :p].clone(), r.grid)
                    self._prefixes.move_to_end(r.image_key)
            while len(self._prefixes) > self.prefix_cache_entries:  # computed or pinned entries came in
                self._prefixes.popitem(last=False)
            for r, source in copies:
                p = r.prompt.prefix_len
                self.kv[:, :, r.slot, :, :p] = self.kv[:, :, source.slot, :, :p]
            first = self._prefill([(r, r.prompt.prefix_len, len(r.prompt.ids)) for r in requests])
        assert first is not None
        logits, greedy = first  # [N, vocab], [N]
        picked = self._next_tokens([(r, i) for i, r in enumerate(requests)], greedy.tolist(), logits)
        for r, _ in picked:
            r.cache_len = len(r.prompt.ids)
        # all slots in one copy, before _emit: a request that ends at its first token clears its slot
        self.runner.set_slots([r.slot for r, _ in picked], [token for _, token in picked],
                              [r.cache_len for r, _ in picked], [r.cache_len + r.rope_delta for r, _ in picked])
        for r, token in picked:
            self._emit(r, token)

    # -- decode ----------------------------------------------------------------------------------

    def _decode(self) -> None:
        """Launch the next step for every active slot, then hand out the tokens of the step before.

        With only greedy requests the step just launched feeds on the previous step's tokens on
        the device, so the host reads (and streams) step t while the GPU runs step t+1. A sampled
        request needs its token before the next step: then the new step is read at once too.
        """
        pending, self._pending = self._pending, None  # a failure drops it with every active request
        active = dict(self._active)
        # no step when every answer's last token is already on its way: a step that nobody reads would
        # delay the next admission's prefill behind it on the device
        more = any(len(r.tokens) + (pending is not None and pending.rows.get(s) is r) < r.max_tokens
                   for s, r in active.items())
        launched = self._launch(active) if more else None
        if pending is not None:
            self._process(pending)
        if launched is None:
            return
        if all(r.temperature <= 0 for r in launched.rows.values()):
            self._pending = launched
        else:
            self._process(launched)

    def _launch(self, active: dict[int, _Request]) -> _Launched:
        batch, window = self.runner.bucket(max(active) + 1, max(r.cache_len for r in active.values()) + 1)
        step = self.runner.launch(self.decode_fn, batch, window)
        for request in active.values():
            request.cache_len += 1
        self.counters["decode_steps"] += 1
        return _Launched(active, step)

    def _process(self, launched: _Launched) -> None:
        step = launched.step
        greedy = step.tokens()  # [batch], row = slot
        # those that finished (or left) while this step was on its way are skipped
        rows = [(request, slot) for slot, request in launched.rows.items()
                if self._active.get(slot) is request and not request.stream.cancelled]
        picked = self._next_tokens(rows, greedy, step.logits)
        sampled = [(request.slot, token) for request, token in picked if request.temperature > 0]
        for request, token in picked:
            self._emit(request, token)
        self.runner.set_tokens([slot for slot, _ in sampled], [token for _, token in sampled])

    def _emit(self, request: _Request, token: int) -> None:
        request.tokens.append(token)
        self.counters["generated_tokens"] += 1
        stop = token in self.eos_token_ids
        decoder = request.decoder
        if not stop and decoder is not None:
            text = decoder.push(token)
            request.text.append(text)
            request.stream._put(Delta(text, token))
        if stop or len(request.tokens) >= request.max_tokens:
            if decoder is None:
                answer = self.prompts.decode(request.tokens[:-1] if stop else request.tokens)
            else:
                tail = decoder.flush()
                if tail:
                    request.text.append(tail)
                    request.stream._put(Delta(tail, None))
                answer = "".join(request.text)
            self._release(request)
            request.stream._put(Finish("stop" if stop else "length", answer, tuple(request.tokens),
                                       len(request.prompt.ids), len(request.tokens)))

