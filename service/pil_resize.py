"""Pillow's resize on tensors: ``PIL.Image.resize`` for uint8 images, on any device, bit for bit.

A torch port of Pillow's fixed-point resampler (libImaging/Resample.c): the same coefficients, the
same 22-bit integer arithmetic, the same pass order and the same uint8 rounding between the two
passes. ``F.interpolate(mode="bicubic", antialias=True)`` is close to PIL; this is equal to it, so the
GPU preprocessing path produces HF's pixels exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import PIL.Image
import torch


@dataclass(frozen=True)
class _Filter:
    fn: Callable[[np.ndarray], np.ndarray]
    support: float


# Pillow's filters (libImaging/Resample.c), in float64 with the same operation order. Only the
# polynomial ones: hamming/lanczos use libm sin/cos, which numpy need not reproduce to the ulp.
def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _box(x: np.ndarray) -> np.ndarray:
    return np.where((x > -0.5) & (x <= 0.5), 1.0, 0.0)


FILTERS: dict[int, _Filter] = {
    int(PIL.Image.Resampling.BICUBIC): _Filter(_bicubic, 2.0),
    int(PIL.Image.Resampling.BILINEAR): _Filter(_bilinear, 1.0),
    int(PIL.Image.Resampling.BOX): _Filter(_box, 0.5),
}

# Pillow's 8-bit resampler: coefficients in fixed point with 22 fractional bits, int32 sums.
_PRECISION_BITS = 32 - 8 - 2


def _pil_coefficients(in_size: int, out_size: int, resample: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for one axis, vectorised over outputs.

    Returns (first input index per output [out], fixed-point weights [out, ksize] int32 (0 past
    each output's taps), number of taps per output [out]).
    """
    filt = FILTERS[resample]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = filt.support * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    # C's (int) cast truncates toward zero; astype does the same.
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)
    count = np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize, dtype=np.int64)
    positions = (xmin[:, None] + taps[None, :]).astype(np.float64)
    weights = filt.fn((positions - center[:, None] + 0.5) * (1.0 / filterscale))
    weights = np.where(taps[None, :] < count[:, None], weights, 0.0)
    total = np.zeros(out_size, dtype=np.float64)
    for k in range(ksize):  # C sums left to right; numpy's pairwise sum would round differently
        total = total + weights[:, k]
    weights = np.divide(weights, total[:, None], out=weights.copy(), where=total[:, None] != 0.0)
    scaled = weights * float(1 << _PRECISION_BITS)
    fixed = np.where(weights < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int32)
    return xmin, fixed, count


@dataclass(frozen=True)
class _AxisPlan:
    """One axis of a resize: per-tap gather indices and weights, both [ksize, out], on a device.

    Indices are relative to ``first``: a pass reads only input[first:last] along the axis.
    """

    index: torch.Tensor
    weights: torch.Tensor
    first: int
    last: int


@lru_cache(maxsize=512)
def _axis_plan(in_size: int, out_size: int, resample: int, device: torch.device) -> _AxisPlan:
    xmin, fixed, count = _pil_coefficients(in_size, out_size, resample)
    first = int(xmin[0])
    last = int(xmin[-1] + count[-1])
    # Taps past an output's window have weight 0; clamp their index so the gather stays in bounds.
    index = np.minimum(xmin[:, None] + np.arange(fixed.shape[1])[None, :], last - 1) - first
    return _AxisPlan(
        index=torch.from_numpy(np.ascontiguousarray(index.T)).to(device),
        weights=torch.from_numpy(np.ascontiguousarray(fixed.T)).to(device),
        first=first,
        last=last,
    )


def _resample_axis(image: torch.Tensor, dim: int, plan: _AxisPlan) -> torch.Tensor:
    """One Pillow pass along ``dim`` of a uint8 [C, H, W] tensor: int32 fixed-point sums, rounded, clipped."""
    image = image.narrow(dim, plan.first, plan.last - plan.first)
    shape = list(image.shape)
    shape[dim] = plan.index.shape[1]
    acc = torch.full(shape, 1 << (_PRECISION_BITS - 1), dtype=torch.int32, device=image.device)
    last_dim = dim == image.ndim - 1
    for k in range(plan.index.shape[0]):
        w = plan.weights[k] if last_dim else plan.weights[k].unsqueeze(-1)
        acc.addcmul_(image.index_select(dim, plan.index[k]), w)
    # Pillow's clip8: floor-shift (arithmetic, like C's >> on int), then clamp to 0..255.
    return acc.bitwise_right_shift_(_PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def _two_pass(image: torch.Tensor, height: int, width: int, resample: int, vertical_first: bool) -> torch.Tensor:
    in_h, in_w = image.shape[-2:]
    passes = [(2, in_w, width), (1, in_h, height)]
    if vertical_first:
        passes.reverse()
    for dim, in_size, out_size in passes:
        if in_size != out_size:  # Pillow skips an axis whose size does not change
            image = _resample_axis(image, dim, _axis_plan(in_size, out_size, resample, image.device))
    return image


# Which axis Pillow resamples first changes the uint8 rounding between the passes, and it changed
# between releases, so the installed Pillow's rule is detected, not assumed:
# - older Pillow: always horizontal first;
# - Pillow 12.x after python-pillow/Pillow#9524 (12.3 has it): vertical first when the image is
#   more than 100x taller than wide and the height shrinks (two calls in Image.resize);
# - Pillow 13 (python-pillow/Pillow#9549): vertical first when the height shrinks by more than
#   twice as many pixels as the width (in C).
PASS_ORDER_HORIZONTAL_FIRST = "horizontal-first"
PASS_ORDER_TALL_100X = "vertical-first-when-100x-tall"
PASS_ORDER_SHRINK_HEIGHT_FIRST = "vertical-first-when-height-shrinks-2x-more"


def _vertical_first(order: str, in_h: int, in_w: int, out_h: int, out_w: int) -> bool:
    if order == PASS_ORDER_TALL_100X:
        return in_h > in_w * 100 and out_h < in_h
    if order == PASS_ORDER_SHRINK_HEIGHT_FIRST:
        return (in_h - out_h) > 0 and (in_h - out_h) > (in_w - out_w) * 2
    return False


# Probes (in_h, in_w, out_h, out_w) on which the two orders round differently. Which of them PIL
# resizes vertically first tells the rules apart: the first only under Pillow 13's rule, the
# second (250:1 tall, height shrinking) under both newer rules.
_PROBES = ((96, 47, 12, 32), (250, 2, 20, 3))
_PROBE_ORDERS = {
    (True, True): PASS_ORDER_SHRINK_HEIGHT_FIRST,
    (False, True): PASS_ORDER_TALL_100X,
    (False, False): PASS_ORDER_HORIZONTAL_FIRST,
}


def _pil_went_vertical_first(in_h: int, in_w: int, out_h: int, out_w: int) -> bool | None:
    probe = np.random.default_rng(0).integers(0, 256, (in_h, in_w, 3), dtype=np.uint8)
    expected = np.asarray(PIL.Image.fromarray(probe).resize((out_w, out_h), PIL.Image.Resampling.BICUBIC))
    tensor = torch.from_numpy(probe).permute(2, 0, 1).contiguous()
    bicubic = int(PIL.Image.Resampling.BICUBIC)
    for vertical_first in (True, False):
        got = _two_pass(tensor, out_h, out_w, bicubic, vertical_first).permute(1, 2, 0).numpy()
        if np.array_equal(got, expected):
            return vertical_first
    return None


@lru_cache(maxsize=1)
def pil_pass_order() -> str:
    """The installed Pillow's pass-order rule, found by resizing probes with PIL and both orders here."""
    seen = tuple(_pil_went_vertical_first(*probe) for probe in _PROBES)
    order = _PROBE_ORDERS.get(seen)  # type: ignore[arg-type]
    if order is None:
        raise RuntimeError(
            f"Pillow {PIL.__version__} resizes in a way this module does not reproduce (probes: {seen}); "
            "the GPU resize would not match HF. Pin Pillow or update service/pil_resize.py."
        )
    return order


def resize_tensor(image: torch.Tensor, height: int, width: int,
                  resample: int = int(PIL.Image.Resampling.BICUBIC)) -> torch.Tensor:
    """Resize a uint8 [C, H, W] tensor exactly as the installed ``PIL.Image.resize`` would, on its device.

    Pillow resamples one axis, rounds to uint8, then the other (reading only the span the second
    pass needs); this does the same in the same order, so the result equals PIL's bit for bit.
    """
    check_uint8_chw(image)
    in_h, in_w = image.shape[-2:]
    if (height, width) == (in_h, in_w):
        return image
    if resample not in FILTERS:
        raise ValueError(f"resample={resample} not supported (have {sorted(FILTERS)})")
    vertical_first = _vertical_first(pil_pass_order(), in_h, in_w, height, width)
    return _two_pass(image, height, width, resample, vertical_first)


def check_uint8_chw(image: torch.Tensor) -> None:
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.ndim != 3:
        got = f"{image.dtype} {tuple(image.shape)}" if isinstance(image, torch.Tensor) else type(image).__name__
        raise TypeError(f"expected a uint8 [C, H, W] tensor, got {got}")
