"""Each family's language model against HF's ``*ForConditionalGeneration`` on the same checkpoint.

Qwen2-VL is held to HF by test_engine.py / test_model.py; here every later family: logits of the
whole prompt, greedy answers with and without prefix reuse, questions batched together, a
sharded checkpoint whose visual-only shards are deleted, and (Qwen3-VL) DeepStack: the answers
need the DeepStack features, which only the prefix prefill injects.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from service.llm.engine import LLMEngine
from service.llm.generation import Finish

from . import Features, oracle, random_image, rel_err

FAMILIES = ["qwen2_5_vl", "qwen3_vl"]
IMAGES = [(0, (150, 100)), (1, (56, 56)), (2, (230, 180)), (3, (90, 300))]  # different grids
QUESTIONS = ["What is in this picture?", "How many people are there?", "Is it day or night? Answer briefly."]
MAX_NEW = 16


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request: pytest.FixtureRequest, family_checkpoint) -> Path:
    return family_checkpoint(request.param, seed=2)


@pytest.fixture(scope="module")
def features(checkpoint: Path) -> list[Features]:
    hf = oracle(checkpoint)
    return [hf.features(random_image(seed, *size)) for seed, size in IMAGES]


@pytest.fixture(scope="module")
def engine(checkpoint: Path) -> Iterator[LLMEngine]:
    made = LLMEngine(checkpoint, max_batch_slots=3, max_seq_len=256, prefix_cache_entries=8)
    yield made
    made.close()


def ask(engine: LLMEngine, feats: Features, key: str, question: str, **kw) -> Finish:
    return engine.generate(feats.embeds, feats.grid[0], key, question, MAX_NEW, deepstack=feats.deepstack,
                           **kw).result()


@torch.no_grad()
def prompt_logits(engine: LLMEngine, feats: Features, question: str, deepstack: torch.Tensor | None) -> torch.Tensor:
    """[T, vocab] of the whole prompt, through the engine's model in one prefill (one slot)."""
    prompt = engine.prompts.build(question, feats.num_tokens)
    ids = torch.tensor([prompt.ids])
    x = engine.model.embed(ids)
    lo, n = prompt.image_start, prompt.num_image_tokens
    x[0, lo : lo + n] = feats.embeds
    stack = None
    if deepstack is not None:
        stack = x.new_zeros((len(deepstack), *x.shape))
        stack[:, 0, lo : lo + n] = deepstack
    positions, _ = engine.family.positions(prompt.prefix_len, feats.grid[0].tolist(), 2, len(prompt.ids),
                                           image_start=lo)
    from service.llm.model import prefill

    hidden = prefill(engine.model, engine.kv, x, positions[:, None], torch.tensor([0]), 0, deepstack=stack)
    return engine.model.logits(hidden[0])


def test_prompt_logits_match_hf(engine: LLMEngine, checkpoint: Path, features: list[Features]) -> None:
    hf = oracle(checkpoint)
    for feats in features[:2]:
        want = hf.logits(feats, QUESTIONS[0])
        got = prompt_logits(engine, feats, QUESTIONS[0], feats.deepstack)
        assert got.shape == want.shape
        assert rel_err(got, want) < 1e-5
        if feats.deepstack is not None:  # the DeepStack features change the function: they are not optional
            assert engine.deepstack_layers == len(feats.deepstack) >= 2
            assert rel_err(prompt_logits(engine, feats, QUESTIONS[0], None), want) > 1e-3
            for layer in range(len(feats.deepstack)):  # every layer's features count
                partial = feats.deepstack.clone()
                partial[layer] = 0
                assert rel_err(prompt_logits(engine, feats, QUESTIONS[0], partial), want) > 1e-4, layer


def test_greedy_answers_match_hf_generate(engine: LLMEngine, checkpoint: Path, features: list[Features]) -> None:
    hf = oracle(checkpoint)
    expected = {(i, q): hf.generate(f, q, MAX_NEW) for i, f in enumerate(features) for q in QUESTIONS}
    assert len({tuple(t) for t in expected.values()}) > 1, "a degenerate checkpoint cannot tell answers apart"
    # one at a time: the first question on each image fills the prefix cache, the rest reuse it
    for (i, q), tokens in expected.items():
        answer = ask(engine, features[i], f"one/{i}", q)
        assert list(answer.token_ids) == tokens, (i, q)
        assert answer.text == hf.tokenizer.decode(tokens, skip_special_tokens=True)
    # all at once, decoded together in batches of 3 slots (the rest waiting), prefixes computed in batches
    streams = [engine.generate(features[i].embeds, features[i].grid[0], f"all/{i}", q, MAX_NEW,
                               deepstack=features[i].deepstack) for i, q in expected]
    for (i, q), stream in zip(expected, streams, strict=True):
        assert list(stream.result().token_ids) == expected[(i, q)], (i, q)
    # no prefix reuse: every prompt prefilled whole
    whole = LLMEngine(checkpoint, max_batch_slots=2, max_seq_len=256, prefix_cache_entries=0)
    try:
        for (i, q), tokens in list(expected.items())[::3]:
            assert list(ask(whole, features[i], f"whole/{i}", q).token_ids) == tokens, (i, q)
    finally:
        whole.close()


def test_cached_prefix_needs_no_features(engine: LLMEngine, features: list[Features], checkpoint: Path) -> None:
    """A question on an image whose prefix KV is cached runs on shape-only embeddings and no DeepStack
    features (what the worker sends when it skips the Redis read), and answers the same."""
    feats = features[2]
    want = ask(engine, feats, "cached", QUESTIONS[1])
    shape_only = engine.shape_only_embeds(tuple(feats.grid[0].tolist()))
    got = engine.generate(shape_only, feats.grid[0], "cached", QUESTIONS[1], MAX_NEW).result()
    assert got.token_ids == want.token_ids


def test_language_only_checkpoint(checkpoint: Path, features: list[Features], family_checkpoint,
                                  tmp_path: Path) -> None:
    """A sharded checkpoint with every visual-only shard deleted: the LLM worker's half still answers as HF."""
    family = json.loads((checkpoint / "config.json").read_text())["model_type"]
    sharded = family_checkpoint(family, seed=2, shard_size="40KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    visual_only = {f for f in index.values()} - {f for k, f in index.items() if "visual." not in k}
    assert visual_only, "the fixture must put visual tensors in shards of their own"
    copy = tmp_path / "language-only"
    shutil.copytree(sharded, copy)
    for name in visual_only:
        (copy / name).unlink()
    hf = oracle(sharded)
    feats = hf.features(random_image(7, 120, 90))
    engine = LLMEngine(copy, max_batch_slots=2, max_seq_len=256)
    try:
        answer = engine.generate(feats.embeds, feats.grid[0], "img", QUESTIONS[0], MAX_NEW,
                                 deepstack=feats.deepstack).result()
        assert list(answer.token_ids) == hf.generate(feats, QUESTIONS[0], MAX_NEW)
    finally:
        engine.close()


def test_features_of_the_wrong_kind_are_refused(engine: LLMEngine, features: list[Features]) -> None:
    from service.errors import ApiError

    feats = features[0]
    if feats.deepstack is None:  # a family without DeepStack refuses them
        bad = torch.zeros(2, *feats.embeds.shape)
    else:  # Qwen3-VL needs them, with one tensor per DeepStack layer
        bad = None
        with pytest.raises(ApiError) as missing:
            engine.generate(feats.embeds, feats.grid[0], "bad", QUESTIONS[0], 4)
        assert missing.value.status == 409 and missing.value.code == "feature_mismatch"
        bad = feats.deepstack[:1]
    with pytest.raises(ApiError) as wrong:
        engine.generate(feats.embeds, feats.grid[0], "bad", QUESTIONS[0], 4, deepstack=bad)
    assert wrong.value.status == 409 and wrong.value.code == "feature_mismatch"
