"""The vision tower loaded from visual.* alone equals HF's full model on the same checkpoint, for every family."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from service.checkpoint import CheckpointError, canonical_key, open_checkpoint
from service.models import FAMILY_NAMES
from service.vision.encoder import GRAPH_MAX_IMAGES, Patches, VisionEncoder


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def checkpoint(request, family_checkpoint) -> Path:
    return family_checkpoint(request.param, seed=0)


@pytest.fixture(scope="module")
def hf_model(checkpoint: Path):
    model_class = open_checkpoint(checkpoint).family.hf_model_class()
    return model_class.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_processor(checkpoint: Path):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(checkpoint)  # every family's image processor


@pytest.fixture(scope="module")
def encoder(checkpoint: Path) -> VisionEncoder:
    return VisionEncoder(checkpoint, device="cpu", dtype=torch.float32)


def hf_features(model, processor, data: bytes) -> tuple[torch.Tensor, list[int]]:
    """HF's ``get_image_features`` stacked as the encoder returns them: [K, tokens, D] (the merged
    embeddings, then each DeepStack output), and the grid."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    inputs = processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    deepstack = list(getattr(out, "deepstack_features", None) or [])
    return torch.stack([out.pooler_output[0], *deepstack]), inputs["image_grid_thw"][0].tolist()


@pytest.mark.parametrize("size", [(56, 56), (97, 61), (224, 160), (333, 517), (640, 90)])
def test_features_match_hf(encoder, hf_model, hf_processor, size, image_bytes):
    data = image_bytes(*size, seed=size[0])
    patches = encoder.preprocess(data)
    (ours,) = encoder.forward([patches])
    ref, ref_grid = hf_features(hf_model, hf_processor, data)
    assert list(patches.grid_thw) == ref_grid
    assert ours.shape == ref.shape == (1 + encoder.deepstack_layers, encoder.num_tokens(patches), encoder.hidden_size)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_packed_batch_equals_one_at_a_time(encoder, image_bytes):
    batch = [encoder.preprocess(image_bytes(w, h, seed=i)) for i, (w, h) in enumerate([(56, 56), (200, 120), (90, 300)])]
    packed = encoder.forward(batch)
    for patches, row in zip(batch, packed, strict=True):
        (alone,) = encoder.forward([patches])
        torch.testing.assert_close(row, alone, atol=1e-5, rtol=1e-5)


def test_every_visual_tensor_matters(checkpoint, tmp_path, encoder, image_bytes):
    """Zeroing any one visual tensor in the checkpoint changes the features: nothing is skipped."""
    data = image_bytes(120, 88, seed=7)
    (base,) = encoder.forward([encoder.preprocess(data)])
    tensors = load_file(checkpoint / "model.safetensors")
    visual = sorted(k for k in tensors if "visual." in k)
    assert len(visual) > 20
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    for name in visual:
        changed = dict(tensors)
        changed[name] = torch.zeros_like(tensors[name])
        save_file(changed, copy / "model.safetensors", metadata={"format": "pt"})
        other = VisionEncoder(copy, device="cpu")
        (out,) = other.forward([other.preprocess(data)])
        assert not torch.allclose(out, base, atol=1e-6), name
        assert other.fingerprint != encoder.fingerprint


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_sharded_checkpoint_without_language_shards(family, family_checkpoint, tmp_path, image_bytes):
    sharded = family_checkpoint(family, seed=1, shard_size="40KB", tie_word_embeddings=True)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    visual_files = {f for k, f in index.items() if "visual." in k}
    lm_only = {f for f in index.values()} - visual_files
    assert lm_only, "fixture must put the language model in shards of its own"
    copy = tmp_path / "visual-only"
    shutil.copytree(sharded, copy)
    for name in lm_only:
        (copy / name).unlink()
    full = VisionEncoder(sharded, device="cpu")
    partial = VisionEncoder(copy, device="cpu")
    data = image_bytes(150, 100, seed=3)
    (a,) = full.forward([full.preprocess(data)])
    (b,) = partial.forward([partial.preprocess(data)])
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert full.fingerprint == partial.fingerprint


def test_sharded_matches_hf(sharded_checkpoint, image_bytes):
    from transformers import Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    model = Qwen2VLForConditionalGeneration.from_pretrained(sharded_checkpoint, dtype=torch.float32).eval()
    processor = Qwen2VLImageProcessorPil.from_pretrained(sharded_checkpoint)
    enc = VisionEncoder(sharded_checkpoint, device="cpu")
    data = image_bytes(210, 140, seed=11)
    (ours,) = enc.forward([enc.preprocess(data)])
    ref, _ = hf_features(model, processor, data)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_internal_key_names_load(checkpoint, tmp_path, encoder, image_bytes):
    """transformers' internal spelling (model.visual.*) loads like the hub's (visual.*)."""
    tensors = load_file(checkpoint / "model.safetensors")
    renamed = {("model." + k if k.startswith("visual.") else k): v for k, v in tensors.items()}
    copy = tmp_path / "internal"
    shutil.copytree(checkpoint, copy)
    save_file(renamed, copy / "model.safetensors", metadata={"format": "pt"})
    other = VisionEncoder(copy, device="cpu")
    data = image_bytes(64, 64, seed=1)
    torch.testing.assert_close(other.forward([other.preprocess(data)])[0], encoder.forward([encoder.preprocess(data)])[0])


@pytest.mark.parametrize("damage", ["missing", "misshapen"])
def test_bad_visual_tensor_is_named(checkpoint, tmp_path, damage):
    tensors = load_file(checkpoint / "model.safetensors")
    name = "visual.blocks.1.attn.qkv.weight"  # errors name tensors in the hub's spelling
    stored = next(k for k in tensors if canonical_key(k) == name)  # Qwen3-VL's files say model.visual.*
    if damage == "missing":
        del tensors[stored]
    else:
        tensors[stored] = tensors[stored][:-1]
    copy = tmp_path / damage
    shutil.copytree(checkpoint, copy)
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=name):
        VisionEncoder(copy, device="cpu")


def test_graphable_batches_are_small_and_of_one_grid(tiny_checkpoint):
    def batch(*grids: tuple[int, int, int]) -> list[Patches]:
        return [Patches(torch.zeros(t * h * w, 8), (t, h, w)) for t, h, w in grids]

    g, other = (1, 32, 32), (1, 16, 24)
    for limit in (GRAPH_MAX_IMAGES, 3, 0):
        encoder = VisionEncoder(tiny_checkpoint, device="cpu", graph_max_images=limit)
        assert encoder.graphable(batch(g)) == (limit > 0)
        assert encoder.graphable(batch(*[g] * max(limit, 1))) == (limit > 0)
        assert not encoder.graphable(batch(*[g] * (limit + 1)))
        assert not encoder.graphable(batch(g, other))


def test_warm_plan_has_the_grids_uploads_get(tiny_checkpoint, image_bytes):
    """On CUDA, warmup records the graphs of 448² and 224² uploads in the grids this checkpoint's pixel
    bounds resize them to (the tiny one's max_pixels is 224²: both become 16 x 16), not 32 x 32 ones
    no upload replays."""
    encoder = VisionEncoder(tiny_checkpoint, device="cpu")
    encoder.patched = {"<model>": "patched"}  # the plan of a patched tower (on CUDA)
    planned = {grid for grid, _ in encoder._warm_plan()}
    assert planned == {encoder.preprocess(image_bytes(side, side, seed=side)).grid_thw for side in (448, 224)}


def test_decoded_pixels_are_patchified_in_the_forward(encoder, image_bytes):
    """What the GPU path hands the forward (decoded pixels; resize and patchify on the device)
    gives the embeddings of the CPU path (PIL's resize), here both on the CPU."""
    from service.preprocess import ImageLimits, decode_image, image_to_tensor

    data = image_bytes(150, 110, seed=31)  # resized: 150x110 is not a multiple of 28
    ready = encoder.preprocess(data)
    pixels = image_to_tensor(decode_image(data, ImageLimits()))
    decoded = Patches(pixels, ready.grid_thw)
    assert decoded.decoded_only and not ready.decoded_only and decoded.num_patches == ready.num_patches
    assert torch.equal(encoder.ready(decoded).pixel_values, ready.pixel_values)  # bit for bit
    (want,) = encoder.forward([ready])
    for got in encoder.forward([decoded, ready]):  # packed together: float order only
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_replays_in_flight_keep_their_outputs(tiny_checkpoint, image_bytes):
    """Batches of 1-4 equal grids replay CUDA graphs whose output buffer the next replay reuses; with
    several launched before any finishes, each still gets its own embeddings (the copy to the host
    is queued before the next replay), equal to the eager patched tower's."""
    enc = VisionEncoder(tiny_checkpoint, device="cuda", dtype=torch.bfloat16)
    assert enc.graphs is not None
    batch = [enc.preprocess(image_bytes(112, 112, seed=40 + i)) for i in range(4)]
    plan = [batch[:1], batch[1:2], batch[:2], batch[2:4], batch[:4], batch[3:4]]  # one graph replayed thrice
    launched = [enc.launch(b) for b in plan]
    got = [enc.finish(one) for one in launched]
    enc.graphs = None  # the same patched tower, eagerly
    for b, out in zip(plan, got, strict=True):
        for have, want in zip(out, enc.forward(b), strict=True):
            torch.testing.assert_close(have.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_launch_does_not_wait_for_the_device(tiny_checkpoint, image_bytes):
    """``launch`` queues a batch behind the one in flight without waiting for it: no operation in
    it may synchronize with the device (a CUDA tensor built from host values does), or the GPU
    idles while the host prepares every next batch."""
    enc = VisionEncoder(tiny_checkpoint, device="cuda", dtype=torch.bfloat16)
    sizes = [(112, 112), (112, 112), (150, 110), (300, 90)]  # graphed and eager batches, resized or not
    batch = [enc.preprocess(image_bytes(w, h, seed=60 + i)) for i, (w, h) in enumerate(sizes)]
    plan = [batch[:2], batch[2:], batch[1:3]]
    for b in plan:  # warm: lazily built tables and graphs may copy to the device once
        enc.finish(enc.launch(b))
    torch.cuda.set_sync_debug_mode("error")
    try:
        launched = [enc.launch(b) for b in plan]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(len(enc.finish(one)) == len(b) for one, b in zip(launched, plan, strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_gpu_encoder_of_every_family(family, family_checkpoint, image_bytes):
    """On CUDA every family's tower runs fused (kernels.patch) and, for batches of one grid, from CUDA
    graphs; the features ([K, n, D], DeepStack included) match the CPU fp32 encoder within bf16."""
    path = family_checkpoint(family, seed=0)
    gpu = VisionEncoder(path, device="cuda", dtype=torch.bfloat16)
    cpu = VisionEncoder(path, device="cpu", dtype=torch.float32)
    assert gpu.patched and gpu.graphs is not None
    images = [image_bytes(w, h, seed=70 + i) for i, (w, h) in enumerate([(112, 112), (112, 112), (150, 110)])]
    graphed = gpu.forward([gpu.preprocess(d) for d in images[:2]])  # one grid: a graph replay
    eager = gpu.forward([gpu.preprocess(d) for d in images])  # mixed grids: the fused forward
    for data, got in zip(images, eager, strict=True):
        (want,) = cpu.forward([cpu.preprocess(data)])
        assert got.shape == want.shape == (1 + cpu.deepstack_layers, *want.shape[1:])
        assert float((got.float() - want).norm() / want.norm()) < 2e-2
    for got, again in zip(graphed, eager, strict=False):
        torch.testing.assert_close(got.float(), again.float(), rtol=2e-2, atol=2e-2)
