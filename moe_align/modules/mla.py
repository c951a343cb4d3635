"""Multi-head Latent Attention (DeepSeek-V2/V3) as a drop-in module, and its paged latent cache.

:class:`MLAttention` has the parameters of transformers' ``DeepseekV3Attention`` and
``DeepseekV2Attention``: ``q_proj`` or ``q_a_proj``/``q_a_layernorm``/``q_b_proj``,
``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``, so ``load_state_dict`` is
strict both ways, and computes what they compute. One set of weights serves two paths:

- training / prefill: packed sequences through :func:`~moe_align.ops.mla.mla_varlen_attention`,
  keys and values expanded from the latents by ``kv_b_proj`` (the rope key stays shared);
- decode: the latents and roped keys go into a paged :class:`MLACache`
  (:func:`~moe_align.ops.mla.mla_cache_append`), and the queries are absorbed into the latent
  space so attention runs over the cache directly (:func:`~moe_align.ops.mla.mla_decode`)::

      W_UK, W_UV = kv_b_proj.weight.view(H, D_nope + D_v, D_lat).split([D_nope, D_v], dim=1)
      q_lat_h = q_nope_h W_UK_h,   o_h = attention(q_lat_h, q_rope_h; [c_j, r_j]) W_UV_h^T

transformers is never imported here: configs are duck-typed (:meth:`MLAConfig.from_config`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from moe_align.ops.mla import (
    MLADecodePlan,
    mla_cache_append,
    mla_decode,
    mla_decode_plan,
    mla_varlen_attention,
)

__all__ = ["MLACache", "MLAConfig", "MLADecodeStep", "MLAttention"]

ROPE_TYPES = ("default", "yarn")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclasses.dataclass
class MLAConfig:
    """The fields of an MLA layer, named as in transformers' DeepseekV2/V3Config.

    ``rope_scaling`` is None (plain RoPE) or a YaRN dict with ``factor``,
    ``original_max_position_embeddings`` and optionally ``beta_fast``, ``beta_slow``, ``mscale``,
    ``mscale_all_dim``, ``attention_factor``, ``truncate`` (transformers' ``rope_parameters``).
    ``rms_norm_eps`` is that of ``q_a_layernorm`` / ``kv_a_layernorm``: transformers' attention
    uses 1e-6 whatever the model config says, so :meth:`from_config` keeps 1e-6.
    """

    hidden_size: int
    num_attention_heads: int
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    rope_interleave: bool = True
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                     "qk_rope_head_dim", "v_head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank < 1):
            raise ValueError(f"q_lora_rank must be a positive int or None, got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rope_type not in ROPE_TYPES:
                raise ValueError(f"rope type {rope_type!r} is not supported (only {ROPE_TYPES})")
            if rope_type == "default":
                self.rope_scaling = None
            elif "original_max_position_embeddings" not in self.rope_scaling:
                raise ValueError("YaRN rope_scaling needs original_max_position_embeddings")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def yarn_factor(self) -> float | None:
        if self.rope_scaling is None:
            return None
        factor = self.rope_scaling.get("factor")
        if factor is None:
            factor = self.max_position_embeddings / self.rope_scaling["original_max_position_embeddings"]
        return float(factor)

    @property
    def softmax_scale(self) -> float:
        """``qk_head_dim ** -0.5``, times ``mscale(factor, mscale_all_dim) ** 2`` under YaRN."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_scaling is not None:
            mscale_all_dim = self.rope_scaling.get("mscale_all_dim", 0)
            if mscale_all_dim:
                scale *= _yarn_mscale(self.yarn_factor, mscale_all_dim) ** 2
        return scale

    def rope_frequencies(self) -> tuple[torch.Tensor, float]:
        """(inverse frequencies float32 ``[qk_rope_head_dim / 2]``, cos/sin scaling), as YaRN defines them."""
        dim, base = self.qk_rope_head_dim, float(self.rope_theta)
        pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
        if self.rope_scaling is None:
            return 1.0 / pos_freqs, 1.0
        rs = self.rope_scaling
        factor = self.yarn_factor
        attention_factor = rs.get("attention_factor")
        if attention_factor is None:
            mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
            if mscale and mscale_all_dim:
                attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
            else:
                attention_factor = _yarn_mscale(factor)
        beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
        original = rs["original_max_position_embeddings"]

        def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if rs.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp  # 1: keep the original frequency, 0: interpolate by `factor`
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
        return inv_freq, float(attention_factor)

    @classmethod
    def from_config(cls, config: Any) -> MLAConfig:
        """An MLAConfig from a transformers DeepseekV2Config / DeepseekV3Config (duck-typed):
        ``rope_parameters`` (transformers >= 5) or ``rope_scaling`` + ``rope_theta`` (older)."""
        if isinstance(config, MLAConfig):
            return config
        missing = [name for name in ("hidden_size", "num_attention_heads", "kv_lora_rank",
                                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
                   if getattr(config, name, None) is None]
        if missing:
            raise ValueError(f"config {type(config).__name__} lacks {', '.join(missing)}")
        params = getattr(config, "rope_parameters", None)
        if isinstance(params, dict) and params:
            rope_theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
            scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        else:
            rope_theta = getattr(config, "rope_theta", 10000.0)
            scaling = dict(getattr(config, "rope_scaling", None) or {})
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        rope_interleave = getattr(config, "rope_interleave", None)
        return cls(
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            kv_lora_rank=config.kv_lora_rank,
            q_lora_rank=getattr(config, "q_lora_rank", None),
            qk_nope_head_dim=config.qk_nope_head_dim,
            qk_rope_head_dim=config.qk_rope_head_dim,
            v_head_dim=config.v_head_dim,
            attention_bias=bool(getattr(config, "attention_bias", False)),
            rope_interleave=True if rope_interleave is None else bool(rope_interleave),
            rope_theta=float(rope_theta),
            rope_scaling=None if rope_type == "default" else scaling,
            max_position_embeddings=getattr(config, "max_position_embeddings", 4096),
            attention_dropout=float(getattr(config, "attention_dropout", 0.0) or 0.0),
            initializer_range=getattr(config, "initializer_range", 0.02),
        )


class RMSNorm(nn.Module):
    """``weight * (x / rms(x))``, normalised in float32 and cast back before the weight (as transformers)."""

    def __init__(self, dim: int, eps: float = 1e-6, *, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x32.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """RoPE on the last dimension; ``cos``/``sin`` hold one angle per pair. Interleaved pairs
    ``(x0, x1), (x2, x3), ...`` come out de-interleaved (first elements, then second), as in
    transformers' DeepSeek-V3."""
    half = x.shape[-1] // 2
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleave else (x[..., :half], x[..., half:])
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class MLADecodeStep(NamedTuple):
    """Metadata of one decode step, shared by every layer (built by :meth:`MLACache.begin_step`)."""

    seq_ids: tuple[int, ...]
    positions: torch.Tensor  # int64 [B, s_q], the new tokens' positions
    slot_mapping: torch.Tensor  # int64 [B * s_q], their cache slots
    block_table: torch.Tensor  # int32 [B, max_blocks]
    cache_seqlens: torch.Tensor  # int32 [B], cache lengths including the new tokens
    plan: MLADecodePlan | None  # on CUDA; None on the CPU (mla_decode makes one if its backend needs it)


class MLACache:
    """Paged latent cache of a stack of MLA layers, with block allocation per sequence.

    ``kv[layer]`` is ``[num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]``: per token the
    normalised latent and the roped key. Sequences get blocks from a shared pool as they grow
    (:meth:`begin_step`) or copy another's (:meth:`fork`), and give them back with :meth:`free` or
    :meth:`truncate`. A step feeds the same number of new tokens to every sequence in it (a
    prompt is a step of its length). The
    bookkeeping is on the host, as in a serving scheduler; each step's device tensors (block
    table, cache lengths, slots and, on CUDA, the split plan) are built once by
    :meth:`begin_step` and read by every layer.

    Args:
        num_layers, num_blocks, block_size: the pool (``block_size`` any positive int, 64 as in
            FlashMLA by default).
        kv_lora_rank, qk_rope_head_dim, num_heads: the model's MLA sizes (``num_heads`` tunes
            the split plan).
        max_seq_len: if given, block tables have a fixed ``ceil(max_seq_len / block_size)``
            columns (stable shapes for CUDA graphs); else as many as the longest sequence needs.
    """

    def __init__(self, num_layers: int, num_blocks: int, *, kv_lora_rank: int, qk_rope_head_dim: int,
                 num_heads: int, block_size: int = 64, max_seq_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks), ("block_size", block_size),
                            ("kv_lora_rank", kv_lora_rank), ("qk_rope_head_dim", qk_rope_head_dim),
                            ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.block_size, self.num_heads = block_size, num_heads
        self.kv = torch.zeros((num_layers, num_blocks, block_size, kv_lora_rank + qk_rope_head_dim),
                              dtype=dtype, device=device)
        self.max_blocks = None if max_seq_len is None else -(-max_seq_len // block_size)
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._blocks: dict[int, list[int]] = {}
        self._lengths: dict[int, int] = {}
        self._next_id = 0
        self.step: MLADecodeStep | None = None

    @classmethod
    def for_config(cls, config: Any, num_layers: int, num_blocks: int, **kwargs) -> MLACache:
        cfg = MLAConfig.from_config(config)
        return cls(num_layers, num_blocks, kv_lora_rank=cfg.kv_lora_rank, qk_rope_head_dim=cfg.qk_rope_head_dim,
                   num_heads=cfg.num_attention_heads, **kwargs)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def layer(self, layer_idx: int) -> torch.Tensor:
        if not 0 <= layer_idx < self.kv.shape[0]:
            raise IndexError(f"layer {layer_idx} is outside the cache's {self.kv.shape[0]} layers")
        return self.kv[layer_idx]

    def add_sequence(self) -> int:
        """A new empty sequence; returns its id."""
        seq_id = self._next_id
        self._next_id += 1
        self._blocks[seq_id], self._lengths[seq_id] = [], 0
        return seq_id

    def fork(self, seq_id: int) -> int:
        """A new sequence holding a copy of the cache of ``seq_id`` (e.g. each of the G samples
        of one prompt, prefilled once); returns its id."""
        source = self._blocks[self._known(seq_id)]
        if len(source) > len(self._free):
            raise RuntimeError(f"the cache is full: the fork needs {len(source)} blocks, {len(self._free)} are free")
        new_id = self.add_sequence()
        blocks = [self._free.pop() for _ in source]
        self._blocks[new_id], self._lengths[new_id] = blocks, self._lengths[seq_id]
        if blocks:
            device = self.kv.device
            self.kv[:, torch.tensor(blocks, device=device)] = self.kv[:, torch.tensor(source, device=device)]
        return new_id

    def length(self, seq_id: int) -> int:
        return self._lengths[self._known(seq_id)]

    def free(self, seq_id: int) -> None:
        """Forget a sequence and return its blocks to the pool."""
        self._free.extend(reversed(self._blocks.pop(self._known(seq_id))))
        del self._lengths[seq_id]

    def truncate(self, seq_id: int, length: int) -> None:
        """Keep only the first ``length`` tokens of a sequence (e.g. after rejected speculative
        tokens) and return the blocks it no longer needs to the pool."""
        current = self._lengths[self._known(seq_id)]
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= current:
            raise ValueError(f"length must be an int in [0, {current}], got {length!r}")
        blocks = self._blocks[seq_id]
        keep = -(-length // self.block_size)
        self._free.extend(reversed(blocks[keep:]))
        del blocks[keep:]
        self._lengths[seq_id] = length

    def _known(self, seq_id: int) -> int:
        if seq_id not in self._blocks:
            raise KeyError(f"unknown sequence id {seq_id}")
        return seq_id

    def begin_step(self, seq_ids: Sequence[int], num_new_tokens: int = 1) -> MLADecodeStep:
        """Reserve cache slots for ``num_new_tokens`` new tokens of each sequence and build the
        step's metadata (also kept in ``self.step`` for the layers). Lengths advance now: run
        every layer on the step's tokens before the next call. Each call builds new metadata
        tensors, so a CUDA graph cannot replay a captured module step on later steps; capture at
        the op level instead (``mla_decode_plan`` + ``mla_decode`` on static buffers updated with
        ``copy_``)."""
        seq_ids = tuple(self._known(s) for s in seq_ids)
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"seq_ids has duplicates: {seq_ids}")
        if isinstance(num_new_tokens, bool) or not isinstance(num_new_tokens, int) or num_new_tokens < 1:
            raise ValueError(f"num_new_tokens must be a positive int, got {num_new_tokens!r}")
        bs, lengths, blocks_of = self.block_size, self._lengths, self._blocks
        new_lengths = [lengths[s] + num_new_tokens for s in seq_ids]
        counts = [-(-n // bs) for n in new_lengths]  # blocks each sequence needs
        need = sum(max(0, c - len(blocks_of[s])) for s, c in zip(seq_ids, counts))
        if need > len(self._free):
            raise RuntimeError(f"the cache is full: the step needs {need} blocks, {len(self._free)} are free")
        width = max(counts, default=0)
        if self.max_blocks is not None:
            if width > self.max_blocks:
                raise ValueError(f"a sequence would exceed max_seq_len ({self.max_blocks * bs} tokens)")
            width = self.max_blocks
        table, positions, slots, padding = [], [], [], [0] * width
        for s, n, c in zip(seq_ids, new_lengths, counts):
            blocks = blocks_of[s]
            while len(blocks) < c:
                blocks.append(self._free.pop())
            start = lengths[s]
            lengths[s] = n
            positions.extend(range(start, n))
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, n))
            table.extend(blocks)
            table.extend(padding[len(blocks):])
        device, batch = self.kv.device, len(seq_ids)
        cache_seqlens = torch.tensor(new_lengths, dtype=torch.int32, device=device)
        self.step = MLADecodeStep(
            seq_ids=seq_ids,
            positions=torch.tensor(positions, dtype=torch.int64, device=device).view(batch, num_new_tokens),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_table=torch.tensor(table, dtype=torch.int32, device=device).view(batch, width),
            cache_seqlens=cache_seqlens,
            # Only the Triton kernel reads a plan (the PyTorch path of the CPU needs none).
            plan=mla_decode_plan(cache_seqlens, self.num_heads, num_new_tokens) if device.type == "cuda" else None,
        )
        return self.step


class MLAttention(nn.Module):
    """Multi-head Latent Attention, a drop-in for transformers' ``DeepseekV3Attention``.

    Args:
        config: an :class:`MLAConfig`, or a transformers DeepseekV2Config / DeepseekV3Config (or
            any object with their field names).
        layer_idx: the layer's index in an :class:`MLACache`.
        device, dtype: of the parameters.

    Forward, training / prefill (``cache=None``), causal within each sequence:

    - ``hidden_states [B, S, hidden]``: B sequences of S tokens (``position_ids [B, S]``,
      default ``0 .. S-1``);
    - ``hidden_states [T, hidden]`` with ``cu_seqlens`` (int32 ``[N + 1]``) and ``max_seqlen``
      (int): N packed sequences (``position_ids [T]``, default: from 0 in each sequence).

    Forward, decode (``cache`` given): ``hidden_states [B, s_q, hidden]`` are the new tokens of
    the sequences of ``cache.step`` (see :meth:`MLACache.begin_step`, called once per step for
    all layers); their latents are appended to ``cache.layer(layer_idx)`` and they attend to
    the whole cache (causal among themselves).

    Returns the attention output, shaped as ``hidden_states`` (not transformers' tuple).

    Math: ``q = q_b_proj(q_a_layernorm(q_a_proj(x)))`` (or ``q_proj(x)``) split per head into
    ``[q_nope, q_rope]``; ``[c, k_rope] = kv_a_proj_with_mqa(x)``, ``c = kv_a_layernorm(c)``;
    ``[k_nope, v] = kv_b_proj(c)`` per head; RoPE (YaRN-scaled cos/sin) on ``q_rope`` and on the
    one shared ``k_rope``; softmax scale ``(D_nope + D_rope) ** -0.5`` (times YaRN's
    ``mscale_all_dim`` factor squared); ``o_proj`` of the concatenated heads. Attention dropout
    is not implemented (an error in training mode when ``attention_dropout > 0``).
    """

    def __init__(self, config: Any, layer_idx: int = 0, *, device=None, dtype=None) -> None:
        super().__init__()
        cfg = MLAConfig.from_config(config)
        self.config, self.layer_idx = cfg, layer_idx
        self.num_heads = cfg.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = cfg.q_lora_rank, cfg.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v_head_dim, self.qk_head_dim = cfg.v_head_dim, cfg.qk_head_dim
        self.softmax_scale = cfg.softmax_scale
        f = dict(device=device, dtype=dtype)
        heads = self.num_heads
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, heads * self.qk_head_dim, bias=False, **f)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.attention_bias, **f)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, **f)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, heads * self.qk_head_dim, bias=False, **f)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                            bias=cfg.attention_bias, **f)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps, **f)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, heads * (self.qk_nope_head_dim + self.v_head_dim),
                                   bias=False, **f)
        self.o_proj = nn.Linear(heads * self.v_head_dim, cfg.hidden_size, bias=cfg.attention_bias, **f)
        inv_freq, self.rope_scaling = cfg.rope_frequencies()
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        # Keep the rotary frequencies float32 through .to(dtype) / .half().
        self.inv_freq = self.config.rope_frequencies()[0].to(self.inv_freq.device)
        return module

    # ---- shared projections ----------------------------------------------------------------

    def _project(self, x: torch.Tensor, positions: torch.Tensor):
        """x ``[N, hidden]``, positions ``[N]`` -> q_nope ``[N, H, D_nope]``, q_rope ``[N, H, D_rope]``
        (roped), latent ``[N, D_lat]`` (normalised), k_rope ``[N, D_rope]`` (roped)."""
        n = x.shape[0]
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(n, self.num_heads, self.qk_head_dim)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        cos, sin = freqs.cos(), freqs.sin()
        if self.rope_scaling != 1.0:
            cos, sin = cos * self.rope_scaling, sin * self.rope_scaling
        cos, sin = cos.to(x.dtype)[:, None, :], sin.to(x.dtype)[:, None, :]
        # The heads' q_rope and the one shared k_rope turn together, as H + 1 heads.
        roped = _rotate(torch.cat([q_rope, k_rope[:, None, :]], dim=1), cos, sin, self.config.rope_interleave)
        return q_nope, roped[:, :-1], latent, roped[:, -1]

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_UK [H, D_nope, D_lat], W_UV^T [H, D_lat, D_v])``: views of ``kv_b_proj.weight``.

        Views, not copies: the batched matmuls take the strided and transposed operands as they
        are, the weights are always the current ones (a copy cached on the weight's version
        counter would miss in-place updates that leave it alone, e.g. fused AdamW's), and
        gradients flow into ``kv_b_proj`` when autograd records.
        """
        w = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, :self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:].transpose(1, 2)

    # ---- forward ---------------------------------------------------------------------------

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        *,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        cache: MLACache | None = None,
    ) -> torch.Tensor:
        if cache is not None:
            if cu_seqlens is not None or position_ids is not None:
                raise ValueError("with a cache, positions come from cache.step: pass neither cu_seqlens "
                                 "nor position_ids")
            return self._decode(hidden_states, cache)
        if self.training and self.config.attention_dropout > 0:
            raise NotImplementedError("attention dropout is not implemented (attention_dropout > 0)")
        hidden = self.config.hidden_size
        if cu_seqlens is None:
            if hidden_states.dim() != 3 or hidden_states.shape[-1] != hidden:
                raise ValueError(f"hidden_states must be [B, S, {hidden}] (or [T, {hidden}] with cu_seqlens), "
                                 f"got {tuple(hidden_states.shape)}")
            batch, seq_len, _ = hidden_states.shape
            device = hidden_states.device
            cu_seqlens = torch.arange(0, (batch + 1) * seq_len, seq_len, dtype=torch.int32, device=device)
            max_seqlen = seq_len
            if position_ids is None:
                positions = torch.arange(seq_len, device=device).repeat(batch)
            else:
                positions = position_ids.expand(batch, seq_len).reshape(-1)
        else:
            if hidden_states.dim() != 2 or hidden_states.shape[-1] != hidden:
                raise ValueError(f"with cu_seqlens, hidden_states must be [T, {hidden}], got "
                                 f"{tuple(hidden_states.shape)}")
            if max_seqlen is None:
                raise ValueError("packed sequences need max_seqlen (an int) along with cu_seqlens")
            if position_ids is None:
                tokens = torch.arange(hidden_states.shape[0], device=hidden_states.device)
                seq = torch.searchsorted(cu_seqlens[1:], tokens.to(cu_seqlens.dtype), right=True)
                positions = tokens - cu_seqlens.long()[seq]
            else:
                positions = position_ids.reshape(-1)
        x = hidden_states.reshape(-1, hidden)
        out = self._attend(*self._project(x, positions), cu_seqlens, max_seqlen)
        return self.o_proj(out).view(hidden_states.shape)

    def _attend(self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """Packed causal attention from the projections (:meth:`_project`): keys and values from
        the latent through kv_b_proj, the shared rope key; ``[T, heads * v_head_dim]`` before o_proj."""
        tokens = latent.shape[0]
        kv = self.kv_b_proj(latent).view(tokens, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        out, _ = mla_varlen_attention(q_nope, q_rope, k_nope, k_rope.unsqueeze(1), v, cu_seqlens, max_seqlen,
                                      self.softmax_scale)
        return out.reshape(tokens, self.num_heads * self.v_head_dim)

    def _decode(self, hidden_states: torch.Tensor, cache: MLACache) -> torch.Tensor:
        step = cache.step
        if step is None:
            raise ValueError("cache.step is unset: call cache.begin_step(seq_ids, num_new_tokens) first")
        batch, s_q = step.positions.shape
        expected = (batch, s_q, self.config.hidden_size)
        if tuple(hidden_states.shape) != expected:
            raise ValueError(f"hidden_states must be {list(expected)} for the cache's step, got "
                             f"{tuple(hidden_states.shape)}")
        x = hidden_states.reshape(batch * s_q, -1)
        q_nope, q_rope, latent, k_rope = self._project(x, step.positions.reshape(-1))
        kv_cache = cache.layer(self.layer_idx)
        w_uk, w_uv_t = self.absorbed_weights()
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [N, H, D_lat]
        heads = self.num_heads
        # the cache's dtype decides the precision of the decode (a bf16 cache of fp32 weights)
        dtype = kv_cache.dtype
        mla_cache_append(kv_cache, latent.to(dtype), k_rope.to(dtype), step.slot_mapping, validate=False)
        out_latent, _ = mla_decode(
            q_latent.reshape(batch, s_q, heads, self.kv_lora_rank).to(dtype),
            q_rope.reshape(batch, s_q, heads, -1).to(dtype),
            kv_cache, step.block_table, step.cache_seqlens, self.softmax_scale, step.plan, validate=False,
        )
        out_latent = out_latent.reshape(batch * s_q, heads, -1).to(w_uv_t.dtype)  # back from the cache's dtype
        out = torch.bmm(out_latent.transpose(0, 1), w_uv_t)  # [H, N, D_v]
        out = out.transpose(0, 1).reshape(batch, s_q, heads * self.v_head_dim)
        return self.o_proj(out)
