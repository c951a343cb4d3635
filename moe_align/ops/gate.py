"""DeepSeek router gate: scores, group-limited expert choice, top-k and routing weights.

One op covers DeepSeekMoE / DeepSeek-V2 (softmax scores, greedy or group-limited greedy choice)
and DeepSeek-V3 (sigmoid scores, an ``e_score_correction_bias`` used only for choosing, groups
ranked by the sum of their two best experts, normalised weights).
"""

from __future__ import annotations

import torch

from moe_align.ops._autocast import run_without_autocast
from moe_align.ops._backend import backend_for, plain_eager_cpu
from moe_align.ops._native import has_cuda_kernels

__all__ = ["grouped_topk"]

SCORING_FUNCS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2_sum")
# The weights are normalised as in DeepSeek's and transformers' code: w / (sum(w) + 1e-20).
RENORM_EPS = 1e-20
# Limits of the fused CUDA kernel (csrc/moe/moe_kernels.cuh); outside them the PyTorch path runs.
CUDA_MAX_EXPERTS = 512
CUDA_MAX_GROUPS = 32
CUDA_MAX_TOP_K = 32


def grouped_topk_torch(
    logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    use_sigmoid: bool,
    group_by_top2_sum: bool,
    renormalize: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch path of :func:`grouped_topk`: arguments as in the op, already validated."""
    num_tokens, num_experts = logits.shape
    scores = logits.float().sigmoid() if use_sigmoid else logits.float().softmax(dim=-1)
    choice = scores if correction_bias is None else scores + correction_bias
    if n_group > 1:
        grouped = choice.view(num_tokens, n_group, num_experts // n_group)
        if group_by_top2_sum:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.amax(dim=-1)
        kept = group_scores.topk(topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(num_tokens, num_experts)
    topk_ids = choice.topk(top_k, dim=-1, sorted=True).indices
    weights = scores.gather(1, topk_ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + RENORM_EPS)
    return weights * routed_scaling_factor, topk_ids.to(torch.int32)


def _cuda_kernel_fits(num_experts: int, n_group: int, top_k: int) -> bool:
    return num_experts <= CUDA_MAX_EXPERTS and n_group <= CUDA_MAX_GROUPS and top_k <= CUDA_MAX_TOP_K


@torch.library.custom_op("moe_align::grouped_topk", mutates_args=())
def _grouped_topk(
    logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    use_sigmoid: bool,
    group_by_top2_sum: bool,
    renormalize: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (top_k, n_group, topk_group, use_sigmoid, group_by_top2_sum, renormalize, routed_scaling_factor)
    if _backend(logits, n_group, top_k) == "cuda":
        return torch.ops.moe_align.fused_gate(logits.contiguous(), correction_bias, *args)
    return grouped_topk_torch(logits, correction_bias, *args)


def _backend(logits: torch.Tensor, n_group: int, top_k: int) -> str:
    fits = logits.is_cuda and has_cuda_kernels() and _cuda_kernel_fits(logits.shape[1], n_group, top_k)
    available = ("cuda", "torch") if fits else ("torch",)
    return backend_for("grouped_topk", logits.device, available, default=available[0])


@_grouped_topk.register_fake
def _(logits, correction_bias, top_k, n_group, topk_group, use_sigmoid, group_by_top2_sum,
      renormalize, routed_scaling_factor):
    shape = (logits.shape[0], top_k)
    return logits.new_empty(shape, dtype=torch.float32), logits.new_empty(shape, dtype=torch.int32)


def _setup_context(ctx, inputs, output):
    logits, _, _, _, _, use_sigmoid, _, renormalize, routed_scaling_factor = inputs
    weights, topk_ids = output
    ctx.save_for_backward(logits, weights, topk_ids)
    ctx.use_sigmoid, ctx.renormalize, ctx.scale = use_sigmoid, renormalize, routed_scaling_factor


def _backward(ctx, grad_weights, grad_ids):
    """d loss / d logits through w_k = c * s[id_k] (/ (sum_j s[id_j] + eps) when renormalised)."""
    logits, weights, topk_ids = ctx.saved_tensors
    scores = logits.float().sigmoid() if ctx.use_sigmoid else logits.float().softmax(dim=-1)
    ids = topk_ids.long()
    grad = grad_weights.float() * ctx.scale
    if ctx.renormalize:
        raw = scores.gather(1, ids)
        total = raw.sum(dim=-1, keepdim=True) + RENORM_EPS
        # d(c r_k / S) / d r_m = c (delta_km - r_k / S) / S
        grad = (grad - (grad * raw).sum(dim=-1, keepdim=True) / total) / total
    grad_scores = torch.zeros_like(scores).scatter_add_(1, ids, grad)
    if ctx.use_sigmoid:
        grad_logits = grad_scores * scores * (1 - scores)
    else:
        grad_logits = scores * (grad_scores - (grad_scores * scores).sum(dim=-1, keepdim=True))
    return grad_logits.to(logits.dtype), None, None, None, None, None, None, None, None


_grouped_topk.register_autograd(_backward, setup_context=_setup_context)
run_without_autocast(_grouped_topk)


def grouped_topk(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    n_group: int = 1,
    topk_group: int | None = None,
    scoring_func: str = "softmax",
    correction_bias: torch.Tensor | None = None,
    group_score: str | None = None,
    renormalize: bool = False,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route each token to ``top_k`` experts as DeepSeek's gate does.

    For each token with router logits ``l`` (``[E]``)::

        s = softmax(l)            (scoring_func="softmax": DeepSeekMoE, DeepSeek-V2)
          | sigmoid(l)            (scoring_func="sigmoid": DeepSeek-V3)
        c = s + correction_bias   (selection scores; the bias only steers the choice)
        groups: E experts in n_group consecutive groups; a group scores max(c) ("max", V2) or the
                sum of its two largest c ("top2_sum", V3); experts outside the topk_group best
                groups get c = -inf (DeepSeek's reference code)
        ids = the top_k experts by c, in descending order of c
        w   = s[ids]              (unbiased scores)
        w   = w / (sum(w) + 1e-20)  if renormalize
        w   = w * routed_scaling_factor

    Args:
        router_logits: ``[T, E]`` bf16, fp16 or fp32 (the gate projection's output).
        top_k: experts per token, ``1 <= top_k <= topk_group * E / n_group``.
        n_group: number of expert groups; must divide ``E``. 1 disables group-limited routing.
        topk_group: groups kept per token, ``1 <= topk_group <= n_group`` (default ``n_group``).
        scoring_func: ``"softmax"`` or ``"sigmoid"``.
        correction_bias: fp32 ``[E]``, DeepSeek-V3's ``e_score_correction_bias``, or None.
        group_score: ``"max"`` or ``"top2_sum"``; by default ``"top2_sum"`` when a
            correction bias is given and ``"max"`` otherwise, as in DeepSeek's reference code.
        renormalize: normalise the chosen weights to sum to 1 (``norm_topk_prob``).
        routed_scaling_factor: multiplies the weights.

    Returns:
        ``(topk_weights, topk_ids)``: fp32 ``[T, top_k]`` and int32 ``[T, top_k]``.
        Differentiable with respect to ``router_logits`` (through ``topk_weights``).

    Backends: the fused CUDA kernel on CUDA tensors (one warp per token), the PyTorch path on
    the CPU, or with ``MOE_ALIGN_BACKEND=torch``. On plain CPU tensors in eager mode without
    autograd the PyTorch path is called without the dispatch of ``torch.ops.moe_align.grouped_topk``
    (same result).
    """
    if not isinstance(router_logits, torch.Tensor):
        raise TypeError(f"router_logits must be a tensor, got {type(router_logits).__name__}")
    if router_logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"router_logits must be fp32, fp16 or bf16, got {router_logits.dtype}")
    if router_logits.dim() != 2 or router_logits.shape[1] == 0:
        raise ValueError(f"router_logits must be [tokens, experts], got {tuple(router_logits.shape)}")
    num_experts = router_logits.shape[1]
    if not isinstance(n_group, int) or n_group < 1 or num_experts % n_group:
        raise ValueError(f"n_group={n_group!r} must be a positive divisor of the {num_experts} experts")
    topk_group = n_group if topk_group is None else topk_group
    if not isinstance(topk_group, int) or not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group={topk_group!r} must be in [1, n_group={n_group}]")
    reachable = topk_group * (num_experts // n_group)
    if not isinstance(top_k, int) or not 1 <= top_k <= reachable:
        raise ValueError(
            f"top_k={top_k!r} must be in [1, {reachable}] (topk_group x experts per group)"
        )
    if scoring_func not in SCORING_FUNCS:
        raise ValueError(f"scoring_func={scoring_func!r} must be one of {SCORING_FUNCS}")
    if group_score is None:
        group_score = "max" if correction_bias is None else "top2_sum"
    if group_score not in GROUP_SCORES:
        raise ValueError(f"group_score={group_score!r} must be one of {GROUP_SCORES}")
    if group_score == "top2_sum" and n_group > 1 and num_experts // n_group < 2:
        raise ValueError("group_score='top2_sum' needs at least 2 experts per group")
    if correction_bias is not None:
        if not isinstance(correction_bias, torch.Tensor) or correction_bias.dtype != torch.float32:
            raise TypeError("correction_bias must be an fp32 tensor")
        if correction_bias.shape != (num_experts,):
            raise ValueError(
                f"correction_bias must have shape ({num_experts},), got {tuple(correction_bias.shape)}"
            )
        if correction_bias.device != router_logits.device:
            raise ValueError(
                f"correction_bias is on {correction_bias.device}, router_logits on {router_logits.device}"
            )
        correction_bias = correction_bias.contiguous()
    args = (router_logits, correction_bias, top_k, n_group, topk_group, scoring_func == "sigmoid",
            group_score == "top2_sum" and n_group > 1, bool(renormalize), float(routed_scaling_factor))
    if _backend(router_logits, n_group, top_k) == "torch" and plain_eager_cpu(router_logits, correction_bias):
        return grouped_topk_torch(*args)
    return _grouped_topk(*args)
