"""The LLM worker's request path: image id -> cached features (Redis) -> engine -> answer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence

import torch
from starlette.types import Receive

from service import tracing
from service.checkpoint import Checkpoint, open_checkpoint
from service.config import Settings
from service.errors import ApiError, unavailable
from service.fingerprint import model_key
from service.llm.engine import LLMEngine, PrefixNotCached
from service.llm.generation import Delta, Finish, Generation
from service.metrics import Metrics
from service.store import FeatureStore, ImageRecord

log = logging.getLogger(__name__)


def trace_phases(generation: Generation) -> None:
    """The answer's prefill (queued until the first token) and decode, as spans of the request."""
    if generation.first_event_ns is not None:
        tracing.phase("prefill", generation.started_ns, generation.first_event_ns,
                      prompt_tokens=generation.prompt_tokens)
        tracing.phase("decode", generation.first_event_ns, tracing.now_ns())


class LLMWorker:
    def __init__(self, settings: Settings, store: FeatureStore, metrics: Metrics,
                 engine: LLMEngine | None = None, fingerprint: str | None = None,
                 checkpoint: Checkpoint | None = None) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        checkpoint = engine.checkpoint if engine is not None else open_checkpoint(checkpoint or settings.model)
        self.engine = engine or LLMEngine(
            checkpoint,
            device=settings.resolved_device(),
            dtype=settings.resolved_dtype(),
            max_batch_slots=settings.max_batch_size,
            prefix_cache_entries=settings.prefix_cache_entries,
            max_waiting=settings.max_queue,
        )
        self.owns_engine = engine is None
        self.model_key = model_key(checkpoint)
        # Known at once when a vision worker shares this process; else learned from the registry
        # that vision workers of this checkpoint write (this worker never reads visual weights).
        self._fingerprint = fingerprint
        self._from_registry = fingerprint is None

    async def start(self) -> None:
        try:
            await self.fingerprint()
        except ApiError:
            log.warning("Redis unreachable at start; the model fingerprint will be looked up on first use")

    async def stop(self) -> None:
        if self.owns_engine:
            await asyncio.get_running_loop().run_in_executor(None, self.engine.close)

    async def fingerprint(self) -> str | None:
        if self._fingerprint is None:
            self._fingerprint = await self.store.registered_fingerprint(self.model_key)
        return self._fingerprint

    async def features(self, image_id: str, *, with_embeds: bool = True) -> ImageRecord:
        fingerprint = await self.fingerprint()
        with tracing.span("feature fetch", embeddings=with_embeds):
            record = await self.store.get(fingerprint, image_id, with_embeds=with_embeds) if fingerprint else None
            if record is None and fingerprint is not None and self._from_registry:
                # the registry may name another fingerprint by now (vision workers of a new version, or it
                # held junk when we read it): on a miss, look once more
                fresh = await self.store.registered_fingerprint(self.model_key)
                if fresh is not None and fresh != fingerprint:
                    log.info("model fingerprint %s -> %s (from the registry)", fingerprint, fresh)
                    self._fingerprint = fingerprint = fresh
                    record = await self.store.get(fingerprint, image_id, with_embeds=with_embeds)
        if record is not None:
            self.metrics.cache.labels("features", "hit").inc()
            return record
        self.metrics.cache.labels("features", "miss").inc()
        if fingerprint is None:
            raise ApiError(404, "image_not_found",
                           f"image {image_id} is not stored: no vision worker for this model has stored features yet; "
                           "upload the image to POST /v1/images first")
        other = await self.store.other_fingerprint(fingerprint, image_id)
        if other is not None:
            raise ApiError(409, "fingerprint_mismatch",
                           f"image {image_id} was encoded by another model (fingerprint {other}, this worker serves "
                           f"{fingerprint}): upload it to a vision worker of this model")
        raise ApiError(404, "image_not_found",
                       f"image {image_id} is not stored (never uploaded, deleted or evicted): upload it again")

    def check_limits(self, question: str, max_tokens: int) -> None:
        if max_tokens > self.settings.max_new_tokens:
            raise ApiError(422, "invalid_request",
                           f"max_tokens is {max_tokens}; this server allows at most {self.settings.max_new_tokens}")
        # a cheap bound before any Redis work; the exact token count is checked where the prompt is built
        if len(question) > self.settings.max_question_tokens * 16:
            raise ApiError(422, "question_too_long", f"the question is over {self.settings.max_question_tokens} tokens")

    async def ask(self, image_id: str, question: str, *, max_tokens: int, temperature: float, top_p: float,
                  seed: int | None = None, stream: bool = True) -> Generation:
        """Queue the question; ``stream=False`` when only the whole answer is wanted (``answer``)."""
        if not question.strip():
            raise ApiError(422, "invalid_request", "question is empty: ask something about the image")
        self.check_limits(question, max_tokens)
        fingerprint = await self.fingerprint()
        key = f"{fingerprint}:{image_id}"
        grid = self.engine.prefix_grid(key) if fingerprint is not None else None
        if grid is not None:
            # The engine holds the image's prefix KV: it needs no embeddings, so start at once and
            # meanwhile read only the record's metadata (it must still exist: a deleted or evicted
            # image is not answered). The Redis round trip overlaps the prefill instead of preceding
            # it, and ~0.8 MB (2B) to 1.8 MB (7B) per question is neither moved nor checksummed.
            shape_only = self.engine.shape_only_embeds(grid)
            try:
                generation = self._generate(shape_only, grid, key, question, max_tokens, temperature, top_p, seed,
                                            stream)
            except PrefixNotCached:  # evicted in between: fetch the embeddings after all
                pass
            else:
                try:
                    record = await self.features(image_id, with_embeds=False)
                except BaseException:
                    generation.cancel()
                    raise
                if (tuple(record.grid_thw) == grid and record.embeds.shape == shape_only.shape
                        and record.deepstack_layers == self.engine.deepstack_layers):
                    return generation
                generation.cancel()  # the record disagrees with the cached prefix: it decides (or is refused)
        record = await self.features(image_id)
        return self._generate(record.embeds, record.grid_thw, f"{record.fingerprint}:{image_id}", question,
                              max_tokens, temperature, top_p, seed, stream, record.deepstack)

    def _generate(self, embeds: torch.Tensor, grid: Sequence[int], key: str, question: str, max_tokens: int,
                  temperature: float, top_p: float, seed: int | None, stream: bool,
                  deepstack: torch.Tensor | None = None) -> Generation:
        return self.engine.generate(embeds, grid, key, question, max_tokens, temperature, top_p, seed,
                                    self.settings.max_question_tokens, deltas=stream, deepstack=deepstack)

    async def events(self, generation: Generation) -> AsyncIterator[Delta | Finish]:
        """The generation's events, failing with 503 when it runs past the request timeout."""
        deadline = asyncio.get_running_loop().time() + self.settings.request_timeout_s
        try:
            while True:
                # a timer per event, not a task: wait_for wrapped each token's wait in a new task
                try:
                    async with asyncio.timeout_at(deadline):
                        event = await generation.next_event()
                except TimeoutError:
                    raise self._timeout() from None
                yield event
                if isinstance(event, Finish):
                    trace_phases(generation)
                    return
        finally:
            generation.cancel()  # a no-op once finished; frees the slot of a client that left

    def _timeout(self) -> ApiError:
        return unavailable("timeout", f"the answer took longer than {self.settings.request_timeout_s:g} s; "
                           "retry with a smaller max_tokens or later", 2.0)

    async def answer(self, generation: Generation, receive: Receive | None = None) -> Finish:
        """The final event only: one timeout for the whole answer, and the event loop is woken once,
        not once per token. With the request's ``receive`` (its body already read), a client that
        disconnects abandons the generation at once: its slot and the tokens it would still have
        decoded go to other questions (a streamed answer is cancelled by its response instead)."""
        watch = None if receive is None else asyncio.ensure_future(_disconnected(receive))
        if watch is not None:
            watch.add_done_callback(lambda w: w.cancelled() or generation.abandon(ApiError(
                499, "client_closed_request", "the client closed the connection before the answer was complete")))
        # awaited in the request's own task: wait_for would run it in a new task, one more hop
        # through the event loop at the start and one at the end
        try:  # final() cancels the generation when it is left early
            async with asyncio.timeout(self.settings.request_timeout_s):
                finish = await generation.final()
            trace_phases(generation)
            return finish
        except TimeoutError:
            raise self._timeout() from None
        finally:
            if watch is not None:
                watch.cancel()


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (the server's ``http.disconnect``); the body was read before."""
    while (await receive())["type"] != "http.disconnect":
        pass
