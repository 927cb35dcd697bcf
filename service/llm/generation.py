"""What a question's consumer receives: ``Delta`` and ``Finish`` events, through a ``Generation``.

The engine's scheduler thread puts events; one consumer takes them, blocking (``for``) or on an
event loop (``async for`` / ``final``), where it awaits a future that the scheduler resolves with
``call_soon_threadsafe``, so the loop never blocks. ``batched_wakeups`` groups the wake-ups of one
scheduler step into one callback per event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Literal


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


_wakeups = threading.local()  # .batch: the scheduler step's wake-ups, per event loop (batched_wakeups)


def _post(loop: asyncio.AbstractEventLoop, waiters: list[tuple[asyncio.Future[None], Generation]]) -> None:
    def resolve() -> None:
        for fut, _ in waiters:
            if not fut.done():
                fut.set_result(None)

    try:
        loop.call_soon_threadsafe(resolve)
    except RuntimeError:  # the consumers' loop is closed: nobody is listening
        for _, generation in waiters:
            generation.cancelled = True


@contextlib.contextmanager
def batched_wakeups() -> Iterator[None]:
    """Consumers woken inside it on event loops are woken at its end, once per loop: the consumers
    of one scheduler step (say 32 answers that finished together) then resume in the same round of
    their loop, and the questions they ask next are admitted together (see ``LLMEngine.generate``)."""
    batch: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[None], Generation]]] = {}
    _wakeups.batch = batch
    try:
        yield
    finally:
        _wakeups.batch = None
        for loop, waiters in batch.items():
            _post(loop, waiters)


class Generation:
    """The events of one request, delivered by the scheduler thread to one consumer.

    Iterate it once, with ``for`` or ``async for``; an error inside the engine is raised there.
    Leaving the loop early (or ``cancel()``) frees the request's slot.
    """

    def __init__(self, prompt_tokens: int, wake: Callable[[], None] | None = None) -> None:
        self.prompt_tokens = prompt_tokens
        self._wake = wake  # the engine's: a blocking consumer on an event loop thread must not wait for the loop
        self._cond = threading.Condition()
        self._events: deque[Event | BaseException] = deque()
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None
        self._done = False  # Finish or an error was delivered
        self.cancelled = False
        # wall clock (ns) at submission and at the first event (prefill done): the trace's phases
        self.started_ns = time.time_ns()
        self.first_event_ns: int | None = None

    def cancel(self) -> None:
        self.cancelled = True

    def abandon(self, error: BaseException) -> None:
        """Cancel, and have the consumer waiting for the next event (say in ``final``) raise ``error``
        now rather than at its timeout: the engine frees the slot and sends nothing more."""
        self.cancel()
        self._put(error)

    def _put(self, event: Event | BaseException) -> None:
        if self.first_event_ns is None:
            self.first_event_ns = time.time_ns()
        with self._cond:
            self._events.append(event)
            self._done = self._done or not isinstance(event, Delta)
            self._cond.notify_all()
            waiters = [self._waiter] if self._waiter is not None else []
            self._waiter = None
        batch = getattr(_wakeups, "batch", None)
        for loop, fut in waiters:
            if batch is not None:
                batch.setdefault(loop, []).append((fut, self))
            else:
                _post(loop, [(fut, self)])

    @staticmethod
    def _deliver(event: Event | BaseException) -> Event:
        if isinstance(event, BaseException):
            raise event
        return event

    def __iter__(self) -> Iterator[Event]:
        if self._wake is not None:  # queued from this thread's event loop, which now blocks here
            self._wake()
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

    async def next_event(self) -> Event:
        """The next event, on an event loop (woken by the scheduler through a future); an engine
        failure is raised here. Whoever stops before the ``Finish`` calls ``cancel()``."""
        while True:
            with self._cond:
                if self._events:
                    return self._deliver(self._events.popleft())
                loop = asyncio.get_running_loop()
                fut = loop.create_future()
                self._waiter = (loop, fut)
            await fut

    async def __aiter__(self) -> AsyncIterator[Event]:
        try:
            while True:
                event = await self.next_event()
                yield event
                if isinstance(event, Finish):
                    return
        finally:
            self.cancel()

    async def final(self) -> Finish:
        """The Finish event (the deltas' text is in ``Finish.text``); an engine failure is raised here.
        A generation made with ``deltas=False`` has no deltas, so its loop is woken once."""
        # not ``async for event in self``: an async generator left before its end is closed by the
        # loop's finalizer hook, a call_soon_threadsafe (a write to the loop's self-pipe) and an
        # aclose task, per answer
        try:
            while True:
                event = await self.next_event()
                if isinstance(event, Finish):
                    return event
        finally:
            self.cancel()  # a no-op once finished

    def result(self) -> Finish:
        """Block until the answer is complete."""
        for event in self:
            if isinstance(event, Finish):
                return event
        raise RuntimeError("generation ended without a Finish event")
