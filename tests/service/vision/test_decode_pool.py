"""service.vision.decode_pool: heavy decodes cannot take every thread, the queue is bounded, and a
caller that stops waiting leaves it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator

import pytest

from service.errors import ApiError
from service.vision.decode_pool import DecodePool


class Gate:
    """Jobs that note their name and (but for ``free`` ones) hold their thread until ``open()``."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.ran: list[str] = []

    def job(self, name: str, free: bool = False) -> str:
        self.ran.append(name)
        if not free:
            self.opened.wait(10)
        return name

    def open(self) -> None:
        self.opened.set()


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.open()


@pytest.fixture
def make_pool() -> Iterator[Callable[..., DecodePool]]:
    pools: list[DecodePool] = []

    def make(threads: int, max_waiting: int = 16) -> DecodePool:
        pools.append(DecodePool(threads, max_waiting))
        return pools[-1]

    yield make
    for pool in pools:
        pool.shutdown()


async def until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.005)


async def test_light_jobs_pass_heavy_ones_that_hold_the_threads(make_pool, gate):
    pool = make_pool(threads=3)
    heavies = [asyncio.create_task(pool.run(gate.job, f"h{i}", heavy=True)) for i in range(5)]
    await until(lambda: len(gate.ran) == 2)  # threads - 1 heavy ones run; the others wait
    await asyncio.sleep(0.05)
    assert len(gate.ran) == 2 and pool.depth == 3
    # a light job gets the free thread at once, though it came after five heavy ones
    assert await asyncio.wait_for(pool.run(gate.job, "light", True), 2) == "light"
    gate.open()
    assert sorted(await asyncio.gather(*heavies)) == [f"h{i}" for i in range(5)]


async def test_one_thread_still_serves_light_jobs_first(make_pool, gate):
    pool = make_pool(threads=1)
    first = asyncio.create_task(pool.run(gate.job, "first", heavy=True))
    await until(lambda: gate.ran == ["first"])
    later = [asyncio.create_task(pool.run(gate.job, "heavy", heavy=True)),
             asyncio.create_task(pool.run(gate.job, "light"))]
    await until(lambda: pool.depth == 2)
    gate.open()
    await asyncio.gather(first, *later)
    assert gate.ran == ["first", "light", "heavy"]


async def test_a_full_queue_is_503_and_a_cancelled_wait_leaves_it(make_pool, gate):
    pool = make_pool(threads=1, max_waiting=2)
    running = asyncio.create_task(pool.run(gate.job, "0"))
    await until(lambda: gate.ran == ["0"])
    waiting = [asyncio.create_task(pool.run(gate.job, name)) for name in ("1", "2")]
    await until(lambda: pool.depth == 2)
    with pytest.raises(ApiError) as err:
        await pool.run(gate.job, "3")
    assert err.value.status == 503 and err.value.code == "overloaded" and err.value.retry_after
    waiting[0].cancel()  # its request timed out: its place is free, and it never runs
    await until(lambda: pool.depth == 1)
    extra = asyncio.create_task(pool.run(gate.job, "4"))
    gate.open()
    assert await asyncio.gather(running, waiting[1], extra) == ["0", "2", "4"]
    assert "1" not in gate.ran


async def test_errors_reach_their_caller_and_the_pool_goes_on(make_pool):
    pool = make_pool(threads=2)

    def fail() -> None:
        raise ApiError(422, "image_too_complex", "no")

    with pytest.raises(ApiError) as err:
        await pool.run(fail)
    assert err.value.code == "image_too_complex"
    assert await pool.run(lambda: 7) == 7


async def test_shutdown_fails_waiting_jobs(gate):
    pool = DecodePool(threads=1, max_waiting=4)
    running = asyncio.create_task(pool.run(gate.job, "running"))
    await until(lambda: gate.ran == ["running"])
    waiting = asyncio.create_task(pool.run(gate.job, "waiting"))
    await until(lambda: pool.depth == 1)
    pool.shutdown()
    with pytest.raises(ApiError) as err:
        await waiting
    assert err.value.code == "shutting_down"
    gate.open()
    await running
    # an upload that arrives after the stop is refused the same way (it failed inside the executor)
    with pytest.raises(ApiError) as err:
        await pool.run(gate.job, "late", True)
    assert err.value.code == "shutting_down" and "late" not in gate.ran
