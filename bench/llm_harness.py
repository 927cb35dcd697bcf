"""What the LLM benchmarks share: the results file and its guards, the engine's timings (first
token, ms/token, concurrent questions), pure decode loops, the bandwidth ceiling, and checkpoint
directories without weights for any family.

It imports the engine and nothing of the HTTP stack or Redis, so ``llm_families.py`` and the
profiles run where only torch, Triton and transformers are installed (the GPU machine);
``llm_bench.py`` adds its HTTP scenarios on top.
"""

from __future__ import annotations

import asyncio
import faulthandler
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from service.llm.cuda_graphs import DecodeRunner
from service.llm.engine import LLMEngine
from service.llm.generation import Delta, Finish
from service.llm.model import Qwen2LM, TextConfig, allocate_kv_cache, fuse_hub_tensors, model_from_state

QUESTIONS = ["What is in this picture?", "How many people are there?", "Is it day or night? Answer briefly.",
             "Describe the image in detail.", "What colour is the car?"]
RESULTS: dict[str, Any] = {}
START = time.monotonic()
JSON_PATH: list[Path] = []  # where every record() rewrites the results (a hang must not lose them)


def log(msg: str) -> None:
    print(f"[{time.monotonic() - START:6.1f}s] {msg}", flush=True)


def record(key: str, value: Any) -> None:
    RESULTS[key] = value
    log(f"{key} = {value}")
    for path in JSON_PATH:
        path.write_text(json.dumps(RESULTS, indent=1, default=str))


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def med(xs: Sequence[float]) -> float:
    return round(statistics.median(xs), 3)


def guarded(name: str, budget: float) -> Callable[[Callable[[], None]], None]:
    """Run a scenario unless the time budget is spent; print its failure and carry on."""

    def run(fn: Callable[[], None]) -> None:
        left = budget - (time.monotonic() - START)
        if left < 15:
            log(f"SKIP {name}: {left:.0f} s of the budget left")
            RESULTS.setdefault("skipped", []).append(name)
            return
        log(f"-- {name}")
        faulthandler.dump_traceback_later(max(30.0, min(150.0, left)), exit=True)  # a hang: stacks, then out
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - a broken scenario must not cost the others
            traceback.print_exc()
            RESULTS.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
            log(f"FAILED {name}: {type(exc).__name__}: {exc}")
        finally:
            faulthandler.cancel_dump_traceback_later()

    return run


def write_checkpoint(path: Path, family: str, text: dict | None, vision: dict | None) -> Any:
    """A checkpoint directory without weights (they stay in memory): the family's HF config of
    ``text`` and ``vision`` (None: the family's tiny config), the tests' tokenizer, the family's
    chat template, and an EOS no model can emit, so that every answer runs to max_tokens and the
    timings count the same tokens. Returns the HF config."""
    from service.models import family as family_named
    from service.tiny import SPECIAL_TOKENS, _build_tokenizer

    fam = family_named(family)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(400)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    if text is None or vision is None:
        cfg = fam.tiny_config(ids, len(tokenizer), tie_word_embeddings=True)
    else:
        cfg = fam.hf_config_class()(
            vision_config=vision, text_config={**text, "bos_token_id": ids["<|endoftext|>"],
                                               "eos_token_id": ids["<|im_end|>"]},
            **fam.tiny_token_ids(ids), tie_word_embeddings=text["tie_word_embeddings"])
    cfg.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").write_text(fam.chat_template)
    vocab = cfg.get_text_config().vocab_size
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [vocab + 1]}))
    return cfg


def lm_from_hf(hf: Any, cfg: TextConfig, dtype: torch.dtype) -> Qwen2LM:
    tensors = {"model." + k: v for k, v in hf.model.language_model.state_dict().items()}
    if not cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = hf.lm_head.weight
    return model_from_state(cfg, fuse_hub_tensors(cfg, tensors), device=hf.device, dtype=dtype)


class Image:
    """An image's features as the LLM worker reads them: embeddings [n, hidden] and, for Qwen3-VL,
    DeepStack features [L, n, hidden] (both on the CPU, as from Redis)."""

    def __init__(self, embeds: torch.Tensor, grid: tuple[int, int, int], key: str,
                 deepstack: torch.Tensor | None = None) -> None:
        self.embeds, self.grid, self.key, self.deepstack = embeds, grid, key, deepstack


def first_token_ms(engine: LLMEngine, image: Image, key: str, question: str) -> float:
    t0 = time.perf_counter()
    stream = engine.generate(image.embeds, image.grid, key, question, 1, deepstack=image.deepstack)
    first = None
    for event in stream:
        if first is None:
            first = time.perf_counter()
        if isinstance(event, Finish):
            break
    assert first is not None
    return (first - t0) * 1e3


def ms_per_token(engine: LLMEngine, image: Image, tokens: int) -> float:
    stamps = []
    for event in engine.generate(image.embeds, image.grid, image.key, QUESTIONS[0], tokens + 1,
                                 deepstack=image.deepstack):
        if isinstance(event, Delta) and event.token_id is not None:
            stamps.append(time.perf_counter())
    return (stamps[-1] - stamps[0]) * 1e3 / (len(stamps) - 1)


def concurrent(engine: LLMEngine, items: list[tuple[Image, str, str]], max_tokens: int) -> dict[str, float]:
    """All questions at once, consumed by one event loop (as the HTTP server does)."""

    async def one(image: Image, key: str, question: str) -> tuple[float, float, int]:
        first = None
        final = None
        async for event in engine.generate(image.embeds, image.grid, key, question, max_tokens,
                                           deepstack=image.deepstack):
            if first is None:
                first = time.perf_counter()
            if isinstance(event, Finish):
                final = event
        assert first is not None and final is not None
        return first, time.perf_counter(), final.completion_tokens

    async def main() -> list[tuple[float, float, int]]:
        return await asyncio.gather(*(one(*item) for item in items))

    t0 = time.perf_counter()
    results = asyncio.run(main())
    end = max(r[1] for r in results)
    last_first = max(r[0] for r in results)
    tokens = sum(r[2] for r in results)
    # how the burst was admitted: (ms after t0, requests, ms the admission took)
    admissions = [(round((at - t0) * 1e3, 2), n, round(took * 1e3, 2))
                  for at, n, took in list(engine.admissions) if at >= t0]
    return {"wall_ms": (end - t0) * 1e3, "tokens": tokens, "tok_s": tokens / (end - t0),
            "first_token_ms_max": (last_first - t0) * 1e3,
            "decode_phase_tok_s": (tokens - len(items)) / max(end - last_first, 1e-9),
            "admissions": admissions}


def decode_runner(lm: Qwen2LM, batch: int, max_len: int, *, graphs: bool, window_buckets: bool) -> DecodeRunner:
    """A decode runner of ``batch`` slots over a random KV cache, one batch bucket."""
    kv = allocate_kv_cache(lm.cfg, batch, max_len, device=lm.device, dtype=lm.dtype)
    kv.normal_()
    return DecodeRunner(lm, kv, use_graphs=graphs, window_buckets=window_buckets, batch_buckets=[batch])


def enter_slots(runner: DecodeRunner, context: int) -> None:
    """Every slot active at cache position ``context`` (its next step attends that far)."""
    n = runner.slots
    runner.set_slots(range(n), [100 + s for s in range(n)], [context] * n, [context + 10] * n)


def pure_decode_ms(lm: Qwen2LM, fn: Any, *, batch: int, window: int, max_len: int, graphs: bool,
                   window_buckets: bool, steps: int = 50, context: int = 300) -> float:
    """Back-to-back decode steps of the runner (tokens copied to the host each step, never read)."""
    runner = decode_runner(lm, batch, max_len, graphs=graphs, window_buckets=window_buckets)
    enter_slots(runner, context)
    b, w = runner.bucket(batch, window)
    with torch.inference_mode():
        for _ in range(3):
            runner.launch(fn, b, w)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            runner.launch(fn, b, w)
        sync()
    ms = (time.perf_counter() - t0) * 1e3 / steps
    del runner
    return ms


def record_env(device: torch.device, smoke: bool) -> None:
    RESULTS["env"] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
                      "torch": torch.__version__, "python": platform.python_version(),
                      "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:], "smoke": smoke,
                      "switch_interval_s": sys.getswitchinterval()}
    try:
        import transformers
        import triton

        RESULTS["env"] |= {"transformers": transformers.__version__, "triton": triton.__version__}
    except ImportError:
        pass
    log(json.dumps(RESULTS["env"]))


def copy_bandwidth_tb_s(device: torch.device) -> float:
    """The bandwidth ceiling: a 2 GiB device-to-device copy, bytes read + written, TB/s."""
    a = torch.randn(2**30, device=device, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    for _ in range(2):
        b.copy_(a)
    sync()
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    sync()
    rate = 2 * a.numel() * 2 * 10 / (time.perf_counter() - t0) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return round(rate, 3)
