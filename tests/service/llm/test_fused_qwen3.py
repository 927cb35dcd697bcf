"""The fused GPU path on Qwen3-VL's language model (q/k RMSNorm inside the kernels that rotate q and
k, the tiny checkpoint's head size of 24, interleaved M-RoPE, DeepStack features added by the
residual-add + RMSNorm kernel) against the plain path and HF, and bucketed prefills (CUDA graphs on
CUDA) carrying the DeepStack features. The kernels alone: test_fused.py. On the CPU the kernels run
in the Triton interpreter (fp16: its bf16 is not faithful); on CUDA in fp16 and bf16, with graphs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.llm import model as model_module
from service.llm.cuda_graphs import PrefillRunner
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

from . import (
    DEVICE,
    FUSED_DTYPES,
    PromptCase,
    assert_fused_decode_steps,
    fused_tolerance,
    oracle,
    prompt_cases,
    random_image,
    rel_err,
)

pytest.importorskip("triton")


# -- the fused model on the tiny Qwen3-VL checkpoint ----------------------------------------------


@pytest.fixture(scope="module")
def qwen3(family_checkpoint) -> Path:
    return family_checkpoint("qwen3_vl", seed=2)


def _prompts(path: Path, model: Qwen2LM, specs: list[tuple[int, tuple[int, int], str]]) -> list[PromptCase]:
    cases = prompt_cases(path, model, specs)
    for case in cases:
        assert case.deepstack is not None and model.cfg.deepstack_layers == len(case.deepstack) >= 2
    return cases


@torch.no_grad()
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize(("attention", "split_o"), [("triton", False), ("triton", True)]
                         + ([("sdpa", False)] if DEVICE == "cuda" else []))
def test_fused_qwen3_steps_match_the_plain_steps(qwen3: Path, attention: str, split_o: bool, dtype: torch.dtype,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefix with DeepStack (causal), the question after it (masked), then decode steps: the fused
    steps against the plain ones, on the checkpoint's head size of 24 and interleaved M-RoPE;
    ``split_o``: the decode steps' o projection split along K into the norm after it."""
    monkeypatch.setattr(model_module, "SPLIT_O_PROJ", split_o)
    model = load_model(qwen3, device=DEVICE, dtype=dtype)
    assert model.cfg.qk_norm and model.cfg.head_dim == 24 and model.cfg.mrope_interleaved
    (r,) = _prompts(qwen3, model, [(0, (150, 100), "What is in the picture?")])
    p, t = r.prompt.prefix_len, r.total
    pos = r.positions.to(DEVICE)[:, None]
    caches = [allocate_kv_cache(model.cfg, 3, 128, device=DEVICE, dtype=dtype) for _ in range(2)]
    slots = torch.tensor([1], device=DEVICE)
    outs = []
    for kv, fn in zip(caches, (prefill, prefill_fused), strict=True):
        fn(model, kv, r.embeds[:, :p], pos[..., :p], slots, 0, deepstack=r.stack[:, :, :p])
        outs.append(fn(model, kv, r.embeds[:, p:], pos[..., p:], slots, [p]))
    tol = fused_tolerance(dtype)
    assert rel_err(outs[1], outs[0]) < tol
    assert rel_err(caches[1][:, :, 1, :, :t], caches[0][:, :, 1, :, :t]) < tol
    # without the DeepStack features the fused prefix differs (by ~0.5 in fp32): the test sees them
    scratch = caches[1].clone()
    prefill_fused(model, scratch, r.embeds[:, :p], pos[..., :p], slots, 0)
    assert rel_err(scratch[:, :, 1, :, :p], caches[0][:, :, 1, :, :p]) > 0.2
    assert_fused_decode_steps(model, caches, t, r.delta, attention, dtype)


SPECS = [(0, (150, 100), "What is it?"), (1, (56, 56), "Describe the picture in a few more words please.")]


def _one_at_a_time(model: Qwen2LM, kv: torch.Tensor, fn, prompts: list[PromptCase], slots: list[int]) -> torch.Tensor:
    """Unpadded, one prompt at a time: the prefix with its DeepStack features, then the rest ->
    logits at each prompt's last token [N, vocab]."""
    out = []
    for r, slot in zip(prompts, slots, strict=True):
        p, s = r.prompt.prefix_len, torch.tensor([slot], device=DEVICE)
        pos = r.positions.to(DEVICE)[:, None]
        fn(model, kv, r.embeds[:, :p], pos[..., :p], s, 0, deepstack=r.stack[:, :, :p])
        out.append(model.logits(fn(model, kv, r.embeds[:, p:], pos[..., p:], s, [p])[0, -1]))
    return torch.stack(out)


def _batched(runner: PrefillRunner, fn, prompts: list[PromptCase], slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefixes in one padded prefill, then the questions in another -> (logits, greedy tokens)
    at each prompt's last token."""
    runner.run(fn, [r.row(s, 0, r.prompt.prefix_len) for r, s in zip(prompts, slots, strict=True)], logits=False)
    logits, tokens = runner.run(fn, [r.row(s, r.prompt.prefix_len, r.total) for r, s in zip(prompts, slots, strict=True)])
    assert logits is not None and tokens is not None
    return logits, tokens


@torch.inference_mode()
def test_padded_prefill_with_deepstack_gives_the_unpadded_logits_and_hf(qwen3: Path) -> None:
    """fp32: two prefixes padded into one bucket (DeepStack features at each row's image, zeros in
    the padding and in stale buffer rows), then the questions: logits and cache as the unpadded
    prefills; whole prompts (no prefix reuse) against HF's logits. On CUDA: graph replays."""
    model = load_model(qwen3, device=DEVICE, dtype=torch.float32)
    prompts = _prompts(qwen3, model, SPECS)
    slots = [2, 0]
    ref_kv = allocate_kv_cache(model.cfg, 4, 128, device=DEVICE, dtype=torch.float32)
    ref = _one_at_a_time(model, ref_kv, prefill, prompts, slots)
    kv = torch.randn_like(ref_kv)  # old garbage: masked positions must not matter
    runner = PrefillRunner(model, kv, use_graphs=True)
    atol = 1e-5 if DEVICE == "cpu" else 1e-4
    for rep in range(2):  # on CUDA the second round replays the recorded graphs (stale DeepStack rows)
        logits, tokens = _batched(runner, prefill_at, prompts, slots)
        torch.testing.assert_close(logits, ref, atol=atol, rtol=0)
        assert torch.equal(tokens, ref.argmax(-1))
        for r, s in zip(prompts, slots, strict=True):
            torch.testing.assert_close(kv[:, :, s, :, : r.total], ref_kv[:, :, s, :, : r.total], atol=atol, rtol=0)
        if rep == 0:  # a prompt whose image sits elsewhere in the bucket leaves other rows of the buffer stale
            runner.run(prefill_at, [prompts[1].row(1, 0, prompts[1].total)])
    hf = oracle(qwen3)
    for r in prompts:
        want = hf.logits(r.feats, r.question)[-1]
        logits, _ = runner.run(prefill_at, [r.row(3, 0, r.total)])
        assert logits is not None and rel_err(logits[0].cpu(), want) < (1e-5 if DEVICE == "cpu" else 1e-4)  # HF: CPU
    if DEVICE == "cuda":
        assert runner.counters["eager_runs"] == 0


@torch.inference_mode()
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
def test_padded_fused_prefill_with_deepstack_matches_the_fused_prefill(qwen3: Path, dtype: torch.dtype) -> None:
    """The fused form with DeepStack, padded (and on CUDA replayed from graphs), against the unpadded
    fused prefill one prompt at a time."""
    model = load_model(qwen3, device=DEVICE, dtype=dtype)
    prompts = _prompts(qwen3, model, SPECS)
    slots = [1, 2]
    ref_kv = allocate_kv_cache(model.cfg, 4, 128, device=DEVICE, dtype=dtype)
    ref = _one_at_a_time(model, ref_kv, prefill_fused, prompts, slots)
    kv = allocate_kv_cache(model.cfg, 4, 128, device=DEVICE, dtype=dtype)
    runner = PrefillRunner(model, kv, use_graphs=True)
    tol = fused_tolerance(dtype)
    for _ in range(2 if DEVICE == "cuda" else 1):
        logits, tokens = _batched(runner, prefill_fused_at, prompts, slots)
        assert rel_err(logits, ref) < tol
        if dtype == torch.float16:
            assert torch.equal(tokens, ref.argmax(-1))
        for r, s in zip(prompts, slots, strict=True):
            assert rel_err(kv[:, :, s, :, : r.total], ref_kv[:, :, s, :, : r.total]) < tol
    if DEVICE == "cuda":
        assert runner.graphs == 2 and runner.counters["eager_runs"] == 0


def test_runner_refuses_an_image_row_without_its_deepstack_features(qwen3: Path) -> None:
    model = load_model(qwen3)
    (r,) = _prompts(qwen3, model, SPECS[:1])
    row = r.row(0, 0, r.prompt.prefix_len)
    row.deepstack = None
    runner = PrefillRunner(model, allocate_kv_cache(model.cfg, 1, 128, device="cpu", dtype=torch.float32),
                           use_graphs=False)
    with pytest.raises(ValueError, match="DeepStack"):
        runner.run(prefill_at, [row], logits=False)


# -- the engine -------------------------------------------------------------------------------------


QUESTIONS = ["What is it?", "Is it day or night? Answer briefly."]


def test_engine_with_bucketed_prefills_answers_qwen3_like_hf(qwen3: Path) -> None:
    """fp32, the bucketed prefill path (eager on the CPU, graphs on CUDA) with DeepStack: greedy
    answers equal HF's, with prefix reuse and batched admission, and with whole-prompt prefills."""
    hf = oracle(qwen3)
    feats = [hf.features(random_image(seed, *size)) for seed, size, _ in SPECS]
    asks = [(i, q) for i in range(len(feats)) for q in QUESTIONS]
    expected = [hf.generate(feats[i], q, 8) for i, q in asks] if DEVICE == "cpu" else None
    answers = {}
    for entries in (8, 0):
        engine = LLMEngine(qwen3, device=DEVICE, max_batch_slots=3, max_seq_len=256, prefix_cache_entries=entries,
                           prefill_graphs=True)
        try:
            streams = [engine.generate(feats[i].embeds, feats[i].grid[0], f"img{i}", q, 8,
                                       deepstack=feats[i].deepstack) for i, q in asks]
            answers[entries] = [list(s.result().token_ids) for s in streams]
            assert engine.prefiller is not None and engine.prefiller.counters["eager_runs" if DEVICE == "cpu"
                                                                              else "graph_runs"] > 0
        finally:
            engine.close()
        if expected is not None:
            assert answers[entries] == expected, entries
    assert answers[8] == answers[0]


def test_engine_on_the_fused_path_answers_qwen3_like_the_plain_path(qwen3: Path) -> None:
    """The engine's GPU path on Qwen3-VL (fused kernels, Triton decode attention, bucketed prefills
    with DeepStack; graphs on CUDA) against the plain path, both in fp16 (bf16's rounding flips the
    near ties of this tiny model; the kernels' bf16 is tested above)."""
    hf = oracle(qwen3)
    feats = [hf.features(random_image(seed, *size)) for seed, size, _ in SPECS]
    answers = {}
    for fused in (False, True):
        engine = LLMEngine(qwen3, device=DEVICE, dtype=torch.float16, max_batch_slots=3, max_seq_len=256, fused=fused,
                           attention="triton" if fused else "sdpa", prefill_graphs=fused)
        try:
            assert engine.fused == fused
            streams = [engine.generate(f.embeds, f.grid[0], f"img{i}", q, 6, deepstack=f.deepstack)
                       for i, f in enumerate(feats) for q in QUESTIONS]
            answers[fused] = [s.result().token_ids for s in streams]
        finally:
            engine.close()
    agree = sum(a == b for a, b in zip(answers[False], answers[True], strict=True))
    assert agree >= 3, answers  # fp16 rounding order may flip a near tie; most answers must agree
