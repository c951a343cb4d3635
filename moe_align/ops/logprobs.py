"""Fused LM head + log-softmax gather: per-token log-probs (and entropy) without [N, V] logits.

The policy-gradient step of GRPO, SFT's cross-entropy and DPO's sequence log-probs all need
``log softmax(h W^T / T)[target]`` for every response token; with DeepSeek's vocabularies
(102400, 129280) the logits would dominate training memory. Here they only ever exist one tile
(Triton) or one chunk (PyTorch) at a time, in the forward and in the backward.
"""

from __future__ import annotations

import math
import numbers

import torch

from moe_align.ops._autocast import autocast_inputs, run_without_autocast
from moe_align.ops._backend import backend_for, triton_available
from moe_align.ops._memory import new_empty_huge_pages

__all__ = ["linear_logprobs"]

# Tokens per chunk of the PyTorch forward; the backward of both paths keeps its dz buffer within
# DEFAULT_CHUNK_SIZE x vocab elements.
DEFAULT_CHUNK_SIZE = 512
# CPU GEMMs take another code path below 16 rows (each row's rounding then depends on the batch):
# the PyTorch forward pads its chunks to at least this many rows.
MIN_GEMM_ROWS = 16
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _valid_rows(targets: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """Indices of the tokens to compute (None: all of them), after checking their range."""
    valid = targets != ignore_index
    rows = valid.nonzero().squeeze(1)
    return None if rows.numel() == targets.numel() else rows


def _check_target_range(targets: torch.Tensor, ignore_index: int, vocab: int) -> None:
    # Runs inside the op (a data-dependent check would break torch.compile's graph outside it).
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        first = int(targets[bad][0])
        raise ValueError(
            f"targets must be in [0, {vocab}) or equal ignore_index={ignore_index}; found {first}"
        )


def _backend(device: torch.device) -> str:
    available = ("triton", "torch") if triton_available(device) else ("torch",)
    return backend_for("linear_logprobs", device, available, default="triton" if device.type == "cuda" else "torch")


# ---- PyTorch path --------------------------------------------------------------------------------


def linear_logprobs_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    return_entropy: bool,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch path of the forward, in float32: ``chunk_size`` tokens at a time, each chunk's
    logits ``[chunk, V]`` reduced over the whole vocabulary at once (so a token's result does not
    depend on the chunking). Returns (logp, entropy or [0], lse), float32."""
    num_tokens = hidden.shape[0]
    logp = hidden.new_zeros(num_tokens, dtype=torch.float32)
    lse = torch.zeros_like(logp)
    entropy = hidden.new_zeros(num_tokens if return_entropy else 0, dtype=torch.float32)
    rows = _valid_rows(targets, ignore_index)
    rows = torch.arange(num_tokens, device=hidden.device) if rows is None else rows
    if rows.numel() == 0:
        return logp, entropy, lse
    weight32 = weight.float()
    inv_temp = 1.0 / temperature
    # One logits buffer for all chunks (fresh large allocations would page-fault every chunk).
    buffer = new_empty_huge_pages(hidden, (max(MIN_GEMM_ROWS, min(chunk_size, rows.numel())), weight.shape[0]),
                                  dtype=torch.float32)
    for start in range(0, rows.numel(), chunk_size):
        idx = rows[start:start + chunk_size]
        n = idx.numel()
        h = hidden[idx].float()
        if n < MIN_GEMM_ROWS:
            h = torch.cat([h, h.new_zeros(MIN_GEMM_ROWS - n, h.shape[1])])
        z = torch.mm(h, weight32.T, out=buffer[: h.shape[0]])[:n]
        if inv_temp != 1.0:
            z.mul_(inv_temp)
        z_target = z.gather(1, targets[idx].long().unsqueeze(1)).squeeze(1)
        z_max = z.amax(dim=-1, keepdim=True)
        z.sub_(z_max)  # z - max
        if return_entropy:
            p = z.exp()
            total = p.sum(dim=-1)
            # H = log s - sum_v exp(z_v - m)(z_v - m) / s,  s = sum_v exp(z_v - m)
            entropy[idx] = total.log() - (p.mul_(z)).sum(dim=-1) / total
        else:
            total = z.exp_().sum(dim=-1)
        chunk_lse = z_max.squeeze(1) + total.log()
        lse[idx] = chunk_lse
        logp[idx] = z_target - chunk_lse
    return logp, entropy, lse


def linear_logprobs_backward_torch(
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
    ignore_index: int,
    budget_elems: int,
    need_hidden: bool,
    need_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch path of the backward, in float32, vocabulary chunk by chunk (the kernel's plan):
    ``dz[:, chunk]`` from recomputed logits, ``dW[chunk] = dz^T H``, ``dH += dz W[chunk]``."""
    num_tokens, hidden_size = hidden.shape
    vocab = weight.shape[0]
    grad_hidden = torch.zeros_like(hidden) if need_hidden else hidden.new_empty(0)
    grad_weight = new_empty_huge_pages(weight, weight.shape) if need_weight else weight.new_empty(0)
    rows = _valid_rows(targets, ignore_index)
    rows = torch.arange(num_tokens, device=hidden.device) if rows is None else rows
    num_valid = rows.numel()
    if num_valid == 0 or not (need_hidden or need_weight):
        return grad_hidden, grad_weight.zero_()
    h = hidden[rows].float()
    g = grad_logp[rows].float().unsqueeze(1)
    lse_v = lse[rows].unsqueeze(1)
    tgt = targets[rows].long()
    use_entropy = grad_entropy is not None and entropy.numel() > 0
    if use_entropy:
        g_ent = grad_entropy[rows].float().unsqueeze(1)
        ent = entropy[rows].unsqueeze(1)
    inv_temp = 1.0 / temperature
    grad_h = torch.zeros(num_valid, hidden_size, device=hidden.device, dtype=torch.float32) if need_hidden else None
    cols = min(vocab, max(1, budget_elems // num_valid))
    buffer = new_empty_huge_pages(hidden, (num_valid * cols,), dtype=torch.float32)  # reused by every chunk
    token = torch.arange(num_valid, device=hidden.device)
    direct_dw = need_weight and weight.dtype == torch.float32
    for start in range(0, vocab, cols):
        w = weight[start:start + cols].float()
        logp_all = torch.mm(h, w.T, out=buffer[: num_valid * w.shape[0]].view(num_valid, w.shape[0]))
        if inv_temp != 1.0:
            logp_all.mul_(inv_temp)
        logp_all.sub_(lse_v)
        if use_entropy:
            # d ent / d z_v = -p_v (log p_v + ent)
            scale = g + g_ent * (logp_all + ent)
            dz = logp_all.exp_().mul_(scale).neg_()
        else:
            dz = logp_all.exp_().mul_(g).neg_()
        here = (tgt >= start) & (tgt < start + w.shape[0])
        dz[token[here], tgt[here] - start] += g[here, 0]
        if inv_temp != 1.0:
            dz.mul_(inv_temp)
        if direct_dw:
            torch.mm(dz.T, h, out=grad_weight[start:start + w.shape[0]])
        elif need_weight:
            grad_weight[start:start + w.shape[0]] = (dz.T @ h).to(weight.dtype)
        if need_hidden:
            grad_h.addmm_(dz, w)
    if need_hidden:
        grad_hidden[rows] = grad_h.to(hidden.dtype)
    return grad_hidden, grad_weight


# ---- the ops ---------------------------------------------------------------------------------------


@torch.library.custom_op("moe_align::linear_logprobs", mutates_args=())
def _linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    return_entropy: bool,
    fp32_head: bool,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_target_range(targets, ignore_index, weight.shape[0])
    if _backend(hidden.device) == "triton":
        from moe_align.kernels.linear_logprobs import logprobs_forward

        rows = _valid_rows(targets, ignore_index)
        return logprobs_forward(hidden, weight, targets, rows, temperature, return_entropy, fp32_head)
    return linear_logprobs_torch(hidden, weight, targets, temperature, ignore_index, return_entropy, chunk_size)


@_linear_logprobs.register_fake
def _(hidden, weight, targets, temperature, ignore_index, return_entropy, fp32_head, chunk_size):
    n = hidden.shape[0]
    logp = hidden.new_empty(n, dtype=torch.float32)
    return logp, hidden.new_empty(n if return_entropy else 0, dtype=torch.float32), torch.empty_like(logp)


@torch.library.custom_op("moe_align::linear_logprobs_backward", mutates_args=())
def _linear_logprobs_backward(
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
    ignore_index: int,
    fp32_head: bool,
    chunk_size: int,
    need_hidden: bool,
    need_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    budget = chunk_size * weight.shape[0]
    if _backend(hidden.device) == "triton":
        from moe_align.kernels.linear_logprobs import logprobs_backward

        rows = _valid_rows(targets, ignore_index)
        return logprobs_backward(
            grad_logp, grad_entropy, hidden, weight, targets, rows, lse, entropy, temperature,
            fp32_head, budget, need_hidden, need_weight,
        )
    return linear_logprobs_backward_torch(
        grad_logp, grad_entropy, hidden, weight, targets, lse, entropy, temperature, ignore_index,
        budget, need_hidden, need_weight,
    )


@_linear_logprobs_backward.register_fake
def _(grad_logp, grad_entropy, hidden, weight, targets, lse, entropy, temperature, ignore_index,
      fp32_head, chunk_size, need_hidden, need_weight):
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, temperature, ignore_index, return_entropy, fp32_head, chunk_size = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, targets, lse, entropy)
    ctx.args = (temperature, ignore_index, fp32_head, chunk_size)
    ctx.return_entropy = return_entropy


def _backward(ctx, grad_logp, grad_entropy, grad_lse):
    hidden, weight, targets, lse, entropy = ctx.saved_tensors
    temperature, ignore_index, fp32_head, chunk_size = ctx.args
    need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    grad_entropy = grad_entropy.float().contiguous() if ctx.return_entropy and grad_entropy is not None else None
    grad_hidden, grad_weight = _linear_logprobs_backward(
        grad_logp.float().contiguous(), grad_entropy, hidden, weight, targets, lse, entropy,
        temperature, ignore_index, fp32_head, chunk_size, need_hidden, need_weight,
    )
    return (grad_hidden if need_hidden else None, grad_weight if need_weight else None,
            None, None, None, None, None, None)


_linear_logprobs.register_autograd(_backward, setup_context=_setup_context)
run_without_autocast(_linear_logprobs, _linear_logprobs_backward)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    fp32_head: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target token under the LM head, without materialising the logits.

    For each token ``n`` with hidden state ``h_n`` and target ``t_n``::

        z_n     = W h_n / temperature                     ([V] logits, never stored whole)
        logp_n  = z_n[t_n] - log sum_v exp(z_nv)          (log softmax(z_n)[t_n])
        ent_n   = -sum_v p_nv log p_nv,   p_n = softmax(z_n)   (return_entropy=True)

    and ``logp_n = ent_n = 0`` with no gradient where ``t_n == ignore_index``; those tokens are
    skipped (they cost no compute).

    Args:
        hidden: ``[..., H]`` fp32, bf16 or fp16 (e.g. the last hidden states).
        weight: ``[V, H]``, the LM head (``lm_head.weight``), same dtype and device as ``hidden``.
        targets: ``[...]`` int64 or int32, values in ``[0, V)`` or ``ignore_index``.
        temperature: divides the logits (sampling temperature), ``> 0``.
        ignore_index: target value of tokens to skip.
        return_entropy: also return the entropy of each token's distribution.
        fp32_head: compute the head in float32 even for bf16/fp16 inputs (the logits are always
            accumulated and reduced in float32). Under autocast, ``hidden`` and ``weight`` are
            then cast to float32 rather than to the autocast dtype.
        chunk_size: tokens per chunk of the PyTorch path (default 512); the backward of both
            paths keeps its one vocabulary-wide buffer within ``chunk_size x V`` elements.

    Returns:
        ``logp`` float32 of the shape of ``targets``, or ``(logp, entropy)``. Differentiable with
        respect to ``hidden`` and ``weight`` (through both outputs). The backward recomputes the
        logits tile by tile (so forward+backward costs four N x H x V GEMMs where the unfused path
        costs three, in exchange for memory that does not grow with N x V) and is deterministic.

    A token's result does not depend on the other tokens of the batch, nor on ``chunk_size``: the
    Triton kernel reduces each token over fixed vocabulary splits and tiles, the PyTorch path over
    the whole vocabulary row.

    Under ``torch.autocast``, ``hidden`` and ``weight`` are cast to the autocast dtype, as for an
    LM-head linear (so an fp32 ``lm_head.weight`` may be passed with bf16 hidden states).

    Backends: the Triton kernels on CUDA tensors (and on CPU tensors under ``TRITON_INTERPRET=1``
    with ``MOE_ALIGN_BACKEND=triton``), the chunked PyTorch path (float32) on the CPU.
    """
    hidden, weight = autocast_inputs(hidden, weight, dtype=torch.float32 if fp32_head else None)
    if not isinstance(hidden, torch.Tensor) or hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be an fp32, bf16 or fp16 tensor, got {getattr(hidden, 'dtype', type(hidden))}")
    if hidden.dim() < 1 or hidden.shape[-1] == 0:
        raise ValueError(f"hidden must be [..., H] with H > 0, got {tuple(hidden.shape)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a [V, H] tensor, got {getattr(weight, 'shape', type(weight))}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(
            f"weight must be [V, H={hidden.shape[-1]}] with V > 0, got {tuple(weight.shape)}"
        )
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be an int64 or int32 tensor, got {getattr(targets, 'dtype', type(targets))}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets must have shape {tuple(hidden.shape[:-1])} (hidden without its last dim), "
            f"got {tuple(targets.shape)}"
        )
    if weight.device != hidden.device or targets.device != hidden.device:
        raise ValueError(
            f"hidden ({hidden.device}), weight ({weight.device}) and targets ({targets.device}) "
            "must be on one device"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    lead = targets.shape
    logp, entropy, _ = _linear_logprobs(
        hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight.contiguous(), targets.reshape(-1).contiguous(),
        temperature, ignore_index, bool(return_entropy), bool(fp32_head), chunk_size,
    )
    if return_entropy:
        return logp.view(lead), entropy.view(lead)
    return logp.view(lead)
