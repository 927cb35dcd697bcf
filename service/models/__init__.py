"""The model families splitvl serves, one module each, and how a checkpoint's family is found.

Adding a family is its module (a subclass of the family it derives from, stating how it differs),
one entry in ``_MODULES``, its kernels (``kernels/``) and its tests. The family modules import torch
and transformers, so they load on first use: ``FAMILY_NAMES`` alone costs nothing (the CLI's help).
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.models.qwen2_vl import Qwen2VL as Family  # every family derives from it

# model_type -> its family's class, as "module:name"
_MODULES = {
    "qwen2_vl": "service.models.qwen2_vl:Qwen2VL",
    "qwen2_5_vl": "service.models.qwen2_5_vl:Qwen2_5_VL",
    "qwen3_vl": "service.models.qwen3_vl:Qwen3VL",
}
FAMILY_NAMES: tuple[str, ...] = tuple(_MODULES)


def load(path: str) -> Any:
    """What ``"module:name"`` names, imported now: a family's module and HF's model classes load on
    first use (importing them costs seconds)."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


@functools.cache
def family(model_type: str) -> Family:
    """The family of this ``model_type`` (one of ``FAMILY_NAMES``)."""
    return load(_MODULES[model_type])()


def supported() -> str:
    return ", ".join(f"{family(name).name} ({name})" for name in FAMILY_NAMES)


def family_of(config: dict) -> Family | None:
    """The family of a ``config.json``: by ``model_type``, else by ``architectures``; None if unknown."""
    model_type = str(config.get("model_type", ""))
    if model_type in _MODULES:
        return family(model_type)
    names = set(config.get("architectures") or ())
    return next((family(n) for n in FAMILY_NAMES if names & set(family(n).architectures)), None)
