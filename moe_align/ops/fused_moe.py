"""Routed experts of DeepSeekMoE: the SwiGLU experts of every (token, k) pair, weighted and summed.

:func:`fused_experts` is a differentiable ``torch.library`` op (``moe_align::fused_experts``,
backward ``moe_align::fused_experts_backward``) with two implementations:

- Triton (CUDA default; on CPU tensors under ``TRITON_INTERPRET=1``): grouped GEMMs over the
  expert-sorted layout of :func:`~moe_align.ops.moe_align_block_size.moe_align_block_size`, the
  SwiGLU and the routing weights fused into their epilogues (``moe_align/kernels/fused_moe.py``).
- PyTorch (CPU default): the pairs sorted by expert once, two GEMMs per expert that received
  pairs, weight gradients written straight into one preallocated buffer per weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_align.ops._autocast import autocast_inputs, run_without_autocast
from moe_align.ops._backend import backend_for, plain_eager_cpu, triton_available
from moe_align.ops._memory import new_empty_huge_pages
from moe_align.ops._native import has_cuda_kernels, load_native
from moe_align.ops.moe_align_block_size import max_num_tokens_padded, moe_align_block_size_torch

__all__ = ["fused_experts", "fused_experts_torch", "fused_experts_backward_torch"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The largest layout block size the Triton path uses (kernels/fused_moe.py: block_m_for).
MAX_BLOCK_M = 64
# CPU BLAS computes an expert's ``x @ W^T`` for a few rows 1.5-3x faster as ``W @ x^T`` into a
# [N, rows] buffer (then transposed) than straight into [rows, N]; from ~256 rows on, not.
SMALL_GEMM_ROWS = 128


# --------------------------------------------------------------------------------------------
# PyTorch path
# --------------------------------------------------------------------------------------------


class _ExpertRuns:
    """The (token, k) pairs sorted by expert: ``order`` (flat pair indices, stable), ``token``
    (their tokens), the ``(expert, first, last)`` runs of the experts that received pairs and the
    ``unused_ranges`` of experts that received none."""

    def __init__(self, topk_ids: torch.Tensor, num_experts: int) -> None:
        flat = topk_ids.reshape(-1).long()
        self.order = torch.argsort(flat, stable=True)
        self.token = self.order // topk_ids.shape[1]
        counts = torch.bincount(flat, minlength=num_experts).tolist()
        self.runs, start = [], 0
        for expert, count in enumerate(counts):
            if count:
                self.runs.append((expert, start, start + count))
            start += count
        # The experts without pairs, as maximal ranges [first, last): the gaps between the runs.
        used = [-1, *(expert for expert, _, _ in self.runs), num_experts]
        self.unused_ranges = [(a + 1, b) for a, b in zip(used, used[1:]) if b > a + 1]

    def to_pair_order(self, sorted_rows: torch.Tensor) -> torch.Tensor:
        """Rows in expert order -> rows by flat pair index."""
        out = torch.empty_like(sorted_rows)
        out[self.order] = sorted_rows
        return out

    def sum_over_topk(self, sorted_rows: torch.Tensor, num_tokens: int, dtype: torch.dtype) -> torch.Tensor:
        """``out[t] = sum_k row of pair t*K + k`` (float32 sum, deterministic: no index_add)."""
        rows = self.to_pair_order(sorted_rows)
        return rows.view(num_tokens, -1, rows.shape[-1]).sum(dim=1, dtype=torch.float32).to(dtype)


def _mm_weight_t(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """``out = x @ weight^T`` (an expert's rows through one of its projections)."""
    if x.device.type == "cpu" and 1 < x.shape[0] <= SMALL_GEMM_ROWS:
        out.copy_(torch.mm(weight, x.t()).t())
    else:
        torch.mm(x, weight.t(), out=out)


def _swiglu(gu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 ``(g, u, sigmoid(g), silu(g))`` of pre-activations ``[..., 2I]``."""
    g, u = gu.float().chunk(2, dim=-1)
    sig = torch.sigmoid(g)
    return g, u, sig, g * sig


def fused_experts_torch(
    hidden_states: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    save_gate_up: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch path of :func:`fused_experts`: ``(out, gu)`` as the op returns them."""
    num_tokens, hidden = hidden_states.shape
    num_experts, two_inter, _ = gate_up_proj.shape
    num_pairs = topk_ids.numel()
    dtype = hidden_states.dtype
    gu_saved = hidden_states.new_empty((num_pairs if save_gate_up else 0, two_inter))
    if num_tokens == 0:
        return hidden_states.new_zeros((0, hidden)), gu_saved
    runs = _ExpertRuns(topk_ids, num_experts)
    x = hidden_states.index_select(0, runs.token)
    gu = hidden_states.new_empty((num_pairs, two_inter))
    for e, a, b in runs.runs:
        _mm_weight_t(x[a:b], gate_up_proj[e], gu[a:b])
    g, u = gu.chunk(2, dim=-1)
    act = F.silu(g.float()).mul_(u).to(dtype) if dtype != torch.float32 else F.silu(g) * u
    y = hidden_states.new_empty((num_pairs, hidden))
    for e, a, b in runs.runs:
        _mm_weight_t(act[a:b], down_proj[e], y[a:b])
    weights = topk_weights.reshape(-1)[runs.order].float().unsqueeze(1)
    y = y * weights if dtype == torch.float32 else y.float() * weights
    out = runs.sum_over_topk(y, num_tokens, dtype)
    if save_gate_up:
        gu_saved[runs.order] = gu
    return out, gu_saved


def fused_experts_backward_torch(
    grad_out: torch.Tensor,
    hidden_states: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    gu: torch.Tensor,
    needs: tuple[bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """PyTorch path of the backward: ``(d hidden_states, d gate_up_proj, d down_proj,
    d topk_weights)``, None where ``needs`` says so."""
    need_x, need_gate_up, need_down, need_weights = needs
    num_tokens, hidden = hidden_states.shape
    num_experts, two_inter, _ = gate_up_proj.shape
    inter = two_inter // 2
    num_pairs = topk_ids.numel()
    dtype = hidden_states.dtype
    new = hidden_states.new_empty
    dx = new((num_tokens, hidden)) if need_x else None
    # The weight gradients are written in full right away (zeros for experts without pairs).
    dgate_up = new_empty_huge_pages(hidden_states, (num_experts, two_inter, hidden)) if need_gate_up else None
    ddown = new_empty_huge_pages(hidden_states, (num_experts, hidden, inter)) if need_down else None
    dweights = topk_weights.new_empty(topk_weights.shape) if need_weights else None
    runs = _ExpertRuns(topk_ids, num_experts)
    # Experts without pairs get exact zeros; the others are overwritten below.
    for grad in (dgate_up, ddown):
        for first, last in runs.unused_ranges if grad is not None else ():
            grad[first:last].zero_()
    if num_tokens == 0:
        for grad in (dx, dweights):
            if grad is not None:
                grad.zero_()
        return dx, dgate_up, ddown, dweights

    dy = grad_out.to(dtype).index_select(0, runs.token)
    g, u, sig, silu = _swiglu(gu.index_select(0, runs.order))
    act = silu * u
    weights = topk_weights.reshape(-1)[runs.order].float().unsqueeze(1)

    if need_down:
        dy_weighted = (dy.float() * weights).to(dtype)
        act_op = act.to(dtype)
        for e, a, b in runs.runs:
            torch.mm(dy_weighted[a:b].t(), act_op[a:b], out=ddown[e])
    if not (need_x or need_gate_up or need_weights):
        return dx, dgate_up, ddown, dweights

    z = new((num_pairs, inter))
    for e, a, b in runs.runs:
        torch.mm(dy[a:b], down_proj[e], out=z[a:b])
    z = z.float()
    if need_weights:
        dw = runs.to_pair_order((z * act).sum(dim=1))
        dweights.copy_(dw.view(dweights.shape))
    dact = z.mul_(weights)
    dgu = new((num_pairs, two_inter))
    dgu[:, :inter].copy_(dact * u * sig * (1 + g * (1 - sig)))  # silu'(g) = s (1 + g (1 - s))
    dgu[:, inter:].copy_(dact.mul_(silu))
    if need_gate_up:
        x = hidden_states.index_select(0, runs.token)
        for e, a, b in runs.runs:
            torch.mm(dgu[a:b].t(), x[a:b], out=dgate_up[e])
    if need_x:
        dx_pairs = new((num_pairs, hidden))
        for e, a, b in runs.runs:
            torch.mm(dgu[a:b], gate_up_proj[e], out=dx_pairs[a:b])
        dx.copy_(runs.sum_over_topk(dx_pairs, num_tokens, dtype))
    return dx, dgate_up, ddown, dweights


# --------------------------------------------------------------------------------------------
# Triton path
# --------------------------------------------------------------------------------------------


def _expert_layout(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """moe_align_block_size's layout. The ids were validated by fused_experts, so the native
    kernel is called directly (no second range check and host sync); the PyTorch path serves
    where the extension has no kernel for the device."""
    ids = topk_ids.to(torch.int32).contiguous()
    if ids.device.type == "cpu" or (ids.is_cuda and has_cuda_kernels()):
        return torch.ops.moe_align.moe_align_block_size(ids, num_experts, block_m)
    return moe_align_block_size_torch(ids, num_experts, block_m)


def _triton_forward(hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids, save_gate_up):
    from moe_align.kernels.fused_moe import block_m_for, fused_experts_forward

    num_experts = gate_up_proj.shape[0]
    block_m = block_m_for(topk_ids.numel(), num_experts)
    layout = _expert_layout(topk_ids, num_experts, block_m)
    weights = topk_weights.reshape(-1).float().contiguous()
    return fused_experts_forward(hidden_states, gate_up_proj, down_proj, weights, topk_ids.shape[1],
                                 *layout, block_m=block_m, save_gate_up=save_gate_up)


def _triton_backward(grad_out, hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids, gu, needs):
    from moe_align.kernels.fused_moe import block_m_for, fused_experts_backward

    num_experts = gate_up_proj.shape[0]
    block_m = block_m_for(topk_ids.numel(), num_experts)
    layout = _expert_layout(topk_ids, num_experts, block_m)
    weights = topk_weights.reshape(-1).float().contiguous()
    dx, dgate_up, ddown, dweights = fused_experts_backward(
        grad_out.to(hidden_states.dtype), hidden_states, gate_up_proj, down_proj, weights,
        topk_ids.shape[1], gu, *layout, block_m=block_m, needs=needs,
    )
    if dweights is not None:
        dweights = dweights.view(topk_weights.shape).to(topk_weights.dtype)
    return dx, dgate_up, ddown, dweights


# --------------------------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------------------------


def _backend(device: torch.device) -> str:
    available = ("triton", "torch") if triton_available(device) else ("torch",)
    return backend_for("fused_experts", device, available,
                       default="triton" if device.type == "cuda" else "torch")


@torch.library.custom_op("moe_align::fused_experts", mutates_args=())
def _fused_experts(
    hidden_states: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    save_gate_up: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids, save_gate_up)
    if _backend(hidden_states.device) == "triton":
        return _triton_forward(*args)
    return fused_experts_torch(*args)


@_fused_experts.register_fake
def _(hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids, save_gate_up):
    num_pairs = topk_ids.shape[0] * topk_ids.shape[1] if save_gate_up else 0
    return (hidden_states.new_empty(hidden_states.shape),
            hidden_states.new_empty((num_pairs, gate_up_proj.shape[1])))


@torch.library.custom_op("moe_align::fused_experts_backward", mutates_args=())
def _fused_experts_backward(
    grad_out: torch.Tensor,
    hidden_states: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    gu: torch.Tensor,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four gradients; one that ``needs`` leaves out is an empty ``[0]`` tensor."""
    args = (grad_out, hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids, gu, tuple(needs))
    if _backend(hidden_states.device) == "triton":
        grads = _triton_backward(*args)
    else:
        grads = fused_experts_backward_torch(*args)
    return tuple(hidden_states.new_empty(0) if g is None else g for g in grads)


@_fused_experts_backward.register_fake
def _(grad_out, hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids, gu, needs):
    shapes = (hidden_states.shape, gate_up_proj.shape, down_proj.shape, topk_weights.shape)
    likes = (hidden_states, hidden_states, hidden_states, topk_weights)
    return tuple(like.new_empty(shape if need else (0,)) for like, shape, need in zip(likes, shapes, needs))


def _setup_context(ctx, inputs, output):
    hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids, _ = inputs
    _, gu = output
    ctx.mark_non_differentiable(gu)
    ctx.save_for_backward(hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids, gu)


def _backward(ctx, grad_out, _grad_gu):
    hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids, gu = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:4])
    if grad_out is None or not any(needs):
        return None, None, None, None, None, None
    grads = _fused_experts_backward(grad_out, hidden_states, gate_up_proj, down_proj, topk_weights,
                                    topk_ids, gu, needs)
    return *(g if need else None for g, need in zip(grads, needs)), None, None


_fused_experts.register_autograd(_backward, setup_context=_setup_context)
run_without_autocast(_fused_experts, _fused_experts_backward)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _check(hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids) -> None:
    named = dict(hidden_states=hidden_states, gate_up_proj=gate_up_proj, down_proj=down_proj,
                 topk_weights=topk_weights, topk_ids=topk_ids)
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    for name in ("hidden_states", "gate_up_proj", "down_proj"):
        if named[name].dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be fp32, fp16 or bf16, got {named[name].dtype}")
    for name in ("gate_up_proj", "down_proj"):
        if named[name].dtype != hidden_states.dtype:
            raise TypeError(f"{name} is {named[name].dtype} but hidden_states is {hidden_states.dtype}")
    if not topk_weights.dtype.is_floating_point:
        raise TypeError(f"topk_weights must be a floating-point tensor, got {topk_weights.dtype}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    for name, t in named.items():
        if t.device != hidden_states.device:
            raise ValueError(f"{name} is on {t.device} but hidden_states is on {hidden_states.device}")

    if hidden_states.dim() != 2:
        raise ValueError(f"hidden_states must be [T, H], got shape {tuple(hidden_states.shape)}")
    num_tokens, hidden = hidden_states.shape
    if gate_up_proj.dim() != 3 or gate_up_proj.shape[2] != hidden or gate_up_proj.shape[1] % 2:
        raise ValueError(
            f"gate_up_proj must be [E, 2I, H={hidden}] with an even second dimension, "
            f"got shape {tuple(gate_up_proj.shape)}"
        )
    num_experts, two_inter, _ = gate_up_proj.shape
    if num_experts < 1 or two_inter < 2 or hidden < 1:
        raise ValueError(f"gate_up_proj must have E >= 1, I >= 1 and H >= 1, got shape {tuple(gate_up_proj.shape)}")
    if down_proj.shape != (num_experts, hidden, two_inter // 2):
        raise ValueError(
            f"down_proj must be [E={num_experts}, H={hidden}, I={two_inter // 2}], got shape {tuple(down_proj.shape)}"
        )
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens or topk_ids.shape[1] < 1:
        raise ValueError(f"topk_ids must be [T={num_tokens}, K] with K >= 1, got shape {tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_weights must have topk_ids' shape {tuple(topk_ids.shape)}, got {tuple(topk_weights.shape)}"
        )
    if max_num_tokens_padded(topk_ids.numel(), num_experts, MAX_BLOCK_M) >= 2**31:
        raise ValueError(f"topk_ids has {topk_ids.numel()} entries; the int32 expert layout holds < 2**31")
    if topk_ids.numel() > 0 and not torch.compiler.is_compiling() and not (
        topk_ids.is_cuda and torch.cuda.is_current_stream_capturing()
    ):
        lo, hi = torch.aminmax(topk_ids)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= num_experts:
            raise ValueError(
                f"topk_ids holds expert ids in [{lo}, {hi}], outside [0, num_experts={num_experts})"
            )


def fused_experts(
    hidden_states: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """The routed experts of DeepSeekMoE: SwiGLU experts per (token, k), weighted and summed.

    For token ``t`` and each of its ``K`` experts ``e = topk_ids[t, k]``::

        [g; u] = gate_up_proj[e] @ hidden_states[t]        (g: the first I rows, u: the last I)
        out[t] = sum_k topk_weights[t, k] * down_proj[e] @ (silu(g) * u)

    (transformers' ``DeepseekV3Experts`` layout: ``gate, up = linear(x, gate_up_proj[e]).chunk(2, -1)``).

    Args:
        hidden_states: ``[T, H]`` fp32, fp16 or bf16.
        gate_up_proj: ``[E, 2I, H]``, the dtype of ``hidden_states``.
        down_proj: ``[E, H, I]``, the dtype of ``hidden_states``.
        topk_weights: ``[T, K]`` any float dtype (used in float32).
        topk_ids: ``[T, K]`` int32 or int64, expert ids in ``[0, E)``; ``K >= 1``.
        All on one device, any strides; nothing is modified. Under ``torch.autocast``,
        ``hidden_states``, ``gate_up_proj`` and ``down_proj`` are cast to the autocast dtype (as
        for a linear).

    Returns:
        ``[T, H]`` in the dtype of ``hidden_states``; float32 accumulation. Differentiable with
        respect to ``hidden_states``, ``gate_up_proj``, ``down_proj`` and ``topk_weights``
        (experts that receive no token get exact zero gradients).

    Backends: Triton on CUDA (grouped GEMMs over the expert-sorted layout, SwiGLU and routing
    weights fused, deterministic: no atomics); the PyTorch path on the CPU (experts without
    tokens skipped, weight gradients written in place); ``MOE_ALIGN_BACKEND=torch|triton``
    forces one (Triton on CPU tensors needs ``TRITON_INTERPRET=1``). The range check of
    ``topk_ids`` reads it on the host; it is skipped under torch.compile and graph capture. On
    plain CPU tensors in eager mode without autograd the PyTorch path is called without the
    dispatch of ``torch.ops.moe_align.fused_experts`` (same result).
    """
    hidden_states, gate_up_proj, down_proj = autocast_inputs(hidden_states, gate_up_proj, down_proj)
    _check(hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids)
    save_gate_up = torch.is_grad_enabled() and any(
        t.requires_grad for t in (hidden_states, gate_up_proj, down_proj, topk_weights)
    )
    args = (hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids, save_gate_up)
    if _backend(hidden_states.device) == "torch" and plain_eager_cpu(*args[:5]):
        return fused_experts_torch(*args)[0]
    return _fused_experts(*args)[0]


load_native()
