"""The threads that decode uploads: a bounded queue, and a lane that keeps cheap images moving.

A decode holds its thread for as long as it takes, which the decode budget bounds but does not make
short: a few images near the budget could hold every thread while small uploads queue behind them
(four crafted JPEGs made a 64x64 upload wait 69 s). So jobs wait in two FIFO queues, light and
heavy. A free thread takes the oldest light job first, and at most ``threads - 1`` heavy jobs run at
once: one thread is always left to light ones. A job's weight is its decoding work, known from the
header before any pixel is decoded (``VisionWorker`` opens the image as a light job, and queues the
decode as a heavy one when its work is over ``HEAVY_WORK``).

More than ``max_waiting`` waiting jobs: 503 ``overloaded`` at once. A caller that stops waiting
(its request timed out) takes its job out of the queue; one already running finishes on its thread
and its result is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from service.errors import unavailable

R = TypeVar("R")

# decoding work (pixel-passes) from which a decode runs in the heavy lane: a 4-megapixel JPEG with
# four scans, tens of milliseconds of a core
HEAVY_WORK = 16_000_000


@dataclass(eq=False)
class _Job:
    call: Callable[[], Any]
    heavy: bool
    future: asyncio.Future[Any] = field(repr=False)
    taken: bool = False  # off the queue: running, done or failed by shutdown


def _stopped_error() -> Exception:
    return unavailable("shutting_down", "the worker is shutting down; retry on another worker")


class DecodePool:
    def __init__(self, threads: int, max_waiting: int, *, name: str = "preprocess") -> None:
        self.threads = threads
        self.max_waiting = max_waiting
        self.max_heavy = max(1, threads - 1)
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix=name)
        self._waiting: dict[bool, deque[_Job]] = {False: deque(), True: deque()}  # heavy? -> jobs
        self._idle = threads
        self._heavy_running = 0
        self._stopped = False

    @property
    def depth(self) -> int:
        return len(self._waiting[False]) + len(self._waiting[True])

    @property
    def running(self) -> int:
        return self.threads - self._idle

    async def run(self, fn: Callable[..., R], *args: Any, heavy: bool = False) -> R:
        """``fn(*args)`` on a decoding thread; 503 at once when the queue is full or the pool stopped."""
        if self._stopped:  # an upload that arrives while the server drains
            raise _stopped_error()
        if self.depth >= self.max_waiting:
            raise unavailable("overloaded", f"the image decoding queue is full ({self.depth} waiting); retry shortly")
        job = _Job(functools.partial(fn, *args), heavy, asyncio.get_running_loop().create_future())
        self._waiting[heavy].append(job)
        self._dispatch()
        try:
            return await job.future
        finally:
            if not job.taken:  # we stopped waiting (cancelled) before it ran: it leaves the queue
                self._waiting[heavy].remove(job)

    def _next(self) -> _Job | None:
        light, heavy = self._waiting[False], self._waiting[True]
        if light:
            return light.popleft()
        if heavy and self._heavy_running < self.max_heavy:
            return heavy.popleft()
        return None

    def _dispatch(self) -> None:
        while self._idle:
            job = self._next()
            if job is None:
                return
            job.taken = True
            self._idle -= 1
            self._heavy_running += job.heavy
            done = self._executor.submit(job.call)
            done.add_done_callback(functools.partial(self._finished_threadsafe, job, asyncio.get_running_loop()))

    def _finished_threadsafe(self, job: _Job, loop: asyncio.AbstractEventLoop, done: Future[Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(self._finished, job, done)

    def _finished(self, job: _Job, done: Future[Any]) -> None:
        self._idle += 1
        self._heavy_running -= job.heavy
        if not job.future.done():
            if done.cancelled():
                job.future.cancel()
            elif (exc := done.exception()) is not None:
                job.future.set_exception(exc)
            else:
                job.future.set_result(done.result())
        self._dispatch()

    def shutdown(self) -> None:
        """Stop: waiting jobs fail with 503, running ones finish on their threads unheard."""
        self._stopped = True
        stopped = _stopped_error()
        for queue in self._waiting.values():
            while queue:
                job = queue.popleft()
                job.taken = True
                if not job.future.done():
                    job.future.set_exception(stopped)
        self._executor.shutdown(wait=False, cancel_futures=True)
