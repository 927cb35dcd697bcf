"""Settings for both workers: flags of ``splitvl serve`` or ``SPLITVL_*`` environment variables.

Built in the app factory, never at import time, so tests and the CLI can make as many as they like.
"""

from __future__ import annotations

import json
from typing import Literal

import torch
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Role = Literal["vision", "llm", "all"]
# the role of the app that ``create_app_from_env`` builds in each of ``serve vision --workers N``'s processes
ROLE_ENV = "SPLITVL_ROLE"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPLITVL_", extra="ignore", protected_namespaces=())

    model: str = Field(description="checkpoint directory or hub id in the local HF cache")
    redis_url: str | None = Field(None, description="Redis URL; `serve all` starts an embedded Redis without one")
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = Field(
        1, ge=1, description="vision: processes serving one port, each with its own copy of the tower "
        "(host work in parallel on one GPU); llm and all take 1")
    device: str | None = Field(None, description="cpu or cuda; default cuda when a GPU is present")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="default bfloat16 on cuda, float32 on cpu"
    )
    api_keys: list[str] = Field(default_factory=list, description="bearer keys; empty: no auth")

    # feature store
    feature_ttl_s: int = Field(0, ge=0, description="expire features after this many seconds; 0: never")
    redis_timeout_s: float = Field(5.0, gt=0)

    # vision worker
    use_kernels: bool = Field(True, description="patch the vision tower with splitvl's Triton kernels on cuda")
    max_upload_bytes: int = Field(20 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(50_000_000, gt=0, description="decoded width*height limit (decompression bombs)")
    max_batch_patches: int = Field(16384, gt=0, description="patches per vision forward")
    max_batch_wait_ms: float = Field(5.0, ge=0)
    graph_max_images: int = Field(8, ge=0, le=32, description="vision on cuda: a forward of up to this many images "
                                  "of one size replays a CUDA graph (one per size and count; those of 448x448 and 1-2 "
                                  "images of 224x224 are recorded at start); 0: never")
    max_queue: int = Field(256, gt=0, description="jobs waiting per worker before 503")
    request_timeout_s: float = Field(60.0, gt=0)
    preprocess_threads: int = Field(4, gt=0)

    # LLM worker
    max_new_tokens: int = Field(1024, gt=0, description="largest max_tokens a request may ask for")
    max_question_tokens: int = Field(2048, gt=0)
    prefix_cache_entries: int = Field(32, ge=0, description="images whose prompt-prefix KV stays on the device")
    max_batch_size: int = Field(16, gt=0, description="questions decoded together")
    vision_url: str | None = Field(
        None, description="vision worker or gateway URL the LLM worker asks to encode images it has no features "
        "for (chat completions with a data URL); `serve all` uses its own vision worker")

    # logging
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per log line")

    @field_validator("api_keys")
    @classmethod
    def _api_keys(cls, v: list[str]) -> list[str]:
        # an empty key would match a request with no Authorization header at all
        for key in v:
            if not key or key != key.strip() or not key.isascii() or not key.isprintable():
                raise ValueError("API keys must be non-empty printable ASCII without surrounding spaces")
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str | None) -> str | None:
        if v is not None and v.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError("device must be cpu or cuda")
        return v

    @field_validator("vision_url")
    @classmethod
    def _vision_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("vision_url must be an http:// or https:// URL")
        return v.rstrip("/") if v else None

    def to_env(self) -> dict[str, str | None]:
        """``SPLITVL_*`` variables from which ``Settings()`` in another process rebuilds these settings.

        pydantic-settings parses complex fields (the ``api_keys`` list) from JSON and the others from
        plain strings, so only non-strings are JSON-encoded (JSON's ``true``/``5.0`` also parse as
        bool/float). ``None`` means "leave the variable unset": an unset optional field is not a string.
        """
        prefix = self.model_config.get("env_prefix", "")
        return {f"{prefix}{name.upper()}": value if isinstance(value, str) or value is None else json.dumps(value)
                for name, value in self.model_dump(mode="json").items()}

    def resolved_device(self) -> str:
        if self.device:
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self) -> torch.dtype:
        name = self.dtype or ("bfloat16" if self.resolved_device().startswith("cuda") else "float32")
        return getattr(torch, name)
