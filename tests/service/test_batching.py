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


# -- two stages: launch, then finish on another thread ---------------------------------------------


async def test_next_batch_launches_while_the_previous_finishes():
    launched: list[list[int]] = []
    second_launched = threading.Event()

    def launch(items):
        launched.append(list(items))
        if len(launched) == 2:
            second_launched.set()
        return list(items)

    def finish(items):
        if items == launched[0]:  # the first batch's results come only once the second is launched
            assert second_launched.wait(5), "the second batch waited for the first to finish"
        return [x * 10 for x in items]

    q = make_queue(launch, finish=finish, max_cost=2, max_wait_s=0)
    q.start()
    results = await asyncio.gather(*(q.submit(i) for i in range(4)))
    await q.stop()
    assert results == [0, 10, 20, 30]
    assert len(launched) >= 2


async def test_in_flight_batches_are_bounded():
    gate = threading.Event()
    launched: list[int] = []

    def launch(items):
        launched.append(len(items))
        return items

    def finish(items):
        gate.wait(5)
        return items

    q = make_queue(launch, finish=finish, max_cost=1, max_wait_s=0, max_in_flight=2)
    q.start()
    tasks = [asyncio.create_task(q.submit(i)) for i in range(4)]
    deadline = time.monotonic() + 5
    while len(launched) < 2 and time.monotonic() < deadline:  # (a slow runner takes a while to launch two)
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # time in which a third launch would show up
    assert len(launched) == 2  # the third waits for a slot
    gate.set()
    assert await asyncio.gather(*tasks) == [0, 1, 2, 3]
    await q.stop()


async def test_a_failing_finish_fails_its_jobs_and_the_loop_goes_on():
    def finish(items):
        if 0 in items:
            raise RuntimeError("device fault")
        return items

    q = make_queue(lambda items: items, finish=finish, max_cost=1, max_wait_s=0)
    q.start()
    with pytest.raises(ApiError) as err:
        await q.submit(0)
    # a bug's 500: what failed stays in the server's log
    assert err.value.status == 500 and err.value.code == "internal_error" and "device fault" not in err.value.message
    assert await q.submit(1) == 1
    await q.stop()


def held_finish():
    """A finish stage that signals ``finishing`` and then holds its batch until ``gate`` is set."""
    gate = threading.Event()
    finishing = threading.Event()

    def finish(items):
        finishing.set()
        gate.wait(5)
        return items

    return finish, finishing, gate


async def test_stop_fails_batches_in_flight():
    finish, finishing, gate = held_finish()
    q = make_queue(lambda items: items, finish=finish, max_cost=1, max_wait_s=0)
    q.start()
    job = asyncio.create_task(q.submit(7))
    assert await asyncio.to_thread(finishing.wait, 5)  # launched and finishing: in flight, not queued
    await q.stop()
    with pytest.raises(ApiError) as err:
        await job
    assert err.value.status == 503 and err.value.code == "shutting_down"
    gate.set()


async def test_stop_fails_a_job_waiting_for_a_free_slot_at_once():
    """With every slot busy, the next job waits in the queue (not in a half-formed batch), so stop()
    fails it with shutting_down at once rather than leaving it to its timeout."""
    finish, finishing, gate = held_finish()
    q = make_queue(lambda items: items, finish=finish, max_cost=1, max_wait_s=0, max_in_flight=1, timeout_s=30)
    q.start()
    first = asyncio.create_task(q.submit(1))
    assert await asyncio.to_thread(finishing.wait, 5)
    second = asyncio.create_task(q.submit(2))
    await asyncio.sleep(0.05)  # the loop would take it now if it did not wait for a slot first
    assert q.depth == 1
    started = time.monotonic()
    await q.stop()
    for job in (first, second):
        with pytest.raises(ApiError) as err:
            await asyncio.wait_for(job, 5)
        assert err.value.code == "shutting_down"
    assert time.monotonic() - started < 5
    gate.set()
