"""The engine's answers against HF's generate; prefix reuse, batching, sampling, streaming, limits."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from service.errors import ApiError
from service.llm.engine import LLMEngine, PrefixNotCached, sample_token
from service.llm.generation import Delta, Finish, Generation

from . import Features, copy_checkpoint, oracle, random_image

IMAGES = [(0, (150, 100)), (1, (56, 56)), (2, (230, 180)), (3, (90, 300))]  # different grids
QUESTIONS = ["What is in this picture?", "How many people are there?", "Is it day or night? Answer briefly."]
MAX_NEW = 24


def _features(path: Path) -> list[Features]:
    hf = oracle(path)
    return [hf.features(random_image(seed, *size)) for seed, size in IMAGES]


@pytest.fixture(scope="module")
def engines(tiny_checkpoint: Path, sharded_checkpoint: Path) -> Iterator[dict[str, LLMEngine]]:
    made = {
        "tiny_checkpoint": LLMEngine(tiny_checkpoint, max_batch_slots=3, max_seq_len=256, prefix_cache_entries=8),
        "sharded_checkpoint": LLMEngine(sharded_checkpoint, max_batch_slots=3, max_seq_len=256),
    }
    yield made
    for engine in made.values():
        engine.close()


def _ask(engine: LLMEngine, feats: Features, key: str, question: str, max_tokens: int = MAX_NEW, **kw) -> Finish:
    return engine.generate(feats.embeds, feats.grid[0], key, question, max_tokens, **kw).result()


def test_grids_differ(tiny_checkpoint: Path) -> None:
    grids = {tuple(f.grid[0].tolist()) for f in _features(tiny_checkpoint)}
    assert len(grids) == len(IMAGES)


@pytest.mark.parametrize("which", ["tiny_checkpoint", "sharded_checkpoint"])
def test_greedy_answers_match_hf_generate(which: str, engines: dict[str, LLMEngine],
                                          request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(which)
    hf, engine = oracle(path), engines[which]
    feats = _features(path)
    expected = {(i, q): hf.generate(f, q, MAX_NEW) for i, f in enumerate(feats) for q in QUESTIONS}
    # one at a time (the first question on each image fills the prefix cache, the rest reuse it)
    for (i, q), tokens in expected.items():
        answer = _ask(engine, feats[i], f"{which}/{i}", q)
        assert list(answer.token_ids) == tokens, (i, q)
        assert answer.text == hf.tokenizer.decode(tokens, skip_special_tokens=True)
        assert answer.prompt_tokens == hf.input_ids(q, feats[i].num_tokens).shape[1]
    # all at once from several threads: decoded together in batches of 3 slots, the rest waiting
    with ThreadPoolExecutor(4) as pool:
        streams = list(pool.map(lambda iq: engines[which].generate(
            feats[iq[0]].embeds, feats[iq[0]].grid[0], f"{which}/{iq[0]}", iq[1], MAX_NEW), expected))
    for (i, q), stream in zip(expected, streams, strict=True):
        assert list(stream.result().token_ids) == expected[(i, q)], (i, q)


def test_answer_stops_at_eos_before_max_tokens(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Make a token the model emits early an EOS (next to <|im_end|>): HF and we must stop there."""
    feats = _features(tiny_checkpoint)[0]
    question = QUESTIONS[0]
    free_run = oracle(tiny_checkpoint).generate(feats, question, MAX_NEW)
    j = next(j for j in range(3, MAX_NEW) if free_run[j] not in free_run[:j])
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    im_end = json.loads((path / "generation_config.json").read_text())["eos_token_id"]
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_end, free_run[j]]}))
    expected = oracle(path).generate(feats, question, MAX_NEW)
    assert expected == free_run[: j + 1]  # HF stops too, before max_new_tokens
    engine = LLMEngine(path, max_batch_slots=2, max_seq_len=256)
    try:
        answer = _ask(engine, feats, "img", question)
        assert list(answer.token_ids) == expected
        assert answer.finish_reason == "stop" and answer.completion_tokens == j + 1 < MAX_NEW
        assert answer.text == oracle(path).tokenizer.decode(expected[:-1], skip_special_tokens=True)
        shorter = _ask(engine, feats, "img", question, max_tokens=j)  # cut one short of the EOS
        assert shorter.finish_reason == "length" and list(shorter.token_ids) == expected[:-1]
        assert _ask(engine, feats, "img", question, deltas=False) == answer  # decoded once: the EOS left out
    finally:
        engine.close()


def test_prefix_reuse_gives_identical_answers(tiny_checkpoint: Path) -> None:
    feats = _features(tiny_checkpoint)[:2]
    reuse = LLMEngine(tiny_checkpoint, max_batch_slots=2, max_seq_len=256, prefix_cache_entries=4)
    whole = LLMEngine(tiny_checkpoint, max_batch_slots=2, max_seq_len=256, prefix_cache_entries=0)
    try:
        for i, f in enumerate(feats):
            for q in QUESTIONS:
                a = _ask(reuse, f, f"img{i}", q)
                b = _ask(whole, f, f"img{i}", q)
                assert a.token_ids == b.token_ids and a.text == b.text
        stats = reuse.stats()
        assert (stats["prefix_misses"], stats["prefix_hits"]) == (2, 4)
        prompts = [reuse.prompts.build(q, f.num_tokens) for f in feats for q in QUESTIONS]
        prefixes = sum(reuse.prompts.build("x", f.num_tokens).prefix_len for f in feats)
        assert stats["prefill_tokens"] == prefixes + sum(len(p.ids) - p.prefix_len for p in prompts)
        assert whole.stats()["prefill_tokens"] == sum(len(p.ids) for p in prompts)
        assert whole.stats()["prefix_hits"] == whole.stats()["prefix_misses"] == 0
    finally:
        reuse.close()
        whole.close()


def test_prefix_cache_is_a_bounded_lru(tiny_checkpoint: Path) -> None:
    feats = _features(tiny_checkpoint)
    engine = LLMEngine(tiny_checkpoint, max_batch_slots=1, max_seq_len=256, prefix_cache_entries=2)
    try:
        answers: dict[int, tuple[int, ...]] = {}
        for i in (0, 1, 0, 2, 1):  # miss, miss, hit, miss (evicts 1, the least recently used), miss
            tokens = _ask(engine, feats[i], f"img{i}", "What?", max_tokens=3).token_ids
            assert answers.setdefault(i, tokens) == tokens
        stats = engine.stats()
        assert (stats["prefix_hits"], stats["prefix_misses"], stats["prefix_entries"]) == (1, 4, 2)
    finally:
        engine.close()


def test_visual_shards_deleted_still_answers(sharded_checkpoint: Path, tmp_path: Path) -> None:
    path = copy_checkpoint(sharded_checkpoint, tmp_path / "ckpt")
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    language_shards = {f for k, f in weight_map.items() if not k.startswith("visual.")}
    for shard in set(weight_map.values()) - language_shards:
        (path / shard).unlink()
    feats = _features(sharded_checkpoint)[1]
    engine = LLMEngine(path, max_batch_slots=1, max_seq_len=256)
    try:
        expected = oracle(sharded_checkpoint).generate(feats, QUESTIONS[1], MAX_NEW)
        assert list(_ask(engine, feats, "img", QUESTIONS[1]).token_ids) == expected
    finally:
        engine.close()


def test_context_length_and_request_errors(engines: dict[str, LLMEngine], tiny_checkpoint: Path) -> None:
    engine = engines["tiny_checkpoint"]
    feats = _features(tiny_checkpoint)[0]
    prompt_len = len(engine.prompts.build(QUESTIONS[0], feats.num_tokens).ids)
    assert _ask(engine, feats, "ok", QUESTIONS[0], max_tokens=256 - prompt_len).finish_reason == "length"
    with pytest.raises(ApiError) as err:
        engine.generate(feats.embeds, feats.grid[0], "x", QUESTIONS[0], 256 - prompt_len + 1)
    assert (err.value.status, err.value.code) == (422, "context_length_exceeded")
    with pytest.raises(ApiError) as err:
        engine.generate(feats.embeds, feats.grid[0], "x", "word " * 300, 1)
    assert err.value.code == "context_length_exceeded"
    for bad in ({"question": "  "}, {"max_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}):
        args = {"question": "q", "max_tokens": 4, "temperature": 1.0, "top_p": 1.0} | bad
        with pytest.raises(ApiError) as err:
            engine.generate(feats.embeds, feats.grid[0], "x", **args)
        assert err.value.status == 422
    with pytest.raises(ApiError) as err:  # features of another model / another grid
        engine.generate(feats.embeds[:-1], feats.grid[0], "x", "q", 4)
    assert err.value.status == 409
    with pytest.raises(ApiError) as err:
        engine.generate(torch.zeros(feats.num_tokens, 32), feats.grid[0], "x", "q", 4)
    assert err.value.status == 409


def test_sampling_is_reproducible_with_a_seed(engines: dict[str, LLMEngine], tiny_checkpoint: Path) -> None:
    engine = engines["tiny_checkpoint"]
    feats = _features(tiny_checkpoint)[0]
    runs = [_ask(engine, feats, "s", "Tell me.", temperature=1.0, seed=s).token_ids for s in (7, 7, 8)]
    assert runs[0] == runs[1] != runs[2]
    greedy = _ask(engine, feats, "s", "Tell me.").token_ids
    assert runs[0] != greedy
    # a tiny top_p keeps only the most likely token: sampling becomes greedy
    assert _ask(engine, feats, "s", "Tell me.", temperature=1.5, top_p=1e-6, seed=1).token_ids == greedy


def test_top_p_restricts_to_the_nucleus() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    gen = torch.Generator().manual_seed(0)

    def draws(top_p: float, temperature: float = 1.0) -> set[int]:
        return {sample_token(logits, temperature, top_p, gen) for _ in range(400)}

    assert draws(1.0) == {0, 1, 2, 3}
    assert draws(0.7) == {0, 1}  # 0.5 + 0.3 reach 0.7; token 2 lies beyond
    assert draws(0.85) == {0, 1, 2}
    assert draws(0.5) == {0}
    assert draws(1.0, temperature=0.0) == {0}


async def test_async_stream_of_deltas(engines: dict[str, LLMEngine], tiny_checkpoint: Path) -> None:
    engine = engines["tiny_checkpoint"]
    feats = _features(tiny_checkpoint)[2]
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    events = [e async for e in engine.generate(feats.embeds, feats.grid[0], "a", QUESTIONS[2], MAX_NEW)]
    task.cancel()
    deltas, final = events[:-1], events[-1]
    assert isinstance(final, Finish) and all(isinstance(d, Delta) for d in deltas)
    assert [d.token_id for d in deltas if d.token_id is not None] == list(final.token_ids)
    assert "".join(d.text for d in deltas) == final.text
    assert list(final.token_ids) == oracle(tiny_checkpoint).generate(feats, QUESTIONS[2], MAX_NEW)
    assert ticks > 1  # the event loop kept running while tokens were generated


def test_leaving_a_stream_frees_its_slot(engines: dict[str, LLMEngine], tiny_checkpoint: Path) -> None:
    engine = engines["tiny_checkpoint"]
    feats = _features(tiny_checkpoint)[0]
    for n, _event in enumerate(engine.generate(feats.embeds, feats.grid[0], "c", "Go on.", 200)):
        if n == 2:
            break
    deadline = time.monotonic() + 10
    while engine.stats()["active"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats()["active"] == 0
    assert _ask(engine, feats, "c", "Go on.", max_tokens=2).completion_tokens == 2


def test_final_gives_the_whole_answer(engines: dict[str, LLMEngine], tiny_checkpoint: Path) -> None:
    engine = engines["tiny_checkpoint"]
    feats = _features(tiny_checkpoint)[1]

    async def main() -> Finish:
        return await engine.generate(feats.embeds, feats.grid[0], "final", QUESTIONS[0], MAX_NEW).final()

    final = asyncio.run(main())
    assert list(final.token_ids) == oracle(tiny_checkpoint).generate(feats, QUESTIONS[0], MAX_NEW)
    assert final.text == _ask(engine, feats, "final", QUESTIONS[0]).text


def test_shape_only_embeddings_use_the_cached_prefix(engines: dict[str, LLMEngine], tiny_checkpoint: Path) -> None:
    engine = engines["tiny_checkpoint"]
    feats = _features(tiny_checkpoint)[3]
    shape_only = torch.empty(feats.embeds.shape, dtype=feats.embeds.dtype, device="meta")
    with pytest.raises(PrefixNotCached):  # nothing cached yet: the caller must send the embeddings
        engine.generate(shape_only, feats.grid[0], "meta", QUESTIONS[1], 4)
    expected = oracle(tiny_checkpoint).generate(feats, QUESTIONS[1], MAX_NEW)
    _ask(engine, feats, "meta", QUESTIONS[0])  # computes and caches the prefix
    assert engine.prefix_grid("meta") == tuple(feats.grid[0].tolist())
    assert engine.shape_only_embeds(engine.prefix_grid("meta")).shape == shape_only.shape
    got = engine.generate(shape_only, feats.grid[0], "meta", QUESTIONS[1], MAX_NEW).result()
    assert list(got.token_ids) == expected
    # evicted after submission, before admission: the request pinned the prefix when it was queued
    with engine._cond:  # the scheduler cannot admit while we hold it
        stream = engine.generate(shape_only, feats.grid[0], "meta", QUESTIONS[1], MAX_NEW)
        engine._prefixes.clear()
    assert list(stream.result().token_ids) == expected
    assert engine.prefix_grid("meta") == tuple(feats.grid[0].tolist())  # back in the cache
    other_grid = torch.tensor([1, 2, 2])
    with pytest.raises(ApiError):  # a grid that does not fit the embeddings' shape is refused first
        engine.generate(shape_only, other_grid, "meta", QUESTIONS[1], 4)


def test_without_deltas_only_the_finish_comes(engines: dict[str, LLMEngine], tiny_checkpoint: Path) -> None:
    engine = engines["tiny_checkpoint"]
    for i, feats in enumerate(_features(tiny_checkpoint)):
        question = QUESTIONS[i % len(QUESTIONS)]
        streamed = _ask(engine, feats, f"deltas{i}", question)
        events = list(engine.generate(feats.embeds, feats.grid[0], f"deltas{i}", question, MAX_NEW, deltas=False))
        assert len(events) == 1 and isinstance(events[0], Finish)
        assert events[0] == streamed  # same ids, same text (decoded once), same reason and counts


def test_a_loop_that_dies_before_its_wake_strands_nothing(engines: dict[str, LLMEngine], tiny_checkpoint: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A question staged by a loop that stops before its wake runs is handed over by the next wake
    from any loop, and questions from other loops are not held back."""
    engine = engines["tiny_checkpoint"]
    feats = _features(tiny_checkpoint)[0]

    class DeadLoop:
        def call_soon(self, callback: object) -> None:  # never runs it
            pass

    with monkeypatch.context() as m:
        m.setattr(asyncio, "get_running_loop", lambda: DeadLoop())
        stranded = engine.generate(feats.embeds, feats.grid[0], "dead", QUESTIONS[0], 2, deltas=False)
    assert engine.stats()["waiting"] == 1

    async def ask() -> Finish:
        return await engine.generate(feats.embeds, feats.grid[0], "dead", QUESTIONS[0], 2, deltas=False).final()

    answer = asyncio.run(asyncio.wait_for(ask(), 60))
    assert stranded.result() == answer


def test_no_decode_step_past_the_last_token(engines: dict[str, LLMEngine], tiny_checkpoint: Path) -> None:
    """Decoding runs one step ahead of the host, but not past an answer's last token: an answer of n
    tokens (the first from its prefill) costs n - 1 decode steps, which the next admission would wait on."""
    engine = engines["tiny_checkpoint"]
    feats = _features(tiny_checkpoint)[2]
    checked = 0
    for n in (1, 2, 5):
        steps = engine.counters["decode_steps"]
        final = _ask(engine, feats, "steps", QUESTIONS[2], n)
        if final.finish_reason == "length":  # (an EOS can't be foreseen: the step after it is spent)
            assert engine.counters["decode_steps"] - steps == n - 1
            checked += 1
    assert checked


def test_a_scheduler_failure_fails_every_request(tiny_checkpoint: Path) -> None:
    """An error that escapes a step's own requests (a sticky device error fails the clean-up too)
    stops the scheduler: whatever is queued or running fails, and nothing new is queued."""
    feats = _features(tiny_checkpoint)[1]
    engine = LLMEngine(tiny_checkpoint, max_batch_slots=1, max_seq_len=256)
    try:
        def broken(slot: int) -> None:
            raise RuntimeError("device lost")

        def failing_decode() -> None:
            raise RuntimeError("step failed")

        engine.runner.clear_slot = broken  # type: ignore[method-assign]
        engine._decode = failing_decode  # type: ignore[method-assign]
        with engine._cond:  # both queued before the scheduler looks: one admitted, one waiting
            running = engine.generate(feats.embeds, feats.grid[0], "x", QUESTIONS[0], 8)
            waiting = engine.generate(feats.embeds, feats.grid[0], "x", QUESTIONS[1], 8)
        with pytest.raises(ApiError) as err:  # a bug's 500; what failed is in the log
            running.result()
        assert (err.value.status, err.value.code) == (500, "internal_error")
        with pytest.raises(ApiError) as err:
            waiting.result()
        assert (err.value.status, err.value.code) == (503, "engine_closed")
        with pytest.raises(ApiError) as err:
            engine.generate(feats.embeds, feats.grid[0], "x", QUESTIONS[0], 8)
        assert err.value.code == "engine_closed"
    finally:
        engine.close()


def test_questions_from_one_loop_round_are_admitted_together(engines: dict[str, LLMEngine], tiny_checkpoint: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Questions queued by one round of an event loop's callbacks (a burst of requests) wait for the
    round to end and go into one admission, whose prefill takes them all, even when the scheduler
    looks in between. Answers that finish in one
    step wake their consumers in one round too, so the questions those ask next are admitted together
    again. A blocking consumer on the loop's own thread still gets its answer (it wakes the scheduler)."""
    engine = engines["tiny_checkpoint"]
    feats = _features(tiny_checkpoint)

    def ask(i: int) -> Generation:
        stream = engine.generate(feats[i].embeds, feats[i].grid[0], f"round-{i}", QUESTIONS[i], 4, deltas=False)
        with engine._cond:  # the scheduler looks in the middle of the round (it may take the GIL any time)
            engine._cond.notify()
        time.sleep(0.02)
        return stream

    async def burst() -> list[list[Finish]]:
        await asyncio.sleep(0.05)  # the scheduler is idle and waiting
        streams = [ask(i) for i in range(3)]

        async def client(i: int) -> list[Finish]:  # asks again as soon as it has its answer
            first = await streams[i].final()
            return [first, await ask(i).final()]

        return list(await asyncio.gather(*(client(i) for i in range(3))))

    decode = engine.prompts.decode

    def slow_decode(ids: list[int]) -> str:  # the answers' texts are decoded one by one at the step's end
        time.sleep(0.02)
        return decode(ids)

    monkeypatch.setattr(engine.prompts, "decode", slow_decode)
    t0 = time.perf_counter()
    finals = asyncio.run(burst())
    assert [f.finish_reason for f, _ in finals] == ["length"] * 3  # they finished in the same step
    assert [n for at, n, _ in engine.admissions if at >= t0] == [3, 3]
    alone = [list(_ask(engine, f, f"round-{i}", QUESTIONS[i], 4).token_ids) for i, f in enumerate(feats[:3])]
    assert [[list(f.token_ids) for f in pair] for pair in finals] == [[a, a] for a in alone]

    async def blocking() -> Finish:
        return engine.generate(feats[0].embeds, feats[0].grid[0], "round-0", QUESTIONS[0], 4).result()

    assert list(asyncio.run(asyncio.wait_for(blocking(), 60)).token_ids) == alone[0]
