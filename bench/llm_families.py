"""The later families' language models on the GPU (issues 13 and 14): Qwen2.5-VL-3B, Qwen3-VL-2B and
Qwen3-VL-8B through the engine as the LLM worker runs them, one process, one GPU.

    python bench/llm_families.py [--out DIR] [--only qwen3_vl_2b,...] [--skip hf] [--budget-s 300]
    python bench/llm_families.py --smoke     # CPU, each family's tiny config: code paths only

Every model gets random bf16 weights (speed does not depend on the values) and the engine's GPU
path: the fused Triton kernels (Qwen3's q/k norms inside them), decode replayed from CUDA graphs
with the Triton decode attention, prefills padded to buckets and replayed from CUDA graphs (for
Qwen3-VL with the image's DeepStack features in the prefix prefill's graph); 8 slots, 1024
positions. Per model:

- decode at batch 1, ms/token over 128 tokens, against the floor: the bytes one step must read (all
  layer weights, the norms and the LM head; an untied input embedding is read one row a step) at
  the device-to-device copy rate measured in this run; a pure decode loop (graph replays, no
  engine) beside it;
- first token on an unseen image (its prefix computed, DeepStack injected) and on a seen one (the
  prefix's KV reused);
- 8 concurrent questions on one unseen image against one question, 32 new tokens each;
- Qwen3-VL-2B only: HF's ``Qwen3VLForConditionalGeneration`` (its vision tower too, sdpa) on the
  same weights: ``generate``'s first token (it encodes the 448x448 image again) and ms/token, and
  greedy agreement with our engine (bf16 on random weights: near ties flip, so this is a record).

The harness (timings, guards, the JSON file) is ``llm_harness``, which needs neither the HTTP stack
nor redis-py; results go to llm_families.json and a table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
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
    med,
    ms_per_token,
    pure_decode_ms,
    record,
    record_env,
    sync,
    write_checkpoint,
)
from service.llm.engine import LLMEngine  # noqa: E402
from service.llm.model import Qwen2LM, TextConfig, decode_step, decode_step_fused, random_model  # noqa: E402
from service.llm.prompt import PromptBuilder  # noqa: E402
from service.models import family as family_named  # noqa: E402


@dataclass(frozen=True)
class Model:
    """A published checkpoint's language model (and the vision config its ``config.json`` holds;
    the vision tower runs only where HF's full model is measured beside ours)."""

    family: str
    text: dict
    vision: dict
    goal_ms_per_token: float | None = None  # the goal at batch 1, when it names one
    goal_over_floor: float | None = None


def _qwen3_text(**sizes: Any) -> dict:
    """What every Qwen3-VL language model shares (hub config.json's text_config)."""
    return {"vocab_size": 151936, "head_dim": 128, "attention_bias": False, "hidden_act": "silu",
            "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20],
                                "mrope_interleaved": True}} | sizes


def _qwen3_vision(**sizes: Any) -> dict:
    return {"hidden_act": "gelu_pytorch_tanh", "num_heads": 16, "in_channels": 3, "patch_size": 16,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304} | sizes


# The hub's config.json of each Qwen/*-Instruct checkpoint, as transformers 5.17's config classes read it.
MODELS = {
    "qwen2_5_vl_3b": Model(
        "qwen2_5_vl",
        {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
         "num_attention_heads": 16, "num_key_value_heads": 2, "tie_word_embeddings": True, "hidden_act": "silu",
         "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
         "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]}},
        {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 2048,
         "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "patch_size": 14, "spatial_merge_size": 2,
         "temporal_patch_size": 2, "in_chans": 3, "hidden_act": "silu"}),
    "qwen3_vl_2b": Model(
        "qwen3_vl",
        _qwen3_text(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                    num_key_value_heads=8, tie_word_embeddings=True),
        _qwen3_vision(depth=24, hidden_size=1024, intermediate_size=4096, out_hidden_size=2048,
                      deepstack_visual_indexes=[5, 11, 17]),
        goal_ms_per_token=1.6),
    "qwen3_vl_8b": Model(
        "qwen3_vl",
        _qwen3_text(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                    num_key_value_heads=8, tie_word_embeddings=False),
        _qwen3_vision(depth=27, hidden_size=1152, intermediate_size=4304, out_hidden_size=4096,
                      deepstack_visual_indexes=[8, 16, 24]),
        goal_over_floor=1.3),
}
HF_MODEL = "qwen3_vl_2b"  # the one measured against HF's generate in the same process
GOALS = {"first_token_seen_ms": 8.0, "first_token_unseen_ms": 20.0, "eight_over_one": 1.5}
MAX_LEN, SLOTS, IMAGE_SIDE = 1024, 8, 448


def text_config(name: str) -> TextConfig:
    """``MODELS[name]``'s language model as its family reads the checkpoint's config.json."""
    spec = MODELS[name]
    return family_named(spec.family).text_config({"text_config": spec.text, "vision_config": spec.vision})


def step_bytes(lm: Qwen2LM) -> int:
    """What a batch-1 decode step must read: every weight but an untied input embedding (one row)."""
    untied_input = lm.embed_tokens.weight if lm.lm_head is not None else None
    return sum(p.numel() * p.element_size() for p in lm.parameters() if p is not untied_input)


class Setup:
    """One model's checkpoint directory, weights, image features and (for ``HF_MODEL``) HF's model."""

    def __init__(self, name: str, tmp: Path, device: torch.device, dtype: torch.dtype, *, smoke: bool,
                 with_hf: bool) -> None:
        spec = MODELS[name]
        fam = family_named(spec.family)
        self.name, self.device, self.dtype = name, device, dtype
        self.ckpt = tmp / name
        self.hf_config = write_checkpoint(self.ckpt, spec.family, None if smoke else spec.text,
                                          None if smoke else spec.vision)
        self.cfg = fam.text_config(json.loads((self.ckpt / "config.json").read_text()))
        patch = fam.preprocess_defaults.patch_size
        side = 4 if smoke else IMAGE_SIDE // patch  # 448x448: 32x32 patches of 14, 28x28 of 16
        self.grid = (1, side, side)
        self.hf = None
        self.pixels: list[torch.Tensor] = []
        self.prompts = PromptBuilder.from_checkpoint(self.ckpt)
        if with_hf:  # HF's full model (vision tower too); our engine gets its language weights
            self.hf_config._attn_implementation = "sdpa"
            with torch.device(device):
                self.hf = fam.hf_model_class()._from_config(self.hf_config, dtype=dtype).eval()
            self.hf.generation_config.eos_token_id = None
            self.hf.generation_config.pad_token_id = 0
            self.lm = lm_from_hf(self.hf, self.cfg, dtype)
            gen = torch.Generator(device).manual_seed(1)
            self.pixels = [torch.randn(side * side, 3 * 2 * patch * patch, generator=gen, device=device).to(dtype)
                           for _ in range(2)]
            self.images = [self._hf_features(px, i) for i, px in enumerate(self.pixels)]
        else:
            self.lm = random_model(self.cfg, device=device, dtype=dtype)
            gen = torch.Generator(device).manual_seed(2)
            n, layers = side * side // 4, self.cfg.deepstack_layers
            self.images = [Image(torch.randn(n, self.cfg.hidden_size, generator=gen, device=device).to(dtype).cpu(),
                                 self.grid, f"{name}/{i}",
                                 torch.randn(layers, n, self.cfg.hidden_size, generator=gen, device=device)
                                 .to(dtype).cpu() if layers else None)
                           for i in range(2)]

    @torch.inference_mode()
    def _hf_features(self, pixels: torch.Tensor, i: int) -> Image:
        """The image's features from HF's tower, on the CPU as the worker reads them from Redis."""
        assert self.hf is not None
        out = self.hf.model.get_image_features(pixels, torch.tensor([self.grid], device=self.device))
        deepstack = getattr(out, "deepstack_features", None)
        return Image(torch.cat(list(out.pooler_output)).cpu(), self.grid, f"{self.name}/{i}",
                     torch.stack(deepstack).cpu() if deepstack else None)

    def hf_generate(self, question: str, new: int, i: int = 0) -> list[int]:
        """HF's greedy answer (the image encoded again, as each HF call does)."""
        assert self.hf is not None
        ids = self.prompts.build(question, self.images[i].embeds.shape[0]).ids
        input_ids = torch.tensor([ids], device=self.device)
        with torch.inference_mode():
            out = self.hf.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                   pixel_values=self.pixels[i], image_grid_thw=torch.tensor([self.grid], device=self.device),
                                   mm_token_type_ids=(input_ids == self.hf_config.image_token_id).int(),
                                   max_new_tokens=new, do_sample=False)
        return out[0, input_ids.shape[1]:].tolist()


def engine_figures(name: str, engine: LLMEngine, images: list[Image], *, reps: int, decode_tokens: int) -> None:
    """First tokens (unseen, seen), ms/token at batch 1, and 8 concurrent questions against one."""
    img = images[0]
    counter = iter(range(10**6))

    def fresh() -> str:  # a key never seen: the prefix is computed
        return f"{img.key}/fresh{next(counter)}"

    # warm up: the decode graphs, every question's prefill bucket, the 8-row buckets
    first_token_ms(engine, img, fresh(), QUESTIONS[0])
    ms_per_token(engine, img, 8)
    concurrent(engine, [(img, fresh(), QUESTIONS[i % 5]) for i in range(8)], 4)
    for question in QUESTIONS:
        first_token_ms(engine, img, img.key, question)
    unseen = [first_token_ms(engine, img, fresh(), QUESTIONS[1]) for _ in range(reps)]
    seen = [first_token_ms(engine, img, img.key, QUESTIONS[i % 5]) for i in range(reps)]
    record(f"{name}.first_token_unseen_ms", med(unseen))
    record(f"{name}.first_token_seen_ms", med(seen))
    record(f"{name}.ms_per_token_b1", med([ms_per_token(engine, img, decode_tokens) for _ in range(2)]))
    one = [concurrent(engine, [(img, fresh(), QUESTIONS[0])], 32)["wall_ms"] for _ in range(3)]
    eight = [concurrent(engine, [(img, key, QUESTIONS[i % 5]) for i in range(8)], 32)["wall_ms"]
             for key in [fresh() for _ in range(3)]]
    record(f"{name}.one_question_32tok_unseen_ms", med(one))
    record(f"{name}.eight_questions_32tok_unseen_ms", med(eight))
    record(f"{name}.eight_over_one", round(med(eight) / med(one), 3))
    record(f"{name}.stats", engine.stats())


def hf_figures(setup: Setup, engine: LLMEngine, *, smoke: bool) -> None:
    """HF generate's first token and ms/token on the same weights, and greedy agreement with ours."""

    def timed(new: int) -> float:
        sync()
        t0 = time.perf_counter()
        setup.hf_generate(QUESTIONS[0], new)
        sync()
        return (time.perf_counter() - t0) * 1e3

    timed(2)
    first = [timed(1) for _ in range(3)]
    full = [timed(33) for _ in range(2)]
    record(f"{setup.name}.hf.first_token_ms", med(first))
    record(f"{setup.name}.hf.ms_per_token_b1", round((med(full) - med(first)) / 32, 3))
    pairs = [(i, q) for i in range(len(setup.images)) for q in QUESTIONS[:2]]
    new = 8 if smoke else 16
    ours = [list(engine.generate(setup.images[i].embeds, setup.grid, f"agree/{i}", q, new,
                                 deepstack=setup.images[i].deepstack).result().token_ids) for i, q in pairs]
    theirs = [setup.hf_generate(q, new, i) for i, q in pairs]
    record(f"{setup.name}.agree_with_hf", {
        "tokens": new, "exact": f"{sum(a == b for a, b in zip(ours, theirs, strict=True))}/{len(pairs)}",
        "first_token": f"{sum(a[0] == b[0] for a, b in zip(ours, theirs, strict=True))}/{len(pairs)}"})


def bench_model(name: str, tmp: Path, device: torch.device, dtype: torch.dtype, *, smoke: bool,
                want: Callable[[str], bool]) -> None:
    with_hf = name == HF_MODEL and want("hf")
    setup = Setup(name, tmp, device, dtype, smoke=smoke, with_hf=with_hf)
    lm = setup.lm
    record(f"{name}.config", {k: getattr(setup.cfg, k) for k in (
        "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "vocab_size",
        "tie_word_embeddings", "qkv_bias", "qk_norm", "mrope_interleaved", "deepstack_layers")})
    gib = step_bytes(lm) / 2**30
    record(f"{name}.step_weights_gib", round(gib, 3))
    if "copy_bandwidth_tb_s" in RESULTS:
        record(f"{name}.floor_ms_per_token", round(step_bytes(lm) / (RESULTS["copy_bandwidth_tb_s"] * 1e12) * 1e3, 3))
    gpu = device.type == "cuda"
    fn = partial(decode_step_fused, attention="triton") if gpu else decode_step
    record(f"{name}.pure_decode_ms_b1", round(pure_decode_ms(lm, fn, batch=1, window=512, max_len=MAX_LEN, graphs=gpu,
                                                             window_buckets=not gpu, steps=50 if gpu else 3), 4))
    # the GPU path is the default on CUDA; prefill_graphs on the CPU too: the padded prefills run eagerly there
    engine = LLMEngine(setup.ckpt, device=device, dtype=dtype, max_batch_slots=SLOTS, max_seq_len=MAX_LEN, lm=lm,
                       prefill_graphs=True)
    try:
        record(f"{name}.engine", {"fused": engine.fused, "attention": engine.attention,
                                  "decode_graphs": engine.runner.use_graphs,
                                  "prefill_graphs": engine.prefiller.bucketed})
        engine_figures(name, engine, setup.images, reps=3 if smoke else 7, decode_tokens=8 if smoke else 128)
        if with_hf:
            hf_figures(setup, engine, smoke=smoke)
    finally:
        engine.close()
    if gpu:
        record(f"{name}.peak_memory_gib", round(torch.cuda.max_memory_allocated() / 2**30, 2))
        del engine, setup, lm
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def summary(r: dict[str, Any]) -> None:
    def g(key: str) -> Any:
        return r.get(key, "-")

    print("\n==== the later families' language models (issues 13, 14) ====", r["env"])
    print(f"copy rate {g('copy_bandwidth_tb_s')} TB/s; goals: Qwen3-VL-2B <= 1.6 ms/token, 8B <= 1.3x floor, first "
          f"token seen <= {GOALS['first_token_seen_ms']} / unseen <= {GOALS['first_token_unseen_ms']} ms, "
          f"8 concurrent <= {GOALS['eight_over_one']}x one")
    head = ["weights GiB", "floor ms", "ms/token", "x floor", "pure loop", "1st unseen", "1st seen", "8 / 1"]
    print(f"{'':16}" + "".join(f"{h:>12}" for h in head))
    for name in MODELS:
        if f"{name}.config" not in r:
            continue
        ms, floor = r.get(f"{name}.ms_per_token_b1"), r.get(f"{name}.floor_ms_per_token")
        over = f"{ms / floor:.2f}" if isinstance(ms, float) and isinstance(floor, float) else "-"
        row = [g(f"{name}.step_weights_gib"), floor or "-", ms or "-", over, g(f"{name}.pure_decode_ms_b1"),
               g(f"{name}.first_token_unseen_ms"), g(f"{name}.first_token_seen_ms"), g(f"{name}.eight_over_one")]
        print(f"{name:16}" + "".join(f"{v!s:>12}" for v in row))
    for name in MODELS:
        if f"{name}.hf.ms_per_token_b1" in r:
            print(f"HF generate, {name}: first token {g(name + '.hf.first_token_ms')} ms, "
                  f"{g(name + '.hf.ms_per_token_b1')} ms/token; greedy agreement with ours {g(name + '.agree_with_hf')}")
    if "errors" in r:
        print("ERRORS:", json.dumps(r["errors"], indent=1))
    if "skipped" in r:
        print("SKIPPED:", r["skipped"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--only", default="", help=f"comma list of models ({', '.join(MODELS)})")
    ap.add_argument("--skip", default="", help="comma list of models, or 'hf'")
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    only, skip = set(filter(None, args.only.split(","))), set(filter(None, args.skip.split(",")))
    if unknown := (only | skip) - set(MODELS) - {"hf"}:
        ap.error(f"unknown model {sorted(unknown)[0]!r}; the models are {', '.join(MODELS)}")

    def want(name: str) -> bool:
        return name not in skip and (not only or name in only or name == "hf")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    JSON_PATH.append(out / "llm_families.json")
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    record_env(device, args.smoke)
    if device.type == "cuda":
        record("copy_bandwidth_tb_s", copy_bandwidth_tb_s(device))
    tmp = Path(tempfile.mkdtemp(prefix="llm_families_"))
    for name in MODELS:
        if want(name):
            guarded(name, args.budget_s)(partial(bench_model, name, tmp, device, dtype, smoke=args.smoke, want=want))
    summary(RESULTS)


if __name__ == "__main__":
    main()
