"""service.llm.generation on its own: a producer thread standing in for the scheduler, one consumer."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.errors import ApiError, unavailable
from service.llm.generation import Delta, Finish, Generation, batched_wakeups

FINISH = Finish("length", "ab", (1, 2), prompt_tokens=5, completion_tokens=2)


def produce(generation: Generation, events: list, delay_s: float = 0.01) -> threading.Thread:
    """Put ``events`` from another thread, after ``delay_s``: the consumer is waiting by then."""

    def run() -> None:
        time.sleep(delay_s)
        for event in events:
            generation._put(event)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


async def test_async_iteration_gets_every_event_in_order() -> None:
    generation = Generation(prompt_tokens=5)
    thread = produce(generation, [Delta("a", 1), Delta("b", 2), FINISH, Delta("late", 3)])
    got = [event async for event in generation]
    thread.join()
    assert got == [Delta("a", 1), Delta("b", 2), FINISH]  # nothing after the Finish
    assert generation.cancelled  # leaving the loop frees the request's slot (a no-op once finished)


async def test_final_skips_the_deltas() -> None:
    generation = Generation(prompt_tokens=5)
    thread = produce(generation, [Delta("a", 1), Delta("b", 2), FINISH])
    assert await generation.final() == FINISH
    thread.join()


async def test_an_engine_error_is_raised_to_the_consumer() -> None:
    generation = Generation(prompt_tokens=5)
    thread = produce(generation, [Delta("a", 1), unavailable("engine_closed", "closing")])
    with pytest.raises(ApiError) as err:
        await generation.final()
    thread.join()
    assert err.value.code == "engine_closed"


async def test_a_timed_out_consumer_cancels_and_a_late_event_is_harmless() -> None:
    generation = Generation(prompt_tokens=5)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.02):
            await generation.final()
    assert generation.cancelled
    produce(generation, [FINISH], delay_s=0).join()  # resolves a cancelled waiter: no error on the loop
    await asyncio.sleep(0.01)


def test_blocking_iteration_and_result() -> None:
    generation = Generation(prompt_tokens=5)
    thread = produce(generation, [Delta("a", 1), FINISH])
    assert generation.result() == FINISH
    thread.join()


async def test_batched_wakeups_resume_consumers_together() -> None:
    """Consumers woken inside one ``batched_wakeups`` block resume in the same round of their loop,
    and none before the block ends."""
    generations = [Generation(prompt_tokens=1) for _ in range(4)]
    resumed: list[int] = []

    async def consume(i: int) -> None:
        await generations[i].final()
        resumed.append(i)

    tasks = [asyncio.create_task(consume(i)) for i in range(4)]
    await asyncio.sleep(0.01)  # every consumer waits on its future
    inside_block: list[int] = []

    def scheduler_step() -> None:
        with batched_wakeups():
            for generation in generations:
                generation._put(FINISH)
            time.sleep(0.05)  # the loop is free meanwhile: nobody may resume before the block ends
            inside_block.extend(resumed)

    thread = threading.Thread(target=scheduler_step)
    thread.start()
    await asyncio.gather(*tasks)
    thread.join()
    assert inside_block == [] and sorted(resumed) == [0, 1, 2, 3]
