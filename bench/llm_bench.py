"""LLM decode: HF generate against our engine (eager, fused, CUDA graphs), one process, one GPU.

    python bench/llm_bench.py [--out DIR] [--skip hf,agree,attn,prefill,7b,http,eager,fused] [--budget-s 420]
    python bench/llm_bench.py --smoke      # CPU, tiny config: code paths only (no graphs, no Triton)

Qwen2-VL-2B config (language model: hidden 1536, 28 layers, 12 heads / 2 KV heads, MLP 8960,
vocab 151936, tied) with random weights in bf16. HF's ``Qwen2VLForConditionalGeneration`` is built
with the 2B vision tower too and answers one question per ``generate`` call, re-encoding a
448x448 image (256 image tokens); our engines get the same language weights and the image
embeddings HF's tower makes. Engines:

- ``eager``: the plain PyTorch steps, no graphs (the engine before issue 5);
- ``fused``: the Triton-fused steps, no graphs;
- ``graphs``: fused steps, decode replayed from CUDA graphs, Triton decode attention, and the
  prefills replayed from CUDA graphs too (padded to buckets; ``prefill_graphs``, the default);
- ``graphs_eager_prefill``: the same with eager prefills (``prefill_graphs=False``), the engine
  before prefill graphs.

Scenarios: first token on an unseen image (prefix computed) and a seen one (prefix KV reused),
ms/token at batch 1, 8 concurrent questions on one image vs one question (32 new tokens each),
32 concurrent questions over 8 images (tokens/s vs a pure decode loop at batch 32), decode
attention variants (SDPA / masked matmul / Triton) in graphs, prefill alone (eager against
graph replay: 16 question tokens after a 271-token prefix, a 271-token prefix), greedy agreement over 50
question/image pairs, the 7B language model, and the HTTP overhead of /v1/questions.
Every scenario is guarded: a failure prints and the rest runs. Rows go to llm_bench.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.llm_harness import (  # noqa: E402
    JSON_PATH,
    QUESTIONS,
    RESULTS,
    Image,
    concurrent,
    copy_bandwidth_tb_s,
    first_token_ms,
    guarded,
    lm_from_hf,
    log,
    med,
    ms_per_token,
    pure_decode_ms,
    record,
    record_env,
    sync,
    write_checkpoint,
)
from bench.question_http import (  # noqa: E402
    HTTP_CLIENT,
    RAW_HTTP_CLIENT,
    StandInStore,
    in_app_times,
    paired,
    redis_store,
    serving,
    wait_for_count,
)
from service.llm.cuda_graphs import PrefillRow, PrefillRunner  # noqa: E402
from service.llm.engine import LLMEngine  # noqa: E402
from service.llm.model import (  # noqa: E402
    TextConfig,
    allocate_kv_cache,
    decode_step,
    decode_step_fused,
    model_from_state,
    prefill_at,
    prefill_fused_at,
    random_model,
)

TEXT_2B = {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
           "num_attention_heads": 12, "num_key_value_heads": 2, "tie_word_embeddings": True}
TEXT_7B = {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
           "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False}
VISION_2B = {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16, "mlp_ratio": 4}
TEXT_SMOKE = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 112, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}
VISION_SMOKE = {"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2}

# -- checkpoint directory (config, tokenizer, template; weights stay in memory) --------------------


def make_checkpoint(path: Path, text: dict, vision: dict, *, smoke: bool) -> Any:
    """Qwen2-VL of these sizes (``write_checkpoint``)."""
    rope = {"rope_type": "default", "rope_theta": 10000.0 if smoke else 1_000_000.0,
            "mrope_section": [2, 3, 3] if smoke else [16, 24, 24]}
    return write_checkpoint(
        path, "qwen2_vl",
        {**text, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_parameters": rope},
        {**vision, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
         "hidden_act": "quick_gelu"})


# -- measuring the engine -----------------------------------------------------------------------------


def sustained(engine: LLMEngine, items: list[tuple[Image, str, str]], max_tokens: int,
              seconds: float) -> dict[str, float]:
    """Closed loop: every item is a client that asks its question again as soon as it has the
    answer (whole answers, no deltas: as non-streamed HTTP requests), for ``seconds``; tokens/s over
    the whole run, admissions and prefills included."""

    async def client(image: Image, key: str, question: str, stop: float) -> tuple[int, int]:
        tokens = answers = 0
        while time.perf_counter() < stop:
            final = await engine.generate(image.embeds, image.grid, key, question, max_tokens, deltas=False).final()
            tokens += final.completion_tokens
            answers += 1
        return tokens, answers

    async def main(stop: float) -> list[tuple[int, int]]:
        return await asyncio.gather(*(client(*item, stop) for item in items))

    steps = engine.counters["decode_steps"]
    t0 = time.perf_counter()
    results = asyncio.run(main(t0 + seconds))
    elapsed = time.perf_counter() - t0
    tokens = sum(r[0] for r in results)
    admitted = [(n, took) for at, n, took in list(engine.admissions) if at >= t0]
    steps = engine.counters["decode_steps"] - steps
    admitting = sum(took for _, took in admitted)
    return {"seconds": elapsed, "answers": sum(r[1] for r in results), "tokens": tokens, "tok_s": tokens / elapsed,
            # how the run was admitted: rounds, questions per round, share of the time spent admitting
            "admissions": len(admitted), "per_admission": sum(n for n, _ in admitted) / max(len(admitted), 1),
            "admitting_share": admitting / elapsed, "decode_steps": steps,
            "ms_per_step_outside_admissions": (elapsed - admitting) / max(steps, 1) * 1e3}


def admission_profile(engine: LLMEngine, images: list[Image], reps: int = 5) -> dict[str, Any]:
    """32 questions on 8 seen images submitted atomically (so one admission takes them all), with
    the device synchronised around ``_start`` and each ``_prefill`` in it: what one admission of 32
    costs, and how much of it is the prefill graphs vs the host work around them."""
    starts: list[float] = []
    prefills: list[float] = []
    real_start, real_prefill = engine._start, engine._prefill

    def timed_prefill(*args: Any, **kwargs: Any) -> Any:
        sync()
        t0 = time.perf_counter()
        out = real_prefill(*args, **kwargs)
        sync()
        prefills.append((time.perf_counter() - t0) * 1e3)
        return out

    def timed_start(requests: list[Any]) -> None:
        sync()
        t0 = time.perf_counter()
        real_start(requests)
        sync()
        starts.append((time.perf_counter() - t0) * 1e3)

    engine._start, engine._prefill = timed_start, timed_prefill  # type: ignore[method-assign]
    host_meta: list[float] = []
    runner = engine.prefiller
    real_meta = runner._host_meta

    def timed_meta(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = real_meta(*args, **kwargs)
        host_meta.append((time.perf_counter() - t0) * 1e3)
        return out

    runner._host_meta = timed_meta  # type: ignore[method-assign]
    walls = []
    try:
        for _ in range(reps):
            t0 = time.perf_counter()
            with engine._cond:  # the scheduler waits until all 32 are queued
                streams = [engine.generate(images[i % 8].embeds, images[i % 8].grid, images[i % 8].key,
                                           QUESTIONS[i % 5], 2) for i in range(32)]
            for stream in streams:
                stream.result()
            walls.append((time.perf_counter() - t0) * 1e3)
    finally:
        del engine._start, engine._prefill, runner._host_meta  # the class's methods again
    return {"admissions": len(starts), "start_ms": med(starts), "prefill_ms": med(prefills),
            "prefill_host_inputs_ms": med(host_meta),
            "prefills_per_admission": len(prefills) / max(len(starts), 1), "wall_2_tokens_ms": med(walls),
            "host_ms_outside_prefill": round(med(starts) - med(prefills) * len(prefills) / max(len(starts), 1), 3)}


def rounded(row: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 3 if abs(v) < 10 else 1) if isinstance(v, float) else v for k, v in row.items()}


def engine_scenarios(name: str, engine: LLMEngine, images: list[Image], *, reps: int, decode_tokens: int,
                     batched_reps: int) -> None:
    """Every engine scenario of the 2B model, results under ``name``."""
    img = images[0]
    counter = iter(range(10**6))

    def fresh(image: Image) -> str:  # a key never seen: the prefix is computed
        return f"{image.key}/fresh{next(counter)}"

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    # warm up: graphs for batch 1, 8 and 32 (and their Triton kernels), cuBLAS, the allocator
    first_token_ms(engine, img, fresh(img), QUESTIONS[0])
    ms_per_token(engine, img, 8)
    concurrent(engine, [(img, fresh(img), QUESTIONS[i % 5]) for i in range(8)], 4)
    concurrent(engine, [(images[i % 8], fresh(images[i % 8]), QUESTIONS[i % 5]) for i in range(32)], 4)
    for question in QUESTIONS:  # every question's prefill bucket (a graph each, with prefill graphs)
        first_token_ms(engine, img, img.key, question)

    unseen = [first_token_ms(engine, img, fresh(img), QUESTIONS[1]) for _ in range(reps)]
    first_token_ms(engine, img, img.key, QUESTIONS[0])
    seen = [first_token_ms(engine, img, img.key, QUESTIONS[i % 5]) for i in range(reps)]
    record(f"{name}.first_token_unseen_ms", med(unseen))
    record(f"{name}.first_token_seen_ms", med(seen))
    record(f"{name}.ms_per_token_b1", med([ms_per_token(engine, img, decode_tokens) for _ in range(2)]))

    one = [concurrent(engine, [(img, fresh(img), QUESTIONS[0])], 32)["wall_ms"] for _ in range(batched_reps)]
    eight = [concurrent(engine, [(img, key, QUESTIONS[i % 5]) for i in range(8)], 32)["wall_ms"]
             for key in [fresh(img) for _ in range(batched_reps)]]
    record(f"{name}.one_question_32tok_unseen_ms", med(one))
    record(f"{name}.eight_questions_32tok_unseen_ms", med(eight))
    record(f"{name}.eight_over_one", round(med(eight) / med(one), 3))
    runs = []
    for _ in range(batched_reps):
        keys = [fresh(images[i]) for i in range(8)]
        runs.append(concurrent(engine, [(images[i % 8], keys[i % 8], QUESTIONS[i % 5]) for i in range(32)], 32))
    best = sorted(runs, key=lambda r: r["wall_ms"])[len(runs) // 2]
    record(f"{name}.b32_over_8_images_unseen", rounded(best))
    seen_runs = [concurrent(engine, [(images[i % 8], images[i % 8].key, QUESTIONS[i % 5]) for i in range(32)], 32)
                 for _ in range(batched_reps)]
    best = sorted(seen_runs, key=lambda r: r["wall_ms"])[len(seen_runs) // 2]
    record(f"{name}.b32_over_8_images_seen", rounded(best))
    record(f"{name}.admission_32_seen", admission_profile(engine, images))
    seen = [(images[i % 8], images[i % 8].key, QUESTIONS[i % 5]) for i in range(32)]
    sustained(engine, seen, 32, 0.5)  # warm-up
    record(f"{name}.b32_over_8_images_sustained_seen", rounded(sustained(engine, seen, 32, 3.0)))
    if torch.cuda.is_available():
        record(f"{name}.peak_memory_gib", round(torch.cuda.max_memory_allocated() / 2**30, 2))
    record(f"{name}.stats", engine.stats())
    record(f"{name}.prefill_runs", engine.prefiller.counters)


# -- main -----------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--skip", default="")
    ap.add_argument("--only", default="", help="comma list of scenarios to run (default: all)")
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval for this process (the GIL hand-over; Python's default 0.005 s)")
    args = ap.parse_args()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    skip = set(filter(None, args.skip.split(",")))
    only = set(filter(None, args.only.split(",")))

    def want(scenario: str) -> bool:
        # an engine's name ("graphs_eager_prefill") is wanted with its family ("graphs") unless skipped by name
        return scenario not in skip and (not only or scenario in only or scenario.split("_")[0] in only)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    JSON_PATH.append(out / "llm_bench.json")
    smoke = args.smoke
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    guard = partial(guarded, budget=args.budget_s)
    torch.manual_seed(0)
    record_env(device, smoke)
    if device.type == "cuda":
        record("copy_bandwidth_tb_s", copy_bandwidth_tb_s(device))

    tmp = Path(tempfile.mkdtemp(prefix="llm_bench_"))
    bench_2b(tmp, device, dtype, smoke, guard, want)  # the 7B model runs in its middle
    (out / "llm_bench.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    summary(RESULTS)


def bench_2b(tmp: Path, device: torch.device, dtype: torch.dtype, smoke: bool, guard: Callable[..., Any],
             want: Callable[[str], bool]) -> None:
    text = TEXT_SMOKE if smoke else TEXT_2B
    hf_cfg = make_checkpoint(tmp / "2b", text, VISION_SMOKE if smoke else VISION_2B, smoke=smoke)
    ckpt = tmp / "2b"
    cfg = TextConfig.from_dict(json.loads((ckpt / "config.json").read_text()))
    max_len = 1024
    grid = (1, 8, 8) if smoke else (1, 32, 32)  # 448x448: 1024 patches, 256 image tokens
    num_images = 10

    # HF's full model (vision tower + language model), random bf16 weights on the device
    from transformers import Qwen2VLForConditionalGeneration

    hf_cfg._attn_implementation = "sdpa"
    with torch.device(device):
        hf = Qwen2VLForConditionalGeneration._from_config(hf_cfg, dtype=dtype).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    lm = lm_from_hf(hf, cfg, dtype)
    weights_gib = sum(p.numel() * p.element_size() for p in lm.parameters()) / 2**30
    record("lm_weights_gib", round(weights_gib, 3))
    patches = grid[0] * grid[1] * grid[2]
    gen = torch.Generator(device).manual_seed(1)
    pixels = [torch.randn(patches, 3 * 2 * 14 * 14, generator=gen, device=device).to(dtype) for _ in range(num_images)]
    grid_t = torch.tensor([grid], device=device)
    images = []
    with torch.inference_mode():
        for i, px in enumerate(pixels):
            embeds = torch.cat(list(hf.model.get_image_features(px, grid_t).pooler_output))
            images.append(Image(embeds.cpu(), grid, f"image{i}"))  # from Redis: on the CPU
    log(f"image embeddings {tuple(images[0].embeds.shape)}")

    from service.llm.prompt import PromptBuilder

    prompts = PromptBuilder.from_checkpoint(ckpt)
    image_token = hf_cfg.image_token_id

    def hf_inputs(question: str, i: int = 0) -> dict[str, torch.Tensor]:
        ids = torch.tensor([prompts.build(question, images[i].embeds.shape[0]).ids], device=device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels[i],
                "image_grid_thw": grid_t, "mm_token_type_ids": (ids == image_token).int()}

    def hf_generate(question: str, new: int, i: int = 0) -> list[int]:
        inputs = hf_inputs(question, i)
        with torch.inference_mode():
            out = hf.generate(**inputs, max_new_tokens=new, do_sample=False)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    engines: dict[str, LLMEngine] = {}

    modes = {"eager": {"fused": False, "cuda_graphs": False},
             "fused": {"fused": True, "cuda_graphs": False},
             "graphs": {"fused": True, "cuda_graphs": True, "attention": "triton", "prefill_graphs": True},
             "graphs_eager_prefill": {"fused": True, "cuda_graphs": True, "attention": "triton",
                                      "prefill_graphs": False},
             "graphs_plain": {"fused": False, "cuda_graphs": True, "attention": "sdpa"}}  # fallback
    if smoke:  # CPU: no graphs; the bucketed prefill runs eagerly
        modes = {"eager": {"fused": False, "cuda_graphs": False},
                 "graphs": {"fused": False, "prefill_graphs": True},
                 "graphs_eager_prefill": {"fused": False, "prefill_graphs": False}}
    reps = 3 if smoke else 7

    def engine(name: str) -> LLMEngine:
        if name not in engines:
            engines[name] = LLMEngine(ckpt, device=device, dtype=dtype, max_batch_slots=32, max_seq_len=max_len,
                                      lm=lm, **modes[name])
        return engines[name]

    def graphs_engine() -> LLMEngine:
        """The CUDA-graph engine that worked: fused + Triton attention, else the plain steps."""
        for name in ("graphs", "graphs_plain"):
            if name in modes and RESULTS.get(f"{name}.ms_per_token_b1") is not None:
                return engine(name)
        return engine("graphs")

    def run_engine(name: str) -> bool:
        if name not in modes or not want(name):
            return False
        ok = []

        @guard(f"engine {name}")
        def _engine() -> None:
            slow = not name.startswith("graphs")
            engine_scenarios(name, engine(name), images, reps=3 if slow else reps,
                             decode_tokens=32 if slow else 128, batched_reps=1 if slow else 3)
            if slow:
                engines.pop(name).close()
            ok.append(True)

        return bool(ok)

    if not run_engine("graphs"):
        engines.pop("graphs", None)
        run_engine("graphs_plain")
    if run_engine("graphs_eager_prefill"):  # the baseline: the same engine with eager prefills
        engines.pop("graphs_eager_prefill").close()
    run_engine("eager")

    @guard("pure decode loops")
    def _pure() -> None:
        if not want("attn"):
            return
        fused_ok = device.type == "cuda"
        variants = {"plain_sdpa": (partial(decode_step, attention="sdpa"), True)}
        if fused_ok:
            variants |= {"fused_sdpa": (partial(decode_step_fused, attention="sdpa"), True),
                         "fused_matmul": (partial(decode_step_fused, attention="matmul"), True),
                         "fused_triton": (partial(decode_step_fused, attention="triton"), False)}
        for batch in (1, 8, 32):
            row = {}
            for vname, (fn, window_buckets) in variants.items():
                try:
                    row[vname] = round(pure_decode_ms(lm, fn, batch=batch, window=512, max_len=max_len,
                                                      graphs=True, window_buckets=window_buckets), 4)
                except Exception as exc:  # noqa: BLE001
                    row[vname] = f"{type(exc).__name__}: {exc}"[:200]
            if batch == 1:
                for vname in ("plain_sdpa", "fused_triton"):
                    if vname in variants:
                        fn, wb = variants[vname]
                        row[vname + "_eager"] = round(pure_decode_ms(lm, fn, batch=1, window=512, max_len=max_len,
                                                                     graphs=False, window_buckets=wb, steps=20), 4)
            record(f"pure_decode_ms.b{batch}_ctx300", row)

    @guard("prefill alone")
    def _prefill_alone() -> None:
        """Prefill alone, batch 1, the LM head and one host sync included: eager (plain and fused
        steps) against the bucketed prefill replayed from a CUDA graph (16 question tokens pad to
        16, the 271-token prefix to 320; ``*_graph_*``; on the CPU the bucketed prefill runs eagerly)."""
        if not want("prefill"):
            return
        from service.llm.model import prefill, prefill_fused

        fused_ok = device.type == "cuda"
        kv = allocate_kv_cache(lm.cfg, 2, max_len, device=device, dtype=dtype)
        slots = torch.tensor([1], device=device)
        fns = {"plain": prefill} | ({"fused": prefill_fused} if fused_ok else {})
        graph_fns = {"plain": prefill_at} | ({"fused": prefill_fused_at} if fused_ok else {})
        runner = PrefillRunner(lm, kv, use_graphs=True)
        image = torch.randn(256, lm.cfg.hidden_size, dtype=dtype)  # from Redis: on the CPU
        row = {}

        def timed(call: Callable[[], Any]) -> float:
            times = []
            for _ in range(8):
                sync()
                t0 = time.perf_counter()
                call()
                times.append((time.perf_counter() - t0) * 1e3)
            return med(times[3:])

        with torch.inference_mode():
            for label, start, t in (("question16_after271", 271, 16), ("prefix271", 0, 271)):
                x = torch.randn(1, t, lm.cfg.hidden_size, device=device, dtype=dtype)
                pos = (torch.arange(t, device=device) + start).expand(3, 1, t)
                for fname, fn in fns.items():
                    row[f"{fname}_{label}"] = timed(
                        lambda fn=fn, x=x, pos=pos, start=start: lm.logits(
                            fn(lm, kv, x, pos, slots, start)[:, -1]).argmax(-1).tolist())
                prow = PrefillRow(list(range(100, 100 + t)), torch.arange(start, start + t).expand(3, t), 1, start,
                                  (15, image) if start == 0 else None)
                for fname, fn in graph_fns.items():
                    row[f"{fname}_graph_{label}"] = timed(
                        lambda fn=fn, prow=prow: runner.run(fn, [prow])[1].tolist())  # type: ignore[union-attr]
        row["graphs"] = runner.graphs
        record("prefill_ms_b1", row)

    @guard("hf")
    def _hf() -> None:
        if not want("hf"):
            return
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        hf_generate(QUESTIONS[0], 2)

        def timed(new: int) -> float:
            sync()
            t0 = time.perf_counter()
            hf_generate(QUESTIONS[0], new)
            sync()
            return (time.perf_counter() - t0) * 1e3

        first = [timed(1) for _ in range(3)]
        full = [timed(33) for _ in range(2)]
        record("hf.first_token_ms", med(first))
        record("hf.ms_per_token_b1", round((med(full) - med(first)) / 32, 3))
        record("hf.answer_32tok_ms", round(med(first) + 31 * (med(full) - med(first)) / 32, 1))
        if device.type == "cuda":
            record("hf.peak_memory_gib", round(torch.cuda.max_memory_allocated() / 2**30, 2))

    @guard("agreement")
    def _agree() -> None:
        if not want("agree"):
            return
        pairs = [(images[i], QUESTIONS[j]) for i in range(num_images) for j in range(5)]  # 50
        new = 32

        def answers(eng: LLMEngine) -> list[list[int]]:
            streams = [eng.generate(im.embeds, im.grid, f"agree/{im.key}", q, new) for im, q in pairs]
            return [list(s.result().token_ids) for s in streams]

        def compare(a: list[list[int]], b: list[list[int]]) -> dict[str, float]:
            exact = sum(x == y for x, y in zip(a, b, strict=True))
            prefix = []
            for x, y in zip(a, b, strict=True):
                n = next((k for k, (u, v) in enumerate(zip(x, y, strict=False)) if u != v), min(len(x), len(y)))
                prefix.append(n / len(y))
            return {"exact": f"{exact}/{len(a)}", "mean_prefix_agreement": round(sum(prefix) / len(prefix), 3)}

        ours = answers(graphs_engine())
        plain = LLMEngine(ckpt, device=device, dtype=dtype, max_batch_slots=32, max_seq_len=max_len, lm=lm,
                          fused=False, cuda_graphs=False)
        try:
            record("agree.graphs_vs_eager_bf16", compare(ours, answers(plain)))
        finally:
            plain.close()
        lm32 = model_from_state(cfg, {k: v.float() for k, v in lm.state_dict().items()}, device=device,
                                dtype=torch.float32)
        ref = LLMEngine(ckpt, device=device, dtype=torch.float32, max_batch_slots=32, max_seq_len=max_len, lm=lm32)
        try:
            reference = answers(ref)
            record("agree.graphs_bf16_vs_ours_fp32", compare(ours, reference))
        finally:
            ref.close()
            del lm32
        if want("hf"):
            k = 3 if smoke else 6
            hf_ans = [hf_generate(pairs[i * 8][1], 16, i=(i * 8) // 5) for i in range(k)]
            record("agree.graphs_bf16_vs_hf_bf16_16tok", compare([ours[i * 8][:16] for i in range(k)], hf_ans))
            record("agree.ours_fp32_vs_hf_bf16_16tok", compare([reference[i * 8][:16] for i in range(k)], hf_ans))

    def http_scenario() -> None:
        @guard("http")
        def _http() -> None:
            if not want("http"):
                return
            http_overhead(graphs_engine(), ckpt, images[0], device)

    bench_7b(tmp, device, dtype, smoke, guard, want)
    http_scenario()
    run_engine("fused")
    for eng in engines.values():
        eng.close()


def bench_7b(tmp: Path, device: torch.device, dtype: torch.dtype, smoke: bool, guard: Callable[..., Any],
             want: Callable[[str], bool]) -> None:
    max_len, grid = 1024, (1, 32, 32)
    modes = {"eager": {"fused": False, "cuda_graphs": False},
             "graphs": {"fused": True, "cuda_graphs": True, "attention": "triton"}}

    @guard("7b")
    def _7b() -> None:
        if not want("7b") or smoke:
            return
        make_checkpoint(tmp / "7b", TEXT_7B, VISION_2B | {"hidden_size": 3584}, smoke=False)
        cfg7 = TextConfig.from_dict(json.loads((tmp / "7b" / "config.json").read_text()))
        lm7 = random_model(cfg7, device=device, dtype=dtype)
        record("7b.lm_weights_gib", round(sum(p.numel() * p.element_size() for p in lm7.parameters()) / 2**30, 3))
        gen7 = torch.Generator(device).manual_seed(2)
        img7 = [Image(torch.randn(256, 3584, generator=gen7, device=device).to(dtype).cpu(), grid, f"7b/{i}")
                for i in range(8)]
        for name in ("graphs", "eager"):
            torch.cuda.reset_peak_memory_stats()
            try:
                eng = LLMEngine(tmp / "7b", device=device, dtype=dtype, max_batch_slots=8, max_seq_len=max_len,
                                lm=lm7, **modes[name])
            except Exception:  # noqa: BLE001 - the fused path failed: the plain steps in graphs
                if name != "graphs":
                    raise
                traceback.print_exc()
                eng = LLMEngine(tmp / "7b", device=device, dtype=dtype, max_batch_slots=8, max_seq_len=max_len,
                                lm=lm7, fused=False, cuda_graphs=True)
                name = "graphs_plain"  # noqa: PLW2901
            try:
                first_token_ms(eng, img7[0], "warm", QUESTIONS[0])
                ms_per_token(eng, img7[0], 4)
                unseen = [first_token_ms(eng, img7[0], f"u{i}", QUESTIONS[1]) for i in range(5 if name.startswith("graphs") else 2)]
                first_token_ms(eng, img7[0], img7[0].key, QUESTIONS[0])
                seen = [first_token_ms(eng, img7[0], img7[0].key, QUESTIONS[i % 5]) for i in range(5)]
                record(f"7b.{name}.first_token_unseen_ms", med(unseen))
                record(f"7b.{name}.first_token_seen_ms", med(seen))
                record(f"7b.{name}.ms_per_token_b1", round(ms_per_token(eng, img7[0], 64 if name.startswith("graphs") else 16), 3))
                if name.startswith("graphs"):
                    concurrent(eng, [(img7[0], "w8", QUESTIONS[i % 5]) for i in range(8)], 4)
                    one = concurrent(eng, [(img7[0], "b1", QUESTIONS[0])], 32)["wall_ms"]
                    eight = concurrent(eng, [(img7[0], "b8", QUESTIONS[i % 5]) for i in range(8)], 32)["wall_ms"]
                    record(f"7b.{name}.eight_over_one_unseen", {"one_ms": round(one, 1), "eight_ms": round(eight, 1),
                                                               "ratio": round(eight / one, 3)})
                record(f"7b.{name}.peak_memory_gib", round(torch.cuda.max_memory_allocated() / 2**30, 2))
            finally:
                eng.close()
        for batch in (1, 8):
            row = {}
            for vname, fn, wb in (("fused_triton", partial(decode_step_fused, attention="triton"), False),
                                  ("plain_sdpa", decode_step, True)):
                try:
                    row[vname] = round(pure_decode_ms(lm7, fn, batch=batch, window=512, max_len=max_len,
                                                      graphs=True, window_buckets=wb), 4)
                except Exception as exc:  # noqa: BLE001
                    row[vname] = f"{type(exc).__name__}: {exc}"[:200]
            record(f"7b.pure_decode_ms.b{batch}_ctx300", row)



def http_overhead(engine: LLMEngine, ckpt: Path, image: Image, device: torch.device, reps: int = 60) -> None:
    """POST /v1/questions through uvicorn + our routes against ``engine.generate`` directly, same
    seen image, same question, ``reps`` of each alternating (``bench/question_http.py``); the
    overhead is the median of the pairs' differences. Features come from a stand-in store (no
    Redis: the routes and the engine only) and from a real Redis (what a deployment does per question)."""
    import httpx

    from service.store import ImageRecord

    image_id = "ab" * 32
    features = ImageRecord(image_id, "fp", "bench", image.grid, image.embeds.cpu())
    warm = 5

    def direct(tokens: int) -> float:
        t0 = time.perf_counter()
        engine.generate(image.embeds, image.grid, f"fp:{image_id}", QUESTIONS[0], tokens, deltas=False).result()
        return (time.perf_counter() - t0) * 1e3

    def measure(name: str, store: Any, server_ms: list[float]) -> None:
        with serving(engine, ckpt, store, device.type, "fp") as port:
            for tokens in (1, 32):
                body = json.dumps({"image_id": image_id, "question": QUESTIONS[0], "max_tokens": tokens})
                for _ in range(5):
                    direct(tokens)
                server_ms.clear()
                h, d = paired(HTTP_CLIENT, port, body, reps, partial(direct, tokens), warm=warm)
                in_app = wait_for_count(server_ms, warm + reps)[warm:]  # past the client's warm-up
                raw, d_raw = paired(RAW_HTTP_CLIENT, port, body, reps, partial(direct, tokens), warm=warm)
                row = {"http_ms": med(h), "direct_ms": med(d),
                       "overhead_ms": med([a - b for a, b in zip(h, d, strict=True)]),  # median of the pairs
                       "raw_socket_http_ms": med(raw),
                       "raw_socket_overhead_ms": med([a - b for a, b in zip(raw, d_raw, strict=True)]),
                       # where the overhead is: inside the app (routes, engine hand-off) or around it
                       "in_app_ms": med(in_app), "in_app_over_direct_ms": round(med(in_app) - med(d), 3),
                       "outside_app_ms": round(med(h) - med(in_app), 3)}
                if name == "standin":  # the first run's method too: httpx in this process
                    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                        def inproc() -> float:
                            t0 = time.perf_counter()
                            client.post("/v1/questions", content=body,  # noqa: B023
                                        headers={"Content-Type": "application/json"}).raise_for_status()
                            return (time.perf_counter() - t0) * 1e3
                        for _ in range(5):
                            inproc()
                        row["httpx_in_process_ms"] = med([inproc() for _ in range(reps)])
                record(f"http.{name}.max_tokens_{tokens}", row)

    with in_app_times() as server_ms:
        measure("standin", StandInStore(features), server_ms)
        with redis_store(features) as store:
            measure("redis", store, server_ms)


def summary(r: dict[str, Any]) -> None:
    def g(key: str) -> Any:
        return r.get(key, "-")

    def ratio(a: str, b: str) -> str:
        x, y = r.get(a), r.get(b)
        return f"{x / y:.1f}x" if isinstance(x, int | float) and isinstance(y, int | float) and y else "-"

    graphs = "graphs" if "graphs.ms_per_token_b1" in r or "graphs_plain.ms_per_token_b1" not in r else "graphs_plain"
    base = "graphs_eager_prefill"
    print("\n==== LLM decode (issue 5) ====", r["env"])
    print(f"(ours graphs = {graphs}; 'eager prefill' = graphs with prefill_graphs=False)")
    print(f"{'':34}{'HF generate':>14}{'ours eager':>14}{'ours fused':>14}{'eager prefill':>14}{'ours graphs':>14}"
          f"{'HF/graphs':>11}")
    for label, suffix, hf_key in [("first token, unseen image (ms)", "first_token_unseen_ms", "hf.first_token_ms"),
                                  ("first token, seen image (ms)", "first_token_seen_ms", "hf.first_token_ms"),
                                  ("decode, batch 1 (ms/token)", "ms_per_token_b1", "hf.ms_per_token_b1")]:
        print(f"{label:34}{g(hf_key)!s:>14}{g('eager.' + suffix)!s:>14}{g('fused.' + suffix)!s:>14}"
              f"{g(base + '.' + suffix)!s:>14}{g(graphs + '.' + suffix)!s:>14}{ratio(hf_key, graphs + '.' + suffix):>11}")
    for key in ("one_question_32tok_unseen_ms", "eight_questions_32tok_unseen_ms", "eight_over_one",
                "b32_over_8_images_unseen", "b32_over_8_images_seen", "b32_over_8_images_sustained_seen",
                "peak_memory_gib", "stats"):
        print(f"  {key}: eager {g('eager.' + key)} | fused {g('fused.' + key)} | eager prefill {g(base + '.' + key)}"
              f" | {graphs} {g(graphs + '.' + key)}")
    for key, value in r.items():
        if key.startswith(("pure_decode", "prefill_ms", "agree.", "7b.", "http.", "hf.", "lm_")):
            print(f"  {key}: {value}")
    if "errors" in r:
        print("ERRORS:", json.dumps(r["errors"], indent=1))
    if "skipped" in r:
        print("SKIPPED:", r["skipped"])


if __name__ == "__main__":
    main()
