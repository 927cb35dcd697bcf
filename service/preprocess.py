"""Image decoding and preprocessing, equal to HF's ``Qwen2VLImageProcessorPil``, the image processor of
every supported family (each with its own patch size, pixel bounds and normalization: ``service.models``).

HF's pipeline for one image: RGB (transparency composited onto white) -> PIL resize to ``smart_resize``'s size (BICUBIC, on
uint8) -> rescale (float64 multiply, then float32) -> normalize (float32) -> replicate the frame
``temporal_patch_size`` times -> flatten into patches in the 2x2-merge order.

Two ways to run it, both equal to HF:

* CPU: PIL does the resize (it *is* HF's resize), torch does the rest.
* CUDA: the uint8 image is uploaded and resized by :func:`service.pil_resize.resize_tensor`, a torch
  port of Pillow's fixed-point resampler, bit-exact with PIL on any device.

Rescale and normalize are a 256-entry lookup table per channel, computed once with HF's own numpy
arithmetic, so every device produces HF's float32 values bit for bit.
"""

from __future__ import annotations

import io
import json
import math
import struct
import zlib
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from service import decode_cost
from service.errors import ApiError
from service.pil_resize import FILTERS, check_uint8_chw, pil_pass_order, resize_tensor

# transformers.image_utils.OPENAI_CLIP_MEAN / OPENAI_CLIP_STD: Qwen2-VL's defaults.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Formats Pillow may use to open an upload. Fewer decoders, less attack surface.
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")

# Bumped whenever this module's output for a given config changes, so cached features are not reused.
ALGORITHM_VERSION = 2  # 2: transparency composited onto white

# HF's smart_resize refuses larger ratios, so no configuration can go above it.
HF_MAX_ASPECT_RATIO = 200.0


# --------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class PreprocessConfig:
    """The settings of a checkpoint's ``preprocessor_config.json`` that change the output."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    do_rescale: bool = True
    do_normalize: bool = True
    do_resize: bool = True
    resample: int = int(PIL.Image.Resampling.BICUBIC)

    def __post_init__(self) -> None:
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} must have 3 values (RGB), got {getattr(self, name)}")
        if self.resample not in FILTERS:
            names = ", ".join(f"{PIL.Image.Resampling(r).name} ({r})" for r in FILTERS)
            raise ValueError(
                f"resample={self.resample} is not supported; the GPU resize is bit-exact only for {names}"
            )

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merged token covers factor x factor pixels."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_checkpoint(cls, path: Path | str) -> PreprocessConfig:
        """Read ``preprocessor_config.json`` from a checkpoint directory (or the file itself).

        Pixel bounds come as ``min_pixels``/``max_pixels`` (Qwen's files) or as
        ``size={"shortest_edge", "longest_edge"}`` (files saved by newer transformers). As in HF's
        ``__init__``, explicit ``min_pixels``/``max_pixels`` win over ``size``.
        """
        path = Path(path)
        file = path / "preprocessor_config.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: the checkpoint needs its preprocessor_config.json")
        raw = json.loads(file.read_text())
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict, defaults: PreprocessConfig | None = None) -> PreprocessConfig:
        """Build from the keys HF writes over ``defaults`` (the family's processor defaults; else
        Qwen2-VL's); keys that do not change the output are ignored."""
        defaults = defaults or cls()
        size = raw.get("size") or {}
        min_pixels = _first(raw.get("min_pixels"), size.get("shortest_edge"), size.get("min_pixels"))
        max_pixels = _first(raw.get("max_pixels"), size.get("longest_edge"), size.get("max_pixels"))
        return cls(
            patch_size=int(raw.get("patch_size", defaults.patch_size)),
            temporal_patch_size=int(raw.get("temporal_patch_size", defaults.temporal_patch_size)),
            merge_size=int(raw.get("merge_size", defaults.merge_size)),
            min_pixels=int(_first(min_pixels, defaults.min_pixels)),
            max_pixels=int(_first(max_pixels, defaults.max_pixels)),
            image_mean=_three(raw.get("image_mean", defaults.image_mean)),
            image_std=_three(raw.get("image_std", defaults.image_std)),
            rescale_factor=float(raw.get("rescale_factor", defaults.rescale_factor)),
            do_rescale=bool(raw.get("do_rescale", defaults.do_rescale)),
            do_normalize=bool(raw.get("do_normalize", defaults.do_normalize)),
            do_resize=bool(raw.get("do_resize", defaults.do_resize)),
            resample=int(raw.get("resample", defaults.resample)),
        )

    def fingerprint_fields(self) -> dict:
        """Everything that changes ``pixel_values``, JSON-ready, for the model fingerprint."""
        fields = asdict(self)
        fields["image_mean"] = list(self.image_mean)
        fields["image_std"] = list(self.image_std)
        fields["algorithm"] = f"splitvl-qwen2vl/{ALGORITHM_VERSION}"
        # PIL's resize (HF's reference) rounds differently depending on Pillow's pass order.
        fields["pil_pass_order"] = pil_pass_order()
        return fields


def _first(*values: object) -> object:
    return next((v for v in values if v is not None), None)


def _three(value: object) -> tuple[float, float, float]:
    # HF accepts one float for all channels.
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    a, b, c = (float(v) for v in value)  # type: ignore[union-attr]
    return (a, b, c)


@dataclass(frozen=True)
class ImageLimits:
    """What an upload may be. Checked before any pixel is decoded."""

    max_bytes: int = 20 * 1024 * 1024  # upload size
    max_pixels: int = 50_000_000  # decoded width*height before resize; also guards decompression bombs
    max_aspect_ratio: float = HF_MAX_ASPECT_RATIO  # HF's smart_resize refuses > 200 too
    formats: tuple[str, ...] = field(default=SUPPORTED_FORMATS)
    max_decode_work: int = 1_000_000_000  # width x height x passes (a progressive JPEG's scans): decode_cost

    def __post_init__(self) -> None:
        if not 1.0 <= self.max_aspect_ratio <= HF_MAX_ASPECT_RATIO:
            raise ValueError(
                f"max_aspect_ratio must be in [1, {HF_MAX_ASPECT_RATIO:g}] (Qwen2-VL's smart_resize refuses more), "
                f"got {self.max_aspect_ratio}"
            )
        if self.max_bytes <= 0 or self.max_pixels <= 0:
            raise ValueError("max_bytes and max_pixels must be positive")
        if self.max_decode_work <= 0:
            raise ValueError("max_decode_work must be positive")


# --------------------------------------------------------------------------------------------
# decoding

# What a malformed file can make Pillow's plugins raise while parsing or decoding.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, struct.error, zlib.error)


def decode_image(data: bytes | PIL.Image.Image, limits: ImageLimits) -> PIL.Image.Image:
    """Decode an upload to an RGB image the way HF's ``load_image`` + processor would see it.

    ``data`` is the upload's bytes, or what :func:`open_image` made of them (header checked, nothing
    decoded yet). Raises :class:`ApiError` with a 4xx status for anything the caller must fix.
    """
    image = data if isinstance(data, PIL.Image.Image) else open_image(data, limits)[0]
    image = _load_oriented(image)
    _check_shape(image.width, image.height, limits)  # a decoder may grow the canvas (GIF frames)
    return _to_rgb(image)


def open_image(data: bytes, limits: ImageLimits) -> tuple[PIL.Image.Image, int]:
    """The upload's header, checked before any pixel is decoded: size, pixel count, aspect ratio and
    decoding work (:mod:`service.decode_cost`, whose structure walk runs before Pillow parses a byte).
    Returns the unloaded image and its decoding work in pixel-passes."""
    if not data:
        raise ApiError(400, "empty_image", f"The request has no image data: send the image bytes ({_formats(limits)}).")
    if len(data) > limits.max_bytes:
        raise ApiError(
            413, "image_too_large",
            f"The image is {len(data)} bytes; the limit is {limits.max_bytes} bytes. "
            "Send a smaller or more compressed file.",
        )
    passes = decode_cost.passes(data)
    image = _open(data, limits)
    _check_shape(image.width, image.height, limits)  # the header's size: nothing decoded yet
    return image, decode_cost.check_work(image.width, image.height, passes, limits.max_decode_work)


def _formats(limits: ImageLimits) -> str:
    return ", ".join(limits.formats)


def _open(data: bytes, limits: ImageLimits) -> PIL.Image.Image:
    """Parse the header only (Pillow decodes lazily)."""
    try:
        return PIL.Image.open(io.BytesIO(data), formats=list(limits.formats))
    except PIL.UnidentifiedImageError:
        raise ApiError(
            415, "unsupported_image",
            f"The data is not an image in a supported format ({_formats(limits)}). "
            "Send one of those, or convert the image first.",
        ) from None
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as exc:
        # Pillow's own guard fires inside open() for sizes far over ours (and when warnings are errors).
        raise ApiError(
            413, "image_too_large",
            f"The image declares too many pixels ({exc}); the limit is {limits.max_pixels} pixels. "
            "Downscale it before uploading.",
        ) from None
    except _DECODE_ERRORS as exc:
        raise ApiError(400, "invalid_image", f"The image header could not be read ({exc}). "
                       "The file is corrupt; re-encode it and upload it again.") from None


def _check_shape(width: int, height: int, limits: ImageLimits) -> None:
    if width <= 0 or height <= 0:
        raise ApiError(400, "invalid_image", f"The image declares a size of {width}x{height}, which has no pixels.")
    pixels = width * height
    if pixels > limits.max_pixels:
        raise ApiError(
            413, "image_too_large",
            f"The image is {width}x{height} = {pixels} pixels; the limit is {limits.max_pixels} pixels. "
            "Downscale it before uploading.",
        )
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_aspect_ratio:
        raise ApiError(
            422, "invalid_image_shape",
            f"The image is {width}x{height}, an aspect ratio of {ratio:.1f}:1; the limit is "
            f"{limits.max_aspect_ratio:g}:1. Crop or pad it to a less elongated shape.",
        )


def _load_oriented(image: PIL.Image.Image) -> PIL.Image.Image:
    """Decode the pixels (first frame of an animation) and apply the EXIF orientation, as HF's load_image."""
    fmt = image.format or "image"
    try:
        image.load()
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as exc:
        raise ApiError(413, "image_too_large", f"The image decodes to too many pixels ({exc}). "
                       "Downscale it before uploading.") from None
    except _DECODE_ERRORS as exc:
        raise ApiError(
            400, "invalid_image",
            f"The {fmt} data could not be decoded ({exc}): the file is truncated or corrupt. "
            "Re-encode it and upload it again.",
        ) from None
    decode_cost.check_exif(image.info.get("exif"))  # what exif_transpose parses in Python
    try:
        return PIL.ImageOps.exif_transpose(image)
    except _DECODE_ERRORS as exc:
        raise ApiError(
            400, "invalid_image",
            f"The {fmt} image's EXIF orientation could not be read ({exc}). Strip or repair its EXIF metadata.",
        ) from None


def _to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """``to_rgb``, with a mode Pillow cannot convert refused as the caller's mistake."""
    try:
        return to_rgb(image)
    except ValueError as exc:
        raise ApiError(415, "unsupported_image",
                       f"Images in pixel mode {image.mode} cannot be converted to RGB ({exc}). "
                       "Convert it to 8-bit RGB first.") from None


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """HF's ``convert_to_rgb``: an image with transparency is composited onto white, any other is a
    plain ``convert("RGB")``. 16-bit and float grayscale (I;16, I, F) are clipped to 0..255 by
    Pillow, not rescaled; HF does the same."""
    if image.mode == "RGB":
        return image
    return composite_on_white(image) if has_transparency(image) else image.convert("RGB")


def has_transparency(image: PIL.Image.Image) -> bool:
    """An alpha band, or a transparent colour or palette entries (PNG tRNS, GIF)."""
    return "A" in image.getbands() or image.info.get("transparency") is not None


def composite_on_white(image: PIL.Image.Image) -> PIL.Image.Image:
    """Transparent pixels show white, half-transparent ones are blended with it: what HF's current
    image processor (checked against 5.25; 5.17 still dropped alpha) and Qwen-VL's own utilities
    feed the model, where a plain ``convert("RGB")`` shows whatever colour a transparent pixel
    stores (often black)."""
    rgba = image.convert("RGBA")  # palette and colour-key transparency become alpha here
    white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return PIL.Image.alpha_composite(white, rgba).convert("RGB")


# --------------------------------------------------------------------------------------------
# geometry


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size HF's Qwen2-VL processor resizes to: sides multiples of ``factor``, area within bounds.

    Same float expressions as HF (including Python's round-half-to-even), so the same numbers.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    ratio = max(height, width) / min(height, width)
    if ratio > HF_MAX_ASPECT_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {HF_MAX_ASPECT_RATIO:g}, got {ratio}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:  # also catches a side that rounded to 0
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def target_size(height: int, width: int, cfg: PreprocessConfig) -> tuple[int, int]:
    """(height, width) after the resize step, or the input size when ``do_resize`` is off."""
    if not cfg.do_resize:
        return height, width
    return smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)


# --------------------------------------------------------------------------------------------
# resize: PIL on the CPU path, an exact torch port of it on the GPU path


def resize_pil(image: PIL.Image.Image, cfg: PreprocessConfig) -> PIL.Image.Image:
    """HF's resize: ``image.resize`` to ``smart_resize``'s size on the uint8 RGB image."""
    image = to_rgb(image)
    height, width = target_size(image.height, image.width, cfg)
    if (height, width) == (image.height, image.width):
        return image
    return image.resize((width, height), resample=PIL.Image.Resampling(cfg.resample))


# --------------------------------------------------------------------------------------------
# rescale + normalize + patchify


@lru_cache(maxsize=16)
def _value_table(mean: tuple[float, ...], std: tuple[float, ...], rescale_factor: float,
                 do_rescale: bool, do_normalize: bool, device: torch.device) -> torch.Tensor:
    """float32 [3, 256]: HF's rescale+normalize of every uint8 value, in HF's own numpy arithmetic."""
    values: np.ndarray = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 256))
    if do_rescale:  # transformers.image_transforms.rescale: float64 multiply, then float32
        values = (values.astype(np.float64) * rescale_factor).astype(np.float32)
    if do_normalize:  # transformers.image_transforms.normalize: float32 (x - mean) / std per channel
        if not np.issubdtype(values.dtype, np.floating):
            values = values.astype(np.float32)
        m = np.array(mean, dtype=values.dtype)
        s = np.array(std, dtype=values.dtype)
        values = ((values.T - m) / s).T
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(device)



def patchify(images: torch.Tensor, cfg: PreprocessConfig, *, resized: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [3, H, W] (any device) -> (pixel_values float32 [gh*gw, 3*tp*ps*ps] on that device,
    grid_thw int64 [1, 3] on the CPU).

    Resizes with :func:`resize_tensor` unless ``resized`` says the caller already did (the PIL path).
    Pure tensor code: runs wherever ``images`` lives.
    """
    check_uint8_chw(images)
    if images.shape[0] != 3:
        raise ValueError(f"expected 3 channels (RGB), got {images.shape[0]}")
    if not resized:
        height, width = target_size(images.shape[1], images.shape[2], cfg)
        images = resize_tensor(images, height, width, cfg.resample)
    _, height, width = images.shape
    if height % cfg.factor or width % cfg.factor:
        raise ValueError(
            f"image is {height}x{width}; both sides must be multiples of patch_size*merge_size={cfg.factor} "
            "(resize with smart_resize first)"
        )
    table = _value_table(cfg.image_mean, cfg.image_std, cfg.rescale_factor, cfg.do_rescale, cfg.do_normalize,
                         images.device)
    values = table.gather(1, images.reshape(3, -1).long()).view(3, height, width)
    return _to_patches(values, cfg)


def _to_patches(values: torch.Tensor, cfg: PreprocessConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's patch layout: rows ordered by merge window (2x2 neighbours adjacent), each row C, T, ps, ps."""
    ps, ms, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    channels, height, width = values.shape
    grid_h, grid_w = height // ps, width // ps
    patches = values.view(channels, grid_h // ms, ms, ps, grid_w // ms, ms, ps)
    patches = patches.permute(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, mh, mw, C, ph, pw)
    # A still image is one frame repeated temporal_patch_size times.
    patches = patches.unsqueeze(5).expand(*patches.shape[:5], tp, ps, ps)
    pixel_values = patches.reshape(grid_h * grid_w, channels * tp * ps * ps)
    # on the host, wherever the pixels are: it is read there, and building a CUDA tensor from host
    # values waits for the device to finish everything queued (the batch in flight)
    grid_thw = torch.tensor([[1, grid_h, grid_w]], dtype=torch.int64)
    return pixel_values, grid_thw


def image_to_tensor(image: PIL.Image.Image, *, pin: bool = False) -> torch.Tensor:
    """uint8 [3, H, W] on the CPU, no resize (non-RGB images are converted as HF does). ``pin``: in
    pinned memory (needs CUDA), so that a copy to the device is queued, not waited for; the
    channel-first layout is then written there directly, without a pageable copy in between."""
    array = np.array(to_rgb(image), dtype=np.uint8)  # a writable copy: torch refuses read-only buffers
    hwc = torch.from_numpy(array)
    if not pin:
        return hwc.permute(2, 0, 1).contiguous()
    chw = torch.empty((3, array.shape[0], array.shape[1]), dtype=torch.uint8, pin_memory=True)
    return chw.copy_(hwc.permute(2, 0, 1))


def preprocess(image: PIL.Image.Image, cfg: PreprocessConfig,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """One image -> (pixel_values on ``device``, grid_thw on the CPU), equal to HF's processor.

    CPU: PIL resizes (HF's exact resize). Elsewhere: upload uint8, resize on the device.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return patchify(image_to_tensor(resize_pil(image, cfg)), cfg, resized=True)
    uploaded = image_to_tensor(image, pin=device.type == "cuda").to(device, non_blocking=True)
    return patchify(uploaded, cfg)
