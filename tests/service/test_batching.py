"""The batch queue packs concurrent jobs and resolves or fails every one of them."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.batching import BatchQueue
from service.errors import ApiError


def make_queue(run, **kw) -> BatchQueue[int, int]:
    opts = {"cost": lambda x: 1, "max_cost": 4, "max_wait_s": 0.05, "max_queue": 8, "timeout_s": 5.0}
    opts.update(kw)
    return BatchQueue(run, **opts)


async def test_concurrent_jobs_share_a_batch():
    sizes: list[int] = []

    def run(items):
        sizes.append(len(items))
        return [x * 10 for x in items]

    q = make_queue(run, max_queue=16)
    q.start()
    results = await asyncio.gather(*(q.submit(i) for i in range(10)))
    await q.stop()
    assert results == [i * 10 for i in range(10)]
    assert max(sizes) == 4 and sum(sizes) == 10


async def test_cost_budget_carries_overflow():
    batches: list[list[int]] = []

    def run(items):
        batches.append(list(items))
        return items

    q = make_queue(run, cost=lambda x: x, max_cost=5)
    q.start()
    await asyncio.gather(q.submit(3), q.submit(3), q.submit(2))
    await q.stop()
    assert all(sum(b) <= 5 or len(b) == 1 for b in batches)


async def test_full_queue_is_503():
    gate = threading.Event()

    def run(items):
        gate.wait(5)
        return items

    q = make_queue(run, max_queue=2, max_cost=1, max_wait_s=0)
    q.start()
    first = asyncio.create_task(q.submit(0))
    await asyncio.sleep(0.05)  # the loop holds job 0 in the executor
    queued = [asyncio.create_task(q.submit(i)) for i in (1, 2)]
    await asyncio.sleep(0.01)
    with pytest.raises(ApiError) as err:
        await q.submit(3)
    assert err.value.status == 503 and err.value.retry_after
    gate.set()
    assert await first == 0 and [await t for t in queued] == [1, 2]
    await q.stop()


async def test_failure_fails_the_batch_and_loop_survives():
    calls = 0

    def run(items):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return items

    q = make_queue(run, max_wait_s=0)
    q.start()
    with pytest.raises(ApiError) as err:
        await q.submit(1)
    assert err.value.status == 500
    assert await q.submit(2) == 2
    await q.stop()


async def test_timeout_and_stop_resolve_everything():
    def run(items):
        time.sleep(0.5)
        return items

    q = make_queue(run, timeout_s=0.1, max_wait_s=0)
    q.start()
    with pytest.raises(ApiError) as err:
        await q.submit(1)
    assert err.value.code == "timeout"
    pending = [asyncio.create_task(q.submit(i)) for i in range(3)]
    await asyncio.sleep(0.01)
    await q.stop()
    for task in pending:
        with pytest.raises(ApiError):
            await task
