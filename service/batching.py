"""Dynamic batching: concurrent requests packed into one model call.

A bounded queue feeds one background loop. The loop takes the first waiting job, keeps taking
jobs until the batch's cost budget (patches, for the vision tower) is spent or ``max_wait_s``
has passed since the first, and runs the batch on one executor thread (the device runs one
batch at a time, the event loop stays free). Every job ends resolved or failed: a full queue
fails at once with 503, a job past its deadline fails with 503, a batch that raises fails all
its jobs, and ``stop`` fails whatever is still queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from service.errors import ApiError, unavailable

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
        run_batch: Callable[[list[T]], list[R]],
        *,
        cost: Callable[[T], int],
        max_cost: int,
        max_wait_s: float,
        max_queue: int,
        timeout_s: float,
        name: str = "batch",
        on_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._cost = cost
        self.max_cost = max_cost
        self.max_wait_s = max_wait_s
        self.timeout_s = timeout_s
        self.name = name
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Job[T, R]] = asyncio.Queue(maxsize=max_queue)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-device")
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
        stopped = unavailable("shutting_down", "the worker is shutting down; retry on another worker")
        pending = [self._carry] if self._carry else []
        self._carry = None
        while not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for job in pending:
            if not job.future.done():
                job.future.set_exception(stopped)
        self._executor.shutdown(wait=False, cancel_futures=True)

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
            future.cancel()  # the loop skips cancelled jobs; a running batch just drops this result
            raise unavailable(
                "timeout", f"the {self.name} did not finish within {self.timeout_s:g} s; retry shortly", 2.0
            ) from None

    async def _next_batch(self) -> list[_Job[T, R]]:
        first = self._carry or await self._queue.get()
        self._carry = None
        batch, spent = [first], first.cost
        deadline = first.enqueued + self.max_wait_s
        while spent < self.max_cost:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), timeout=remaining)
                except TimeoutError:
                    break
            if spent + job.cost > self.max_cost:
                self._carry = job
                break
            batch.append(job)
            spent += job.cost
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [job for job in await self._next_batch() if not job.future.done()]
            if not batch:
                continue
            if self._on_batch:
                try:
                    self._on_batch(len(batch), sum(j.cost for j in batch))
                except Exception:  # noqa: BLE001 - an observer must not stop the loop (every job would hang)
                    log.exception("%s on_batch hook failed", self.name)
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, [j.item for j in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch returned {len(results)} results for {len(batch)} jobs")
            except asyncio.CancelledError:
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(unavailable("shutting_down", "the worker is shutting down"))
                raise
            except ApiError as exc:
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            except Exception as exc:  # noqa: BLE001 - must fail the jobs, never leave them hanging
                log.exception("%s batch of %d failed", self.name, len(batch))
                err = ApiError(500, "internal_error", f"the {self.name} failed: {type(exc).__name__}: {exc}")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(err)
                continue
            for job, result in zip(batch, results, strict=True):
                if not job.future.done():
                    job.future.set_result(result)
