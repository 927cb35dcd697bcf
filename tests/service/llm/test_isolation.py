"""In the engine, a question's failure is its own, and a cache slot carries nothing from one request
into the next, whatever values the first left there (a NaN in masked positions still poisons an
attention: 0 x NaN is NaN)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from service.errors import ApiError
from service.llm.engine import LLMEngine
from service.llm.generation import Finish

from . import Features, oracle, random_image

QUESTION = "What is in this picture?"


@pytest.fixture(scope="module")
def clean(tiny_checkpoint: Path) -> Features:
    return oracle(tiny_checkpoint).features(random_image(0, 56, 56))


@pytest.fixture(scope="module")
def poisoned(tiny_checkpoint: Path) -> Features:
    """A larger image whose embeddings hold NaN (what a damaged record held): its KV is NaN from there on."""
    feats = oracle(tiny_checkpoint).features(random_image(1, 230, 180))
    embeds = feats.embeds.clone()
    embeds[1] = float("nan")
    return Features(embeds, feats.grid, feats.pixel_values)


@pytest.fixture
def one_slot(tiny_checkpoint: Path) -> Iterator[LLMEngine]:
    engine = LLMEngine(tiny_checkpoint, max_batch_slots=1, max_seq_len=512, prefix_cache_entries=0)
    yield engine
    engine.close()


def test_a_slot_carries_nothing_into_its_next_request(one_slot, clean, poisoned, tiny_checkpoint):
    """One slot: a request with NaN features fills it far past where the next, shorter one reads
    (masked); the next one's greedy answer is still HF's, token for token."""
    expected = oracle(tiny_checkpoint).generate(clean, QUESTION, 12)
    before = one_slot.generate(clean.embeds, clean.grid[0], "clean", QUESTION, 12).result()
    assert list(before.token_ids) == expected
    nan_answer = one_slot.generate(poisoned.embeds, poisoned.grid[0], "nan", QUESTION * 4, 60).result()
    assert nan_answer.completion_tokens == 60  # garbage, but its own
    after = one_slot.generate(clean.embeds, clean.grid[0], "clean", QUESTION, 12).result()
    assert list(after.token_ids) == expected


async def test_a_failing_sample_fails_only_its_own_question(tiny_checkpoint, clean, poisoned):
    """Four questions admitted in one batch; sampling from the NaN image's scores fails, and only
    that question gets the error (60 of 120 failed with it); the others' answers are as if alone."""
    engine = LLMEngine(tiny_checkpoint, max_batch_slots=4, max_seq_len=512, prefix_cache_entries=4)
    try:
        asks = [(poisoned, "nan", 1.0, 5), (clean, "clean", 0.0, None), (clean, "clean", 0.8, 3),
                (poisoned, "nan", 0.0, None)]
        alone = [engine.generate(f.embeds, f.grid[0], key, QUESTION, 8, temperature=t, seed=seed).result()
                 if i else None for i, (f, key, t, seed) in enumerate(asks)]
        admissions = engine.stats()["admissions"]
        # from one round of this loop: staged together, admitted in one prefill
        streams = [engine.generate(f.embeds, f.grid[0], key, QUESTION, 8, temperature=t, seed=seed)
                   for f, key, t, seed in asks]
        results = await asyncio.gather(*(s.final() for s in streams), return_exceptions=True)
        for _ in range(100):  # the scheduler counts an admission after its answers went out
            if engine.stats()["admissions"] > admissions:
                break
            await asyncio.sleep(0.01)
        assert engine.stats()["admissions"] == admissions + 1
        failed = results[0]
        assert isinstance(failed, ApiError) and failed.status == 500 and failed.code == "internal_error"
        for got, want in zip(results[1:], alone[1:], strict=True):
            assert isinstance(got, Finish) and got.token_ids == want.token_ids
        assert engine.stats()["active"] == 0
        # and the engine goes on
        assert engine.generate(clean.embeds, clean.grid[0], "clean", QUESTION, 8).result() == alone[1]
    finally:
        engine.close()


def test_every_slot_state_is_reset_when_freed(one_slot, clean):
    one_slot.generate(clean.embeds, clean.grid[0], "clean", QUESTION, 5).result()
    assert torch.count_nonzero(one_slot.runner.state[:, 0]) == 0
