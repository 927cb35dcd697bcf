"""service.pil_resize against Pillow itself: every uint8 of the tensor resize equals PIL.Image.resize."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from service.pil_resize import pil_pass_order, resize_tensor


def test_resize_tensor_is_pils_resize() -> None:
    """Random shapes, both pass orders, up and down, three filters: every uint8 equal to PIL's."""
    rng = np.random.default_rng(1)
    cases = [tuple(int(v) for v in rng.integers(1, 300, 4)) for _ in range(80)]
    cases += [(96, 47, 12, 32), (47, 96, 32, 12), (300, 20, 7, 19), (20, 300, 19, 7)]
    for in_h, in_w, out_h, out_w in cases:
        array = rng.integers(0, 256, (in_h, in_w, 3), dtype=np.uint8)
        for resample in (PIL.Image.Resampling.BICUBIC, PIL.Image.Resampling.BILINEAR, PIL.Image.Resampling.BOX):
            expected = np.asarray(PIL.Image.fromarray(array).resize((out_w, out_h), resample))
            got = resize_tensor(torch.from_numpy(array).permute(2, 0, 1), out_h, out_w, int(resample))
            assert np.array_equal(got.permute(1, 2, 0).numpy(), expected), (in_h, in_w, out_h, out_w, resample)


def test_pass_order_detected() -> None:
    # Pillow 13 resizes height first when it shrinks much more than the width; Pillow 12.3 only
    # for images over 100:1 tall; older Pillow never. See service.pil_resize.pil_pass_order.
    major, minor = (int(v) for v in PIL.__version__.split(".")[:2])
    if major >= 13:
        assert pil_pass_order() == "vertical-first-when-height-shrinks-2x-more"
    elif (major, minor) >= (12, 3):
        assert pil_pass_order() == "vertical-first-when-100x-tall"
    elif major < 12:
        assert pil_pass_order() == "horizontal-first"


@pytest.mark.parametrize(("in_h", "in_w", "out_h", "out_w"), [(5000, 40, 3052, 28), (3600, 35, 60, 30), (40, 5000, 28, 3052)])
def test_tall_and_wide_resize_is_pils(in_h: int, in_w: int, out_h: int, out_w: int) -> None:
    # The shapes where Pillow versions disagree on the pass order.
    array = np.random.default_rng(12).integers(0, 256, (in_h, in_w, 3), dtype=np.uint8)
    expected = np.asarray(PIL.Image.fromarray(array).resize((out_w, out_h), PIL.Image.Resampling.BICUBIC))
    got = resize_tensor(torch.from_numpy(array).permute(2, 0, 1), out_h, out_w)
    assert np.array_equal(got.permute(1, 2, 0).numpy(), expected)
