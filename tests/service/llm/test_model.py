"""Our Qwen2 language model against HF's full Qwen2-VL, and the loader's checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from service.checkpoint import CheckpointError
from service.llm.model import TextConfig, allocate_kv_cache, decode_step, load_model, prefill
from service.llm.prompt import PromptBuilder, positions

from . import copy_checkpoint, oracle, random_image


def _prompt_inputs(path: Path, question: str, image_seed: int, size: tuple[int, int]):
    hf = oracle(path)
    feats = hf.features(random_image(image_seed, *size))
    prompt = PromptBuilder.from_checkpoint(path).build(question, feats.num_tokens)
    pos, delta = positions(prompt.prefix_len, feats.grid[0], 2, len(prompt.ids))
    return hf, feats, prompt, pos, delta


def _embeds(model, prompt, feats) -> torch.Tensor:
    x = model.embed(torch.tensor(prompt.ids))
    x[prompt.image_start : prompt.image_start + prompt.num_image_tokens] = feats.embeds
    return x[None]  # [1, T, hidden]


@pytest.mark.parametrize("which", ["tiny_checkpoint", "sharded_checkpoint"])
@pytest.mark.parametrize(("image_seed", "size"), [(0, (150, 100)), (1, (56, 90))])
def test_prefill_logits_match_hf(which: str, image_seed: int, size: tuple[int, int],
                                 request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(which)
    hf, feats, prompt, pos, _ = _prompt_inputs(path, "What is in the picture?", image_seed, size)
    model = load_model(path)
    kv = allocate_kv_cache(model.cfg, 3, 256, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        ours = model.logits(prefill(model, kv, _embeds(model, prompt, feats), pos[:, None], torch.tensor([2]), 0))[0]
        expected = hf.logits(feats, "What is in the picture?")
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


def test_chunked_prefill_and_batched_decode_agree_with_one_prefill(tiny_checkpoint: Path) -> None:
    """Prefix then rest, and token-by-token decode over several slots, give the same logits."""
    _, feats, prompt, pos, delta = _prompt_inputs(tiny_checkpoint, "Describe it.", 2, (120, 80))
    model = load_model(tiny_checkpoint)
    kv = allocate_kv_cache(model.cfg, 3, 128, device="cpu", dtype=torch.float32)
    x = _embeds(model, prompt, feats)
    t, p = x.shape[1], prompt.prefix_len
    with torch.no_grad():
        whole = model.logits(prefill(model, kv, x, pos[:, None], torch.tensor([0]), 0))[0]  # [T, V]
        prefill(model, kv, x[:, :p], pos[:, None, :p], torch.tensor([1]), 0)
        rest = model.logits(prefill(model, kv, x[:, p:], pos[:, None, p:], torch.tensor([1]), p))[0]
        torch.testing.assert_close(rest, whole[p:], atol=1e-5, rtol=0)
        # slot 2 holds the prefix minus its last 5 tokens; decode them one by one next to slots 0 and 1
        k = t - 5
        prefill(model, kv, x[:, :k], pos[:, None, :k], torch.tensor([2]), 0)
        ids = torch.tensor(prompt.ids)
        for i in range(k, t):
            tokens = torch.tensor([ids[0], ids[1], ids[i]])
            # slots 0 and 1 take a next token at position t (+ delta) while slot 2 catches up
            step_pos = torch.stack([torch.full((3,), t + delta), torch.full((3,), t + delta), pos[:, i]], dim=1)
            logits = decode_step(model, kv, tokens, step_pos, torch.tensor([t, t, i]))
            torch.testing.assert_close(logits[2], whole[i], atol=1e-5, rtol=0)


def test_tied_embeddings_are_shared(sharded_checkpoint: Path, tiny_checkpoint: Path) -> None:
    tied = load_model(sharded_checkpoint)
    assert tied.cfg.tie_word_embeddings and tied.lm_head is None
    h = torch.randn(3, tied.cfg.hidden_size)
    torch.testing.assert_close(tied.logits(h), h @ tied.embed_tokens.weight.T)
    untied = load_model(tiny_checkpoint)
    assert untied.lm_head is not None
    assert untied.lm_head.weight.data_ptr() != untied.embed_tokens.weight.data_ptr()


def test_loads_with_visual_shards_deleted(sharded_checkpoint: Path, tmp_path: Path) -> None:
    path = copy_checkpoint(sharded_checkpoint, tmp_path / "ckpt")
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    shards: dict[str, set[bool]] = {}
    for key, shard in weight_map.items():
        shards.setdefault(shard, set()).add(key.startswith("visual."))
    visual_only = [s for s, kinds in shards.items() if kinds == {True}]
    assert visual_only
    for shard in visual_only:
        (path / shard).unlink()
    model = load_model(path)
    reference = load_model(sharded_checkpoint)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def _rewrite(src: Path, dst: Path, edit) -> Path:
    path = copy_checkpoint(src, dst)
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_missing_tensor_is_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    name = "model.layers.1.self_attn.k_proj.bias"
    path = _rewrite(tiny_checkpoint, tmp_path / "ckpt", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"lacks tensor {name}"):
        load_model(path)


def test_untied_checkpoint_needs_lm_head(tiny_checkpoint: Path, tmp_path: Path) -> None:
    path = _rewrite(tiny_checkpoint, tmp_path / "ckpt", lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="lacks tensor lm_head.weight"):
        load_model(path)


def test_misshaped_tensor_is_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    name = "model.layers.0.mlp.up_proj.weight"

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = tensors[name][:-1].contiguous()

    path = _rewrite(tiny_checkpoint, tmp_path / "ckpt", edit)
    with pytest.raises(CheckpointError, match=rf"{name} has shape \(111, 64\)"):
        load_model(path)


def test_unexpected_tensor_is_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    path = _rewrite(tiny_checkpoint, tmp_path / "ckpt",
                    lambda t: t.__setitem__("model.layers.2.mlp.up_proj.weight", torch.zeros(2, 2)))
    with pytest.raises(CheckpointError, match="model.layers.2.mlp.up_proj.weight does not belong"):
        load_model(path)


def test_flat_hub_config_reads_like_nested(tiny_checkpoint: Path) -> None:
    nested = json.loads((tiny_checkpoint / "config.json").read_text())
    text = nested["text_config"]
    flat = {k: v for k, v in nested.items() if k != "text_config"}
    flat |= {k: v for k, v in text.items() if k != "rope_parameters"}
    flat |= {"rope_theta": 10000.0, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
    assert TextConfig.from_dict(flat) == TextConfig.from_dict(nested)
