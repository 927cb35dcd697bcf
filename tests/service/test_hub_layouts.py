"""Checkpoints load in both layouts: as published on the hub and as the current transformers'
``save_pretrained`` writes them (config.json's shape, preprocessor bounds, tensor-name spellings).

Each hub layout is made from a tiny checkpoint by rewriting its files the way the published
checkpoints are laid out; the worker halves built from it must compute exactly what they compute
from the original.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from service.checkpoint import open_checkpoint
from service.llm.engine import LLMEngine
from service.vision.encoder import VisionEncoder


def flat_qwen2_5_vl(config: dict, preprocessor: dict) -> tuple[dict, dict]:
    """Qwen2.5-VL on the hub: text fields at the top, ``rope_scaling {"type": "mrope"}``, ``in_chans``."""
    text = dict(config.pop("text_config"))
    rope = text.pop("rope_parameters")
    for key in ("model_type", "layer_types"):
        text.pop(key, None)
    vision = dict(config["vision_config"])
    vision["in_chans"] = vision.pop("in_channels")
    vision.pop("rope_parameters", None)
    flat = {**text, **config, "vision_config": vision, "rope_theta": rope["rope_theta"],
            "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}}
    return flat, preprocessor


def hub_qwen3_vl(config: dict, preprocessor: dict) -> tuple[dict, dict]:
    """Qwen3-VL on the hub: the text config's rope as ``rope_scaling`` + ``rope_theta``; the pixel
    bounds as ``size`` (already so in the tiny checkpoint)."""
    text = dict(config["text_config"])
    rope = dict(text.pop("rope_parameters"))
    text["rope_theta"] = rope.pop("rope_theta")
    text["rope_scaling"] = rope
    assert "size" in preprocessor and "min_pixels" not in preprocessor
    return {**config, "text_config": text}, preprocessor


def hub_names(key: str) -> str:
    """The older hub spelling: ``visual.*`` and ``model.layers.*``."""
    return key.replace("model.visual.", "visual.").replace("model.language_model.", "model.")


def internal_names(key: str) -> str:
    """transformers' own spelling: ``model.visual.*`` and ``model.language_model.*``."""
    key = hub_names(key)
    if key.startswith("visual."):
        return "model." + key
    return key.replace("model.", "model.language_model.", 1) if key.startswith("model.") else key


LAYOUTS: dict[str, Callable[[dict, dict], tuple[dict, dict]]] = {
    "qwen2_5_vl": flat_qwen2_5_vl,
    "qwen3_vl": hub_qwen3_vl,
}


def rewrite(src: Path, dst: Path, configs: Callable[[dict, dict], tuple[dict, dict]],
            names: Callable[[str], str]) -> Path:
    shutil.copytree(src, dst)
    config, preprocessor = configs(json.loads((src / "config.json").read_text()),
                                   json.loads((src / "preprocessor_config.json").read_text()))
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    tensors = load_file(src / "model.safetensors")
    save_file({names(k): v for k, v in tensors.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("family", list(LAYOUTS))
@pytest.mark.parametrize("names", [hub_names, internal_names], ids=["hub-names", "internal-names"])
def test_hub_layout_computes_the_same(family, names, family_checkpoint, tmp_path, image_bytes):
    original = family_checkpoint(family, seed=0)
    hub = rewrite(original, tmp_path / "hub", LAYOUTS[family], names)
    assert open_checkpoint(hub).family is open_checkpoint(original).family

    data = image_bytes(130, 90, seed=4)
    ours, theirs = VisionEncoder(original), VisionEncoder(hub)
    assert ours.preprocess_config == theirs.preprocess_config
    torch.testing.assert_close(theirs.forward([theirs.preprocess(data)])[0], ours.forward([ours.preprocess(data)])[0],
                               atol=0, rtol=0)

    (features,) = ours.forward([ours.preprocess(data)])
    grid = ours.preprocess(data).grid_thw
    engines = [LLMEngine(path, max_batch_slots=1, max_seq_len=256) for path in (original, hub)]
    try:
        assert engines[0].model.cfg == engines[1].model.cfg
        answers = [e.generate(features[0], grid, "img", "What is in this picture?", 8,
                              deepstack=features[1:] if len(features) > 1 else None).result() for e in engines]
        assert answers[0].token_ids == answers[1].token_ids
    finally:
        for engine in engines:
            engine.close()
