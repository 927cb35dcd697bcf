"""Bucketed prefills (``cuda_graphs.PrefillRunner``): rows and tokens padded to buckets give the
logits and the cache of the unpadded prefill; on CUDA the same runs replay CUDA graphs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.llm.cuda_graphs import PrefillRow, PrefillRunner, PrefillShape, token_bucket, window_bucket
from service.llm.engine import LLMEngine
from service.llm.model import (
    Qwen2LM,
    allocate_kv_cache,
    load_model,
    prefill,
    prefill_at,
    prefill_fused,
    prefill_fused_at,
)

from . import DEVICE, FUSED_DTYPES, PromptCase, fused_tolerance, oracle, prompt_cases, random_image, rel_err

SENTINEL = 7.0
# fp32: the padded GEMMs and attention windows only change the reduction order (the CPU gives
# about 2e-6); cuBLAS may pick other algorithms for other shapes
ATOL = 1e-5 if DEVICE == "cpu" else 1e-4


def test_buckets_and_shapes() -> None:
    assert [token_bucket(n) for n in (1, 16, 17, 33, 100, 128, 129, 271, 320)] == [16, 16, 32, 64, 128, 128,
                                                                                   192, 320, 320]
    assert [window_bucket(e, 1024) for e in (1, 64, 65, 287, 600, 1024)] == [64, 64, 128, 512, 1024, 1024]
    assert window_bucket(287, 300) == 300
    kv = torch.zeros(2, 2, 6, 1, 300, 4)
    runner = PrefillRunner(None, kv, use_graphs=True)  # type: ignore[arg-type]  # a CPU cache: eager
    assert runner.row_buckets == [1, 2, 4, 6] and not runner.use_graphs
    pos = torch.zeros(3, 20, dtype=torch.long)
    questions = [PrefillRow([1] * 12, pos[:, :12], 4, 271), PrefillRow([1] * 20, pos, 0, 100),
                 PrefillRow([1] * 3, pos[:, :3], 1, 7)]
    assert runner.shape(questions, logits=True) == PrefillShape(4, 32, 300, False, False, True)
    prefix = [PrefillRow([1] * 271, torch.zeros(3, 271, dtype=torch.long), 2, 0, (3, torch.zeros(256, 8)))]
    assert runner.shape(prefix, logits=False) == PrefillShape(1, 300, 300, True, True, False)  # clamped to the cache
    runner.max_graph_tokens = 100  # too big for a graph: as it is, unpadded
    assert runner.shape(questions, logits=True) == PrefillShape(3, 20, 283, False, False, True)
    assert runner.shape(prefix, logits=False) == PrefillShape(1, 271, 271, True, True, False)
    # an exact shape that happens to fit max_graph_tokens is still a one-off: never recorded as a graph
    assert not runner.shape(questions, logits=True).bucketed
    assert runner.shape(questions[2:], logits=True).bucketed  # 1 row x 16 tokens: still bucketed
    runner.bucketed = False
    assert runner.shape(questions[2:], logits=True) == PrefillShape(1, 3, 10, False, False, True)


REQUESTS = [(0, (150, 100), "What is it?"), (1, (56, 56), "Describe the picture in a few more words please, thanks."),
            (2, (230, 180), "Describe the picture in a few more words please, thanks.")]


def _cache(model: Qwen2LM, dtype: torch.dtype, max_len: int) -> torch.Tensor:
    """4 slots of old garbage (finite: masked positions must not matter), slot 3 a sentinel."""
    kv = allocate_kv_cache(model.cfg, 4, max_len, device=DEVICE, dtype=dtype)
    kv.normal_(generator=torch.Generator(DEVICE).manual_seed(5))
    kv[:, :, 3] = SENTINEL
    return kv


def _reference(model: Qwen2LM, kv: torch.Tensor, fn, requests: list[PromptCase], slots: list[int]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One request at a time, unpadded: prefix, then the rest -> logits at the last token [N, vocab]
    and, for the whole prompts from 0, the same [N, vocab]."""
    rest, whole = [], []
    scratch = kv.clone()
    for r, slot in zip(requests, slots, strict=True):
        p, s = r.prompt.prefix_len, torch.tensor([slot], device=DEVICE)
        pos = r.positions.to(DEVICE)[:, None]
        fn(model, kv, r.embeds[:, :p], pos[..., :p], s, 0)
        rest.append(model.logits(fn(model, kv, r.embeds[:, p:], pos[..., p:], s, [p])[0, -1]))
        whole.append(model.logits(fn(model, scratch, r.embeds, pos, s, 0)[0, -1]))
    return torch.stack(rest), torch.stack(whole)


@torch.inference_mode()
def test_padded_prefill_gives_the_unpadded_logits_fp32(tiny_checkpoint: Path) -> None:
    """Three rows (padded to 4), prefixes of different lengths from 0 (causal, images), then the
    questions after them (masked, padding that runs past the cache's end): the logits at each real
    last token and every real cache entry equal the unpadded one-row prefills; slot 3 is untouched."""
    model = load_model(tiny_checkpoint, device=DEVICE, dtype=torch.float32)
    requests = prompt_cases(tiny_checkpoint, model, REQUESTS)
    slots = [2, 0, 1]
    max_len = 120  # the third question (70 + 43 tokens) pads to 64 tokens: past the end, clamped
    ref_kv = _cache(model, torch.float32, max_len)
    ref_rest, ref_whole = _reference(model, ref_kv, prefill, requests, slots)
    kv = _cache(model, torch.float32, max_len)
    runner = PrefillRunner(model, kv, use_graphs=True)  # CUDA graphs on CUDA, eager on the CPU
    for rep in range(2):  # on CUDA the second round replays the recorded graphs
        prefix = [r.row(s, 0, r.prompt.prefix_len) for r, s in zip(requests, slots, strict=True)]
        assert runner.shape(prefix, logits=False) == PrefillShape(4, 120, 120, True, True, False)
        assert runner.run(prefill_at, prefix, logits=False) == (None, None)
        questions = [r.row(s, r.prompt.prefix_len, r.total) for r, s in zip(requests, slots, strict=True)]
        assert runner.shape(questions, logits=True) == PrefillShape(4, 64, 120, False, False, True)
        logits, tokens = runner.run(prefill_at, questions)
        assert logits is not None and tokens is not None and logits.shape[0] == 3
        torch.testing.assert_close(logits, ref_rest, atol=ATOL, rtol=0)
        assert torch.equal(tokens, logits.argmax(-1)) and torch.equal(tokens, ref_rest.argmax(-1))
        for r, s in zip(requests, slots, strict=True):
            torch.testing.assert_close(kv[:, :, s, :, : r.total], ref_kv[:, :, s, :, : r.total], atol=ATOL, rtol=0)
        assert bool((kv[:, :, 3] == SENTINEL).all()), "a padding row wrote into a slot it does not own"
        # whole prompts from 0 (no prefix reuse), one row fewer: the same bucket of rows
        whole = [r.row(s, 0, r.total) for r, s in zip(requests[:2], slots[:2], strict=True)]
        logits, tokens = runner.run(prefill_at, whole)
        assert logits is not None and tokens is not None
        torch.testing.assert_close(logits, ref_whole[:2], atol=ATOL, rtol=0)
        assert torch.equal(tokens, ref_whole[:2].argmax(-1))
        assert bool((kv[:, :, 3] == SENTINEL).all())
        if rep == 0:
            kv[:, :, :3].normal_()  # new garbage: the next round must not depend on the first
    if DEVICE == "cuda":
        assert runner.graphs == 3 and runner.counters == {"graph_runs": 6, "eager_runs": 0}
    else:
        assert runner.graphs == 0 and runner.counters["eager_runs"] == 6


@torch.inference_mode()
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
def test_padded_fused_prefill_matches_the_fused_prefill(tiny_checkpoint: Path, dtype: torch.dtype) -> None:
    """The fused (Triton) form, padded and (on CUDA) replayed from graphs, against ``prefill_fused``
    unpadded; on the CPU it runs in the Triton interpreter (fp16)."""
    pytest.importorskip("triton")
    model = load_model(tiny_checkpoint, device=DEVICE, dtype=dtype)
    # short prompts: the interpreter runs every Triton program in Python
    specs = REQUESTS[:2] if DEVICE == "cuda" else [(1, (56, 56), "What is it?"), (1, (56, 56), "Day or night?")]
    requests = prompt_cases(tiny_checkpoint, model, specs)
    slots = [1, 2]
    ref_kv = _cache(model, dtype, 128)
    ref_rest, ref_whole = _reference(model, ref_kv, prefill_fused, requests, slots)
    kv = _cache(model, dtype, 128)
    runner = PrefillRunner(model, kv, use_graphs=True)
    tol = fused_tolerance(dtype)
    for _ in range(2 if DEVICE == "cuda" else 1):  # on CUDA the second round replays the graphs
        runner.run(prefill_fused_at, [r.row(s, 0, r.prompt.prefix_len) for r, s in zip(requests, slots, strict=True)],
                   logits=False)
        logits, tokens = runner.run(prefill_fused_at, [r.row(s, r.prompt.prefix_len, r.total)
                                                       for r, s in zip(requests, slots, strict=True)])
        assert logits is not None and tokens is not None
        assert rel_err(logits, ref_rest) < tol
        assert torch.equal(tokens, logits.argmax(-1))
        if dtype == torch.float16:  # bf16's rounding may flip a near tie of this tiny model
            assert torch.equal(tokens, ref_rest.argmax(-1))
        for r, s in zip(requests, slots, strict=True):
            assert rel_err(kv[:, :, s, :, : r.total], ref_kv[:, :, s, :, : r.total]) < tol
        assert bool((kv[:, :, 3] == SENTINEL).all())
        logits, _ = runner.run(prefill_fused_at, [requests[1].row(slots[1], 0, requests[1].total)])
        assert logits is not None and rel_err(logits, ref_whole[1:]) < tol
    if DEVICE == "cuda":
        assert runner.graphs == 3 and runner.counters["eager_runs"] == 0


def test_engine_with_padded_prefills_answers_like_hf(tiny_checkpoint: Path) -> None:
    """The engine's bucketed prefill path (``prefill_graphs=True``; eager on the CPU): greedy
    answers equal HF's in fp32, with prefix reuse, batched admission and whole-prompt prefills.
    On CUDA (graphs), against the same engine without prefill graphs."""
    hf = oracle(tiny_checkpoint)
    feats = [hf.features(random_image(seed, *size)) for seed, size, _ in REQUESTS]
    asks = [(i, q) for i in range(len(feats)) for q in ("What is it?", "Is it day or night? Answer briefly.")]
    if DEVICE == "cpu":
        expected = [hf.generate(feats[i], q, 8) for i, q in asks]
    answers = {}
    for prefill_graphs in (True, False) if DEVICE == "cuda" else (True,):
        for entries in (8, 0):
            engine = LLMEngine(tiny_checkpoint, device=DEVICE, max_batch_slots=3, max_seq_len=256,
                               prefix_cache_entries=entries, prefill_graphs=prefill_graphs)
            try:
                assert engine.prefiller.bucketed == prefill_graphs
                one = engine.generate(feats[0].embeds, feats[0].grid[0], "img0", asks[0][1], 8).result()
                streams = [engine.generate(feats[i].embeds, feats[i].grid[0], f"img{i}", q, 8) for i, q in asks]
                got = [list(one.token_ids)] + [list(s.result().token_ids) for s in streams]
                if DEVICE == "cuda" and prefill_graphs:
                    assert engine.stats()["prefill_graphs"] > 0
            finally:
                engine.close()
            answers[(prefill_graphs, entries)] = got
            if DEVICE == "cpu":
                assert got == [expected[0], *expected]
    if DEVICE == "cuda":
        for entries in (8, 0):
            agree = sum(a == b for a, b in zip(answers[(True, entries)], answers[(False, entries)], strict=True))
            assert agree >= len(asks), answers  # fp32: at most one near tie may flip
