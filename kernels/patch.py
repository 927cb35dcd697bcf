"""``patch(model)``: swap our Triton kernels into an HF Qwen-VL-family vision tower, in place.

Works on a vision-only tower (which Liger refuses) and on a full ``*ForConditionalGeneration`` /
``*Model`` (the tower is found among its modules). Parameters are adopted, never copied, and module
names are kept, so the state dict is unchanged.

Each family's tower is patched by its own module (``kernels/qwen2_vl.py``, ...), found here by the
HF class of the tower: adding a family is its module plus one line in ``_TOWERS``. The shared
pieces (per-grid metadata, fused attention, GEMM + activation) live in ``kernels/tower.py``.

The choices are the fastest measured on an H100/H200 (bench/RESULTS.md, bench/NOTES-kernels.md);
the others stay selectable (``attention=``, ``mlp=``, ``rope_gemm=``) for benchmarks.

``import kernels`` works without triton; ``patch`` then raises ``RuntimeError``.
"""

from __future__ import annotations

import importlib

from torch import nn

# Defaults picked from bench/kernel_bench.py and vision_bench.py on an H100 (bench/RESULTS.md).
DEFAULT_ATTENTION = "auto"  # cuDNN for equal-size batches, our varlen Triton kernel for mixed sizes
# "cublas": cuBLAS GEMM + Triton bias/act pass; "triton": our TMA GEMM with the activation in its
# epilogue; "auto": "triton" from tower.TRITON_GEMM_MIN_ROWS rows on Hopper, else "cublas"
DEFAULT_MLP = "auto"
# Rotary in the qkv GEMM's epilogue (q/k weight rows interleaved in place; state_dict() unchanged).
# Off: measured slower on the H100 (1.13 ms vs 0.65 ms for cuBLAS qkv + rope_qk at 32768 rows; the
# epilogue's pair split/join and cos/sin gathers cost more than the pass they save). Opt-in only.
DEFAULT_ROPE_GEMM = False

# HF vision tower class -> the kernels module that patches it (``<module>.patch_tower``)
_TOWERS = {
    "Qwen2VisionTransformerPretrainedModel": "qwen2_vl",
    "Qwen2_5_VisionTransformerPretrainedModel": "qwen2_5_vl",
    "Qwen3VLVisionModel": "qwen3_vl",
}


def _require_triton() -> None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            "kernels.patch needs triton (pip install 'splitvl[kernels]') and a CUDA GPU; "
            "run the tower unpatched on this machine"
        ) from exc


def _find_tower(model: nn.Module) -> tuple[str, nn.Module, str]:
    """(qualified name, tower, kernels module name) of the first known vision tower in ``model``."""
    for name, mod in model.named_modules():
        for cls in type(mod).__mro__:
            if cls.__name__ in _TOWERS:
                return name, mod, _TOWERS[cls.__name__]
    known = ", ".join(sorted(_TOWERS))
    raise TypeError(f"no supported vision tower inside {type(model).__name__} (known: {known}); "
                    "pass the tower or a model that has one among its modules")


def _patched(tower: nn.Module) -> bool:
    return bool(getattr(tower, "_splitvl_patched", False))  # set by tower.fuse_class


def patch(
    model: nn.Module,
    *,
    attention: str | None = None,
    mlp: str | None = None,
    rope_gemm: bool | None = None,
) -> dict[str, str]:
    """Replace the vision tower's modules with Triton-backed ones, in place.

    Returns ``{qualified module name: "Old -> New"}``. Patching twice is a no-op (empty dict).
    ``attention``: one of ``kernels.attention.BACKENDS`` (default ``"auto"``: the fastest measured);
    ``mlp``: ``"cublas"``, ``"triton"`` (our GEMM with the activation in its epilogue) or ``"auto"``;
    ``rope_gemm``: apply the rotary in the qkv GEMM's epilogue (stores the q/k rows of each qkv
    weight pair-interleaved; ``state_dict()``/``load_state_dict()`` still speak HF's order).
    Inference only: the patched modules have no backward.
    """
    _require_triton()
    from .attention import BACKENDS

    attention = attention or DEFAULT_ATTENTION
    mlp = mlp or DEFAULT_MLP
    rope_gemm = DEFAULT_ROPE_GEMM if rope_gemm is None else rope_gemm
    if attention not in BACKENDS:
        raise ValueError(f"attention must be one of {BACKENDS}, got {attention!r}")
    if mlp not in ("cublas", "triton", "auto"):
        raise ValueError(f"mlp must be 'cublas', 'triton' or 'auto', got {mlp!r}")
    prefix, tower, family = _find_tower(model)
    if _patched(tower):
        return {}
    module = importlib.import_module(f".{family}", __package__)
    return module.patch_tower(tower, prefix, attention, mlp, rope_gemm)


def is_patched(model: nn.Module) -> bool:
    try:
        _, tower, _ = _find_tower(model)
    except TypeError:
        return False
    return _patched(tower)
