"""Settings for both workers: the one definition behind ``splitvl serve``'s flags, the ``SPLITVL_*``
environment variables and the README's configuration table.

Each field says, besides its type, range and default, which roles it applies to, its help text and
(where the default is computed) how to show its default. ``service.cli`` builds each role's flags
from it, ``settings_table()`` renders the README's table (``python -m service.config``), and
``tests/service/test_config.py`` checks that the three agree.

Built in the app factory, never at import time, so tests and the CLI can make as many as they like.
No torch at import: the CLI's client verbs import this module and should start fast.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args, get_origin

from pydantic import Field, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

if TYPE_CHECKING:
    import torch

Role = Literal["vision", "llm", "all"]
ROLES: tuple[Role, ...] = get_args(Role)
VISION: tuple[Role, ...] = ("vision", "all")
LLM: tuple[Role, ...] = ("llm", "all")
# the role of the app that ``create_app_from_env`` builds in each of ``serve vision --workers N``'s processes
ROLE_ENV = "SPLITVL_ROLE"
ENV_PREFIX = "SPLITVL_"
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def setting(default: Any = ..., help: str = "", *, roles: tuple[Role, ...] = ROLES, flag: str | None = None,
            shown: str | None = None, **constraints: Any) -> Any:
    """A pydantic ``Field`` that also carries what the CLI and the README show: the roles it applies
    to, the flag's name when it is not the field's (``--api-key`` for ``api_keys``) and the default
    as shown when the value itself says little (``None`` that means "computed at start")."""
    extra = {"roles": list(roles), "flag": flag, "shown": shown}
    if default is ...:
        return Field(description=help, json_schema_extra=extra, **constraints)
    return Field(default, description=help, json_schema_extra=extra, **constraints)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", protected_namespaces=())

    model: str = setting(help="checkpoint directory (holding config.json), or a hub id already in the local "
                         "Hugging Face cache (never downloaded)", min_length=1)
    served_model_name: str | None = setting(
        None, "the name answers give as `model` (OpenAI's `model` field when the request names none)",
        shown="the hub id, or the model directory's name", min_length=1, max_length=256)
    redis_url: str | None = setting(
        None, "where features are stored: redis://[:password@]host:port/db, rediss://… (TLS) or unix:///path.sock",
        shown="required by vision and llm; `serve all`: an embedded redis-server")
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0: all interfaces)", min_length=1)
    port: int = setting(8000, "TCP port to listen on", ge=1, le=65535)
    workers: int = setting(
        1, "processes serving the port, each with its own copy of the tower, so that uploads' host work runs "
        "in parallel on one GPU (README: several vision processes on one GPU)", roles=("vision",), ge=1, le=64)
    device: str | None = setting(None, "cpu, cuda or cuda:N", shown="cuda when a GPU is present, else cpu")
    dtype: Literal["float32", "bfloat16", "float16"] | None = setting(
        None, "weights and activations", shown="bfloat16 on cuda, float32 on cpu")
    api_keys: Annotated[list[str], NoDecode] = setting(
        default_factory=list, help="bearer keys; when set, every endpoint but /healthz needs one (flag: repeat it; "
        "env: a JSON list, e.g. '[\"key-1\", \"key-2\"]')", flag="api-key", shown="none: no auth", max_length=1000)

    # feature store
    feature_ttl_s: int = setting(0, "expire stored features after this many seconds (0: never; Redis' maxmemory "
                                 "and LRU bound memory anyway)", roles=VISION, ge=0, le=10 * 365 * 86400)
    redis_timeout_s: float = setting(5.0, "seconds a Redis command may take before the request gets a 503",
                                     gt=0, le=600)

    # vision worker
    use_kernels: bool = setting(True, "run the vision tower with splitvl's Triton kernels on cuda "
                                "(--no-kernels: HF's modules, to compare)", roles=VISION, flag="kernels")
    max_upload_bytes: int = setting(20 * 1024 * 1024, "largest image upload in bytes (also bounds a chat "
                                    "completion's inline image)", ge=1, le=2**31)
    max_image_pixels: int = setting(50_000_000, "largest decoded width x height (decompression bombs are refused "
                                    "from the header)", roles=VISION, ge=1, le=2**31)
    max_decode_work: int = setting(
        1_000_000_000, "decoding work per image in pixel-passes: width x height times a progressive JPEG's scans "
        "(1 for other formats); files that decode far slower than their size suggests get 422 image_too_complex",
        roles=VISION, ge=1, le=2**50)
    max_batch_patches: int = setting(16384, "patches per vision forward (bounds activation memory)", roles=VISION,
                                     ge=1, le=2**24)
    max_batch_wait_ms: float = setting(5.0, "how long the first upload of a batch waits for company",
                                       roles=VISION, ge=0, le=10_000)
    graph_max_images: int = setting(
        8, "on cuda: a forward of up to this many images of one size replays a CUDA graph (those of 448x448 and "
        "1-2 images of 224x224 are recorded at start); 0: never", roles=VISION, ge=0, le=32)
    max_queue: int = setting(256, "jobs waiting per worker before 503 overloaded", ge=1, le=1_000_000)
    request_timeout_s: float = setting(60.0, "a request still queued or running after this many seconds gets a "
                                       "503", gt=0, le=86400)
    body_timeout_s: float = setting(60.0, "a request's whole body must arrive within this many seconds of its "
                                    "start (408 after)", gt=0, le=86400)
    preprocess_threads: int = setting(4, "threads decoding and resizing uploads", roles=VISION, ge=1, le=256)

    # LLM worker
    max_new_tokens: int = setting(1024, "largest max_tokens a question may ask for", roles=LLM, ge=1, le=1 << 20)
    max_question_tokens: int = setting(2048, "longest question, in tokens", roles=LLM, ge=1, le=1 << 20)
    prefix_cache_entries: int = setting(32, "images whose prompt-prefix KV cache stays on the device", roles=LLM,
                                        ge=0, le=100_000)
    max_batch_size: int = setting(16, "questions decoded together", roles=LLM, ge=1, le=1024)
    vision_url: str | None = setting(
        None, "vision worker or gateway that encodes images sent inline to /v1/chat/completions when their "
        "features are not stored", roles=("llm",), shown="none (compose: http://gateway:8000)")

    # logging
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = setting("info", "log level")
    log_format: Literal["text", "json"] = setting(
        "text", "json: one JSON object per line with request_id (and pid with several workers)")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _api_keys_from_env(cls, v: object) -> object:
        # the environment gives a string; a plain one would otherwise be a JSON error deep in pydantic-settings
        if not isinstance(v, str):
            return v
        try:
            keys = json.loads(v) if v.strip() else []
        except ValueError:
            keys = None
        if not isinstance(keys, list):
            raise ValueError("must be a JSON list of keys: '[\"key-1\"]' or '[\"key-1\", \"key-2\"]'")
        return keys

    @field_validator("api_keys")
    @classmethod
    def _api_keys(cls, v: list[str]) -> list[str]:
        # an empty key would match a request with no Authorization header at all
        for key in v:
            if not key or key != key.strip() or not key.isascii() or not key.isprintable():
                raise ValueError("API keys must be non-empty printable ASCII without surrounding spaces")
        return v

    @field_validator("served_model_name")
    @classmethod
    def _served_model_name(cls, v: str | None) -> str | None:
        # it is stored with every record and sent in headers: a name a read would refuse is refused here
        if v is not None and (v != v.strip() or not v.isprintable()):
            raise ValueError("the served model name must be printable text without surrounding spaces")
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str | None) -> str | None:
        if v is None:
            return v
        kind, _, index = v.partition(":")
        if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
            raise ValueError(f"device must be cpu, cuda or cuda:N, not {v!r}")
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(REDIS_SCHEMES):
            raise ValueError(f"must start with {', '.join(REDIS_SCHEMES)}: e.g. redis://{v or 'localhost:6379'}"
                             f"{'' if '/' in v else '/0'}")
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
        return {env_name(name): value if isinstance(value, str) or value is None else json.dumps(value)
                for name, value in self.model_dump(mode="json").items()}

    def resolved_device(self) -> str:
        if self.device:
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self) -> torch.dtype:
        import torch

        name = self.dtype or ("bfloat16" if self.resolved_device().startswith("cuda") else "float32")
        return getattr(torch, name)

    def served_name(self) -> str:
        """What answers call the model: ``served_model_name``, else the hub id or the directory's name
        (never a server path)."""
        from pathlib import Path

        if self.served_model_name:
            return self.served_model_name
        path = Path(self.model).expanduser()
        return self.model if not path.exists() and self.model.count("/") == 1 else path.resolve().name


# --------------------------------------------------------------------------------------------
# what the CLI and the README show of each setting


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def _extra(info: FieldInfo) -> dict:
    extra = info.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def roles_of(field: str) -> tuple[Role, ...]:
    return tuple(_extra(Settings.model_fields[field]).get("roles", ROLES))


def flag_of(field: str) -> str:
    return "--" + (_extra(Settings.model_fields[field]).get("flag") or field.replace("_", "-"))


def value_type(field: str) -> tuple[type, tuple[str, ...]]:
    """(the Python type of one value, its choices if a Literal) with Optional and list stripped."""
    annotation = Settings.model_fields[field].annotation
    while get_origin(annotation) is not None and get_origin(annotation) is not Literal:
        args = [a for a in get_args(annotation) if a is not type(None)]
        annotation = args[0]
    if get_origin(annotation) is Literal:
        return str, tuple(get_args(annotation))
    return annotation, ()  # type: ignore[return-value]


def shown_default(field: str) -> str:
    info = Settings.model_fields[field]
    shown = _extra(info).get("shown")
    if shown:
        return shown
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def range_text(field: str) -> str:
    """'1-65535', '>= 0', '> 0' from the field's constraints, or ''."""
    low = high = None
    strict = False
    for m in Settings.model_fields[field].metadata:
        for name in ("ge", "gt"):
            if getattr(m, name, None) is not None:
                low, strict = getattr(m, name), name == "gt"
        if getattr(m, "le", None) is not None:
            high = m.le
    if low is not None and high is not None and not strict:
        return f"{low}-{high}"
    if low is not None:
        return f"{'>' if strict else '>='} {low}" + (f", <= {high}" if high is not None else "")
    return ""


def settings_table() -> str:
    """The README's configuration table, one row per setting, from the fields themselves."""
    rows = ["| flag | environment | roles | default | meaning |", "|---|---|---|---|---|"]
    for name, info in Settings.model_fields.items():
        roles = roles_of(name)
        where = "all" if roles == ROLES else ", ".join(roles)
        _, choices = value_type(name)
        detail = f" ({' / '.join(choices)})" if choices else ""
        limits = range_text(name)
        detail += f" (range {limits})" if limits else ""
        help_text = (info.description or "").replace("|", "\\|")
        flag = f"`{flag_of(name)}`" + (f" / `--no-{flag_of(name)[2:]}`" if value_type(name)[0] is bool else "")
        rows.append(f"| {flag} | `{env_name(name)}` | {where} | {shown_default(name)} | {help_text}{detail} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
