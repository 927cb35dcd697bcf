"""Fixtures of the robustness tests: one vision encoder and one LLM engine for the session, app factories."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from service.app import create_app
from service.config import Role, Settings
from service.llm.engine import LLMEngine
from service.vision.encoder import VisionEncoder


@pytest.fixture(scope="session")
def encoder(tiny_checkpoint: Path) -> VisionEncoder:
    return VisionEncoder(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="session")
def engine(tiny_checkpoint: Path) -> Iterator[LLMEngine]:
    engine = LLMEngine(tiny_checkpoint, device="cpu", max_batch_slots=4, prefix_cache_entries=8)
    yield engine
    engine.close()


AppFactory = Callable[..., FastAPI]


@pytest.fixture
def make_app(tiny_checkpoint: Path, encoder: VisionEncoder, engine: LLMEngine) -> AppFactory:
    """``make_app(role="all", redis_url=..., **settings)``: the session's encoder and engine by default.

    ``own_engine=True`` lets the LLM worker build its engine from the settings (``max_queue``,
    ``max_batch_size``), as ``splitvl serve`` does; it is closed with the app.
    """

    def factory(role: Role = "all", *, redis_url: str, llm_engine: LLMEngine | None = None,
                vision_encoder: VisionEncoder | None = None, own_engine: bool = False, **overrides: Any) -> FastAPI:
        settings = Settings(model=str(tiny_checkpoint), redis_url=redis_url, device="cpu",
                            **{"max_batch_wait_ms": 2, **overrides})
        workers: dict[str, Any] = {"vision_encoder": vision_encoder or encoder}
        if not own_engine:
            workers["llm_engine"] = llm_engine or engine
        return create_app(settings, role, workers=workers)

    return factory
