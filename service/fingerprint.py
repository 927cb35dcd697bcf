"""Model identity in the feature store.

The *fingerprint* names the function image -> features: it changes whenever the model family, the
vision weights, the vision config or the preprocessing change, so features from another model are
never served.
Only a vision worker can compute it (it hashes the visual weights it loaded). It registers the
fingerprint under the *model key* (a hash of the checkpoint's config files, which every worker can
read), and LLM workers, which never read the visual weights, look it up there.
"""

from __future__ import annotations

import hashlib
import json

import torch

from service.checkpoint import Checkpoint
from service.preprocess import PreprocessConfig

REGISTRY = "splitvl:models"


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(family: str, vision_config: dict, preprocess: PreprocessConfig, weights: str) -> str:
    return _digest({"family": family, "vision": vision_config, "preprocess": preprocess.fingerprint_fields(),
                    "weights": weights})[:16]


def model_key(checkpoint: Checkpoint) -> str:
    """A hash of config.json and preprocessor_config.json: the same for every worker of one checkpoint."""
    return _digest({"config.json": checkpoint.config, "preprocessor_config.json": checkpoint.preprocessor})[:16]
