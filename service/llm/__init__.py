"""The LLM worker's engine: our own language model for every family (Qwen2's decoder, with Qwen3's
q/k norms and DeepStack where the family has them), prompts, and a batching scheduler.

``LLMEngine(model_or_checkpoint, device=..., dtype=...).generate(image_embeds, grid_thw, image_key,
question, max_tokens, temperature, top_p, seed, deepstack=...)`` returns a ``Generation`` stream of ``Delta``
events and a final ``Finish``; see ``service.llm.engine``.
"""

from service.llm.engine import LLMEngine, sample_token
from service.llm.generation import Delta, Finish, Generation
from service.llm.model import Qwen2LM, TextConfig, decode_step, load_model, prefill
from service.llm.prompt import Prompt, PromptBuilder, StreamDecoder, positions

__all__ = [
    "Delta",
    "Finish",
    "Generation",
    "LLMEngine",
    "Prompt",
    "PromptBuilder",
    "Qwen2LM",
    "StreamDecoder",
    "TextConfig",
    "decode_step",
    "load_model",
    "positions",
    "prefill",
    "sample_token",
]
