"""Open a checkpoint once, then read it selectively: its configs, and only the tensors one worker needs.

``open_checkpoint(model)`` resolves the path (a directory, or a hub id in the local HF cache),
reads ``config.json`` and ``preprocessor_config.json`` and finds the model family; the
``Checkpoint`` it returns is handed to every part that needs the checkpoint, so none resolves the
path or re-reads a config again.

A worker names the part it wants (``visual`` or ``language``); with a sharded checkpoint the
index says which shards hold that part, and only those shards are opened, and only those
tensors read. So the vision worker never touches the language model's bytes, and a deployment
may delete the shards the worker does not need.

Key names come in two spellings: the hub's (``visual.*``, ``model.*``, ``lm_head.*``) and
transformers' internal one (``model.visual.*``, ``model.language_model.*``, ``lm_head.*``).
Both are mapped to the hub's.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

if TYPE_CHECKING:
    from service.models import Family

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(RuntimeError):
    """The checkpoint is missing, incomplete or does not fit the model built from its config."""


def resolve_model_path(model: str | Path) -> Path:
    """A local directory, or a hub id found in the local HF cache (never downloaded)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if isinstance(model, str) and model.count("/") == 1 and not path.exists() and not model.startswith((".", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(model, local_files_only=True))
        except Exception:  # noqa: BLE001 - any hub failure means "not available offline"
            from huggingface_hub.constants import HF_HUB_CACHE

            raise CheckpointError(
                f"no directory {model!r} here, and no copy of the hub model {model!r} in the local Hugging Face "
                f"cache ({HF_HUB_CACHE}); splitvl never downloads: fetch it first (`hf download {model}`), "
                "or pass a checkpoint directory"
            ) from None
    if path.exists():
        raise CheckpointError(f"{str(model)!r} is a file: pass the checkpoint's directory (the one holding config.json)")
    raise CheckpointError(f"model directory {str(model)!r} does not exist: pass a checkpoint directory (holding "
                          "config.json) or a hub id already in the local Hugging Face cache")


def load_json(path: Path, name: str) -> dict:
    file = path / name
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: {path} is not a (complete) Hugging Face checkpoint directory")
    return json.loads(file.read_text())


def text_fields(config: dict) -> dict:
    """The language model's fields of a config.json in either layout: the hub's older flat one (at the
    top) or transformers 5's nested ``text_config`` (which wins)."""
    return {**config, **(config.get("text_config") or {})}


def load_optional_json(path: Path, name: str) -> dict | None:
    file = path / name
    return json.loads(file.read_text()) if file.is_file() else None


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint, opened once (``open_checkpoint``): where it is, its configs and its family."""

    name: str  # as given: a hub id or a path
    path: Path
    config: dict  # config.json
    preprocessor: dict | None  # preprocessor_config.json (the vision worker needs it)
    family: Family = field(repr=False)

    def json(self, name: str) -> dict | None:
        """Another JSON file of the checkpoint (tokenizer or generation config), or None."""
        return load_optional_json(self.path, name)

    @functools.cached_property
    def locations(self) -> dict[str, Path]:
        """Canonical tensor name -> the file holding it (the weight index, read once)."""
        return _key_locations(self.path)

    def vision_config_dict(self) -> dict:
        """config.json's ``vision_config`` as written (what the fingerprint hashes)."""
        vision = dict(self.config.get("vision_config") or {})
        if not vision:
            raise CheckpointError("config.json has no vision_config: not a vision-language checkpoint")
        return vision

    def check(self, *, visual: bool, language: bool) -> None:
        """What loading the visual or language half will need, checked cheaply now (configs parsed,
        files present; no tensor read), so a broken checkpoint is one line before anything starts."""
        family = self.family
        try:
            if visual:
                self.vision_config_dict()
                family.vision_config(self.config)
                family.preprocess_config(self.preprocessor)
            if language:
                family.text_config(self.config)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - HF's config classes raise many kinds: all mean "not this model"
            raise CheckpointError(f"{self.path / 'config.json'} does not describe a {family.name} model: "
                                  f"{type(exc).__name__}: {exc}".splitlines()[0]) from None
        if language and not (self.path / "tokenizer.json").is_file():
            raise CheckpointError(f"{self.path / 'tokenizer.json'} is missing (the LLM worker needs it)")
        for part, wanted, needed in (("visual", is_visual, visual), ("language", is_language, language)):
            if not needed:
                continue
            files = {f for key, f in self.locations.items() if wanted(key)}
            if not files:
                raise CheckpointError(f"{self.path} holds no {part} tensors")
            missing = sorted(f.name for f in files if not f.is_file())
            if missing:
                raise CheckpointError(f"shard {missing[0]} is missing from {self.path} but holds {part} tensors")

    def read_tensors(self, wanted: Callable[[str], bool], *, strip_prefix: str = "",
                     progress: bool | None = None) -> dict[str, torch.Tensor]:
        """Read the tensors whose canonical key passes ``wanted``, opening only the files that hold them.

        Returned keys are canonical with ``strip_prefix`` removed (``"visual."`` gives the keys of a
        vision tower module's own ``state_dict``). ``progress``: see ``show_progress``.
        """
        from tqdm import tqdm

        locations = {k: f for k, f in self.locations.items() if wanted(k)}
        if not locations:
            raise CheckpointError(f"{self.path} holds no tensors for this worker")
        by_file: dict[Path, list[str]] = {}
        for key, file in locations.items():
            by_file.setdefault(file, []).append(key)
        tensors: dict[str, torch.Tensor] = {}
        bar = tqdm(total=len(locations), desc=f"loading {self.path.name}", unit="tensor", leave=False,
                   disable=not show_progress(progress), file=sys.stderr)
        for file, keys in by_file.items():
            if not file.is_file():
                raise CheckpointError(f"shard {file.name} is missing but holds {sorted(keys)[0]} (and {len(keys) - 1} more)")
            with safe_open(file, framework="pt") as f:
                stored = {canonical_key(k): k for k in f.keys()}  # noqa: SIM118
                for key in keys:
                    if key not in stored:
                        raise CheckpointError(f"tensor {key} is listed in the index but absent from {file.name}")
                    out = key[len(strip_prefix) :] if strip_prefix and key.startswith(strip_prefix) else key
                    tensors[out] = f.get_tensor(stored[key])
                    bar.update()
        bar.close()
        return tensors


def open_checkpoint(model: str | Path | Checkpoint) -> Checkpoint:
    """Resolve ``model`` and read what every worker needs; a ``Checkpoint`` is returned as it is.

    Raises ``CheckpointError`` (one line that says what to do) for a missing directory, a hub id
    not in the local cache, an unreadable ``config.json`` or a family splitvl does not serve.
    """
    if isinstance(model, Checkpoint):
        return model
    from service.models import family_of, supported

    path = resolve_model_path(model)
    try:
        config = load_json(path, "config.json")
        preprocessor = load_optional_json(path, "preprocessor_config.json")
    except (OSError, ValueError) as exc:  # unreadable or not JSON
        raise CheckpointError(f"{path}: cannot read its config ({exc})") from exc
    if not isinstance(config, dict) or not isinstance(preprocessor, dict | None):
        raise CheckpointError(f"{path}: config.json and preprocessor_config.json must each hold a JSON object")
    family = family_of(config)
    if family is None:
        kind = config.get("model_type") or (config.get("architectures") or ["no model_type"])[0]
        raise CheckpointError(f"{path} is a {kind} checkpoint; splitvl serves {supported()}")
    return Checkpoint(str(model), path, config, preprocessor, family)


def canonical_key(key: str) -> str:
    """Map transformers' internal names onto the hub's."""
    if key.startswith("model.visual."):
        return key[len("model.") :]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    return key


def is_visual(key: str) -> bool:
    return key.startswith("visual.")


def is_language(key: str) -> bool:
    return not key.startswith("visual.")


def _key_locations(path: Path) -> dict[str, Path]:
    """Canonical key -> the file that holds it, from the index or the single file's header."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return {canonical_key(k): path / f for k, f in weight_map.items()}
    single = path / SINGLE_FILE
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {canonical_key(k): single for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    raise CheckpointError(f"{path} holds neither {INDEX_FILE} nor {SINGLE_FILE}")


def show_progress(progress: bool | None = None) -> bool:
    """Whether weight loading draws a progress bar: when asked (argument, or ``SPLITVL_PROGRESS=1``/``0``),
    else when stderr is a terminal."""
    if progress is not None:
        return progress
    env = os.environ.get("SPLITVL_PROGRESS", "").strip().lower()
    if env:
        return env not in ("0", "false", "no", "off")
    return sys.stderr.isatty()


def check_state_dict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str,
                     optional: Iterable[str] = ()) -> None:
    """Every parameter and persistent buffer of ``module`` is present with its shape; nothing extra."""
    expected = dict(module.state_dict(keep_vars=True))
    optional = set(optional)
    missing = [k for k in expected if k not in tensors and k not in optional]
    if missing:
        raise CheckpointError(f"checkpoint lacks tensor {prefix}{missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        raise CheckpointError(f"checkpoint tensor {prefix}{unexpected[0]} does not belong to the model built from config.json")
    for key, tensor in tensors.items():
        want = tuple(expected[key].shape)
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"tensor {prefix}{key} has shape {tuple(tensor.shape)}, the config implies {want}")
