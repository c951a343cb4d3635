"""Expert load balance: token counts, DeepSeek-V2's and DeepSeek-V3's balance losses, and V3's
auxiliary-loss-free bias update.

Plain differentiable PyTorch (a few reductions over ``[T, E]``); no kernel would pay for itself.
"""

from __future__ import annotations

import torch

__all__ = [
    "expert_token_counts",
    "expert_balance_loss",
    "sequence_balance_loss",
    "update_correction_bias_",
]


def _check_routing(scores: torch.Tensor, topk_ids: torch.Tensor) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must be [tokens, experts], got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be floating point, got {scores.dtype}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != scores.shape[0]:
        raise ValueError(
            f"topk_ids must be [tokens={scores.shape[0]}, top_k], got shape {tuple(topk_ids.shape)}"
        )
    _check_ids(topk_ids, scores.shape[1])


def _check_ids(topk_ids: torch.Tensor, num_experts: int) -> None:
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if topk_ids.numel() and not torch.compiler.is_compiling():
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"topk_ids holds ids in [{lo}, {hi}], outside [0, {num_experts})")


def expert_token_counts(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Routed (token, k) pairs per expert: int64 ``[E]`` from ``topk_ids`` int ``[T, K]``."""
    _check_ids(topk_ids, num_experts)
    return torch.bincount(topk_ids.reshape(-1).long(), minlength=num_experts)


def _load_fraction(topk_ids: torch.Tensor, num_experts: int, group: torch.Tensor, num_groups: int):
    """f[g, i] = N / (K T_g) * #{t in g : t selects i}, as ``[num_groups, E]`` fp32."""
    top_k = topk_ids.shape[1]
    flat = group.repeat_interleave(top_k) * num_experts + topk_ids.reshape(-1).long()
    hits = torch.bincount(flat, minlength=num_groups * num_experts).view(num_groups, num_experts)
    tokens = torch.bincount(group, minlength=num_groups).clamp(min=1).unsqueeze(1)
    return hits.float() * num_experts / (top_k * tokens)


def expert_balance_loss(scores: torch.Tensor, topk_ids: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """DeepSeek-V2's expert-level balance loss over a batch of ``T`` tokens.

    ``L = alpha * sum_i f_i P_i`` with ``f_i = E / (K T) * sum_t 1[token t selects expert i]``
    and ``P_i = 1/T sum_t s_{i,t}``.

    Args:
        scores: ``[T, E]`` routing affinities ``s`` (the gate's softmax scores), differentiable.
        topk_ids: int ``[T, K]``, the experts each token was routed to.
        alpha: the balance factor.

    Returns an fp32 scalar; 0 for ``T = 0``. Gradients flow through ``P`` only.
    """
    _check_routing(scores, topk_ids)
    num_tokens, num_experts = scores.shape
    if num_tokens == 0:
        return scores.float().sum() * 0.0
    group = torch.zeros(num_tokens, dtype=torch.long, device=scores.device)
    f = _load_fraction(topk_ids, num_experts, group, 1)[0]
    p = scores.float().mean(dim=0)
    return alpha * (f * p).sum()


def sequence_balance_loss(
    scores: torch.Tensor, topk_ids: torch.Tensor, cu_seqlens: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss, averaged over the sequences of a packed batch.

    For a sequence of ``T`` tokens: ``L = alpha * sum_i f_i P_i`` with
    ``f_i = E / (K T) * sum_t 1[s_{i,t} in TopK]``, ``s'_{i,t} = s_{i,t} / sum_j s_{j,t}`` and
    ``P_i = 1/T sum_t s'_{i,t}``.

    Args:
        scores: ``[T_total, E]`` affinities ``s`` (the gate's sigmoid scores), differentiable.
        topk_ids: int ``[T_total, K]``, the chosen experts.
        cu_seqlens: int ``[B + 1]``, sequence boundaries in the packed batch (0, ..., T_total).
        alpha: the balance factor.

    Returns an fp32 scalar: the mean over non-empty sequences (0 when there are none).
    """
    _check_routing(scores, topk_ids)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.is_floating_point():
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    if not torch.compiler.is_compiling():
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != scores.shape[0]:
            raise ValueError(f"cu_seqlens must run from 0 to the {scores.shape[0]} tokens")
        if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError("cu_seqlens must be non-decreasing")
    num_tokens, num_experts = scores.shape
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    num_seqs = lengths.numel()
    if num_tokens == 0:
        return scores.float().sum() * 0.0
    seq = torch.repeat_interleave(torch.arange(num_seqs, device=scores.device), lengths)
    f = _load_fraction(topk_ids, num_experts, seq, num_seqs)
    normed = scores.float() / scores.float().sum(dim=1, keepdim=True)
    p = torch.zeros(num_seqs, num_experts, device=scores.device).index_add_(0, seq, normed)
    p = p / lengths.clamp(min=1).unsqueeze(1)
    per_seq = (f * p).sum(dim=1)
    return alpha * per_seq[lengths > 0].mean()


@torch.no_grad()
def update_correction_bias_(bias: torch.Tensor, counts: torch.Tensor, gamma: float) -> torch.Tensor:
    """DeepSeek-V3's auxiliary-loss-free balancing, in place: ``b_i += gamma * sign(mean(load) - load_i)``.

    Call it after each training step with the tokens each expert received over the step
    (e.g. summed :func:`expert_token_counts`): overloaded experts' biases fall and underloaded
    ones rise, steering the gate's choice without a gradient.

    Args:
        bias: fp32 ``[E]``, the gate's ``e_score_correction_bias``; updated in place.
        counts: ``[E]`` tokens routed to each expert.
        gamma: the bias update speed.

    Returns ``bias``.
    """
    if bias.dim() != 1 or counts.shape != bias.shape:
        raise ValueError(f"bias {tuple(bias.shape)} and counts {tuple(counts.shape)} must both be [E]")
    load = counts.to(device=bias.device, dtype=torch.float32)
    bias.add_(torch.sign(load.mean() - load), alpha=gamma)
    return bias
