"""Selective reading: a worker opens only the files that hold its tensors."""

from __future__ import annotations

import json

import pytest

import service.checkpoint as checkpoint
from service.checkpoint import (
    CheckpointError,
    canonical_key,
    is_language,
    is_visual,
    open_checkpoint,
    resolve_model_path,
)


def test_canonical_key_maps_internal_names():
    assert canonical_key("model.visual.blocks.0.norm1.weight") == "visual.blocks.0.norm1.weight"
    assert canonical_key("model.language_model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert canonical_key("lm_head.weight") == "lm_head.weight"


@pytest.mark.parametrize("part,wanted", [("visual", is_visual), ("language", is_language)])
def test_only_needed_shards_are_opened(sharded_checkpoint, monkeypatch, part, wanted):
    index = json.loads((sharded_checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {f for k, f in index.items() if wanted(k)}
    opened: list[str] = []
    real = checkpoint.safe_open

    def spy(path, *args, **kwargs):
        opened.append(str(path).rsplit("/", 1)[-1])
        return real(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "safe_open", spy)
    tensors = open_checkpoint(sharded_checkpoint).read_tensors(wanted)
    assert set(opened) == needed
    assert set(tensors) == {k for k in index if wanted(k)}


def test_missing_shard_is_named(sharded_checkpoint, tmp_path):
    import shutil

    copy = tmp_path / "c"
    shutil.copytree(sharded_checkpoint, copy)
    index = json.loads((copy / "model.safetensors.index.json").read_text())["weight_map"]
    victim = index["visual.merger.ln_q.weight"]
    (copy / victim).unlink()
    with pytest.raises(CheckpointError, match=victim):
        open_checkpoint(copy).read_tensors(is_visual)


def test_resolve_unknown_model_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_model_path(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="local Hugging Face cache"):
        resolve_model_path("no-such-org/no-such-model")


def test_progress_bar_only_when_asked(tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.delenv("SPLITVL_PROGRESS", raising=False)
    open_checkpoint(tiny_checkpoint).read_tensors(is_visual)  # stderr is not a terminal here: no bar
    assert "loading" not in capsys.readouterr().err
    open_checkpoint(tiny_checkpoint).read_tensors(is_visual, progress=True)
    assert "loading" in capsys.readouterr().err
    monkeypatch.setenv("SPLITVL_PROGRESS", "1")
    open_checkpoint(tiny_checkpoint).read_tensors(is_visual)
    assert "tensor" in capsys.readouterr().err
