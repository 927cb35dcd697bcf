"""Dynamic batching: concurrent requests packed into one model call.

A bounded queue feeds one background loop. The loop takes the first waiting job, keeps taking
jobs until the batch's cost budget (patches, for the vision tower) is spent or ``max_wait_s``
has passed since the first, and runs the batch on one executor thread (the device runs one
batch at a time, the event loop stays free). With ``finish``, a batch runs in two stages:
``run_batch`` launches it (device work queued, results on their way to the host) and returns,
``finish`` (on a second thread) waits for the results; the loop launches the next batch in the
meantime, so the device is never idle while jobs wait (at most ``max_in_flight`` batches).
Every job ends resolved or failed: a full queue fails at once with 503, a job past its deadline
fails with 503, a batch that raises in either stage fails all its jobs, and ``stop`` fails
whatever is still queued or in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from service.errors import ApiError, internal_error, unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Job(Generic[T, R]):
    item: T
    cost: int
    future: asyncio.Future[R]
    enqueued: float = field(default_factory=time.monotonic)


class BatchQueue(Generic[T, R]):
    def __init__(
        self,
        run_batch: Callable[[list[T]], Any],  # the results, or what ``finish`` turns into them
        *,
        cost: Callable[[T], int],
        max_cost: int,
        max_wait_s: float,
        max_queue: int,
        timeout_s: float,
        name: str = "batch",
        on_batch: Callable[[int, int], None] | None = None,
        finish: Callable[[Any], list[R]] | None = None,
        max_in_flight: int = 2,
    ) -> None:
        self._run_batch = run_batch
        self._finish = finish
        self._cost = cost
        self.max_cost = max_cost
        self.max_wait_s = max_wait_s
        self.timeout_s = timeout_s
        self.name = name
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Job[T, R]] = asyncio.Queue(maxsize=max_queue)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-device")
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-finish") if finish else None
        self._slots = asyncio.Semaphore(max_in_flight if finish else 1)
        self._finishing: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._carry: _Job[T, R] | None = None  # a job that did not fit the previous batch

    @property
    def depth(self) -> int:
        return self._queue.qsize() + (1 if self._carry else 0)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"{self.name}-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for task in list(self._finishing):  # their jobs fail with shutting_down
            task.cancel()
        await asyncio.gather(*self._finishing, return_exceptions=True)
        stopped = unavailable("shutting_down", "the worker is shutting down; retry on another worker")
        pending = [self._carry] if self._carry else []
        self._carry = None
        while not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for job in pending:
            if not job.future.done():
                job.future.set_exception(stopped)
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._finisher is not None:
            self._finisher.shutdown(wait=False, cancel_futures=True)

    async def submit(self, item: T) -> R:
        if self._task is None or self._task.done():
            raise unavailable("not_ready", f"the {self.name} loop is not running")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        job = _Job(item, self._cost(item), future)
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise unavailable(
                "overloaded", f"the {self.name} queue is full ({self._queue.maxsize} waiting); retry shortly"
            ) from None
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout=self.timeout_s)
        except TimeoutError:
            raise unavailable(
                "timeout", f"the {self.name} did not finish within {self.timeout_s:g} s; retry shortly", 2.0
            ) from None
        finally:  # timed out, or the caller was cancelled (its own deadline, say)
            future.cancel()  # the loop skips cancelled jobs; a running batch just drops this result

    async def _next_batch(self) -> list[_Job[T, R]]:
        first = self._carry or await self._queue.get()
        self._carry = None
        batch, spent = [first], first.cost
        deadline = first.enqueued + self.max_wait_s
        try:
            while spent < self.max_cost:
                try:
                    job = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        # asyncio.timeout, not wait_for: on 3.11 wait_for may return a get() that finished
                        # as stop() cancelled this task, swallowing the cancellation (stop would hang)
                        async with asyncio.timeout(remaining):
                            job = await self._queue.get()
                    except TimeoutError:
                        break
                if spent + job.cost > self.max_cost:
                    self._carry = job
                    break
                batch.append(job)
                spent += job.cost
        except BaseException as exc:  # stopped while gathering: these jobs are in no queue stop() drains
            self._fail(batch, exc)
            raise
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # A slot first, then the batch: jobs that arrive while every slot is busy join it, and until
            # it is formed they stay queued, where stop() fails them. Released when the batch's results
            # are in (or it failed).
            await self._slots.acquire()
            try:
                batch = [job for job in await self._next_batch() if not job.future.done()]
            except BaseException:
                self._slots.release()
                raise
            if not batch:
                self._slots.release()
                continue
            if self._on_batch:
                try:
                    self._on_batch(len(batch), sum(j.cost for j in batch))
                except Exception:  # noqa: BLE001 - an observer must not stop the loop (every job would hang)
                    log.exception("%s on_batch hook failed", self.name)
            try:
                out = await loop.run_in_executor(self._executor, self._run_batch, [j.item for j in batch])
            except BaseException as exc:
                self._slots.release()
                self._fail(batch, exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            if self._finish is None:
                self._slots.release()
                self._resolve(batch, out)
                continue
            task = loop.create_task(self._complete(batch, out), name=f"{self.name}-finish")
            self._finishing.add(task)
            task.add_done_callback(self._finishing.discard)

    async def _complete(self, batch: list[_Job[T, R]], launched: Any) -> None:
        """The second stage: wait (on the finisher thread) for a launched batch's results."""
        assert self._finish is not None and self._finisher is not None
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._finisher, self._finish, launched)
        except BaseException as exc:  # noqa: BLE001 - every job is failed, the loop carries on
            self._fail(batch, exc)
            return
        finally:
            self._slots.release()
        self._resolve(batch, results)

    def _resolve(self, batch: list[_Job[T, R]], results: list[R]) -> None:
        if len(results) != len(batch):
            self._fail(batch, RuntimeError(f"batch returned {len(results)} results for {len(batch)} jobs"))
            return
        for job, result in zip(batch, results, strict=True):
            if not job.future.done():
                job.future.set_result(result)

    def _fail(self, batch: list[_Job[T, R]], exc: BaseException) -> None:
        """Every job of the batch gets an error: ours as is, shutdown as 503, anything else as 500."""
        if isinstance(exc, asyncio.CancelledError):
            err: ApiError = unavailable("shutting_down", "the worker is shutting down")
        elif isinstance(exc, ApiError):
            err = exc
        else:
            log.error("%s batch of %d failed", self.name, len(batch), exc_info=exc)
            err = internal_error(f"the {self.name}")
        for job in batch:
            if not job.future.done():
                job.future.set_exception(err)
