"""Multi-head Latent Attention (DeepSeek-V2/V3): training / prefill attention over packed
variable-length sequences, decode over a paged latent cache, and the cache append.

Notation (DeepSeek-V3 sizes in brackets): ``H`` heads, ``D_nope`` [128] and ``D_rope`` [64] the two
parts of a query/key head, ``D_v`` [128] the value head, ``D_lat`` [512] the latent
(``kv_lora_rank``). In MLA every head's key is ``[k_nope_h, k_rope]`` where ``k_rope`` (the roped
part) is one vector per token shared by all heads.

- :func:`mla_varlen_attention`: causal attention of packed sequences, differentiable (Triton
  forward and backward on CUDA, the PyTorch path on the CPU).
- :func:`mla_decode`: attention of ``s_q`` new tokens per sequence over the paged cache of
  latents, with the queries absorbed into the latent space (split-KV Triton kernel + combine).
- :func:`mla_cache_append`: writes new tokens' latents and roped keys into their cache slots.
- :func:`mla_decode_plan`: the split plan of :func:`mla_decode`, computed on the device.

Checks of argument *values* (cu_seqlens order, block ids, cache lengths) read the tensors on the
host; they are skipped while a CUDA graph is being captured or torch.compile is tracing, and can
be switched off with ``validate=False``. Shapes, dtypes and devices are always checked.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from moe_align.ops._autocast import autocast_inputs, run_without_autocast
from moe_align.ops._backend import backend_for, plain_eager_cpu, triton_available
from moe_align.ops._native import has_cuda_kernels

__all__ = [
    "MLADecodePlan",
    "mla_cache_append",
    "mla_decode",
    "mla_decode_plan",
    "mla_varlen_attention",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Decode split plan: splits are whole multiples of SPLIT_GRANULE cached tokens and at least
# MIN_SPLIT_GRANULES long; each sequence costs SEQUENCE_OVERHEAD_GRANULES extra (its combine and
# the partial outputs), as in FlashMLA's scheduler.
SPLIT_GRANULE = 64
MIN_SPLIT_GRANULES = 2
SEQUENCE_OVERHEAD_GRANULES = 1
# The PyTorch paths bound their float32 score blocks to about this many elements.
TORCH_PATH_SCORE_ELEMENTS = 1 << 24


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _check_float(name: str, t, dim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be fp32, fp16 or bf16, got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(t.shape)}")


def _check_index(name: str, t, dim: int, dtype: torch.dtype) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimension(s), got shape {tuple(t.shape)}")


def _check_same_dtype(named: dict[str, torch.Tensor]) -> None:
    (first_name, first), *rest = named.items()
    for name, t in rest:
        if t.dtype != first.dtype:
            raise TypeError(f"{name} is {t.dtype} but {first_name} is {first.dtype}")


def _check_same_device(named: dict[str, torch.Tensor]) -> None:
    (first_name, first), *rest = named.items()
    for name, t in rest:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def _check_dim16(name: str, d: int) -> None:
    if d < 16 or d % 16:
        raise ValueError(f"{name} head dimension must be a positive multiple of 16, got {d}")


def _values_checkable(t: torch.Tensor) -> bool:
    """Whether reading argument values on the host is allowed (not under graph capture or tracing)."""
    if torch.compiler.is_compiling():
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


# --------------------------------------------------------------------------------------------
# 1. Varlen causal attention (training / prefill)
# --------------------------------------------------------------------------------------------


def _sequences(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    bounds = cu_seqlens.tolist()
    return [(s, e) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]


def _query_chunk(num_heads: int, seq_len: int) -> int:
    # At most 256 queries at a time: a chunk only meets the keys up to its last query, so small
    # chunks skip most of the masked half of the causal score matrix.
    return max(1, min(256, TORCH_PATH_SCORE_ELEMENTS // max(1, num_heads * seq_len)))


def _heads_first(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``[L, H, D]`` -> contiguous float32 ``[H, L, D]``, times ``scale``."""
    x = x.transpose(0, 1).float()
    return (x * scale).contiguous() if scale != 1.0 else x.contiguous()


def _causal_scores(qn, qr, kn, kr, q0: int, q1: int) -> torch.Tensor:
    """float32 scores ``[H, q1 - q0, q1]`` of the queries ``q0 .. q1-1`` (qn ``[H, q, D_nope]``,
    qr ``[H, q, D_rope]``, already times the softmax scale) against the keys ``0 .. q1-1`` (kn
    ``[H, L, D_nope]``, the shared kr ``[L, D_rope]``), causal-masked."""
    s = torch.bmm(qn, kn[:, :q1].transpose(1, 2))
    s.baddbmm_(qr, kr[:q1].t().expand(qr.shape[0], -1, -1))
    qpos = torch.arange(q0, q1, device=s.device)
    kpos = torch.arange(q1, device=s.device)
    return s.masked_fill_(kpos[None, :] > qpos[:, None], float("-inf"))


def mla_varlen_attention_torch(
    q_nope, q_rope, k_nope, k_rope, v, cu_seqlens, max_seqlen: int, softmax_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch path of :func:`mla_varlen_attention` (float32 math, chunked over queries)."""
    total, num_heads, _ = q_nope.shape
    out = torch.zeros((total, num_heads, v.shape[-1]), dtype=q_nope.dtype, device=q_nope.device)
    lse = torch.full((total, num_heads), float("-inf"), dtype=torch.float32, device=q_nope.device)
    for start, end in _sequences(cu_seqlens):
        seq_len = end - start
        kn, kr, val = _heads_first(k_nope[start:end]), k_rope[start:end, 0].float(), _heads_first(v[start:end])
        qn_all = _heads_first(q_nope[start:end], softmax_scale)
        qr_all = _heads_first(q_rope[start:end], softmax_scale)
        chunk = _query_chunk(num_heads, seq_len)
        for q0 in range(0, seq_len, chunk):
            q1 = min(seq_len, q0 + chunk)
            s = _causal_scores(qn_all[:, q0:q1], qr_all[:, q0:q1], kn, kr, q0, q1)
            p = torch.softmax(s, dim=-1)
            # p at a row's maximum is exp(max - lse) >= 1 / q1: it never underflows.
            row_lse = s.amax(dim=-1) - p.amax(dim=-1).log()
            o = torch.bmm(p, val[:, :q1])
            out[start + q0:start + q1] = o.transpose(0, 1).to(out.dtype)
            lse[start + q0:start + q1] = row_lse.t()
    return out, lse


def mla_varlen_attention_backward_torch(
    grad_out, grad_lse, q_nope, q_rope, k_nope, k_rope, v, out, lse, cu_seqlens, softmax_scale: float
):
    """PyTorch path of the backward: ``(dq_nope, dq_rope, dk_nope, dk_rope, dv)``."""
    total, num_heads, _ = q_nope.shape
    f32 = dict(dtype=torch.float32, device=q_nope.device)
    dqn = torch.zeros(q_nope.shape, **f32)
    dqr = torch.zeros(q_rope.shape, **f32)
    dkn = torch.zeros(k_nope.shape, **f32)
    dkr = torch.zeros((total, k_rope.shape[-1]), **f32)
    dv = torch.zeros(v.shape, **f32)
    # d lse_i / d s_ij = p_ij, so a gradient of the lse enters as a shift of delta.
    delta = (grad_out.float() * out.float()).sum(dim=-1)
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    for start, end in _sequences(cu_seqlens):
        seq_len = end - start
        kn, kr, val = _heads_first(k_nope[start:end]), k_rope[start:end, 0].float(), _heads_first(v[start:end])
        # Queries times the scale c: s = (c q) k, dk = c ds^T q = ds^T (c q), dq = c ds k.
        qn_all = _heads_first(q_nope[start:end], softmax_scale)
        qr_all = _heads_first(q_rope[start:end], softmax_scale)
        g_all = _heads_first(grad_out[start:end])
        lse_all, delta_all = lse[start:end].t(), delta[start:end].t()
        dkn_h = torch.zeros_like(kn)
        dv_h = torch.zeros_like(val)
        chunk = _query_chunk(num_heads, seq_len)
        for q0 in range(0, seq_len, chunk):
            q1 = min(seq_len, q0 + chunk)
            qn, qr, g = qn_all[:, q0:q1], qr_all[:, q0:q1], g_all[:, q0:q1]
            p = _causal_scores(qn, qr, kn, kr, q0, q1)
            p = p.sub_(lse_all[:, q0:q1, None]).exp_()
            dv_h[:, :q1] += torch.bmm(p.transpose(1, 2), g)
            ds = torch.bmm(g, val[:, :q1].transpose(1, 2))
            ds = ds.sub_(delta_all[:, q0:q1, None]).mul_(p)  # ds / c
            rows = slice(start + q0, start + q1)
            dqn[rows] = torch.bmm(ds, kn[:, :q1]).mul_(softmax_scale).transpose(0, 1)
            dqr[rows] = torch.matmul(ds, kr[:q1]).mul_(softmax_scale).transpose(0, 1)
            ds_t = ds.transpose(1, 2)
            dkn_h[:, :q1] += torch.bmm(ds_t, qn)
            dkr[start:start + q1] += torch.bmm(ds_t, qr).sum(dim=0)
        dkn[start:end] = dkn_h.transpose(0, 1)
        dv[start:end] = dv_h.transpose(0, 1)
    return (dqn.to(q_nope.dtype), dqr.to(q_rope.dtype), dkn.to(k_nope.dtype),
            dkr.to(k_rope.dtype).view(k_rope.shape), dv.to(v.dtype))


def _varlen_backend(device: torch.device) -> str:
    available = ("triton", "torch") if triton_available(device) else ("torch",)
    return backend_for("mla_varlen_attention", device, available,
                       default="triton" if device.type == "cuda" else "torch")


@torch.library.custom_op("moe_align::mla_varlen_attention", mutates_args=())
def _mla_varlen_attention(
    q_nope: torch.Tensor, q_rope: torch.Tensor, k_nope: torch.Tensor, k_rope: torch.Tensor,
    v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    if _varlen_backend(q_nope.device) == "triton":
        from moe_align.kernels.mla_attention import mla_varlen_fwd

        args = [_unit_last_stride(t) for t in (q_nope, q_rope, k_nope, k_rope, v)]
        return mla_varlen_fwd(*args, cu_seqlens, max_seqlen, softmax_scale)
    return mla_varlen_attention_torch(q_nope, q_rope, k_nope, k_rope, v, cu_seqlens, max_seqlen, softmax_scale)


@_mla_varlen_attention.register_fake
def _(q_nope, q_rope, k_nope, k_rope, v, cu_seqlens, max_seqlen, softmax_scale):
    total, num_heads, _ = q_nope.shape
    out = q_nope.new_empty((total, num_heads, v.shape[-1]))
    return out, q_nope.new_empty((total, num_heads), dtype=torch.float32)


@torch.library.custom_op("moe_align::mla_varlen_attention_backward", mutates_args=())
def _mla_varlen_attention_backward(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q_nope: torch.Tensor,
    q_rope: torch.Tensor, k_nope: torch.Tensor, k_rope: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if _varlen_backend(q_nope.device) == "triton":
        from moe_align.kernels.mla_attention import mla_varlen_bwd

        tensors = [_unit_last_stride(t) for t in (grad_out, q_nope, q_rope, k_nope, k_rope, v, out)]
        return mla_varlen_bwd(*tensors, lse, cu_seqlens, max_seqlen, softmax_scale, grad_lse=grad_lse)
    return mla_varlen_attention_backward_torch(
        grad_out, grad_lse, q_nope, q_rope, k_nope, k_rope, v, out, lse, cu_seqlens, softmax_scale
    )


@_mla_varlen_attention_backward.register_fake
def _(grad_out, grad_lse, q_nope, q_rope, k_nope, k_rope, v, out, lse, cu_seqlens, max_seqlen,
      softmax_scale):
    return (torch.empty_like(q_nope, memory_format=torch.contiguous_format),
            torch.empty_like(q_rope, memory_format=torch.contiguous_format),
            torch.empty_like(k_nope, memory_format=torch.contiguous_format),
            torch.empty_like(k_rope, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _varlen_setup_context(ctx, inputs, output):
    q_nope, q_rope, k_nope, k_rope, v, cu_seqlens, max_seqlen, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q_nope, q_rope, k_nope, k_rope, v, cu_seqlens, out, lse)
    ctx.max_seqlen, ctx.softmax_scale = max_seqlen, softmax_scale


def _varlen_backward(ctx, grad_out, grad_lse):
    q_nope, q_rope, k_nope, k_rope, v, cu_seqlens, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grads = _mla_varlen_attention_backward(
        grad_out, grad_lse, q_nope, q_rope, k_nope, k_rope, v, out, lse, cu_seqlens,
        ctx.max_seqlen, ctx.softmax_scale,
    )
    return (*grads, None, None, None)


_mla_varlen_attention.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)
run_without_autocast(_mla_varlen_attention, _mla_varlen_attention_backward)


def mla_varlen_attention(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    k_nope: torch.Tensor,
    k_rope: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float,
    *,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal MLA attention of packed variable-length sequences (training and prefill).

    Sequence ``b`` holds the tokens ``cu_seqlens[b] <= t < cu_seqlens[b + 1]``; a token attends
    to the tokens of its own sequence up to itself. For query token ``i`` and key token ``j`` of
    one sequence, and head ``h``::

        s_hij = softmax_scale * (q_nope[i, h] . k_nope[j, h] + q_rope[i, h] . k_rope[j, 0])
        lse[i, h] = log sum_{j <= i} exp(s_hij)
        out[i, h] = sum_{j <= i} exp(s_hij - lse[i, h]) v[j, h]

    The rope part of the key is shared by all heads (MLA) and is never expanded to ``H`` heads.

    Args:
        q_nope: ``[T, H, D_nope]``; q_rope: ``[T, H, D_rope]``.
        k_nope: ``[T, H, D_nope]``; k_rope: ``[T, 1, D_rope]``; v: ``[T, H, D_v]``.
            All five fp32, fp16 or bf16 (one dtype; under ``torch.autocast`` they are cast to
            the autocast dtype), on one device, any strides; every head dimension a positive
            multiple of 16 (DeepSeek-V3: 128, 64, 128).
        cu_seqlens: int32 ``[B + 1]``, ``0 = cu_seqlens[0] <= ... <= cu_seqlens[B] = T``
            (empty sequences are allowed).
        max_seqlen: an int at least the longest sequence (sizes the kernel grid).
        softmax_scale: ``c`` above, e.g. ``(D_nope + D_rope) ** -0.5`` times YaRN's mscale².
        validate: check the values of ``cu_seqlens`` (a host sync; skipped under graph capture
            and torch.compile).

    Returns:
        ``(out, lse)``: ``out [T, H, D_v]`` in the input dtype, ``lse`` float32 ``[T, H]``
        (natural log). Differentiable with respect to the five float inputs (and through lse).

    Backends: Triton (flash-attention style, no ``T x T`` buffer, backward recomputes) on CUDA;
    the PyTorch path (float32, chunked over queries) on the CPU; ``MOE_ALIGN_BACKEND`` forces one.
    """
    q_nope, q_rope, k_nope, k_rope, v = autocast_inputs(q_nope, q_rope, k_nope, k_rope, v)
    _check_float("q_nope", q_nope, 3)
    _check_float("q_rope", q_rope, 3)
    _check_float("k_nope", k_nope, 3)
    _check_float("k_rope", k_rope, 3)
    _check_float("v", v, 3)
    named = dict(q_nope=q_nope, q_rope=q_rope, k_nope=k_nope, k_rope=k_rope, v=v)
    _check_same_dtype(named)
    total, num_heads, d_nope = q_nope.shape
    d_rope, d_v = q_rope.shape[-1], v.shape[-1]
    if q_rope.shape[:2] != (total, num_heads):
        raise ValueError(f"q_rope must be [{total}, {num_heads}, D_rope] like q_nope, got {tuple(q_rope.shape)}")
    if k_nope.shape != q_nope.shape:
        raise ValueError(f"k_nope must have q_nope's shape {tuple(q_nope.shape)}, got {tuple(k_nope.shape)}")
    if k_rope.shape != (total, 1, d_rope):
        raise ValueError(
            f"k_rope must be [{total}, 1, {d_rope}] (one rope key per token, shared by the heads), "
            f"got {tuple(k_rope.shape)}"
        )
    if v.shape[:2] != (total, num_heads):
        raise ValueError(f"v must be [{total}, {num_heads}, D_v] (heads of q_nope), got {tuple(v.shape)}")
    _check_dim16("q_nope/k_nope", d_nope)
    _check_dim16("q_rope/k_rope", d_rope)
    _check_dim16("v", d_v)
    _check_index("cu_seqlens", cu_seqlens, 1, torch.int32)
    _check_same_device(dict(named, cu_seqlens=cu_seqlens))
    if cu_seqlens.shape[0] < 1:
        raise ValueError("cu_seqlens must hold at least one offset (0)")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt)) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
    if not isinstance(softmax_scale, (int, float)) or not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be a finite float, got {softmax_scale!r}")
    if validate and _values_checkable(cu_seqlens):
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != total:
            raise ValueError(f"cu_seqlens must start at 0 and end at T={total}, got {bounds[0]} .. {bounds[-1]}")
        lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
        if any(n < 0 for n in lengths):
            b = next(i for i, n in enumerate(lengths) if n < 0)
            raise ValueError(
                f"cu_seqlens must not decrease: cu_seqlens[{b}]={bounds[b]} > cu_seqlens[{b + 1}]={bounds[b + 1]}"
            )
        if lengths and max(lengths) > max_seqlen:
            raise ValueError(f"max_seqlen={max_seqlen} is below the longest sequence ({max(lengths)} tokens)")
    # The kernels read the offsets as a dense int32 array.
    return _mla_varlen_attention(q_nope, q_rope, k_nope, k_rope, v, cu_seqlens.contiguous(), max_seqlen,
                                 float(softmax_scale))


# --------------------------------------------------------------------------------------------
# 2. Decode over the paged latent cache
# --------------------------------------------------------------------------------------------


class MLADecodePlan(NamedTuple):
    """How :func:`mla_decode` cuts the cache of each sequence into splits (int32, on the device).

    ``split_offsets[b] .. split_offsets[b + 1]`` are the work items of sequence ``b``;
    ``split_len[b]`` tokens per split (the last split runs to the end of the cache);
    ``work[w] = (b, s)`` for work item ``w = split_offsets[b] + s``, ``(-1, 0)`` past the last one.
    ``work`` has a fixed number of rows (``num_parts + B``), so the kernel grid depends only on
    shapes and the plan can be built inside or outside a captured CUDA graph and shared by
    every layer of a decode step.
    """

    work: torch.Tensor  # int32 [W, 2]
    split_offsets: torch.Tensor  # int32 [B + 1]
    split_len: torch.Tensor  # int32 [B]


def _default_num_parts(device: torch.device, num_heads: int, s_q: int) -> int:
    if device.type != "cuda":
        return 4
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_tiles = max(1, -(-(num_heads * s_q) // 64))
    return max(1, (2 * sms) // row_tiles)


def mla_decode_plan(
    cache_seqlens: torch.Tensor,
    num_heads: int,
    s_q: int = 1,
    *,
    num_parts: int | None = None,
    split_granule: int = SPLIT_GRANULE,
) -> MLADecodePlan:
    """Split plan of :func:`mla_decode` (flash-decoding), balanced over the batch's total work.

    With ``n_b = ceil(L_b / g)`` granules of ``g = split_granule`` tokens for cache length ``L_b``,
    the work ``N = sum_b n_b + B`` (one granule of overhead per sequence) is cut into about
    ``num_parts`` equal parts: every split holds ``u = max(ceil(N / num_parts), 2)`` granules, so
    sequence ``b`` gets ``max(1, ceil(n_b / u))`` splits of ``ceil(n_b / splits) * g`` tokens. A
    batch of one 32k-token sequence thus fills the GPU, and a batch of many short ones takes one
    split each. Computed with device ops only (no host sync).

    The plan stays correct when the caches grow after it was made (the last split of every
    sequence runs to the sequence's current end), only less balanced: it may be made once outside
    a captured CUDA graph and the graph replayed at later decode steps.

    Args:
        cache_seqlens: int32 ``[B]``, the cache lengths the decode step will see.
        num_heads, s_q: query heads and new tokens per sequence (they set the default
            ``num_parts``: about two programs per SM over all row tiles).
        num_parts: target number of splits for the whole batch (default: device-dependent).
        split_granule: splits are multiples of this many tokens.
    """
    _check_index("cache_seqlens", cache_seqlens, 1, torch.int32)
    for name, value in (("num_heads", num_heads), ("s_q", s_q), ("split_granule", split_granule)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_parts is None:
        num_parts = _default_num_parts(cache_seqlens.device, num_heads, s_q)
    if isinstance(num_parts, bool) or not isinstance(num_parts, int) or num_parts < 1:
        raise ValueError(f"num_parts must be a positive int, got {num_parts!r}")
    batch = cache_seqlens.shape[0]
    lengths = cache_seqlens.long().clamp(min=0)
    granules = (lengths + split_granule - 1) // split_granule
    total = granules.sum() + batch * SEQUENCE_OVERHEAD_GRANULES
    unit = ((total + num_parts - 1) // num_parts).clamp(min=MIN_SPLIT_GRANULES)
    splits = ((granules + unit - 1) // unit).clamp(min=1)
    split_len = ((granules + splits - 1) // splits) * split_granule
    split_offsets = torch.zeros(batch + 1, dtype=torch.long, device=cache_seqlens.device)
    split_offsets[1:] = torch.cumsum(splits, dim=0)
    # sum_b ceil(n_b / u) <= sum_b n_b / u + B <= num_parts + B work items.
    items = torch.arange(num_parts + batch, device=cache_seqlens.device)
    seq = torch.searchsorted(split_offsets[1:], items, right=True)
    split = items - split_offsets[seq.clamp(max=max(batch - 1, 0))] if batch else torch.zeros_like(items)
    live = seq < batch
    work = torch.stack([torch.where(live, seq, -1), torch.where(live, split, 0)], dim=1)
    return MLADecodePlan(work.to(torch.int32), split_offsets.to(torch.int32), split_len.to(torch.int32))


def _decode_groups(lengths: list[int], row_elements: int, budget: int) -> list[list[int]] | None:
    """Batches of sequence indices for :func:`mla_decode_torch`: None when the whole batch, padded
    to its longest cache, fits in ``budget`` float32 elements (``row_elements`` per cached
    position of a sequence); else the non-empty sequences longest first, cut greedily into groups
    that fit (at least one sequence each), so that a group pads its caches to similar lengths."""
    if len(lengths) * max(lengths, default=0) * row_elements <= budget:
        return None
    groups: list[list[int]] = []
    for b in sorted((b for b, n in enumerate(lengths) if n > 0), key=lambda b: -lengths[b]):
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] * row_elements <= budget:
            groups[-1].append(b)
        else:
            groups.append([b])
    return groups


def _decode_padded(q_latent, q_rope, kv_cache, block_table, cache_seqlens, min_len: int, max_len: int,
                   softmax_scale: float):
    """:func:`mla_decode_torch` of a batch whose caches hold ``min_len .. max_len`` tokens
    (``max_len >= 1``): the rows of every sequence gathered into one float32 block ``[B, max_len,
    D_lat + D_rope]``, one batched matmul for the scores and one for the output, positions past
    a cache length masked. Returns float32 ``out [B, s_q, H, D_lat]`` and ``lse [B, s_q, H]``."""
    batch, s_q, num_heads, d_lat = q_latent.shape
    rows_q = s_q * num_heads  # query rows of a sequence, ordered (new token, head)
    num_blocks, page = kv_cache.shape[0], kv_cache.shape[1]
    used_blocks = -(-max_len // page)
    # Table entries past a sequence's last block may hold anything: clamped, they read some
    # block, whose rows are past the cache length like the tail of the last block.
    blocks = block_table[:, :used_blocks].clamp(0, num_blocks - 1).reshape(-1)
    gathered = kv_cache.index_select(0, blocks)
    rows = gathered.view(batch, used_blocks * page, -1)[:, :max_len].float()
    pos = torch.arange(max_len, device=rows.device)
    past_end = pos >= cache_seqlens[:, None]  # [B, max_len]
    # Positions past the end get probability 0, and 0 * x = 0 for every finite x: the rows
    # there (stale, or anything) need zeroing only when some value is NaN or inf, which makes
    # the sum non-finite (a finite sum that overflows merely zeroes them too).
    if not math.isfinite(gathered.sum(dtype=torch.float32).item()):
        rows.masked_fill_(past_end[..., None], 0.0)  # index_select made a copy: the cache is untouched
    # New token i sees the positions j <= L_b - s_q + i, i.e. j - i <= L_b - s_q (j < L_b if s_q = 1).
    if s_q == 1:
        hidden = past_end[:, None, :]
    else:
        offset = pos[None, :] - torch.arange(s_q, device=pos.device)[:, None]  # [s_q, max_len]
        hidden = (offset[None] > (cache_seqlens[:, None, None] - s_q))[:, :, None, :]
        hidden = hidden.expand(batch, s_q, num_heads, max_len).reshape(batch, rows_q, max_len)
    q = torch.cat([q_latent, q_rope], dim=-1).float().view(batch, rows_q, -1)
    s = torch.bmm(q, rows.transpose(1, 2)).mul_(softmax_scale)  # [B, s_q * H, max_len]
    s.masked_fill_(hidden, float("-inf"))  # whatever the scores at hidden positions were
    p = torch.softmax(s, dim=-1)
    # At a row's maximum p = exp(max - lse) >= 1 / max_len does not underflow.
    lse = s.amax(dim=-1).sub_(p.amax(dim=-1).log_())
    if min_len < s_q:  # some queries see no position: their softmax is 0 / 0
        last_visible = cache_seqlens[:, None] - s_q + torch.arange(s_q, device=pos.device)  # [B, s_q]
        blind = (last_visible < 0)[:, :, None].expand(batch, s_q, num_heads).reshape(batch, rows_q)
        p.masked_fill_(blind[..., None], 0.0)
        lse.masked_fill_(blind, float("-inf"))
    out = torch.bmm(p, rows[..., :d_lat])
    return out.view(q_latent.shape), lse.view(batch, s_q, num_heads)


def mla_decode_torch(
    q_latent, q_rope, kv_cache, block_table, cache_seqlens, softmax_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch path of :func:`mla_decode`: float32 math, all sequences of the batch at once (their
    caches padded to the longest); in groups of similar cache lengths when the padded scores or
    rows of the whole batch would exceed ``TORCH_PATH_SCORE_ELEMENTS`` float32 elements."""
    batch, s_q, num_heads, _ = q_latent.shape
    lengths = cache_seqlens.tolist()
    groups = _decode_groups(lengths, max(s_q * num_heads, kv_cache.shape[-1]), TORCH_PATH_SCORE_ELEMENTS)
    if groups is None and max(lengths, default=0) > 0:
        out, lse = _decode_padded(q_latent, q_rope, kv_cache, block_table, cache_seqlens, min(lengths),
                                  max(lengths), softmax_scale)
        return out.to(q_latent.dtype), lse
    out = torch.zeros(q_latent.shape, dtype=q_latent.dtype, device=q_latent.device)
    lse = torch.full((batch, s_q, num_heads), float("-inf"), dtype=torch.float32, device=q_latent.device)
    for group in groups or ():
        idx = torch.tensor(group, device=q_latent.device)
        g_out, g_lse = _decode_padded(q_latent[idx], q_rope[idx], kv_cache, block_table[idx], cache_seqlens[idx],
                                      lengths[group[-1]], lengths[group[0]], softmax_scale)
        out[idx] = g_out.to(out.dtype)
        lse[idx] = g_lse
    return out, lse


def _decode_backend(device: torch.device) -> str:
    available = ("triton", "torch") if triton_available(device) else ("torch",)
    return backend_for("mla_decode", device, available, default="triton" if device.type == "cuda" else "torch")


@torch.library.custom_op("moe_align::mla_decode", mutates_args=())
def _mla_decode(
    q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
    cache_seqlens: torch.Tensor, work: torch.Tensor | None, split_offsets: torch.Tensor | None,
    split_len: torch.Tensor | None, softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    if _decode_backend(q_latent.device) == "triton":
        from moe_align.kernels.mla_decode import mla_decode_triton

        if work is None:
            work, split_offsets, split_len = mla_decode_plan(cache_seqlens, q_latent.shape[2], q_latent.shape[1])
        return mla_decode_triton(
            _unit_last_stride(q_latent), _unit_last_stride(q_rope), kv_cache, block_table,
            cache_seqlens, work, split_offsets, split_len, softmax_scale,
        )
    return mla_decode_torch(q_latent, q_rope, kv_cache, block_table, cache_seqlens, softmax_scale)


@_mla_decode.register_fake
def _(q_latent, q_rope, kv_cache, block_table, cache_seqlens, work, split_offsets, split_len, softmax_scale):
    out = q_latent.new_empty(q_latent.shape)
    return out, q_latent.new_empty(q_latent.shape[:-1], dtype=torch.float32)


run_without_autocast(_mla_decode)


def _check_cache(kv_cache, d_lat: int, d_rope: int) -> None:
    _check_float("kv_cache", kv_cache, 3)
    if kv_cache.shape[-1] != d_lat + d_rope:
        raise ValueError(
            f"kv_cache rows must hold D_lat + D_rope = {d_lat} + {d_rope} = {d_lat + d_rope} values, "
            f"got kv_cache of shape {tuple(kv_cache.shape)}"
        )
    if kv_cache.stride(-1) != 1:
        raise ValueError("kv_cache must have a unit stride along its last dimension")
    if kv_cache.shape[1] < 1:
        raise ValueError(f"kv_cache must have a block size >= 1, got kv_cache of shape {tuple(kv_cache.shape)}")


def mla_decode(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    plan: MLADecodePlan | None = None,
    *,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA decode of ``s_q`` new tokens per sequence over the paged latent cache (weights absorbed).

    The cache row of token ``j`` of sequence ``b`` is ``kv_cache[block_table[b, j // P], j % P]
    = [c_j, r_j]`` (``P = block_size``; ``c_j`` the normalised latent, ``r_j`` the roped key). Its
    ``L_b = cache_seqlens[b]`` tokens include the ``s_q`` new ones (append them first with
    :func:`mla_cache_append`), and new token ``i`` (``0 <= i < s_q``) sees the positions
    ``j <= L_b - s_q + i``. For head ``h``::

        s_j = softmax_scale * (q_latent[b, i, h] . c_j + q_rope[b, i, h] . r_j)
        lse[b, i, h] = log sum_j exp(s_j),    out[b, i, h] = sum_j exp(s_j - lse) c_j

    where ``q_latent = q_nope W_UK`` (per head, ``W_UK = kv_b_proj.weight.view(H, D_nope + D_v,
    D_lat)[:, :D_nope]``) and the attention output is ``out W_UV^T``, applied by the caller.
    A query that sees no position (``L_b = 0``, or ``L_b < s_q - i``) gets ``out = 0`` and
    ``lse = -inf``. Cache rows past ``L_b`` and block-table entries past ``ceil(L_b / P)`` never
    affect the result (they may hold anything, NaN included).

    Args:
        q_latent: ``[B, s_q, H, D_lat]``; q_rope: ``[B, s_q, H, D_rope]``; fp32, fp16 or bf16,
            the dtype of ``kv_cache`` (under ``torch.autocast`` they are cast to it); any strides.
        kv_cache: ``[num_blocks, block_size, D_lat + D_rope]``, unit last stride (any block size).
        block_table: int32 ``[B, max_blocks]``, entries in ``[0, num_blocks)`` where used.
        cache_seqlens: int32 ``[B]``, ``0 <= L_b <= max_blocks * block_size``.
        softmax_scale: the model's softmax scale (``(D_nope + D_rope) ** -0.5`` times YaRN's mscale²).
        plan: from :func:`mla_decode_plan`, used by the Triton kernel (default: computed there,
            without a host sync; the PyTorch path needs none). Reuse one plan for all layers of
            a step.
        validate: check block ids and cache lengths (a host sync; skipped under CUDA graph
            capture and torch.compile).

    Returns:
        ``(out, lse)``: ``out [B, s_q, H, D_lat]`` in the query dtype, ``lse`` float32
        ``[B, s_q, H]``. Not differentiable.

    Backends: the split-KV Triton kernel + combine on CUDA (no host sync: CUDA-graph capturable),
    the PyTorch path on the CPU (float32, every sequence of the batch in one padded block). On
    plain CPU tensors in eager mode the PyTorch path is called directly, without the dispatch of
    ``torch.ops.moe_align.mla_decode`` (same result); compile, tracing, fake tensors and
    autograd go through the op.
    """
    q_latent, q_rope = autocast_inputs(q_latent, q_rope, dtype=getattr(kv_cache, "dtype", None))
    _check_float("q_latent", q_latent, 4)
    _check_float("q_rope", q_rope, 4)
    batch, s_q, num_heads, d_lat = q_latent.shape
    d_rope = q_rope.shape[-1]
    if s_q < 1 or num_heads < 1:
        raise ValueError(f"q_latent must hold s_q >= 1 new tokens of >= 1 heads, got shape {tuple(q_latent.shape)}")
    if q_rope.shape[:3] != (batch, s_q, num_heads):
        raise ValueError(
            f"q_rope must be [{batch}, {s_q}, {num_heads}, D_rope] like q_latent, got {tuple(q_rope.shape)}"
        )
    _check_dim16("q_latent", d_lat)
    _check_dim16("q_rope", d_rope)
    _check_cache(kv_cache, d_lat, d_rope)
    _check_same_dtype(dict(q_latent=q_latent, q_rope=q_rope, kv_cache=kv_cache))
    _check_index("block_table", block_table, 2, torch.int32)
    _check_index("cache_seqlens", cache_seqlens, 1, torch.int32)
    if block_table.shape[0] != batch or cache_seqlens.shape[0] != batch:
        raise ValueError(
            f"block_table {tuple(block_table.shape)} and cache_seqlens {tuple(cache_seqlens.shape)} "
            f"must have one row per sequence (batch {batch})"
        )
    _check_same_device(dict(q_latent=q_latent, q_rope=q_rope, kv_cache=kv_cache, block_table=block_table,
                           cache_seqlens=cache_seqlens))
    if not isinstance(softmax_scale, (int, float)) or not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be a finite float, got {softmax_scale!r}")
    work = split_offsets = split_len = None
    if plan is not None:
        if not isinstance(plan, tuple) or len(plan) != 3:
            raise TypeError("plan must be an MLADecodePlan from mla_decode_plan")
        work, split_offsets, split_len = plan
        _check_index("plan.work", work, 2, torch.int32)
        _check_index("plan.split_offsets", split_offsets, 1, torch.int32)
        _check_index("plan.split_len", split_len, 1, torch.int32)
        if work.shape[1] != 2 or split_offsets.shape[0] != batch + 1 or split_len.shape[0] != batch:
            raise ValueError(f"plan was not made for a batch of {batch} (see mla_decode_plan)")
        _check_same_device(dict(q_latent=q_latent, work=work, split_offsets=split_offsets, split_len=split_len))
        work, split_offsets, split_len = work.contiguous(), split_offsets.contiguous(), split_len.contiguous()
    if validate and _values_checkable(cache_seqlens):
        _check_cache_values(kv_cache, block_table, cache_seqlens)
    if _decode_backend(q_latent.device) == "torch" and plain_eager_cpu(
            q_latent, q_rope, kv_cache, block_table, cache_seqlens):
        return mla_decode_torch(q_latent, q_rope, kv_cache, block_table, cache_seqlens, float(softmax_scale))
    return _mla_decode(
        q_latent, q_rope, kv_cache, _unit_last_stride(block_table), cache_seqlens.contiguous(),
        work, split_offsets, split_len, float(softmax_scale),
    )


def _check_cache_values(kv_cache, block_table, cache_seqlens) -> None:
    num_blocks, page = kv_cache.shape[0], kv_cache.shape[1]
    capacity = block_table.shape[1] * page
    lengths = cache_seqlens.long()
    bad = (lengths < 0) | (lengths > capacity)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"cache_seqlens[{b}]={int(lengths[b])} is outside [0, {capacity}], the capacity of "
            f"{block_table.shape[1]} blocks of {page} tokens in block_table"
        )
    used = torch.arange(block_table.shape[1], device=lengths.device)[None, :] < ((lengths + page - 1) // page)[:, None]
    outside = used & ((block_table < 0) | (block_table >= num_blocks))
    if bool(outside.any()):
        b, j = outside.nonzero()[0].tolist()
        raise ValueError(
            f"block_table[{b}, {j}]={int(block_table[b, j])} points outside the cache of {num_blocks} blocks"
        )


# --------------------------------------------------------------------------------------------
# 3. Cache append
# --------------------------------------------------------------------------------------------


def mla_cache_append_torch(kv_cache, latent, k_rope, slot_mapping) -> None:
    """PyTorch path of :func:`mla_cache_append` (one indexed write of whole rows)."""
    rows = torch.cat([latent, k_rope], dim=-1).to(kv_cache.dtype)
    if slot_mapping.numel() and int(slot_mapping.min()) < 0:  # padding tokens: skipped
        keep = slot_mapping >= 0
        slot_mapping, rows = slot_mapping[keep], rows[keep]
    page = kv_cache.shape[1]
    blocks, offsets = torch.div(slot_mapping, page, rounding_mode="floor"), torch.remainder(slot_mapping, page)
    kv_cache.index_put_((blocks, offsets), rows)


def _append_backend(device: torch.device) -> str:
    if device.type == "cuda":
        available = ("cuda", "triton", "torch") if has_cuda_kernels() else ("triton", "torch")
    else:
        available = ("triton", "torch") if triton_available(device) else ("torch",)
    default = available[0] if device.type == "cuda" else "torch"
    return backend_for("mla_cache_append", device, available, default=default)


@torch.library.custom_op("moe_align::mla_cache_append", mutates_args=("kv_cache",))
def _mla_cache_append(
    kv_cache: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    backend = _append_backend(kv_cache.device)
    latent, k_rope = _unit_last_stride(latent), _unit_last_stride(k_rope)
    if backend == "cuda":
        torch.ops.moe_align.mla_cache_write(kv_cache, latent, k_rope, slot_mapping)
    elif backend == "triton":
        from moe_align.kernels.mla_decode import mla_cache_append_triton

        mla_cache_append_triton(kv_cache, latent, k_rope, slot_mapping)
    else:
        mla_cache_append_torch(kv_cache, latent, k_rope, slot_mapping)


@_mla_cache_append.register_fake
def _(kv_cache, latent, k_rope, slot_mapping):
    return None


run_without_autocast(_mla_cache_append)


def mla_cache_append(
    kv_cache: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    validate: bool = True,
) -> None:
    """Write new tokens into the paged latent cache, in place.

    For every token ``t`` with ``slot = slot_mapping[t] >= 0``::

        kv_cache[slot // P, slot % P] = [latent[t], k_rope[t]]       (P = block_size)

    Tokens with a negative slot (padding, e.g. of a CUDA-graph batch) are skipped. Two tokens
    must not share a slot.

    Args:
        kv_cache: ``[num_blocks, block_size, D_lat + D_rope]``, unit last stride; modified.
        latent: ``[N, D_lat]`` (after ``kv_a_layernorm``); k_rope: ``[N, D_rope]`` (after the
            rotary embedding); the cache's dtype (under ``torch.autocast`` they are cast to it).
        slot_mapping: int64 ``[N]``, ``slot = block_id * block_size + offset``, ``< num_blocks *
            block_size``.
        validate: check the slots' range (a host sync; skipped under graph capture / compile).

    Backends: the CUDA kernel (one program per token, vectorised copies) when the extension has
    CUDA kernels, else Triton, on CUDA tensors; the PyTorch path on the CPU, called directly on
    plain tensors in eager mode (as for :func:`mla_decode`).
    """
    latent, k_rope = autocast_inputs(latent, k_rope, dtype=getattr(kv_cache, "dtype", None))
    _check_float("latent", latent, 2)
    _check_float("k_rope", k_rope, 2)
    num_tokens, d_lat = latent.shape
    d_rope = k_rope.shape[-1]
    if k_rope.shape[0] != num_tokens:
        raise ValueError(f"k_rope must be [{num_tokens}, D_rope] like latent, got {tuple(k_rope.shape)}")
    _check_cache(kv_cache, d_lat, d_rope)
    _check_same_dtype(dict(kv_cache=kv_cache, latent=latent, k_rope=k_rope))
    _check_index("slot_mapping", slot_mapping, 1, torch.int64)
    if slot_mapping.shape[0] != num_tokens:
        raise ValueError(f"slot_mapping must have one slot per token ({num_tokens}), got {slot_mapping.shape[0]}")
    _check_same_device(dict(kv_cache=kv_cache, latent=latent, k_rope=k_rope, slot_mapping=slot_mapping))
    if validate and _values_checkable(slot_mapping) and num_tokens:
        capacity = kv_cache.shape[0] * kv_cache.shape[1]
        top = int(slot_mapping.max())
        if top >= capacity:
            raise ValueError(
                f"slot_mapping holds slot {top}, outside the cache of {kv_cache.shape[0]} blocks x "
                f"{kv_cache.shape[1]} tokens = {capacity} slots"
            )
    if _append_backend(kv_cache.device) == "torch" and plain_eager_cpu(kv_cache, latent, k_rope, slot_mapping):
        mla_cache_append_torch(kv_cache, latent, k_rope, slot_mapping)
        return
    _mla_cache_append(kv_cache, latent, k_rope, slot_mapping.contiguous())
