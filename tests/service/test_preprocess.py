"""service.preprocess against HF's Qwen2VLImageProcessorPil: decoding, smart_resize, both resize paths.

Tolerances: the PIL path and the torch path are both bit-exact with HF (max abs diff 0.0 in
pixel_values); the assertions allow 1e-5, the float noise the contract permits.
"""

from __future__ import annotations

import copy
import inspect
import io
import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageFile
import PIL.ImageOps
import pytest
import torch
from transformers.image_transforms import convert_to_rgb
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_qwen

from service.errors import ApiError
from service.pil_resize import pil_pass_order
from service.preprocess import (
    ImageLimits,
    PreprocessConfig,
    decode_image,
    image_to_tensor,
    patchify,
    preprocess,
    resize_pil,
    smart_resize,
)

TOLERANCE = 1e-5  # both paths are exact in practice (0.0); this is the contract's float slack

DEFAULT = PreprocessConfig()
# Qwen2-VL-2B/7B-Instruct's own preprocessor_config.json: max_pixels = 12845056, not the class default.
QWEN_RELEASED = PreprocessConfig(max_pixels=12845056)
# A narrow band so small images are scaled up (min binds) and larger ones down (max binds).
NARROW = PreprocessConfig(min_pixels=64 * 28 * 28, max_pixels=96 * 28 * 28)
CONFIGS = {"default": DEFAULT, "qwen-released": QWEN_RELEASED, "narrow": NARROW}


# -- helpers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # These tensors are small: intra-op threads only add synchronisation, which on a busy 2-core
    # CI box made each op ~20x slower. Restored for the other test modules.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Read at collection, before any test (of any module) has run HF's processor.
_PRISTINE_HF_SIZE = copy.deepcopy(hf_qwen.Qwen2VLImageProcessorPil.size)


@pytest.fixture(autouse=True)
def _restore_hf_class_size() -> Iterator[None]:
    # HF's Qwen2VLImageProcessorPil.__init__ writes min/max_pixels into the *class-level* `size`
    # dict when `size` is not passed, leaking into every later instance (other test modules'
    # from_pretrained calls included). Start each test from the pristine default and restore it.
    hf_qwen.Qwen2VLImageProcessorPil.size = copy.deepcopy(_PRISTINE_HF_SIZE)
    yield
    hf_qwen.Qwen2VLImageProcessorPil.size = copy.deepcopy(_PRISTINE_HF_SIZE)


def hf_processor(cfg: PreprocessConfig) -> hf_qwen.Qwen2VLImageProcessorPil:
    # A fresh `size` dict (rather than min_pixels=/max_pixels=) keeps HF off its class attribute.
    return hf_qwen.Qwen2VLImageProcessorPil(
        size={"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels},
        patch_size=cfg.patch_size,
        temporal_patch_size=cfg.temporal_patch_size,
        merge_size=cfg.merge_size,
        image_mean=list(cfg.image_mean),
        image_std=list(cfg.image_std),
        rescale_factor=cfg.rescale_factor,
        do_rescale=cfg.do_rescale,
        do_normalize=cfg.do_normalize,
        do_resize=cfg.do_resize,
        resample=cfg.resample,
    )


def hf_reference(image: PIL.Image.Image, cfg: PreprocessConfig) -> tuple[torch.Tensor, torch.Tensor]:
    out = hf_processor(cfg)(images=image, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def assert_matches_hf(got: tuple[torch.Tensor, torch.Tensor], image: PIL.Image.Image, cfg: PreprocessConfig) -> float:
    pixel_values, grid_thw = got
    ref_values, ref_grid = hf_reference(image, cfg)
    assert grid_thw.dtype == torch.int64 and pixel_values.dtype == torch.float32
    assert grid_thw.tolist() == ref_grid.tolist()
    assert pixel_values.shape == ref_values.shape
    diff = (pixel_values.cpu() - ref_values).abs().max().item()
    assert diff <= TOLERANCE, f"max abs diff {diff}"
    return diff


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> PIL.Image.Image:
    """Uniform noise: the hardest case for resampling (every pass over- and undershoots)."""
    bands = len(mode) if mode not in ("L", "P", "I;16") else 1
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (height, width, bands), dtype=np.uint8)
    return PIL.Image.fromarray(array[..., 0] if bands == 1 else array, mode if mode != "P" else "L")


def encode(image: PIL.Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _hf_convert_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    if "return_numpy" in inspect.signature(convert_to_rgb).parameters:  # newer releases; PIL output deprecated
        return PIL.Image.fromarray(convert_to_rgb(image, return_numpy=True))
    return convert_to_rgb(image)


# Current transformers (checked: 5.25) composites transparency onto white in its processor's RGB step;
# 5.17, the pinned release, still dropped alpha there. Where the installed release drops it, the current
# rule, written out below, stands in, so these tests hold against both and against HF itself on the newer.
HF_COMPOSITES = _hf_convert_to_rgb(PIL.Image.new("RGBA", (1, 1), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)


def hf_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """The RGB image HF's current processor feeds the model."""
    if HF_COMPOSITES or image.mode == "RGB":
        return _hf_convert_to_rgb(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def hf_open(data: bytes) -> PIL.Image.Image:
    """HF's path from bytes: PIL.Image.open, the EXIF transpose of its load_image, its processor's RGB step."""
    return hf_rgb(PIL.ImageOps.exif_transpose(PIL.Image.open(io.BytesIO(data))))


def api_error(data: bytes, limits: ImageLimits | None = None) -> ApiError:
    with pytest.raises(ApiError) as info:
        decode_image(data, limits or ImageLimits())
    return info.value


def png_header_only(width: int, height: int) -> bytes:
    """A ~60-byte PNG whose IHDR declares width x height (1-bit gray) and whose IDAT is one empty row."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything decodes pixels."""
    def refuse(self: PIL.ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", refuse)


# -- smart_resize ---------------------------------------------------------------------------------


def test_smart_resize_equals_hf_on_a_grid() -> None:
    rng = np.random.default_rng(0)
    sizes = [(h, w) for h in (1, 2, 10, 14, 27, 28, 42, 55, 56, 70, 333, 966) for w in (1, 5, 28, 300, 517, 1288)]
    sizes += [tuple(int(v) for v in rng.integers(1, 8000, 2)) for _ in range(3000)]
    bounds = [(56 * 56, 28 * 28 * 1280), (56 * 56, 12845056), (64 * 28 * 28, 96 * 28 * 28), (4 * 28 * 28, 4 * 28 * 28)]
    checked = 0
    for h, w in sizes:
        for lo, hi in bounds:
            try:
                expected = hf_qwen.smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi)
            except ValueError:
                with pytest.raises(ValueError):
                    smart_resize(h, w, 28, lo, hi)
                continue
            assert smart_resize(h, w, 28, lo, hi) == expected, (h, w, lo, hi)
            checked += 1
    assert checked > 10000


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1, 1), (56, 56)),  # both sides round to 0: min_pixels scales it up
        ((10, 300), (28, 308)),
        ((966, 1288), (952, 1288)),  # 966/28 = 34.5: Python rounds half to even -> 34
        ((2, 400), (28, 812)),  # exactly 200:1 is allowed
    ],
)
def test_smart_resize_edge_cases(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert smart_resize(*size, 28, 56 * 56, 12845056) == expected


def test_smart_resize_refuses_like_hf() -> None:
    for h, w in ((2, 401), (401, 2), (1, 300)):
        with pytest.raises(ValueError):
            hf_qwen.smart_resize(h, w)
        with pytest.raises(ValueError, match="aspect ratio"):
            smart_resize(h, w, 28, 56 * 56, 28 * 28 * 1280)
    with pytest.raises(ValueError):
        smart_resize(0, 10, 28, 56 * 56, 28 * 28 * 1280)


# -- preprocessing against HF ---------------------------------------------------------------------

# (width, height)
SIZES = [
    (1, 1), (10, 300), (300, 10), (224, 224), (448, 448), (333, 517), (517, 333),
    (1288, 966), (57, 13), (2, 400), (400, 2), (5600, 28), (28, 5600), (2003, 11),
]


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize(("width", "height"), SIZES)
def test_both_paths_equal_hf(width: int, height: int, config: str) -> None:
    cfg = CONFIGS[config]
    image = noise_image(width, height, seed=width * 7 + height)
    cpu = preprocess(image, cfg, "cpu")  # PIL resize
    assert_matches_hf(cpu, image, cfg)
    on_tensor = patchify(image_to_tensor(image), cfg)  # torch resize, the CUDA path's code
    assert_matches_hf(on_tensor, image, cfg)
    # Not merely within tolerance: the two paths agree bit for bit.
    assert torch.equal(cpu[0], on_tensor[0]) and torch.equal(cpu[1], on_tensor[1])


def test_output_layout() -> None:
    cfg = DEFAULT
    pixel_values, grid_thw = preprocess(noise_image(333, 517), cfg)
    t, gh, gw = grid_thw[0].tolist()
    assert (t, gh, gw) == (1, 36, 24)  # smart_resize(517, 333) = (504, 336)
    assert pixel_values.shape == (gh * gw, 3 * cfg.temporal_patch_size * cfg.patch_size**2)
    # The frame is repeated temporal_patch_size times inside each row: (C, T, ps, ps).
    rows = pixel_values.view(-1, 3, cfg.temporal_patch_size, cfg.patch_size**2)
    assert torch.equal(rows[:, :, 0], rows[:, :, 1])


@pytest.mark.parametrize(
    "cfg",
    [
        PreprocessConfig(do_normalize=False),
        PreprocessConfig(do_rescale=False),
        PreprocessConfig(do_rescale=False, do_normalize=False),
        PreprocessConfig(image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), rescale_factor=1 / 127.5),
        PreprocessConfig(patch_size=16, merge_size=2, temporal_patch_size=1, min_pixels=32 * 32 * 4),
        PreprocessConfig(resample=int(PIL.Image.Resampling.BILINEAR)),
        PreprocessConfig(resample=int(PIL.Image.Resampling.BOX)),
    ],
    ids=["no-normalize", "no-rescale", "neither", "half-mean", "patch16-t1", "bilinear", "box"],
)
def test_other_settings_equal_hf(cfg: PreprocessConfig) -> None:
    image = noise_image(333, 517, seed=3)
    assert_matches_hf(preprocess(image, cfg, "cpu"), image, cfg)
    assert_matches_hf(patchify(image_to_tensor(image), cfg), image, cfg)


def test_without_resize_equals_hf() -> None:
    cfg = PreprocessConfig(do_resize=False)
    image = noise_image(336, 504, seed=4)  # already multiples of 28, as HF then requires
    assert_matches_hf(preprocess(image, cfg), image, cfg)
    with pytest.raises(ValueError, match="multiples of"):
        patchify(image_to_tensor(noise_image(333, 517)), cfg)


def test_patchify_is_a_pure_tensor_function(monkeypatch: pytest.MonkeyPatch) -> None:
    image = noise_image(517, 333, seed=5)
    expected = hf_reference(image, DEFAULT)
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    pil_path_result = pil_pass_order()  # probe Pillow now, then forbid it
    assert pil_path_result

    def no_pil(*args: object, **kwargs: object) -> None:
        raise AssertionError("patchify used PIL")

    monkeypatch.setattr(PIL.Image.Image, "resize", no_pil)
    monkeypatch.setattr(PIL.Image, "fromarray", no_pil)
    pixel_values, grid_thw = patchify(tensor, DEFAULT)
    assert torch.equal(grid_thw, expected[1])
    assert (pixel_values - expected[0]).abs().max().item() <= TOLERANCE
    assert torch.equal(tensor, torch.from_numpy(np.array(image)).permute(2, 0, 1))  # input untouched


def test_patchify_refuses_wrong_input() -> None:
    with pytest.raises(TypeError, match="uint8"):
        patchify(torch.zeros(3, 56, 56), DEFAULT)
    with pytest.raises(ValueError, match="3 channels"):
        patchify(torch.zeros(4, 56, 56, dtype=torch.uint8), DEFAULT)
    with pytest.raises(ValueError, match="multiples of"):
        patchify(torch.zeros(3, 57, 56, dtype=torch.uint8), DEFAULT, resized=True)


def test_resize_pil_and_image_to_tensor() -> None:
    image = noise_image(333, 517)
    resized = resize_pil(image, DEFAULT)
    assert resized.size == (336, 504)
    tensor = image_to_tensor(resized)
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 504, 336)
    assert np.array_equal(tensor.permute(1, 2, 0).numpy(), np.asarray(resized))
    assert image_to_tensor(noise_image(5, 4, mode="L")).shape == (3, 4, 5)  # converted like HF


def test_the_grid_stays_on_the_host_wherever_the_pixels_are() -> None:
    """Building it on the pixels' device would, on CUDA, wait for everything queued there (a CUDA
    tensor made from host values synchronizes the stream): the batch in flight."""
    pixels, grid = patchify(torch.empty(3, 56, 56, dtype=torch.uint8, device="meta"), DEFAULT)
    assert pixels.device.type == "meta" and grid.device.type == "cpu"
    assert grid.tolist() == [[1, 4, 4]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_path_equals_cpu_path() -> None:
    for width, height in SIZES:
        image = noise_image(width, height, seed=width + height)
        for cfg in CONFIGS.values():
            cpu = preprocess(image, cfg, "cpu")
            gpu = preprocess(image, cfg, "cuda")
            assert gpu[0].is_cuda and not gpu[1].is_cuda  # the grid stays on the host (read there)
            assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1])


# -- decoding ---------------------------------------------------------------------------------------


def _asym(width: int = 41, height: int = 23) -> PIL.Image.Image:
    """Smooth but asymmetric content (compresses predictably, shows any rotation or flip)."""
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255 // width, y * 255 // height, (x * y) % 256], axis=-1).astype(np.uint8)
    return PIL.Image.fromarray(array)


def _animated_gif() -> bytes:
    first = PIL.Image.new("RGB", (31, 17), (200, 30, 30))
    second = PIL.Image.new("RGB", (31, 17), (30, 30, 200))
    return encode(first, "GIF", save_all=True, append_images=[second], duration=50, loop=0)


def _palette_with_transparency() -> bytes:
    rng = np.random.default_rng(6)
    image = PIL.Image.fromarray(rng.integers(0, 4, (19, 33), dtype=np.uint8), "L").convert("P")
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30])
    return encode(image, "PNG", transparency=bytes([0, 128, 255, 255]))  # per-index alpha: tRNS bytes


def _rgba() -> bytes:
    rng = np.random.default_rng(7)
    array = rng.integers(0, 256, (23, 29, 4), dtype=np.uint8)
    array[0, 0] = (10, 20, 30, 0)  # fully transparent, with a colour underneath
    array[0, 1] = (255, 0, 0, 128)  # half-transparent red
    array[0, 2] = (0, 0, 255, 255)  # opaque blue
    return encode(PIL.Image.fromarray(array, "RGBA"), "PNG")


def _gif_transparent() -> bytes:
    image = PIL.Image.fromarray(np.random.default_rng(10).integers(0, 3, (15, 21), dtype=np.uint8), "L").convert("P")
    image.putpalette([200, 30, 30, 30, 200, 30, 0, 0, 0])
    return encode(image, "GIF", transparency=2)  # index 2 (stored black) is transparent


def _webp_alpha() -> bytes:
    array = np.random.default_rng(11).integers(0, 256, (19, 23, 4), dtype=np.uint8)
    array[:3, :3, 3] = 0
    return encode(PIL.Image.fromarray(array, "RGBA"), "WEBP", lossless=True)


def _sixteen_bit() -> bytes:
    rng = np.random.default_rng(8)
    array = rng.integers(0, 65536, (21, 27), dtype=np.uint16)
    array[0, :4] = (0, 100, 255, 256)
    return encode(PIL.Image.fromarray(array), "PNG")


UPLOADS = {
    "jpeg": lambda: encode(_asym(), "JPEG", quality=90),
    "png": lambda: encode(noise_image(37, 53), "PNG"),
    "webp": lambda: encode(noise_image(37, 53), "WEBP", lossless=True),
    "webp-lossy": lambda: encode(_asym(), "WEBP", quality=80),
    "gif-animated": _animated_gif,
    "bmp": lambda: encode(noise_image(37, 53), "BMP"),
    "grayscale": lambda: encode(noise_image(37, 53, mode="L"), "PNG"),
    "bilevel": lambda: encode(noise_image(37, 53, mode="L").convert("1"), "PNG"),
    "palette-transparency": _palette_with_transparency,
    "rgba": _rgba,
    "gif-transparent": _gif_transparent,
    "webp-alpha": _webp_alpha,
    "la": lambda: encode(PIL.Image.fromarray(np.random.default_rng(9).integers(0, 256, (17, 45, 2), dtype=np.uint8), "LA"), "PNG"),
    "png-16bit": _sixteen_bit,
    "cmyk-jpeg": lambda: encode(noise_image(37, 53, mode="CMYK"), "JPEG", quality=95),
}


# HF's own convert("RGB") of a palette image with a tRNS table warns; ours does not (tested below).
@pytest.mark.filterwarnings("ignore:Palette images with Transparency:UserWarning")
@pytest.mark.parametrize("kind", list(UPLOADS))
def test_decode_equals_hf(kind: str) -> None:
    data = UPLOADS[kind]()
    image = decode_image(data, ImageLimits())
    reference = hf_open(data)
    assert image.mode == "RGB"
    assert image.size == reference.size
    assert np.array_equal(np.asarray(image), np.asarray(reference))
    # HF's processor fed the raw PIL image (its own convert_to_rgb, no EXIF step) agrees too; a release
    # that drops alpha is fed the composited image instead.
    raw = PIL.Image.open(io.BytesIO(data))
    assert_matches_hf(preprocess(image, NARROW), raw if HF_COMPOSITES else hf_rgb(raw), NARROW)


def test_decode_source_modes() -> None:
    # The fixtures really exercise the modes they are named after.
    modes = {kind: PIL.Image.open(io.BytesIO(make())).mode for kind, make in UPLOADS.items()}
    assert modes["grayscale"] == "L" and modes["bilevel"] == "1" and modes["la"] == "LA"
    assert modes["palette-transparency"] == "P" and modes["rgba"] == "RGBA"
    assert modes["png-16bit"] == "I;16" and modes["cmyk-jpeg"] == "CMYK"


@pytest.mark.parametrize("kind", ["rgba", "la", "palette-transparency", "gif-transparent", "webp-alpha"])
def test_transparency_is_composited_onto_white_like_current_hf(kind: str) -> None:
    data = UPLOADS[kind]()
    stored = np.asarray(PIL.Image.open(io.BytesIO(data)).convert("RGBA")).astype(np.float64)
    image = np.asarray(decode_image(data, ImageLimits())).astype(np.float64)
    alpha = stored[..., 3:] / 255
    expected = stored[..., :3] * alpha + 255 * (1 - alpha)  # over white
    assert np.abs(image - expected).max() <= 1  # Pillow's alpha_composite rounds in fixed point
    assert (alpha == 0).any() and (image[alpha[..., 0] == 0] == 255).all()  # a transparent pixel is white
    if HF_COMPOSITES:  # the installed transformers is a current one: the same bytes as its processor's
        assert np.array_equal(image, np.asarray(_hf_convert_to_rgb(PIL.Image.open(io.BytesIO(data)))))


def test_rgba_pixels() -> None:
    image = decode_image(_rgba(), ImageLimits())
    assert image.getpixel((0, 0)) == (255, 255, 255)  # fully transparent: white, not the stored (10, 20, 30)
    assert image.getpixel((1, 0)) == (255, 127, 127)  # red at alpha 128 over white: 255 * 127 / 255
    assert image.getpixel((2, 0)) == (0, 0, 255)  # opaque: unchanged


def test_palette_transparency_without_warning(recwarn: pytest.WarningsRecorder) -> None:
    decode_image(_palette_with_transparency(), ImageLimits())
    assert not [w for w in recwarn if "Transparency" in str(w.message)]


def test_sixteen_bit_is_clipped_like_hf() -> None:
    image = decode_image(_sixteen_bit(), ImageLimits())
    assert [image.getpixel((x, 0))[0] for x in range(4)] == [0, 100, 255, 255]


def test_animated_gif_first_frame() -> None:
    image = decode_image(_animated_gif(), ImageLimits())
    red, green, blue = image.getpixel((15, 8))
    assert red > 150 and blue < 80


def test_exif_orientation_is_applied() -> None:
    source = _asym(41, 23)
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    data = encode(source, "JPEG", quality=95, exif=exif.tobytes())
    image = decode_image(data, ImageLimits())
    assert image.size == (23, 41)
    stored = PIL.Image.open(io.BytesIO(data)).convert("RGB")
    assert np.array_equal(np.asarray(image), np.asarray(stored.transpose(PIL.Image.Transpose.ROTATE_270)))
    assert np.array_equal(np.asarray(image), np.asarray(hf_open(data)))
    assert_matches_hf(preprocess(image, NARROW), hf_open(data), NARROW)


# -- refusals ---------------------------------------------------------------------------------------


def test_empty_body() -> None:
    err = api_error(b"")
    assert (err.status, err.code) == (400, "empty_image")


def test_not_an_image() -> None:
    err = api_error(np.random.default_rng(10).bytes(3001))
    assert (err.status, err.code) == (415, "unsupported_image")
    assert "JPEG" in err.message


def test_known_but_unsupported_format() -> None:
    err = api_error(encode(noise_image(13, 17), "TIFF"))
    assert (err.status, err.code) == (415, "unsupported_image")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(fmt: str) -> None:
    data = encode(noise_image(61, 47, seed=11), fmt)
    err = api_error(data[: len(data) // 2])
    assert (err.status, err.code) == (400, "invalid_image")
    assert "truncated" in err.message


def test_over_max_bytes() -> None:
    data = encode(noise_image(31, 29), "PNG")
    err = api_error(data, ImageLimits(max_bytes=len(data) - 1))
    assert (err.status, err.code) == (413, "image_too_large")
    assert str(len(data)) in err.message and str(len(data) - 1) in err.message


def test_declared_bomb_refused_before_decoding(no_pixel_decoding: None) -> None:
    data = png_header_only(20000, 20000)
    assert len(data) < 100
    err = api_error(data)
    assert (err.status, err.code) == (413, "image_too_large")
    assert "400000000" in err.message and "50000000" in err.message


def test_over_max_pixels_refused_before_decoding(no_pixel_decoding: None) -> None:
    # Under Pillow's own bomb threshold (~89 MP), over ours: our header check refuses it.
    err = api_error(png_header_only(8001, 7001))
    assert (err.status, err.code) == (413, "image_too_large")
    assert "8001x7001 = 56015001 pixels" in err.message and "50000000" in err.message
    err = api_error(encode(noise_image(101, 99), "PNG"), ImageLimits(max_pixels=9_000))
    assert (err.status, err.code) == (413, "image_too_large")


@pytest.mark.parametrize("size", [(600, 2), (2, 600), (3000, 10)])
def test_aspect_ratio_refused(size: tuple[int, int], no_pixel_decoding: None) -> None:
    err = api_error(png_header_only(*size))
    assert (err.status, err.code) == (422, "invalid_image_shape")
    assert "300.0:1" in err.message and "200:1" in err.message


def test_aspect_ratio_at_the_limit_accepted() -> None:
    data = encode(noise_image(400, 2), "PNG")
    image = decode_image(data, ImageLimits())
    assert_matches_hf(preprocess(image, DEFAULT), image, DEFAULT)


def test_limits_validate() -> None:
    with pytest.raises(ValueError, match="max_aspect_ratio"):
        ImageLimits(max_aspect_ratio=300)


# -- configuration ----------------------------------------------------------------------------------


def _write(path: Path, raw: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "preprocessor_config.json").write_text(json.dumps(raw))
    return path


BASE = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "rescale_factor": 0.00392156862745098, "resample": 3,
}


@pytest.mark.parametrize(
    ("pixels", "expected"),
    [
        ({"min_pixels": 3136, "max_pixels": 12845056}, (3136, 12845056)),
        ({"size": {"shortest_edge": 1000, "longest_edge": 200000}}, (1000, 200000)),
        ({"size": {"shortest_edge": 1000, "longest_edge": 200000}, "min_pixels": 2000, "max_pixels": 90000}, (2000, 90000)),
        ({}, (56 * 56, 28 * 28 * 1280)),
    ],
    ids=["min-max", "size", "explicit-wins", "defaults"],
)
def test_from_checkpoint_reads_pixels_like_hf(tmp_path: Path, pixels: dict, expected: tuple[int, int]) -> None:
    path = _write(tmp_path, {**BASE, **pixels})
    cfg = PreprocessConfig.from_checkpoint(path)
    assert (cfg.min_pixels, cfg.max_pixels) == expected
    hf = hf_qwen.Qwen2VLImageProcessorPil.from_pretrained(path)
    assert (hf.size["shortest_edge"], hf.size["longest_edge"]) == expected
    assert cfg == PreprocessConfig.from_checkpoint(path / "preprocessor_config.json")


def test_from_checkpoint_other_fields(tmp_path: Path) -> None:
    raw = {**BASE, "min_pixels": 3136, "max_pixels": 50176, "image_mean": 0.5, "image_std": [0.25, 0.5, 1.0],
           "do_normalize": False, "patch_size": 16}
    cfg = PreprocessConfig.from_checkpoint(_write(tmp_path, raw))
    assert cfg.image_mean == (0.5, 0.5, 0.5) and cfg.image_std == (0.25, 0.5, 1.0)
    assert not cfg.do_normalize and cfg.patch_size == 16 and cfg.factor == 32
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        PreprocessConfig.from_checkpoint(tmp_path / "missing")
    with pytest.raises(ValueError, match="resample"):
        PreprocessConfig.from_checkpoint(_write(tmp_path / "lanczos", {**BASE, "resample": 1}))


def test_fingerprint_fields() -> None:
    fields = DEFAULT.fingerprint_fields()
    assert json.loads(json.dumps(fields)) == fields
    assert fields["pil_pass_order"] == pil_pass_order()
    for changed in (PreprocessConfig(max_pixels=12845056), PreprocessConfig(image_mean=(0.5, 0.5, 0.5)),
                    PreprocessConfig(resample=2), PreprocessConfig(do_rescale=False)):
        assert changed.fingerprint_fields() != fields
    assert PreprocessConfig().fingerprint_fields() == fields
