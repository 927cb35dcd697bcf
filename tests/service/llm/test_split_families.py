"""Every family end to end through real HTTP with the workers split: a vision worker that holds only
the visual shards and an LLM worker that holds only the language shards (each with the other
part's shards deleted), one real Redis between them, and HF's ``*ForConditionalGeneration`` on the
whole checkpoint as the oracle for the stored features and the greedy answers."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors

from clients import SplitVL
from service.app import create_app
from service.config import Settings
from service.models import FAMILY_NAMES

from . import oracle

QUESTIONS = ["What is in this picture?", "Is it day or night? Answer briefly."]
MAX_NEW = 10


def half(sharded: Path, dst: Path, keep_visual: bool) -> Path:
    """A copy of ``sharded`` without the shards that hold only the other worker's tensors."""
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    mine = {f for k, f in index.items() if ("visual." in k) == keep_visual}
    shutil.copytree(sharded, dst)
    deleted = set(index.values()) - mine
    assert deleted, "the fixture must give each part shards of its own"
    for name in deleted:
        (dst / name).unlink()
    return dst


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_split_workers_answer_as_hf(family, family_checkpoint, tmp_path, redis_url, live_server, image_bytes):
    sharded = family_checkpoint(family, seed=3, shard_size="40KB")
    vision_dir = half(sharded, tmp_path / "vision", keep_visual=True)
    llm_dir = half(sharded, tmp_path / "llm", keep_visual=False)
    hf = oracle(sharded)

    def settings(path: Path) -> Settings:
        return Settings(model=str(path), redis_url=redis_url, device="cpu", max_new_tokens=32)

    data = image_bytes(150, 110, seed=9)
    feats = hf.features(Image.open(io.BytesIO(data)).convert("RGB"))
    with live_server(create_app(settings(vision_dir), "vision")) as vision, \
            live_server(create_app(settings(llm_dir), "llm")) as llm, httpx.Client(timeout=120) as client:
        r = client.post(vision.url + "/v1/images", content=data, headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text
        meta = r.json()
        assert meta["grid_thw"] == feats.grid[0].tolist() and meta["num_tokens"] == feats.num_tokens
        layers = 0 if feats.deepstack is None else len(feats.deepstack)
        assert meta.get("deepstack_layers", 0) == layers

        # the stored features are HF's: the embeddings and, for Qwen3-VL, every DeepStack tensor
        stored = load_safetensors(client.get(f"{vision.url}/v1/images/{meta['image_id']}/embeddings").content)
        assert (stored["image_embeds"] - feats.embeds).abs().max() <= 1e-4
        if layers:
            assert stored["deepstack_image_embeds"].shape == feats.deepstack.shape
            assert (stored["deepstack_image_embeds"] - feats.deepstack).abs().max() <= 1e-4
        else:
            assert "deepstack_image_embeds" not in stored
        with SplitVL(vision.url) as typed:  # the Python client exposes them too, in one round trip
            emb = typed.embeddings(data)
            assert emb.info.deepstack_layers == layers and typed.get(meta["image_id"]).deepstack_layers == layers
            assert torch.equal(emb.image_embeds, stored["image_embeds"])
            assert (emb.deepstack_image_embeds is None) == (layers == 0)

        for question in QUESTIONS * 2:  # the second round reuses the cached prefix
            r = client.post(llm.url + "/v1/questions",
                            json={"image_id": meta["image_id"], "question": question, "max_tokens": MAX_NEW})
            assert r.status_code == 200, r.text
            expected = hf.generate(feats, question, MAX_NEW)
            assert r.json()["answer"] == hf.tokenizer.decode(expected, skip_special_tokens=True), question
            assert r.json()["usage"]["completion_tokens"] == len(expected)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_serve_all_answers_as_hf(family, family_checkpoint, redis_url, live_server, image_bytes):
    """``serve all`` (both workers in one app, one checkpoint opened once): the same answers."""
    checkpoint = family_checkpoint(family, seed=3)
    hf = oracle(checkpoint)
    data = image_bytes(90, 120, seed=12)
    feats = hf.features(Image.open(io.BytesIO(data)).convert("RGB"))
    settings = Settings(model=str(checkpoint), redis_url=redis_url, device="cpu", max_new_tokens=32)
    with live_server(create_app(settings, "all")) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        image_id = client.post("/v1/images", content=data, headers={"Content-Type": "image/png"}).json()["image_id"]
        r = client.post("/v1/questions", json={"image_id": image_id, "question": QUESTIONS[0], "max_tokens": MAX_NEW})
        assert r.status_code == 200, r.text
        expected = hf.generate(feats, QUESTIONS[0], MAX_NEW)
        assert r.json()["answer"] == hf.tokenizer.decode(expected, skip_special_tokens=True)


def test_unknown_family_is_refused_in_one_line(tiny_checkpoint, tmp_path):
    from service.checkpoint import CheckpointError, open_checkpoint

    other = tmp_path / "llava"
    shutil.copytree(tiny_checkpoint, other)
    config = json.loads((other / "config.json").read_text())
    config |= {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]}
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as refused:
        open_checkpoint(other)
    message = str(refused.value)
    assert "\n" not in message and "llava" in message
    assert all(name in message for name in FAMILY_NAMES)


def test_fingerprints_differ_between_families():
    """Features of one family are never served to another: the fingerprint covers the family."""
    from service.fingerprint import model_fingerprint
    from service.preprocess import PreprocessConfig

    cfg = PreprocessConfig()
    assert model_fingerprint("qwen2_vl", {}, cfg, "w") != model_fingerprint("qwen2_5_vl", {}, cfg, "w")
