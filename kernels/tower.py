"""What every patched Qwen-VL tower shares: per-grid metadata, the patch embedding as a GEMM, the
fused attention (qkv GEMM -> rotary -> packed attention -> proj GEMM), bias + activation GEMMs, the
block (attention and MLP, each followed by its residual add fused with the next norm), and the
per-grid metadata cache the fused forwards read.

A family's module (``qwen2_vl.py``, ``qwen2_5_vl.py``, ...) gives the block its norm and MLP and
says only how its tower differs; the merger (norm -> GEMM -> GELU -> GEMM) is shared too, with the
family's norm.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Below this many rows our GEMM loses to cuBLAS (H100: 1024 rows, 128x256 tiles fill 80 of 132 SMs)
TRITON_GEMM_MIN_ROWS = 4096

META_CACHE_SIZE = 32


@dataclasses.dataclass
class VisionMeta:
    """Per-grid data every block needs; built once per forward (and cached per grid)."""

    grid: tuple[tuple[int, int, int], ...]
    lengths: list[int]  # tokens per attention segment (one per frame)
    cu_seqlens: torch.Tensor  # [n + 1] int32, device
    max_seqlen: int
    cos: torch.Tensor  # [S, D/2] fp32, device
    sin: torch.Tensor
    # what backend "auto" means on these segments: chosen once per grid, not in every block's call
    auto: str = dataclasses.field(default="auto", kw_only=True)


def grid_key(grid_thw: torch.Tensor | list) -> tuple[tuple[int, int, int], ...]:
    rows = grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else grid_thw
    return tuple((int(t), int(h), int(w)) for t, h, w in rows)


def segments(lengths: list[int], device: torch.device) -> tuple[torch.Tensor, int]:
    """cu_seqlens [n + 1] int32 on ``device`` (queued without a sync) and the longest segment."""
    from ._utils import to_device_async

    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
    return to_device_async(cu, device), max(lengths) if lengths else 0


def build_meta(
    grid: tuple[tuple[int, int, int], ...], spatial_merge_size: int, rotary: nn.Module,
    order: torch.Tensor | None = None,
) -> VisionMeta:
    """Per-frame segments and rotary tables from the tower's ``rotary_pos_emb`` (its ``inv_freq``,
    and its ``attention_scaling`` where it has one); ``order`` [S] (host) puts the tables' rows in the
    tower's token order when it is not the image's (Qwen2.5-VL's window order)."""
    from .attention import auto_backend
    from .rope_vision import rope_angles, rope_positions

    inv_freq = rotary.inv_freq
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    lengths = [h * w for t, h, w in grid for _ in range(t)]
    positions = rope_positions(grid, spatial_merge_size)  # [S, 2]
    if order is not None:
        positions = positions[order]
    cos, sin = rope_angles(positions, inv_freq)
    if scaling != 1.0:  # in place: keeps the tables' padded rows (see rope_vision.padded_table)
        cos.mul_(scaling)
        sin.mul_(scaling)
    cu, longest = segments(lengths, inv_freq.device)
    return VisionMeta(grid=grid, lengths=lengths, cu_seqlens=cu, max_seqlen=longest, cos=cos, sin=sin,
                      auto=auto_backend(lengths))


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


def use_triton_gemm(mode: str, x: torch.Tensor) -> bool:
    if mode == "triton":
        return True
    if mode != "auto" or x.shape[0] < TRITON_GEMM_MIN_ROWS:
        return False
    from .gemm import hopper

    return hopper(x)


def linear_bias_act(x: torch.Tensor, linear: nn.Linear, act: str, mode: str) -> torch.Tensor:
    """``act(linear(x))``: bias and activation in our GEMM's epilogue (see ``use_triton_gemm``), else
    cuBLAS without the bias and one in-place bias + activation pass."""
    from .activations import bias_act
    from .gemm import linear_act

    if use_triton_gemm(mode, x):
        return linear_act(x, linear.weight, linear.bias, act)
    f = F.linear(x, linear.weight)
    return bias_act(f, linear.bias, act, out=f)


def fc_act_fc(y: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear, act: str, mode: str,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """``fc2(act(fc1(y)))``, the vision MLPs and mergers: fc1's bias and the activation in one pass
    (``linear_bias_act``); ``out`` receives fc2's output (the same GEMM + bias as ``F.linear``)."""
    f = linear_bias_act(y, fc1, act, mode)
    if out is None:
        return F.linear(f, fc2.weight, fc2.bias)
    if fc2.bias is None:
        return torch.mm(f, fc2.weight.t(), out=out)
    return torch.addmm(fc2.bias, f, fc2.weight.t(), out=out)


def require_exact_gelu(act: nn.Module) -> None:
    """The mergers' activation: our GELU kernels compute the exact (erf) one."""
    if not isinstance(act, nn.GELU) or act.approximate != "none":
        raise ValueError(f"merger activation must be exact nn.GELU, got {act!r}")


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
        if self.rope_gemm and use_triton_gemm(self.gemm, y):
            rope = (meta.cos, meta.sin, 2 * hd, self.head_dim)
            qkv = linear_act(y, self.qkv.weight, self.qkv.bias, rope=rope)  # [S, 3C], q/k rotated
            pre = True
        else:
            qkv = F.linear(y, self.qkv.weight, self.qkv.bias)  # [S, 3C]
            pre = False
        backend = meta.auto if self.backend == "auto" else self.backend
        a = attention(qkv, meta.cu_seqlens, meta.max_seqlen, self.num_heads, meta.cos, meta.sin,
                      backend=backend, lengths=meta.lengths, prerotated=pre,
                      interleaved=self.rope_gemm)  # [S, C]
        return F.linear(a, self.proj.weight, self.proj.bias)


class FusedVisionBlock(nn.Module):
    """One vision block of any family on our kernels; the same submodule names as HF's blocks.

    ``norm`` makes the family's norm module (``TritonLayerNorm.from_torch``, ``TritonRMSNorm.from_module``)
    from ``orig.norm1`` / ``orig.norm2``, adopting their parameters; its ``add`` is the residual add
    fused with the norm. ``mlp``: the family's fused MLP, built from ``orig.mlp``.
    """

    def __init__(self, orig: nn.Module, norm: Callable[[nn.Module], nn.Module], mlp: nn.Module, attention: str,
                 gemm: str, rope_gemm: bool = False) -> None:
        super().__init__()
        self.norm1 = norm(orig.norm1)
        self.norm2 = norm(orig.norm2)
        self.attn = FusedVisionAttention(orig.attn, attention, rope_gemm=rope_gemm, gemm=gemm)
        self.mlp = mlp

    def fused(
        self, h: torch.Tensor, y: torch.Tensor, meta: VisionMeta, next_norm: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, norm1(h)) -> (h', next_norm(h')), updating the stream h [S, C] in place."""
        a = self.attn(y, meta)
        h, y = self.norm2.add(a, h, out_sum=h, out=a)
        m = self.mlp(y)
        return next_norm.add(m, h, out_sum=h, out=m)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        max_seqlen: int | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """HF's block signature (every family's), for a caller that drives the blocks with HF's own loop."""
        from .rope_vision import rope_tables

        if position_embeddings is None:
            raise ValueError("FusedVisionBlock needs position_embeddings=(cos, sin)")
        cos, sin = rope_tables(*position_embeddings, self.attn.head_dim)
        cu = cu_seqlens.to(torch.int32)
        lengths = (cu[1:] - cu[:-1]).tolist()
        meta = VisionMeta(grid=(), lengths=lengths, cu_seqlens=cu, max_seqlen=max(lengths), cos=cos, sin=sin)
        h = hidden_states
        h, y = self.norm2.add(self.attn(self.norm1(h), meta), h)
        return h + self.mlp(y)


def hidden_act(tower: nn.Module) -> str:
    """The blocks' MLP activation (``config.hidden_act``), refused here if we have no kernel for it."""
    from .activations import act_code

    act = tower.config.hidden_act
    act_code(act)
    return act


def patch_embed_and_blocks(tower: nn.Module, p: str, make_block: Callable[[nn.Module], FusedVisionBlock],
                           describe: Callable[[int], str]) -> dict[str, str]:
    """Swap the patch embedding and every block (``make_block(HF's block)``) in place; ``p``: the
    tower's qualified name plus a dot, or empty. Returns the ``patch`` report entries, each block's
    with ``describe(index)``."""
    done = {f"{p}patch_embed": f"{type(tower.patch_embed).__name__} -> LinearPatchEmbed"}
    tower.patch_embed = LinearPatchEmbed(tower.patch_embed)
    for i, blk in enumerate(tower.blocks):
        done[f"{p}blocks.{i}"] = f"{type(blk).__name__} -> FusedVisionBlock({describe(i)})"
        tower.blocks[i] = make_block(blk)
    return done


class FusedPatchMerger(nn.Module):
    """``ln_q`` (fused upstream with the last residual add) -> GEMM -> bias + exact GELU -> GEMM.

    ``ln_q``: the family's norm module adopting ``orig.ln_q``'s parameters (LayerNorm, RMSNorm)."""

    def __init__(self, orig: nn.Module, mlp: str, ln_q: nn.Module) -> None:
        super().__init__()
        require_exact_gelu(orig.mlp[1])
        self.hidden_size = orig.hidden_size
        self.ln_q = ln_q
        self.mlp = orig.mlp  # Sequential(Linear, GELU, Linear): keeps keys mlp.0.*, mlp.2.*
        self.mode = mlp

    def project(self, y: torch.Tensor) -> torch.Tensor:
        """y = ln_q(h) [S, C] -> [S / m^2, out_dim]."""
        return fc_act_fc(y.reshape(-1, self.hidden_size), self.mlp[0], self.mlp[2], "gelu", self.mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.ln_q(x))


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


def cached_meta(tower: nn.Module, grid_thw: torch.Tensor | list, build: Callable[[tuple], Any]) -> Any:
    """``build(grid)`` for this grid, LRU-cached (bounded) on the tower: the per-grid metadata
    (cu_seqlens, rotary tables, window order, ...) is built once per image size."""
    key = grid_key(grid_thw)
    cache: collections.OrderedDict = tower.__dict__.setdefault("_splitvl_meta_cache", collections.OrderedDict())
    meta = cache.get(key)
    if meta is not None:
        cache.move_to_end(key)
        return meta
    meta = cache[key] = build(key)
    while len(cache) > META_CACHE_SIZE:
        cache.popitem(last=False)
    return meta


_SUBCLASSES: dict[tuple[type, Callable], type] = {}


def fuse_class(tower: nn.Module, forward: Callable, meta: Callable) -> str:
    """Give ``tower`` a subclass of its own class whose ``forward`` is ``forward`` and whose
    ``splitvl_meta(grid_thw)`` is ``meta``; returns the old class name. Subclassing (rather than
    setting attributes) keeps ``isinstance`` checks and HF's class-level hooks working."""
    cls = type(tower)
    key = (cls, forward)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"Splitvl{cls.__name__}", (cls,),
                                {"forward": forward, "splitvl_meta": meta, "_splitvl_patched": True})
    tower.__class__ = _SUBCLASSES[key]
    return cls.__name__
