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
``max_batch_slots`` slots. Each iteration it admits waiting requests into free slots (prefill),
then decodes one token for every active slot in a single ``decode_step`` batch, so concurrent
requests share each decode step. The prompt's per-image prefix (up to ``<|vision_end|>``) has
its KV computed once per ``image_key`` and kept in a bounded LRU on the device; later questions
on that image copy it into their slot and prefill only the question and the suffix.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from service.checkpoint import load_json, resolve_model_path
from service.errors import ApiError, unavailable
from service.llm.model import Qwen2LM, allocate_kv_cache, decode_step, load_model, prefill
from service.llm.prompt import Prompt, PromptBuilder, StreamDecoder, positions

log = logging.getLogger(__name__)


# -- events and the per-request stream ------------------------------------------------------------


@dataclass(frozen=True)
class Delta:
    """New answer text. One per generated token (not the EOS), with ``text`` "" while the token
    holds part of a UTF-8 character; at the very end possibly one more with ``token_id`` None that
    flushes an incomplete character (as U+FFFD, like HF's decode)."""

    text: str
    token_id: int | None


@dataclass(frozen=True)
class Finish:
    """The last event: ``text`` is the whole answer (the concatenation of the deltas' texts)."""

    finish_reason: Literal["stop", "length"]
    text: str
    token_ids: tuple[int, ...]  # generated ids, the EOS included when it stopped the answer
    prompt_tokens: int
    completion_tokens: int  # len(token_ids)


Event = Delta | Finish


class Generation:
    """The events of one request, delivered by the scheduler thread to one consumer.

    Iterate it once, with ``for`` or ``async for``; an error inside the engine is raised there.
    Leaving the loop early (or ``cancel()``) frees the request's slot.
    """

    def __init__(self, prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self._cond = threading.Condition()
        self._events: deque[Event | BaseException] = deque()
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None
        self._done = False  # Finish or an error was delivered
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def _put(self, event: Event | BaseException) -> None:
        with self._cond:
            self._events.append(event)
            self._done = self._done or not isinstance(event, Delta)
            self._cond.notify_all()
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            loop, fut = waiter
            try:
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(None))
            except RuntimeError:  # the consumer's loop is closed: nobody is listening
                self.cancelled = True

    @staticmethod
    def _deliver(event: Event | BaseException) -> Event:
        if isinstance(event, BaseException):
            raise event
        return event

    def __iter__(self) -> Iterator[Event]:
        try:
            while True:
                with self._cond:
                    while not self._events:
                        self._cond.wait()
                    event = self._deliver(self._events.popleft())
                yield event
                if isinstance(event, Finish):
                    return
        finally:
            self.cancel()  # a no-op once finished

    async def __aiter__(self) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        try:
            while True:
                with self._cond:
                    if self._events:
                        fut = None
                        event = self._deliver(self._events.popleft())
                    else:
                        fut = loop.create_future()
                        self._waiter = (loop, fut)
                if fut is not None:
                    await fut
                    continue
                yield event
                if isinstance(event, Finish):
                    return
        finally:
            self.cancel()

    def result(self) -> Finish:
        """Block until the answer is complete."""
        for event in self:
            if isinstance(event, Finish):
                return event
        raise RuntimeError("generation ended without a Finish event")


# -- sampling -------------------------------------------------------------------------------------


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """logits [vocab] fp32 -> a token id. Temperature 0 is greedy (argmax, ties to the lowest id);
    otherwise sample from softmax(logits / temperature) restricted to the smallest set of most
    likely tokens whose mass reaches ``top_p`` (the most likely token is always kept)."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = (sorted_probs.cumsum(0) - sorted_probs) < top_p  # mass strictly before each token
        choice = torch.multinomial(sorted_probs * keep, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


# -- the engine -----------------------------------------------------------------------------------


@dataclass
class _Request:
    prompt: Prompt
    embeds: torch.Tensor  # [num_image_tokens, hidden] on the device, model dtype
    grid: tuple[int, int, int]
    image_key: str
    positions: torch.Tensor  # [3, prompt_len] on the device
    rope_delta: int
    max_tokens: int
    temperature: float
    top_p: float
    generator: torch.Generator | None
    stream: Generation
    decoder: StreamDecoder
    slot: int = -1
    cache_len: int = 0  # tokens whose KV is in the slot
    tokens: list[int] = field(default_factory=list)  # generated so far
    text: list[str] = field(default_factory=list)


@dataclass
class _Prefix:
    kv: torch.Tensor  # [layers, 2, kv_heads, prefix_len, head_dim]
    grid: tuple[int, int, int]


class LLMEngine:
    """Greedy/sampled answers about one image, streamed; thread-safe ``generate``.

    ``max_seq_len`` is the context (prompt + max_tokens) a request may use, ``max_batch_slots``
    how many requests decode together (the rest wait), ``prefix_cache_entries`` how many image
    prefixes stay in device memory (0 turns reuse off: every prompt is prefilled whole).
    """

    def __init__(self, model: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 max_batch_slots: int = 8, max_seq_len: int | None = None, prefix_cache_entries: int = 32,
                 max_waiting: int = 256) -> None:
        path = resolve_model_path(model)
        self.device = torch.device(device)
        self.dtype = dtype
        self.model: Qwen2LM = load_model(path, device=self.device, dtype=dtype)
        self.prompts = PromptBuilder.from_checkpoint(path)
        config = load_json(path, "config.json")
        self.spatial_merge_size = int((config.get("vision_config") or {}).get("spatial_merge_size", 2))
        self.hidden_size = self.model.cfg.hidden_size
        self.max_seq_len = min(max_seq_len or 4096, self.model.cfg.max_position_embeddings)
        self.max_batch_slots = max_batch_slots
        self.prefix_cache_entries = prefix_cache_entries
        self.max_waiting = max_waiting
        self.eos_token_ids = frozenset(self.prompts.eos_token_ids)
        self.kv = allocate_kv_cache(self.model.cfg, max_batch_slots, self.max_seq_len, device=self.device, dtype=dtype)
        # the two model steps, replaceable by compiled / CUDA-graph versions with the same signatures
        self.prefill_fn = prefill
        self.decode_fn = decode_step
        self._prefixes: OrderedDict[str, _Prefix] = OrderedDict()
        self.counters = {"prefix_hits": 0, "prefix_misses": 0, "prefill_tokens": 0, "decode_steps": 0,
                         "generated_tokens": 0}
        self._cond = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._active: dict[int, _Request] = {}  # slot -> request
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self._thread.start()

    # -- public API ------------------------------------------------------------------------------

    def generate(self, image_embeds: torch.Tensor, grid_thw: Sequence[int] | torch.Tensor, image_key: str,
                 question: str, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None) -> Generation:
        """Queue one question about one image; returns its event stream at once.

        image_embeds [num_tokens, hidden] as the vision worker stored them (any dtype, any device);
        grid_thw the image's patch grid (t, h, w); image_key names the image's features (the
        caller makes it from fingerprint + image id) and keys the prefix-KV cache.
        Raises ``ApiError`` 422 for an empty question, parameters out of range or a prompt that
        with ``max_tokens`` exceeds ``max_seq_len`` (code ``context_length_exceeded``), 409 when the
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
        prompt = self.prompts.build(question, num_tokens)
        total = len(prompt.ids)
        if total + max_tokens > self.max_seq_len:
            raise ApiError(422, "context_length_exceeded", f"the prompt has {total} tokens; with max_tokens "
                           f"{max_tokens} it exceeds the context length of {self.max_seq_len}")
        pos, delta = positions(prompt.prefix_len, grid, merge, total, image_start=prompt.image_start)
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=self.device)
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)
        stream = Generation(total)
        request = _Request(prompt, image_embeds.to(self.device, self.dtype), grid, image_key, pos.to(self.device),
                           delta, max_tokens, temperature, top_p, generator, stream, self.prompts.decoder())
        with self._cond:
            if self._closed:
                raise unavailable("engine_closed", "the LLM engine is shutting down")
            if len(self._waiting) >= self.max_waiting:
                raise unavailable("overloaded", "too many questions are waiting; retry later")
            self._waiting.append(request)
            self._cond.notify()
        return stream

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {**self.counters, "active": len(self._active), "waiting": len(self._waiting),
                    "prefix_entries": len(self._prefixes)}

    def close(self) -> None:
        """Stop the scheduler; requests still queued or running fail with 503."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    # -- scheduler thread ------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._closed and not self._waiting and not self._active:
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
                for request in admitted:
                    self._guard([request], lambda r=request: self._start(r))
                self._drop_cancelled()
                if self._active:
                    self._guard(list(self._active.values()), self._decode)
        closing = unavailable("engine_closed", "the LLM engine is shutting down")
        with self._cond:
            for request in [*self._waiting, *self._active.values()]:
                request.stream._put(closing)
            self._waiting.clear()
            self._active.clear()

    def _guard(self, requests: list[_Request], work: Callable[[], None]) -> None:
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - the consumers get the error; the engine carries on
            log.exception("LLM engine step failed")
            for request in requests:
                self._release(request)
                request.stream._put(exc)

    def _release(self, request: _Request) -> None:
        with self._cond:
            if self._active.get(request.slot) is request:
                del self._active[request.slot]

    def _drop_cancelled(self) -> None:
        for request in list(self._active.values()):
            if request.stream.cancelled:
                self._release(request)
        with self._cond:
            self._waiting = deque(r for r in self._waiting if not r.stream.cancelled)

    def _embed(self, request: _Request, ids: list[int], offset: int) -> torch.Tensor:
        """ids -> [1, T, hidden], the image's rows replaced by its embeddings (ids start at ``offset``)."""
        x = self.model.embed(torch.tensor(ids, device=self.device))
        lo = request.prompt.image_start - offset
        n = request.prompt.num_image_tokens
        if lo >= 0 and lo + n <= len(ids):
            x[lo : lo + n] = request.embeds
        return x[None]

    def _prefill(self, request: _Request, start: int, end: int) -> torch.Tensor:
        """Prompt tokens [start, end) into the request's slot -> hidden of the last [hidden]"""
        ids = request.prompt.ids[start:end]
        slots = torch.tensor([request.slot], device=self.device)
        hidden = self.prefill_fn(self.model, self.kv, self._embed(request, ids, start),
                         request.positions[:, None, start:end], slots, start)
        self.counters["prefill_tokens"] += end - start
        return hidden[0, -1]

    def _start(self, request: _Request) -> None:
        prompt, slot = request.prompt, request.slot
        p, total = prompt.prefix_len, len(prompt.ids)
        if self.prefix_cache_entries <= 0:
            hidden = self._prefill(request, 0, total)
        else:
            entry = self._prefixes.get(request.image_key)
            if entry is not None and entry.grid == request.grid and entry.kv.shape[3] == p:
                self._prefixes.move_to_end(request.image_key)
                self.kv[:, :, slot, :, :p] = entry.kv
                self.counters["prefix_hits"] += 1
            else:
                self._prefill(request, 0, p)
                self._prefixes[request.image_key] = _Prefix(self.kv[:, :, slot, :, :p].clone(), request.grid)
                self._prefixes.move_to_end(request.image_key)
                while len(self._prefixes) > self.prefix_cache_entries:
                    self._prefixes.popitem(last=False)
                self.counters["prefix_misses"] += 1
            hidden = self._prefill(request, p, total)
        request.cache_len = total
        self._emit(request, sample_token(self.model.logits(hidden), request.temperature, request.top_p,
                                         request.generator))

    def _decode(self) -> None:
        active = dict(self._active)
        batch = max(active) + 1  # rows 0..batch-1 are slots 0..batch-1; idle rows compute harmlessly
        tokens = [0] * batch
        cache_pos = [0] * batch
        pos = [0] * batch
        for slot, request in active.items():
            tokens[slot] = request.tokens[-1]
            cache_pos[slot] = request.cache_len
            pos[slot] = request.cache_len + request.rope_delta
        length = _bucket(max(cache_pos) + 1, self.max_seq_len)
        dev = self.device
        logits = self.decode_fn(self.model, self.kv[:, :, :batch, :, :length], torch.tensor(tokens, device=dev),
                             torch.tensor(pos, device=dev).expand(3, -1), torch.tensor(cache_pos, device=dev))
        self.counters["decode_steps"] += 1
        greedy = torch.argmax(logits, dim=-1).tolist()
        for slot, request in active.items():
            request.cache_len += 1
            token = greedy[slot] if request.temperature <= 0 else sample_token(
                logits[slot], request.temperature, request.top_p, request.generator)
            self._emit(request, token)

    def _emit(self, request: _Request, token: int) -> None:
        request.tokens.append(token)
        self.counters["generated_tokens"] += 1
        stop = token in self.eos_token_ids
        if not stop:
            text = request.decoder.push(token)
            request.text.append(text)
            request.stream._put(Delta(text, token))
        if stop or len(request.tokens) >= request.max_tokens:
            tail = request.decoder.flush()
            if tail:
                request.text.append(tail)
                request.stream._put(Delta(tail, None))
            self._release(request)
            request.stream._put(Finish("stop" if stop else "length", "".join(request.text), tuple(request.tokens),
                                       len(request.prompt.ids), len(request.tokens)))


def _bucket(needed: int, limit: int) -> int:
    """Cache positions one decode step attends over: a power of two >= needed (few distinct shapes)."""
    size = 64
    while size < needed:
        size *= 2
    return min(size, limit)
