"""``patch(model)``: swap our Triton kernels into an HF Qwen2-VL vision tower, in place.

Works on a vision-only ``Qwen2VisionTransformerPretrainedModel`` (which Liger refuses) and on a
full ``Qwen2VLForConditionalGeneration`` / ``Qwen2VLModel`` (the tower is found as ``.visual``).
Parameters are adopted, never copied, and module names are kept, so the state dict is unchanged.

What changes in a Qwen2-VL tower (per forward, for S patches of C = embed_dim):

- the tower's forward: cu_seqlens, per-image lengths and the rotary cos/sin tables [S, D/2] are
  built once per forward and cached per grid (HF rebuilds positions with a Python loop and keeps
  [S, D] tables); the residual stream is updated in place;
- every block: ``qkv GEMM (cuBLAS) -> rotary pass (rope_qk) -> attention (cuDNN for equal-size
  batches, our Triton varlen kernel for mixed sizes) -> proj GEMM -> fused (residual add + norm2)
  -> fc1 GEMM with bias + QuickGELU (our TMA GEMM's epilogue from 4096 rows, else cuBLAS + one
  bias/act pass) -> fc2 GEMM -> fused (residual add + next block's norm1)``; the last block's
  second add is fused with the merger's ``ln_q``;
- the patch embedding: the Conv3d whose kernel equals its stride is one GEMM over the flattened
  patches (same weight tensor, viewed);
- the merger: GEMM + (bias + exact GELU) + GEMM.

The choices are the fastest measured on an H100 (bench/RESULTS.md, bench/NOTES-kernels.md); the
others stay selectable (``attention=``, ``mlp=``, ``rope_gemm=``) for benchmarks.

A Qwen2.5-VL tower gets module swaps only (RMSNorm, SwiGLU MLP); its window-attention forward
stays HF's.

``import kernels`` works without triton; ``patch`` then raises ``RuntimeError``.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Defaults picked from bench/kernel_bench.py and vision_bench.py on an H100 (bench/RESULTS.md).
DEFAULT_ATTENTION = "auto"  # cuDNN for equal-size batches, our varlen Triton kernel for mixed sizes
# "cublas": cuBLAS GEMM + Triton bias/act pass; "triton": our TMA GEMM with the activation in its
# epilogue; "auto": "triton" from TRITON_GEMM_MIN_ROWS rows on Hopper, else "cublas"
DEFAULT_MLP = "auto"
# Rotary in the qkv GEMM's epilogue (q/k weight rows interleaved in place; state_dict() unchanged).
# Off: measured slower on the H100 (1.13 ms vs 0.65 ms for cuBLAS qkv + rope_qk at 32768 rows; the
# epilogue's pair split/join and cos/sin gathers cost more than the pass they save). Opt-in only.
DEFAULT_ROPE_GEMM = False
# Below this many rows our GEMM loses to cuBLAS (H100: 1024 rows, 128x256 tiles fill 80 of 132 SMs)
TRITON_GEMM_MIN_ROWS = 4096

_META_CACHE_SIZE = 32


def _require_triton() -> None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            "kernels.patch needs triton (pip install 'splitvl[kernels]') and a CUDA GPU; "
            "run the tower unpatched on this machine"
        ) from exc


@dataclasses.dataclass
class VisionMeta:
    """Per-grid data every block needs; built once per forward (and cached per grid)."""

    grid: tuple[tuple[int, int, int], ...]
    lengths: list[int]  # tokens per attention segment (one per frame)
    cu_seqlens: torch.Tensor  # [n + 1] int32, device
    max_seqlen: int
    cos: torch.Tensor  # [S, D/2] fp32, device
    sin: torch.Tensor


def _grid_key(grid_thw: torch.Tensor | list) -> tuple[tuple[int, int, int], ...]:
    rows = grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else grid_thw
    return tuple((int(t), int(h), int(w)) for t, h, w in rows)


def build_meta(
    grid: tuple[tuple[int, int, int], ...], spatial_merge_size: int, inv_freq: torch.Tensor, scaling: float = 1.0
) -> VisionMeta:
    from ._utils import to_device_async
    from .rope_vision import rope_angles, rope_positions

    lengths = [h * w for t, h, w in grid for _ in range(t)]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
    cos, sin = rope_angles(rope_positions(grid, spatial_merge_size), inv_freq)
    if scaling != 1.0:  # in place: keeps the tables' padded rows (see rope_vision.padded_table)
        cos.mul_(scaling)
        sin.mul_(scaling)
    return VisionMeta(
        grid=grid, lengths=lengths, cu_seqlens=to_device_async(cu, inv_freq.device),
        max_seqlen=max(lengths) if lengths else 0, cos=cos, sin=sin,
    )


# --------------------------------------------------------------------------------------------
# Qwen2-VL modules


class LinearPatchEmbed(nn.Module):
    """Conv3d with kernel == stride over pre-cut patches is a GEMM: [S, C*T*P*P] @ W^T."""

    def __init__(self, orig: nn.Module) -> None:
        super().__init__()
        self.proj = orig.proj  # keep the Conv3d (state-dict key patch_embed.proj.weight)
        self.in_channels = orig.in_channels
        self.temporal_patch_size = orig.temporal_patch_size
        self.patch_size = orig.patch_size
        self.embed_dim = orig.embed_dim

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight  # [E, C, T, P, P] contiguous -> [E, C*T*P*P] view
        x = hidden_states.reshape(-1, w[0].numel()).to(w.dtype)
        return F.linear(x, w.view(w.shape[0], -1), self.proj.bias)


def _use_triton_gemm(mode: str, x: torch.Tensor) -> bool:
    if mode == "triton":
        return True
    if mode != "auto" or x.shape[0] < TRITON_GEMM_MIN_ROWS:
        return False
    from .gemm import hopper

    return hopper(x)


def _linear_bias_act(x: torch.Tensor, linear: nn.Linear, act: str, mode: str) -> torch.Tensor:
    """``act(linear(x))``: bias and activation in our GEMM's epilogue (see ``_use_triton_gemm``), else
    cuBLAS without the bias and one in-place bias + activation pass."""
    from .activations import bias_act
    from .gemm import linear_act

    if _use_triton_gemm(mode, x):
        return linear_act(x, linear.weight, linear.bias, act)
    f = F.linear(x, linear.weight)
    return bias_act(f, linear.bias, act, out=f)


class FusedVisionAttention(nn.Module):
    """qkv GEMM (+ rotary in its epilogue) -> packed attention -> proj GEMM.

    With ``rope_gemm`` the q/k rows of ``qkv.weight``/``qkv.bias`` are stored pair-interleaved
    (``rope_vision.interleave_qk_rows``) so the GEMM epilogue can rotate adjacent columns; hooks
    convert to and from HF's order in ``state_dict()`` / ``load_state_dict()``.
    """

    def __init__(self, orig: nn.Module, backend: str, rope_gemm: bool = False, gemm: str = "auto") -> None:
        super().__init__()
        self.qkv = orig.qkv
        self.proj = orig.proj
        self.num_heads = orig.num_heads
        self.head_dim = orig.head_dim
        self.backend = backend
        self.gemm = gemm
        self.rope_gemm = False
        if rope_gemm:
            self.set_rope_gemm(True)
        self.register_state_dict_post_hook(_qkv_to_hf_order)
        self.register_load_state_dict_pre_hook(_qkv_from_hf_order)

    @torch.no_grad()
    def set_rope_gemm(self, on: bool) -> None:
        """Switch the stored q/k row order (and so the rotary path); a no-op if already so."""
        from .rope_vision import interleave_qk_rows

        if on == self.rope_gemm:
            return
        for t in (self.qkv.weight, self.qkv.bias):
            if t is not None:
                interleave_qk_rows(t.data, self.num_heads, inverse=not on)
        self.rope_gemm = on

    def forward(self, y: torch.Tensor, meta: VisionMeta) -> torch.Tensor:
        """y [S, C] (normed) -> proj(attn(rope(qkv(y)))) [S, C]."""
        from .attention import attention
        from .gemm import linear_act

        hd = self.num_heads * self.head_dim
        if self.rope_gemm and _use_triton_gemm(self.gemm, y):
            rope = (meta.cos, meta.sin, 2 * hd, self.head_dim)
            qkv = linear_act(y, self.qkv.weight, self.qkv.bias, rope=rope)  # [S, 3C], q/k rotated
            pre = True
        else:
            qkv = F.linear(y, self.qkv.weight, self.qkv.bias)  # [S, 3C]
            pre = False
        a = attention(qkv, meta.cu_seqlens, meta.max_seqlen, self.num_heads, meta.cos, meta.sin,
                      backend=self.backend, lengths=meta.lengths, prerotated=pre,
                      interleaved=self.rope_gemm)  # [S, C]
        return F.linear(a, self.proj.weight, self.proj.bias)


def _reorder_qkv(module: nn.Module, state_dict: dict, prefix: str, inverse: bool) -> None:
    """Convert the qkv weight/bias entries of ``state_dict`` between HF's q/k row order and the
    interleaved one (``inverse``: back to HF's), for a module storing them interleaved."""
    if not getattr(module, "rope_gemm", False):
        return
    from .rope_vision import interleave_qk_rows

    for name in ("qkv.weight", "qkv.bias"):
        key = prefix + name
        if key in state_dict and state_dict[key] is not None:
            state_dict[key] = interleave_qk_rows(state_dict[key].detach().clone(), module.num_heads, inverse=inverse)


def _qkv_to_hf_order(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    _reorder_qkv(module, state_dict, prefix, inverse=True)


def _qkv_from_hf_order(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    _reorder_qkv(module, state_dict, prefix, inverse=False)


class FusedVisionMlp(nn.Module):
    def __init__(self, orig: nn.Module, act: str, mode: str) -> None:
        super().__init__()
        self.fc1 = orig.fc1
        self.fc2 = orig.fc2
        self.act = act
        self.mode = mode

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        f = _linear_bias_act(y, self.fc1, self.act, self.mode)  # [S, 4C]
        return F.linear(f, self.fc2.weight, self.fc2.bias)


class FusedVisionBlock(nn.Module):
    """Qwen2-VL vision block on our kernels; same submodule names as ``Qwen2VLVisionBlock``."""

    def __init__(self, orig: nn.Module, act: str, attention: str, mlp: str, rope_gemm: bool = False) -> None:
        super().__init__()
        from .layer_norm import TritonLayerNorm

        self.norm1 = TritonLayerNorm.from_torch(orig.norm1)
        self.norm2 = TritonLayerNorm.from_torch(orig.norm2)
        self.attn = FusedVisionAttention(orig.attn, attention, rope_gemm=rope_gemm, gemm=mlp)
        self.mlp = FusedVisionMlp(orig.mlp, act, mlp)

    def fused(
        self, h: torch.Tensor, y: torch.Tensor, meta: VisionMeta, next_norm: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, norm1(h)) -> (h', next_norm(h')), updating the stream h [S, C] in place."""
        from .layer_norm import add_layer_norm

        a = self.attn(y, meta)
        h, y = add_layer_norm(a, h, self.norm2.weight, self.norm2.bias, self.norm2.eps, out_sum=h, out=a)
        m = self.mlp(y)
        return add_layer_norm(m, h, next_norm.weight, next_norm.bias, next_norm.eps, out_sum=h, out=m)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        max_seqlen: int | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """HF's block signature (used only if something drives the blocks with HF's own loop)."""
        from .layer_norm import add_layer_norm

        if position_embeddings is None:
            raise ValueError("FusedVisionBlock needs position_embeddings=(cos, sin)")
        from .rope_vision import rope_tables

        cos, sin = rope_tables(*position_embeddings, self.attn.head_dim)
        cu = cu_seqlens.to(torch.int32)
        lengths = (cu[1:] - cu[:-1]).tolist()
        meta = VisionMeta(grid=(), lengths=lengths, cu_seqlens=cu, max_seqlen=max(lengths), cos=cos, sin=sin)
        h = hidden_states
        a = self.attn(self.norm1(h), meta)
        h, y = add_layer_norm(a, h, self.norm2.weight, self.norm2.bias, self.norm2.eps)
        return h + self.mlp(y)


class FusedPatchMerger(nn.Module):
    """``ln_q`` (fused upstream with the last residual add) -> GEMM -> bias + exact GELU -> GEMM."""

    def __init__(self, orig: nn.Module, mlp: str) -> None:
        super().__init__()
        from .layer_norm import TritonLayerNorm

        gelu = orig.mlp[1]
        if not isinstance(gelu, nn.GELU) or gelu.approximate != "none":
            raise ValueError(f"merger activation must be exact nn.GELU, got {gelu!r}")
        self.hidden_size = orig.hidden_size
        self.ln_q = TritonLayerNorm.from_torch(orig.ln_q)
        self.mlp = orig.mlp  # Sequential(Linear, GELU, Linear): keeps keys mlp.0.*, mlp.2.*
        self.mode = mlp

    def project(self, y: torch.Tensor) -> torch.Tensor:
        """y = ln_q(h) [S, C] -> [S / m^2, out_dim]."""
        f = _linear_bias_act(y.reshape(-1, self.hidden_size), self.mlp[0], "gelu", self.mode)
        fc2 = self.mlp[2]
        return F.linear(f, fc2.weight, fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.ln_q(x))


def _fused_tower_forward(self: nn.Module, hidden_states: torch.Tensor, grid_thw: torch.Tensor | list,
                         **kwargs: Any) -> Any:
    """Replacement for ``Qwen2VisionTransformerPretrainedModel.forward``; same inputs and output
    type (``last_hidden_state`` [S, C] before the merger, ``pooler_output`` [S/4, hidden_size])."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    meta = self.splitvl_meta(grid_thw)
    blocks = self.blocks
    h = self.patch_embed(hidden_states)  # [S, C], ours: updated in place below
    y = blocks[0].norm1(h)
    for i, blk in enumerate(blocks):
        nxt = blocks[i + 1].norm1 if i + 1 < len(blocks) else self.merger.ln_q
        h, y = blk.fused(h, y, meta, nxt)
    merged = self.merger.project(y)
    return BaseModelOutputWithPooling(last_hidden_state=h, pooler_output=merged)


def _splitvl_meta(self: nn.Module, grid_thw: torch.Tensor | list) -> VisionMeta:
    """cu_seqlens / max length / rotary tables for this grid; LRU-cached (bounded) per grid."""
    key = _grid_key(grid_thw)
    cache: collections.OrderedDict = self._splitvl_meta_cache
    meta = cache.get(key)
    if meta is not None:
        cache.move_to_end(key)
        return meta
    rot = self.rotary_pos_emb
    meta = build_meta(key, self.spatial_merge_size, rot.inv_freq, float(getattr(rot, "attention_scaling", 1.0)))
    cache[key] = meta
    while len(cache) > _META_CACHE_SIZE:
        cache.popitem(last=False)
    return meta


_SUBCLASSES: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(
            f"Splitvl{cls.__name__}", (cls,),
            {"forward": _fused_tower_forward, "splitvl_meta": _splitvl_meta, "_splitvl_patched": True},
        )
    return _SUBCLASSES[cls]


def _patch_qwen2_vl(tower: nn.Module, prefix: str, attention: str, mlp: str, rope_gemm: bool) -> dict[str, str]:
    cfg = tower.config
    act = cfg.hidden_act
    from .activations import act_code

    act_code(act)  # raises for an activation we have no kernel for
    done: dict[str, str] = {}
    p = f"{prefix}." if prefix else ""
    done[f"{p}patch_embed"] = f"{type(tower.patch_embed).__name__} -> LinearPatchEmbed"
    tower.patch_embed = LinearPatchEmbed(tower.patch_embed)
    for i, blk in enumerate(tower.blocks):
        done[f"{p}blocks.{i}"] = (
            f"{type(blk).__name__} -> FusedVisionBlock(attention={attention}, mlp={mlp}, act={act}, "
            f"rope_gemm={rope_gemm})"
        )
        tower.blocks[i] = FusedVisionBlock(blk, act, attention, mlp, rope_gemm)
    done[f"{p}merger"] = f"{type(tower.merger).__name__} -> FusedPatchMerger"
    tower.merger = FusedPatchMerger(tower.merger, mlp)
    tower._splitvl_meta_cache = collections.OrderedDict()
    old = type(tower).__name__
    tower.__class__ = _fused_class(type(tower))
    done[prefix or "<model>"] = f"{old}.forward -> fused forward (cached cu_seqlens + rotary, fused residual+LN)"
    return done


def _patch_qwen2_5_vl(tower: nn.Module, prefix: str) -> dict[str, str]:
    from .rms_norm import TritonRMSNorm
    from .swiglu import TritonSwiGLUMLP

    done: dict[str, str] = {}
    p = f"{prefix}." if prefix else ""
    for i, blk in enumerate(tower.blocks):
        for name in ("norm1", "norm2"):
            done[f"{p}blocks.{i}.{name}"] = f"{type(getattr(blk, name)).__name__} -> TritonRMSNorm"
            setattr(blk, name, TritonRMSNorm.from_module(getattr(blk, name)))
        done[f"{p}blocks.{i}.mlp"] = f"{type(blk.mlp).__name__} -> TritonSwiGLUMLP"
        blk.mlp = TritonSwiGLUMLP.from_module(blk.mlp)
    done[f"{p}merger.ln_q"] = f"{type(tower.merger.ln_q).__name__} -> TritonRMSNorm"
    tower.merger.ln_q = TritonRMSNorm.from_module(tower.merger.ln_q)
    return done


def _find_tower(model: nn.Module) -> tuple[str, nn.Module, str]:
    names = {
        "Qwen2VisionTransformerPretrainedModel": "qwen2_vl",
        "Qwen2_5_VisionTransformerPretrainedModel": "qwen2_5_vl",
    }
    for name, mod in model.named_modules():
        for cls in type(mod).__mro__:
            if cls.__name__ in names:
                return name, mod, names[cls.__name__]
    raise TypeError(
        f"no Qwen2-VL / Qwen2.5-VL vision tower inside {type(model).__name__}; "
        "pass the tower or a model that has one at .visual"
    )


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
    prefix, tower, kind = _find_tower(model)
    if getattr(tower, "_splitvl_patched", False) or getattr(tower, "_splitvl_patched_25", False):
        return {}
    if kind == "qwen2_vl":
        return _patch_qwen2_vl(tower, prefix, attention, mlp, rope_gemm)
    done = _patch_qwen2_5_vl(tower, prefix)
    tower._splitvl_patched_25 = True
    return done


def is_patched(model: nn.Module) -> bool:
    try:
        _, tower, _ = _find_tower(model)
    except TypeError:
        return False
    return bool(getattr(tower, "_splitvl_patched", False) or getattr(tower, "_splitvl_patched_25", False))
