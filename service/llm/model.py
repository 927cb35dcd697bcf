"""The Qwen-VL families' language model (Qwen2, Qwen3), written for serving: fused GEMMs, a static
KV cache, two pure steps.

The variants differ only in what ``TextConfig`` says: q/k/v biases (Qwen2) or per-head RMSNorm on
q and k before the rotary (Qwen3), an explicit head size, the M-RoPE layout (contiguous t/h/w
sections, or interleaved), and DeepStack: image features added to the hidden states at the
image's positions after the first ``deepstack_layers`` layers (Qwen3-VL), which only a prefill
that holds the image does.

The module holds weights only. The work is done by two functions that issue 5 may compile or
capture in CUDA graphs:

- ``prefill(model, kv, embeds, positions, slots, start)`` runs ``T`` new tokens of ``B`` slots
  (all starting at cache position ``start``) and writes their keys and values into the cache;
- ``decode_step(model, kv, tokens, positions, cache_pos)`` runs one token for each of ``B`` slots
  with fixed-shape tensors only (no Python value depends on the data), and returns logits.

``prefill_at`` is ``prefill`` with the layout as tensors (each token's cache position) and a fixed
attention window, so that a padded prefill can be replayed from a CUDA graph; ``prefill_fused`` /
``prefill_fused_at`` and ``decode_step_fused`` are the Triton-fused GPU versions.

The KV cache is one preallocated tensor ``[layers, 2, slots, kv_heads, max_len, head_dim]``
(2 = keys, values). ``decode_step`` takes a view of its first ``B`` slots (and, optionally, of
its first ``L`` positions): batch row ``b`` is slot ``b``.

Numerics follow HF's ``*ForConditionalGeneration``: RMSNorm in fp32, M-RoPE cos/sin computed in
fp32 and cast to the activation dtype, SDPA attention with grouped KV heads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from service.checkpoint import Checkpoint, CheckpointError, is_language, open_checkpoint, text_fields

# -- config ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]
    max_position_embeddings: int
    tie_word_embeddings: bool
    head_dim: int
    qkv_bias: bool = True  # Qwen2; Qwen3 has none
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before the rotary
    mrope_interleaved: bool = False  # Qwen3-VL: t/h/w frequencies interleaved, not in contiguous sections
    deepstack_layers: int = 0  # Qwen3-VL: image features added after layers 0 .. L-1

    @classmethod
    def from_dict(cls, config: dict, *, qkv_bias: bool = True, qk_norm: bool = False,
                  mrope_interleaved: bool = False, deepstack_layers: int = 0,
                  default_mrope_section: tuple[int, ...] = (16, 24, 24)) -> TextConfig:
        """From ``config.json``: transformers 5's nested ``text_config`` or the hub's older flat layout.
        The keyword arguments are the family's facts (``service.models``)."""
        text = text_fields(config)

        def need(key: str) -> int:
            if key not in text:
                raise CheckpointError(f"config.json lacks the language model's {key}")
            return int(text[key])

        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise CheckpointError(f"rope type {rope_type!r} is not supported (only the Qwen-VL families' M-RoPE)")
        act = text.get("hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(f"hidden_act {act!r} is not supported (Qwen2 and Qwen3 use silu)")
        heads = need("num_attention_heads")
        cfg = cls(
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=int(text.get("num_key_value_heads") or heads),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 1_000_000.0))),
            mrope_section=tuple(int(s) for s in rope.get("mrope_section", default_mrope_section)),
            max_position_embeddings=int(text.get("max_position_embeddings", 32768)),
            # HF ties when either level says so (pre-v5 saves put it in text_config)
            tie_word_embeddings=bool(config.get("tie_word_embeddings") or
                                     (config.get("text_config") or {}).get("tie_word_embeddings")),
            head_dim=int(text.get("head_dim") or need("hidden_size") // heads),
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            mrope_interleaved=mrope_interleaved,
            deepstack_layers=deepstack_layers,
        )
        if cfg.num_heads % cfg.num_kv_heads or ("head_dim" not in text and cfg.hidden_size % cfg.num_heads):
            raise CheckpointError("hidden_size, num_attention_heads and num_key_value_heads do not divide")
        if sum(cfg.mrope_section) * 2 != cfg.head_dim or len(cfg.mrope_section) != 3:
            raise CheckpointError(f"mrope_section {list(cfg.mrope_section)} does not cover head_dim {cfg.head_dim}")
        return cfg


def _rope_buffers(cfg: TextConfig, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Which t/h/w position row drives each rotary frequency, and the frequencies: both [head_dim / 2].

    Contiguous sections: t for the first ``mrope_section[0]`` frequencies, then h, then w.
    Interleaved (Qwen3-VL): t, h, w, t, h, w, ... while h and w last (``3 * section``), then t."""
    d = cfg.head_dim
    if cfg.mrope_interleaved:
        rows = torch.zeros(d // 2, dtype=torch.long)
        for row, count in ((1, cfg.mrope_section[1]), (2, cfg.mrope_section[2])):
            rows[row : 3 * count : 3] = row
    else:
        rows = torch.cat([torch.full((n,), i % 3, dtype=torch.long) for i, n in enumerate(cfg.mrope_section)])
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))  # on the CPU, as HF
    return (rows, inv_freq) if device is None else (rows.to(device), inv_freq.to(device))


# -- modules (weights) ----------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Block(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.qkv_proj = nn.Linear(cfg.hidden_size, qkv, bias=cfg.qkv_bias)  # q, k, v stacked on dim 0
        if cfg.qk_norm:  # per head, over head_dim
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)  # gate, up
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)


class Qwen2LM(nn.Module):
    """Weights of the language model (Qwen2 or, per ``TextConfig``, Qwen3); ``lm_head`` absent when
    tied (the embedding is used)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        rows, inv_freq = _rope_buffers(cfg, None)
        self.register_buffer("rope_rows", rows, persistent=False)  # [head_dim / 2] long
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [head_dim / 2] fp32

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """[...] token ids -> [..., hidden]"""
        return self.embed_tokens(ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., hidden] (after the final norm) -> [..., vocab] fp32"""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()


# -- the two steps --------------------------------------------------------------------------------


def allocate_kv_cache(cfg: TextConfig, slots: int, max_len: int, *, device: torch.device | str,
                      dtype: torch.dtype) -> torch.Tensor:
    """[layers, 2, slots, kv_heads, max_len, head_dim], zeros."""
    shape = (cfg.num_layers, 2, slots, cfg.num_kv_heads, max_len, cfg.head_dim)
    return torch.zeros(shape, device=device, dtype=dtype)


def rope(model: Qwen2LM, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE: positions [3, B, T] (t, h, w rows) -> cos, sin [B, T, head_dim] in ``dtype``."""
    pos = positions.float()[model.rope_rows]  # [head_dim/2, B, T]: each frequency's own row
    freqs = pos.permute(1, 2, 0) * model.inv_freq  # [B, T, head_dim/2] fp32
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D]; cos, sin [B, 1, T, D]"""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _qkv(model: Qwen2LM, block: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, T, hidden] -> q [B, H, T, D], k, v [B, Hkv, T, D] (q and k rotated)"""
    cfg = model.cfg
    b, t, _ = x.shape
    qkv = block.qkv_proj(block.input_layernorm(x))
    q, k, v = qkv.split([cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
                         cfg.num_kv_heads * cfg.head_dim], dim=-1)
    q, k, v = (x.view(b, t, -1, cfg.head_dim) for x in (q, k, v))  # [B, T, heads, D]
    if cfg.qk_norm:
        q, k = block.q_norm(q), block.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin), v


def _finish_block(block: Block, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """x [B, T, hidden] residual; attn [B, H, T, D] -> [B, T, hidden]"""
    b, _, t, _ = attn.shape
    x = x + block.o_proj(attn.transpose(1, 2).reshape(b, t, -1))
    gate, up = block.gate_up_proj(block.post_attention_layernorm(x)).chunk(2, dim=-1)
    return x + block.down_proj(F.silu(gate) * up)


def _prefill_layout(kv: torch.Tensor, start: int | Sequence[int], b: int, t: int, device: torch.device
                    ) -> tuple[int, torch.Tensor]:
    """Where ``B`` rows of ``T`` tokens go: (end, cache positions [B, T]).

    Row ``b``'s token ``j`` sits at cache position ``starts[b] + j`` (``prefill_at`` clamps it to
    the cache: padding past a row's real tokens may run over) and attends to ``[0, starts[b] + j]``.
    """
    starts = [start] * b if isinstance(start, int) else [int(s) for s in start]
    end = min(max(starts) + t, kv.shape[4])
    at = torch.tensor(starts, device=device)[:, None] + torch.arange(t, device=device)[None, :]  # [B, T]
    return end, at


def _prefill_mask(at: torch.Tensor, window: int) -> torch.Tensor:
    """at [B, T] cache positions -> mask [B, 1, T, window]: token (b, j) sees ``[0, at[b, j]]``."""
    return (torch.arange(window, device=at.device)[None, None, :] <= at[:, :, None])[:, None]


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, attention: str
            ) -> torch.Tensor:
    """q [B, H, T, D]; keys, values [B, Hkv, L, D]; mask [B, 1, T, L] bool -> [B, H, T, D].

    ``sdpa``: PyTorch's fused attention with grouped KV heads; ``matmul``: the same as two batched
    matmuls around an fp32 softmax, each KV head serving its group of query heads without a copy.
    """
    if attention == "sdpa":
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
    if attention != "matmul":
        raise ValueError(f"unknown attention {attention!r}")
    b, h, t, d = q.shape
    hkv, length = keys.shape[1], keys.shape[2]
    g = h // hkv
    scores = torch.matmul(q.reshape(b, hkv, g * t, d), keys.transpose(-1, -2)).float() * d**-0.5
    scores = scores.view(b, hkv, g, t, length).masked_fill(~mask[:, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype).view(b, hkv, g * t, length)
    return torch.matmul(probs, values).view(b, h, t, d)


def prefill(model: Qwen2LM, kv: torch.Tensor, embeds: torch.Tensor, positions: torch.Tensor,
            slots: torch.Tensor, start: int | Sequence[int], deepstack: torch.Tensor | None = None) -> torch.Tensor:
    """Run ``T`` new tokens per slot; row ``b``'s tokens go to cache positions ``start[b] ..``.

    kv [layers, 2, S, Hkv, max_len, D] (written in place); embeds [B, T, hidden];
    positions [3, B, T] M-RoPE ids; slots [B] long (which cache slot each row uses); ``start`` one
    int for every row or one per row. Each token attends to the slot's cache ``[0, start + own
    index]``. Rows shorter than ``T`` are padded at the end: the padding's keys and values land
    past the row's real tokens, where nothing attends before decoding overwrites them.
    deepstack [L, B, T, hidden] or None: added to the hidden states after layers 0 .. L-1 (zero
    except at image positions). Returns the final-normed hidden states [B, T, hidden].
    """
    b, t, _ = embeds.shape
    end, at = _prefill_layout(kv, start, b, t, embeds.device)
    return prefill_at(model, kv, embeds, positions, slots, at, end, deepstack=deepstack)


def prefill_at(model: Qwen2LM, kv: torch.Tensor, embeds: torch.Tensor, positions: torch.Tensor,
               slots: torch.Tensor, at: torch.Tensor, window: int, *, causal: bool = False,
               deepstack: torch.Tensor | None = None) -> torch.Tensor:
    """``prefill`` with the layout given as tensors: fixed shapes, no host syncs (CUDA-graph safe).

    at [B, T] long: the cache position of each token (its key and value go there, clamped to the
    cache's last position; it attends to ``[0, at]`` of its slot); ``window``: how many cache
    positions attention reads (at least every real token's ``at + 1``). ``causal`` is a hint for
    the fused path (every real row starts at 0 and ``window == T``); here the mask serves.
    ``deepstack``: as in ``prefill``.
    """
    b, t, _ = embeds.shape
    mask = _prefill_mask(at, window)
    slot_rows, at_rows = slots[:, None].expand(b, t).reshape(-1), at.clamp(max=kv.shape[4] - 1).reshape(-1)
    cos, sin = rope(model, positions, embeds.dtype)
    x = embeds
    for i, block in enumerate(model.layers):
        q, k, v = _qkv(model, block, x, cos, sin)
        kv[i, 0, slot_rows, :, at_rows] = k.transpose(1, 2).reshape(b * t, k.shape[1], k.shape[3])
        kv[i, 1, slot_rows, :, at_rows] = v.transpose(1, 2).reshape(b * t, v.shape[1], v.shape[3])
        keys = kv[i, 0, slots, :, :window]  # [B, Hkv, window, D]
        values = kv[i, 1, slots, :, :window]
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        x = _finish_block(block, x, attn)
        if deepstack is not None and i < len(deepstack):
            x = x + deepstack[i]  # zero away from the image: x + 0 leaves those rows exactly as they were
    return model.norm(x)


def decode_step(model: Qwen2LM, kv: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                cache_pos: torch.Tensor, *, attention: str = "sdpa") -> torch.Tensor:
    """One token for each of ``B`` slots; fixed shapes, no host syncs.

    kv [layers, 2, B, Hkv, L, D]: a view of the cache's first B slots (and first L positions),
    written in place; tokens [B] long; positions [3, B] M-RoPE ids of the new tokens;
    cache_pos [B] long, where each new token's key/value goes (it attends to ``[0, cache_pos]``).
    ``attention`` is ``sdpa`` or ``matmul`` (see ``_attend``). Returns logits [B, vocab] fp32.
    """
    b = tokens.shape[0]
    length = kv.shape[4]
    x = model.embed(tokens)[:, None, :]  # [B, 1, hidden]
    cos, sin = rope(model, positions[:, :, None], x.dtype)
    batch = torch.arange(b, device=tokens.device)
    mask = (torch.arange(length, device=tokens.device)[None, :] <= cache_pos[:, None])[:, None, None, :]  # [B,1,1,L]
    for i, block in enumerate(model.layers):
        q, k, v = _qkv(model, block, x, cos, sin)
        kv[i, 0, batch, :, cache_pos] = k[:, :, 0]  # [B, Hkv, D]
        kv[i, 1, batch, :, cache_pos] = v[:, :, 0]
        attn = _attend(q, kv[i, 0], kv[i, 1], mask, attention)
        x = _finish_block(block, x, attn)
    return model.logits(model.norm(x[:, 0]))


# -- the fused GPU path (Triton; bf16 / fp16 on CUDA) ---------------------------------------------


def fused_supported(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether ``prefill_fused`` / ``decode_step_fused`` can run: CUDA, half precision, Triton."""
    if torch.device(device).type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# Few rows (a decode step): the o projection too as fp32 partial sums along K that the post-attention
# residual-add + RMSNorm kernel adds up, as the down projection always is there, instead of cuBLAS.
# Measured the same as cuBLAS on the H200 (Qwen3-VL-2B, bench/RESULTS.md): off. A module setting so that a
# profile can flip it before the graphs are recorded (bench/llm_decode_profile.py --o-parts).
SPLIT_O_PROJ = False


def _norm_weights(model: Qwen2LM) -> list[torch.Tensor]:
    """The RMSNorm weight applied after each residual add: post-attention, then the next input norm."""
    layers = model.layers
    return [w for i, block in enumerate(layers) for w in (
        block.post_attention_layernorm.weight,
        layers[i + 1].input_layernorm.weight if i + 1 < len(layers) else model.norm.weight)]


def _qk_norm(model: Qwen2LM, i: int) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """Layer ``i``'s q and k RMSNorm weights and eps for the kernels that rotate q and k (Qwen3), or None."""
    if not model.cfg.qk_norm:
        return None
    block = model.layers[i]
    return block.q_norm.weight, block.k_norm.weight, model.cfg.rms_norm_eps


def _fused_layers(model: Qwen2LM, h: torch.Tensor, attend: Callable[[int, torch.Tensor], torch.Tensor],
                  deepstack: torch.Tensor | None = None) -> torch.Tensor:
    """h [N, hidden] token rows -> final-normed [N, hidden]; ``attend(layer, qkv [N, (H + 2 Hkv) * D])
    -> [N, H * D]`` (q/k-norms,) rotates, writes the layer's keys and values into the cache, and attends.

    deepstack [L, N, hidden] or None: added to the residual stream after layers 0 .. L-1, by the
    residual-add + RMSNorm kernel that ends the layer (zero rows stay exactly as they were)."""
    from service.llm import gpu_ops as ops

    eps = model.cfg.rms_norm_eps
    norms = _norm_weights(model)
    few = h.shape[0] <= ops.FEW_ROWS  # a decode step (or a small prefill): the MLP on our few-row kernels
    _, x = ops.rms_norm(h, model.layers[0].input_layernorm.weight, eps)
    for i, block in enumerate(model.layers):
        qkv = F.linear(x, block.qkv_proj.weight, block.qkv_proj.bias)  # bias None for Qwen3
        attn = attend(i, qkv)  # [N, H * D]
        if few and SPLIT_O_PROJ:
            h, x = ops.rms_norm_of_parts(ops.linear_parts(attn, block.o_proj.weight), norms[2 * i], eps, residual=h)
        else:
            h, x = ops.rms_norm(F.linear(attn, block.o_proj.weight), norms[2 * i], eps, residual=h)
        add = deepstack[i] if deepstack is not None and i < len(deepstack) else None
        if few:  # the MLP's weights read by our kernels: SwiGLU in the first, the residual norm after the second
            parts = ops.linear_parts(ops.gate_up_silu(x, block.gate_up_proj.weight), block.down_proj.weight)
            h, x = ops.rms_norm_of_parts(parts, norms[2 * i + 1], eps, residual=h, add=add)
        else:
            mlp = F.linear(ops.silu_mul(F.linear(x, block.gate_up_proj.weight)), block.down_proj.weight)
            h, x = ops.rms_norm(mlp, norms[2 * i + 1], eps, residual=h, add=add)
    return x


def _rope_kv_then(model: Qwen2LM, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot_rows: torch.Tensor,
                  at_rows: torch.Tensor, attend: Callable[[int, torch.Tensor], torch.Tensor]
                  ) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """An ``attend(layer, qkv)`` for ``_fused_layers`` made of ``rope_kv`` (cos, sin [N, D]; token n
    goes to cache position ``at_rows[n]`` of slot ``slot_rows[n]``), then ``attend(layer, q [N, H, D])``."""
    from service.llm import gpu_ops as ops

    cfg = model.cfg

    def rope_then_attend(i: int, qkv: torch.Tensor) -> torch.Tensor:
        q = ops.rope_kv(qkv, cos, sin, kv[i, 0], kv[i, 1], slot_rows, at_rows, cfg.num_heads, cfg.num_kv_heads,
                        qk_norm=_qk_norm(model, i))
        return attend(i, q)

    return rope_then_attend


def prefill_fused(model: Qwen2LM, kv: torch.Tensor, embeds: torch.Tensor, positions: torch.Tensor,
                  slots: torch.Tensor, start: int | Sequence[int], deepstack: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """``prefill`` with the fused kernels (same arguments, same result up to rounding order).

    Attention is PyTorch's SDPA over the rows' gathered cache, KV heads repeated per group so that
    the flash (whole prompts: causal, no mask) or memory-efficient (masked) kernels apply.
    """
    b, t, _ = embeds.shape
    end, at = _prefill_layout(kv, start, b, t, embeds.device)
    from_zero = start == 0 if isinstance(start, int) else not any(start)
    causal = from_zero and end == t  # every row a whole prompt from position 0
    return prefill_fused_at(model, kv, embeds, positions, slots, at, end, causal=causal, deepstack=deepstack)


def prefill_fused_at(model: Qwen2LM, kv: torch.Tensor, embeds: torch.Tensor, positions: torch.Tensor,
                     slots: torch.Tensor, at: torch.Tensor, window: int, *, causal: bool = False,
                     deepstack: torch.Tensor | None = None) -> torch.Tensor:
    """``prefill_at`` with the fused kernels: fixed shapes, no host syncs (CUDA-graph safe).

    ``causal``: every real row starts at cache position 0 and ``window == T``, so attention is
    causal over ``[0, T)`` (flash, no mask); rows past the real ones, and padding tokens, get
    whatever the causal rule gives them (their outputs are ignored). ``deepstack`` [L, B, T, hidden]
    as in ``prefill`` (zero away from the image: padding rows and tokens hold zeros).
    """
    cfg = model.cfg
    b, t, hidden = embeds.shape
    h, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if causal and window != t:
        raise ValueError(f"causal prefill needs window == T, got {window} and {t}")
    group = h // hkv
    # masked: the query heads that share a KV head are stacked along the query axis, [B, Hkv, G*T, D],
    # so attention reads each row's gathered window once instead of a copy repeated per query head
    # (that copy was ~30 % of a 32-row question prefill); the mask is tiled to match, once
    mask = None if causal else _prefill_mask(at, window).expand(b, group, t, window).reshape(b, 1, group * t, window)
    cos, sin = rope(model, positions, embeds.dtype)

    def attend(i: int, q: torch.Tensor) -> torch.Tensor:
        keys = kv[i, 0, :, :, :window].index_select(0, slots)  # [B, Hkv, window, D]
        values = kv[i, 1, :, :, :window].index_select(0, slots)
        if not causal:
            q = q.view(b, t, hkv, group, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, group * t, d)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # [B, Hkv, G*T, D]
            return out.view(b, hkv, group, t, d).permute(0, 3, 1, 2, 4).reshape(b * t, -1)
        # causal (prompts from position 0): the stacked queries would break the causal rule, so each
        # KV head is repeated for its group of query heads (repeat_interleave on dim 1, as a copy)
        q = q.view(b, t, h, d).transpose(1, 2)
        keys = keys[:, :, None].expand(b, hkv, group, window, d).reshape(b, h, window, d)
        values = values[:, :, None].expand(b, hkv, group, window, d).reshape(b, h, window, d)
        out = F.scaled_dot_product_attention(q, keys, values, is_causal=True)
        return out.transpose(1, 2).reshape(b * t, -1)

    x = _fused_layers(model, embeds.reshape(b * t, hidden),
                      _rope_kv_then(model, kv, cos.reshape(b * t, -1), sin.reshape(b * t, -1),
                                    slots[:, None].expand(b, t).contiguous().view(-1), at.contiguous().view(-1), attend),
                      None if deepstack is None else deepstack.reshape(len(deepstack), b * t, hidden))
    return x.view(b, t, hidden)


def decode_step_fused(model: Qwen2LM, kv: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                      cache_pos: torch.Tensor, *, attention: str = "triton") -> torch.Tensor:
    """``decode_step`` with the fused kernels: 8 kernels a layer at batch 1 (cuBLAS only for qkv and o).

    ``attention``: ``triton`` (our decode kernel, which also rotates q and k and writes the cache; it
    reads only ``[0, cache_pos]``, so the window ``L`` of ``kv`` may be the whole cache), or
    ``sdpa`` / ``matmul`` over the window ``L`` (after ``rope_kv``).
    """
    from service.llm import gpu_ops as ops

    b = tokens.shape[0]
    length = kv.shape[4]
    h = model.embed(tokens)  # [B, hidden]
    cos, sin = rope(model, positions[:, :, None], h.dtype)
    cos, sin = cos[:, 0], sin[:, 0]  # [B, D]
    if attention == "triton":
        def attend(i: int, qkv: torch.Tensor) -> torch.Tensor:
            return ops.decode_attention(qkv, cos, sin, kv[i, 0], kv[i, 1], cache_pos, model.cfg.num_heads,
                                        qk_norm=_qk_norm(model, i))
    else:
        mask = (torch.arange(length, device=tokens.device)[None, :] <= cache_pos[:, None])[:, None, None, :]

        def attend_q(i: int, q: torch.Tensor) -> torch.Tensor:
            return _attend(q[:, :, None], kv[i, 0], kv[i, 1], mask, attention).view(b, -1)

        attend = _rope_kv_then(model, kv, cos, sin, torch.arange(b, device=tokens.device), cache_pos, attend_q)
    return model.logits(_fused_layers(model, h, attend))


# -- loading --------------------------------------------------------------------------------------


def _hub_shapes(cfg: TextConfig) -> dict[str, tuple[int, ...]]:
    """Every language tensor the checkpoint must hold (hub spelling) and its shape."""
    h, d, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        attn = p + "self_attn."
        rows = {"q": cfg.num_heads * d, "k": cfg.num_kv_heads * d, "v": cfg.num_kv_heads * d}
        shapes |= {attn + f"{n}_proj.weight": (r, h) for n, r in rows.items()}
        if cfg.qkv_bias:
            shapes |= {attn + f"{n}_proj.bias": (r,) for n, r in rows.items()}
        if cfg.qk_norm:
            shapes |= {attn + "q_norm.weight": (d,), attn + "k_norm.weight": (d,)}
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.o_proj.weight": (h, cfg.num_heads * d),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
    return shapes


def fuse_hub_tensors(cfg: TextConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Check the hub-spelled tensors against the config and map them onto ``Qwen2LM``'s state dict.

    Raises ``CheckpointError`` naming the first missing, misshaped or unexpected tensor.
    """
    shapes = _hub_shapes(cfg)
    for key, shape in shapes.items():
        if key not in tensors:
            raise CheckpointError(f"checkpoint lacks tensor {key}")
        if tuple(tensors[key].shape) != shape:
            raise CheckpointError(f"tensor {key} has shape {tuple(tensors[key].shape)}, the config implies {shape}")
    for key in tensors:
        tied_head = key == "lm_head.weight" and cfg.tie_word_embeddings  # ignored, as HF does when tied
        if key not in shapes and not tied_head and not key.endswith("rotary_emb.inv_freq"):
            raise CheckpointError(f"checkpoint tensor {key} does not belong to the language model of config.json")
    state = {
        "embed_tokens.weight": tensors["model.embed_tokens.weight"],
        "norm.weight": tensors["model.norm.weight"],
    }
    if not cfg.tie_word_embeddings:
        state["lm_head.weight"] = tensors["lm_head.weight"]
    for i in range(cfg.num_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        if cfg.qkv_bias:
            state[o + "qkv_proj.bias"] = torch.cat([tensors[attn + f"{n}_proj.bias"] for n in "qkv"])
        if cfg.qk_norm:
            state |= {o + "q_norm.weight": tensors[attn + "q_norm.weight"],
                      o + "k_norm.weight": tensors[attn + "k_norm.weight"]}
        state |= {
            o + "input_layernorm.weight": tensors[p + "input_layernorm.weight"],
            o + "post_attention_layernorm.weight": tensors[p + "post_attention_layernorm.weight"],
            o + "qkv_proj.weight": torch.cat([tensors[attn + f"{n}_proj.weight"] for n in "qkv"]),
            o + "o_proj.weight": tensors[attn + "o_proj.weight"],
            o + "gate_up_proj.weight": torch.cat([tensors[mlp + "gate_proj.weight"], tensors[mlp + "up_proj.weight"]]),
            o + "down_proj.weight": tensors[mlp + "down_proj.weight"],
        }
    return state


def model_from_state(cfg: TextConfig, state: dict[str, torch.Tensor], *, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> Qwen2LM:
    """``Qwen2LM`` built on the meta device, then given ``state`` (its own spelling, as
    ``fuse_hub_tensors`` returns it) on ``device`` in ``dtype``."""
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    with torch.device("meta"):
        lm = Qwen2LM(cfg)
    lm.load_state_dict(state, strict=True, assign=True)
    # the buffers were built on meta: build them again on the device (inv_freq stays fp32, like HF's)
    lm.rope_rows, lm.inv_freq = _rope_buffers(cfg, torch.device(device))
    return lm.eval().requires_grad_(False)


def load_model(model: str | Path | Checkpoint, *, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> Qwen2LM:
    """Build ``Qwen2LM`` from ``config.json`` (read by the checkpoint's family) on the meta device and
    assign the checkpoint's tensors.

    Opens only the shards that hold non-visual tensors: deleting visual-only shards is fine.
    """
    checkpoint = open_checkpoint(model)
    cfg = checkpoint.family.text_config(checkpoint.config)
    tensors = checkpoint.read_tensors(is_language)
    return model_from_state(cfg, fuse_hub_tensors(cfg, tensors), device=device, dtype=dtype)


@torch.no_grad()
def random_model(cfg: TextConfig, *, device: torch.device | str, dtype: torch.dtype, seed: int = 0,
                 std: float = 0.02) -> Qwen2LM:
    """Random weights drawn on the device (benchmarks: speed does not depend on the values):
    matrices ~ N(0, std), norms 1 + N(0, 0.1), biases N(0, 0.05)."""
    with torch.device("meta"):
        lm = Qwen2LM(cfg).to(dtype)
    lm = lm.to_empty(device=device)
    gen = torch.Generator(device).manual_seed(seed)
    for name, p in lm.named_parameters():
        p.normal_(generator=gen)
        if p.ndim == 1 and "norm" in name:
            p.mul_(0.1).add_(1.0)
        else:
            p.mul_(0.05 if p.ndim == 1 else std)
    lm.rope_rows, lm.inv_freq = _rope_buffers(cfg, torch.device(device))
    return lm.eval().requires_grad_(False)
