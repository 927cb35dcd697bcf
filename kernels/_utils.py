"""Small helpers shared by the kernel files (no triton import here: ``import kernels`` must work without it)."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (CPU tests): host functions then pick small fixed tiles and skip autotune,
    which would otherwise time every config in the slow interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def prev_pow2(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n >= 1 else 0


def check_device(*tensors: torch.Tensor) -> None:
    """Triton kernels run on CUDA tensors, or on CPU tensors only under the interpreter."""
    for t in tensors:
        if t.device.type != "cuda" and not interpreting():
            raise ValueError(f"triton kernel got a {t.device.type} tensor; set TRITON_INTERPRET=1 for CPU")


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without waiting for the work already queued there: from pinned
    memory the copy is queued on the stream; from pageable memory a copy may first wait for the
    stream to drain (the batch in flight)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` [..., n] as an [M, n] view with a unit column stride (copied only when it has none)."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def norm_rows(
    x: torch.Tensor, residual: torch.Tensor | None, out: torch.Tensor | None, out_sum: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host side of a one-row-per-program norm with an optional fused residual add.

    Returns ``x2, r2, h2, y2, y``: the [M, N] input rows, residual rows, sum rows and output rows,
    and the output ``y`` shaped like x. Without a residual, ``r2`` is ``x2`` and ``h2`` is ``y2``
    (stand-ins the kernel never touches). ``out_sum`` may alias residual (in-place update of the
    stream): each program reads its row before it writes it, and rows are disjoint between programs.
    """
    n = x.shape[-1]
    x2 = as_rows(x, n)
    check_device(x2)
    y = out if out is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y2 = y.view(-1, n)
    if residual is None:
        return x2, x2, y2, y2, y
    if residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} != x {tuple(x.shape)}")
    h = out_sum if out_sum is not None else torch.empty(x.shape, dtype=residual.dtype, device=x.device)
    return x2, as_rows(residual, n), h.view(-1, n), y2, y


def elementwise_tiles(m: int, n: int) -> tuple[int, int, tuple[int, int]]:
    """``BLOCK_M, BLOCK_N, grid`` for a 2-D elementwise kernel over [M, N] (4 warps): up to 1024
    columns and ~4K elements a program (8 KB of bf16 in, 8 KB out, 16 B per thread per access)."""
    block_n = min(1024, next_pow2(n))
    block_m = max(1, 4096 // block_n)
    return block_m, block_n, (-(-m // block_m), -(-n // block_n))


def row_warps(block: int, elem_bytes: int = 2) -> int:
    """Warps for a one-row-per-program kernel: enough that each thread moves ~16 B per load."""
    per_thread = max(1, 16 // elem_bytes)
    warps = block // (32 * per_thread)
    return max(1, min(16, next_pow2(warps)))


def install_interpreter_fix() -> None:
    """Make ``range(0, tensor_bound)`` work in Triton 3.6's interpreter with numpy >= 2.4.

    The interpreter keeps scalars as 1-element arrays and converts them with ``int(array)``, which
    numpy 2.4 rejects for ndim > 0. Loop bounds read from memory (our per-image lengths) hit that.
    We wrap the interpreter's tensor patcher to convert through ``.reshape(-1)[0]``; the patch is
    scoped to each interpreted call like the interpreter's own. No effect on compiled kernels.
    """
    if not interpreting():
        return
    try:
        import triton.runtime.interpreter as interp
    except ImportError:
        return
    orig = getattr(interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_splitvl_fixed", False):
        return

    def patched(tensor, scope):  # type: ignore[no-untyped-def]
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._splitvl_fixed = True  # type: ignore[attr-defined]
    interp._patch_lang_tensor = patched
