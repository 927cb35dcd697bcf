"""Fixtures of the LLM worker's HTTP tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.llm.engine import LLMEngine
from service.vision.encoder import VisionEncoder


@pytest.fixture(scope="module")
def parts(tiny_checkpoint: Path):
    """A vision encoder and an LLM engine on the tiny checkpoint, for apps built with ``serve all``."""
    encoder = VisionEncoder(tiny_checkpoint, device="cpu")
    engine = LLMEngine(tiny_checkpoint, device="cpu", max_batch_slots=4, prefix_cache_entries=4)
    yield encoder, engine
    engine.close()
