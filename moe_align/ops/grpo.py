"""GRPO, SFT and DPO losses on top of :func:`moe_align.ops.linear_logprobs`.

GRPO (DeepSeekMath; DeepSeek-V2 section 4.2) maximises, for G sampled outputs ``o_i`` of a
question, the clipped surrogate of eq. 32 with the k3 KL estimate of eq. 33 and group-normalised
advantages (eq. 34); the reward may combine several reward models (eq. 36)::

    r_it  = pi(o_it) / pi_old(o_it)                                       (token ratio)
    l_it  = -min(r_it A_i, clip(r_it, 1 - eps_low, 1 + eps_high) A_i)    (policy term)
            + beta (pi_ref / pi - log(pi_ref / pi) - 1)                  (eq. 33, k3)
            (the k3 term times r_it with unbiased_kl: DeepSeek-V3.2's unbiased estimate)
    A_i   = (R_i - mean(R_group)) / (std(R_group) + eps)                 (eq. 34)
    R_i   = sum_k c_k RM_k(o_i)                                          (eq. 36)

The per-token part and its per-sequence sums run fused (CUDA kernel, forward and backward, or
the PyTorch path); the aggregation over sequences is a few scalar operations on ``[B]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from moe_align.ops._autocast import run_without_autocast
from moe_align.ops._backend import backend_for
from moe_align.ops._native import has_cuda_kernels, load_native
from moe_align.ops.logprobs import linear_logprobs

__all__ = ["combine_rewards", "dpo_loss", "group_advantages", "grpo_loss", "sft_loss"]

LOSS_AGGREGATIONS = ("sequence-mean", "token-mean", "global-token-mean", "dr-grpo")
# The same aggregations under TRL's GRPOConfig.loss_type names (see grpo_loss's table).
TRL_LOSS_TYPES = {"sequence-mean": "grpo", "token-mean": "bnpo", "global-token-mean": "dapo", "dr-grpo": "dr_grpo"}
# Columns of the per-sequence statistics computed by the fused op.
STATS = ("loss_sum", "tokens", "kl_sum", "clip_low", "clip_high", "ratio_sum", "ratio_min",
         "ratio_max", "entropy_sum")
NUM_STATS = len(STATS)


# ---- per-token GRPO terms, summed per sequence -----------------------------------------------


def grpo_sequence_stats_torch(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    sampler_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    entropy: torch.Tensor | None,
    eps_low: float,
    eps_high: float,
    beta: float,
    tis_cap: float,
    unbiased_kl: bool,
) -> torch.Tensor:
    """PyTorch path of the fused op: float32 ``[B, len(STATS)]`` (see :data:`STATS`). Tokens with
    ``mask == 0`` are left out (whatever their values), so padding may hold anything."""
    valid = mask != 0
    adv = advantages.unsqueeze(1)
    ratio = torch.exp(logp - old_logp)
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    if sampler_logp is not None:
        per_token = per_token * torch.exp(old_logp - sampler_logp).clamp(max=tis_cap)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
        if unbiased_kl:
            kl = kl * ratio
        if beta != 0:
            per_token = per_token + beta * kl

    def masked_sum(x: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, x * mask, 0.0).sum(1)

    low = (ratio < 1 - eps_low) & (adv < 0)
    high = (ratio > 1 + eps_high) & (adv > 0)
    inf = torch.full_like(ratio, math.inf)
    columns = [
        masked_sum(per_token),
        mask.sum(1),
        masked_sum(kl),
        masked_sum(low.float()),
        masked_sum(high.float()),
        masked_sum(ratio),
        torch.where(valid, ratio, inf).amin(1) if logp.shape[1] else inf.new_full((logp.shape[0],), math.inf),
        torch.where(valid, ratio, -inf).amax(1) if logp.shape[1] else inf.new_full((logp.shape[0],), -math.inf),
        masked_sum(entropy) if entropy is not None else mask.new_zeros(mask.shape[0]),
    ]
    return torch.stack(columns, dim=1)


def grpo_sequence_stats_backward_torch(
    grad_loss_sum: torch.Tensor,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    sampler_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
    beta: float,
    tis_cap: float,
    unbiased_kl: bool,
) -> torch.Tensor:
    """d loss_sum_b / d logp_bt times ``grad_loss_sum[b]``, float32 ``[B, T]``.

    The policy term's gradient is ``-A r`` (times the truncated IS weight), zero where the clip
    is active on the side that the min picks: ``A > 0, r > 1 + eps_high`` or
    ``A < 0, r < 1 - eps_low`` (as autograd of min/clamp gives); the k3 term's is
    ``beta (1 - pi_ref / pi)``, and with ``unbiased_kl`` that of ``beta r k3`` is
    ``beta r (k3 + 1 - pi_ref / pi) = beta r (logp - ref_logp)``.
    """
    adv = advantages.unsqueeze(1)
    ratio = torch.exp(logp - old_logp)
    clipped = ((adv > 0) & (ratio > 1 + eps_high)) | ((adv < 0) & (ratio < 1 - eps_low))
    grad = torch.where(clipped, 0.0, -adv * ratio)
    if sampler_logp is not None:
        grad = grad * torch.exp(old_logp - sampler_logp).clamp(max=tis_cap)
    if ref_logp is not None and beta != 0:
        grad = grad + beta * (ratio * (logp - ref_logp) if unbiased_kl else 1 - torch.exp(ref_logp - logp))
    return torch.where(mask != 0, grad * mask * grad_loss_sum.unsqueeze(1), 0.0)


# Fake implementations of the native CUDA kernels (csrc/grpo), declared in torch_bindings.cpp.
load_native()


@torch.library.register_fake("moe_align::fused_grpo_fwd")
def _(logp, old_logp, ref_logp, sampler_logp, advantages, mask, entropy, eps_low, eps_high, beta, tis_cap,
      unbiased_kl):
    return logp.new_empty(logp.shape[0], NUM_STATS)


@torch.library.register_fake("moe_align::fused_grpo_bwd")
def _(grad_loss_sum, logp, old_logp, ref_logp, sampler_logp, advantages, mask, eps_low, eps_high, beta, tis_cap,
      unbiased_kl):
    return torch.empty_like(logp)


def _grpo_backend(device: torch.device) -> str:
    fused = device.type == "cuda" and has_cuda_kernels()
    available = ("cuda", "torch") if fused else ("torch",)
    return backend_for("grpo_loss", device, available, default=available[0])


@torch.library.custom_op("moe_align::grpo_sequence_stats", mutates_args=())
def _grpo_sequence_stats(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    sampler_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    entropy: torch.Tensor | None,
    eps_low: float,
    eps_high: float,
    beta: float,
    tis_cap: float,
    unbiased_kl: bool,
) -> torch.Tensor:
    # Runs inside the op (a data-dependent check would break torch.compile's graph outside it).
    if not bool((mask >= 0).all()):
        raise ValueError("completion_mask must be >= 0 everywhere (a 0/1 mask or non-negative token weights)")
    args = (logp, old_logp, ref_logp, sampler_logp, advantages, mask, entropy, eps_low, eps_high, beta, tis_cap,
            unbiased_kl)
    if _grpo_backend(logp.device) == "cuda":
        return torch.ops.moe_align.fused_grpo_fwd(*args)
    return grpo_sequence_stats_torch(*args)


@_grpo_sequence_stats.register_fake
def _(logp, old_logp, ref_logp, sampler_logp, advantages, mask, entropy, eps_low, eps_high, beta, tis_cap,
      unbiased_kl):
    return logp.new_empty(logp.shape[0], NUM_STATS)


@torch.library.custom_op("moe_align::grpo_sequence_stats_backward", mutates_args=())
def _grpo_sequence_stats_backward(
    grad_loss_sum: torch.Tensor,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    sampler_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
    beta: float,
    tis_cap: float,
    unbiased_kl: bool,
) -> torch.Tensor:
    args = (grad_loss_sum, logp, old_logp, ref_logp, sampler_logp, advantages, mask, eps_low, eps_high, beta, tis_cap,
            unbiased_kl)
    if _grpo_backend(logp.device) == "cuda":
        return torch.ops.moe_align.fused_grpo_bwd(*args)
    return grpo_sequence_stats_backward_torch(*args)


@_grpo_sequence_stats_backward.register_fake
def _(grad_loss_sum, logp, old_logp, ref_logp, sampler_logp, advantages, mask, eps_low, eps_high, beta, tis_cap,
      unbiased_kl):
    return torch.empty_like(logp)


def _stats_setup_context(ctx, inputs, output):
    logp, old_logp, ref_logp, sampler_logp, advantages, mask, _, eps_low, eps_high, beta, tis_cap, unbiased_kl = inputs
    ctx.save_for_backward(logp, old_logp, ref_logp, sampler_logp, advantages, mask)
    ctx.hyper = (eps_low, eps_high, beta, tis_cap, unbiased_kl)


def _stats_backward(ctx, grad_stats):
    logp, old_logp, ref_logp, sampler_logp, advantages, mask = ctx.saved_tensors
    # Only the loss column is differentiable; the others are metrics.
    grad_logp = _grpo_sequence_stats_backward(
        grad_stats[:, 0].contiguous(), logp, old_logp, ref_logp, sampler_logp, advantages, mask, *ctx.hyper
    )
    return (grad_logp,) + (None,) * 11


_grpo_sequence_stats.register_autograd(_stats_backward, setup_context=_stats_setup_context)
run_without_autocast(_grpo_sequence_stats, _grpo_sequence_stats_backward)


# ---- argument checks ----------------------------------------------------------------------------


def _check_float(name: str, x, shape: tuple[int, ...] | None, device: torch.device | None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if shape is not None and tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device}")
    return x.float().contiguous()


def _check_number(name: str, value, low: float = 0.0, high: float = math.inf, low_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    ok = (value > low if low_open else value >= low) and value <= high and math.isfinite(value)
    if not ok:
        raise ValueError(f"{name}={value} is out of range ({'(' if low_open else '['}{low}, {high}])")
    return value


def _token_count(name: str, value, device: torch.device) -> torch.Tensor | float:
    """A loss denominator given by the caller (a token count over ranks / accumulation steps):
    a number >= 0 or a one-element real tensor, floored at 1 (a count of 0 means that no rank has
    a token, so the loss sum is 0 too). A tensor's value is not inspected: that would synchronise."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} must be a number or a one-element real tensor, got {value.dtype} {tuple(value.shape)}")
        return value.reshape(()).to(device=device, dtype=torch.float32).clamp(min=1)
    return max(_check_number(name, value), 1.0)


# ---- GRPO -------------------------------------------------------------------------------------------


def grpo_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    *,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    beta: float = 0.04,
    loss_type: str = "sequence-mean",
    num_global_tokens: int | float | torch.Tensor | None = None,
    world_size: int = 1,
    max_len: int | None = None,
    sampler_logp: torch.Tensor | None = None,
    tis_cap: float = 2.0,
    entropy: torch.Tensor | None = None,
    unbiased_kl: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss (DeepSeek-V2 eq. 32-33, to minimise) from per-token log-probs.

    Per token ``t`` of output ``i`` (``m_it`` = completion_mask)::

        r_it = exp(logp_it - old_logp_it)
        l_it = -min(r_it A_i, clip(r_it, 1 - eps_low, 1 + eps_high) A_i) * w_it
               + beta (exp(ref_it - logp_it) - (ref_it - logp_it) - 1)
        w_it = min(exp(old_logp_it - sampler_logp_it), tis_cap)   (truncated IS; 1 if no sampler_logp)

    aggregated by ``loss_type`` (B outputs, n_i = sum_t m_it, L = the padded length T)::

        loss_type             loss                                        TRL loss_type  verl loss_agg_mode
        --------------------  ------------------------------------------  -------------  ----------------------------
        "sequence-mean"       1/B sum_i (sum_t m l) / max(n_i, 1)         "grpo"         "seq-mean-token-mean" (1)
          (eq. 32, default)
        "token-mean"          sum_it m l / max(sum_i n_i, 1)              "bnpo"         "token-mean" (local tokens)
        "global-token-mean"   world_size sum_it m l / num_global_tokens   "dapo" (2)     "token-mean" with the global
                                                                                         token count, dp_size (2)
        "dr-grpo"             sum_it m l / (B max_len)                    "dr_grpo"      "seq-mean-token-sum-norm" (3)

    (1) verl leaves outputs without tokens out of the mean over B; here (as in TRL) they count.
    (2) ``num_global_tokens``: completion tokens over all data-parallel ranks (TRL's
        ``num_items_in_batch``, verl's ``batch_num_tokens``); the ``world_size`` factor undoes
        the averaging of gradients over ranks, so a step is the mean over every token of the
        global batch.
    (3) verl divides the token sum by ``loss_scale_factor`` (default L) only: B times this mode.

    The KL term is eq. 33 as written, or with ``unbiased_kl`` the k3 term times ``r_it``: the
    samples come from pi_old, so ``r_it k3_it`` is the unbiased estimate of KL(pi || pi_ref)
    (DeepSeek-V3.2). That is TRL's ``use_bias_correction_kl`` (True by default in TRL 1.16):
    with the same setting, TRL's loss, gradient and logged metrics equal these
    (tests/test_grpo_trl.py runs TRL's own code).

    Args:
        logp: ``[B, T]`` log-probs of the completion tokens under the policy (differentiable,
            e.g. from :func:`linear_logprobs`).
        advantages: ``[B]`` per-output advantages (:func:`group_advantages`).
        completion_mask: ``[B, T]`` bool, integer or float, 1 on the completion tokens (or
            non-negative token weights); a negative or NaN entry is an error.
        old_logp: ``[B, T]`` under the sampling policy pi_old; None = on-policy (``logp.detach()``,
            so the ratio is exactly 1 and only its gradient remains).
        ref_logp: ``[B, T]`` under the reference policy; required when ``beta > 0``.
        eps_low, eps_high: clip range ``[1 - eps_low, 1 + eps_high]``; ``eps_high`` defaults to
            ``eps_low``.
        beta: weight of the KL term.
        loss_type: one of ``"sequence-mean"``, ``"token-mean"``, ``"global-token-mean"``, ``"dr-grpo"``.
        num_global_tokens, world_size: for ``"global-token-mean"``: the completion tokens over
            all ranks (a number >= 0 or a one-element tensor, floored at 1) and the ranks.
        max_len: for ``"dr-grpo"`` (TRL's ``max_completion_length``); default T.
        sampler_logp: ``[B, T]`` log-probs from the sampling engine (e.g. vLLM); when given, the
            policy term is weighted by the truncated importance ratio ``w`` (TRL's
            ``vllm_importance_sampling_mode="token_truncate"``), which carries no gradient.
        tis_cap: the truncation of ``w``.
        entropy: ``[B, T]`` per-token entropies, only for the metrics.
        unbiased_kl: weight the k3 term (and the ``"kl"`` metric) by the ratio ``r_it``, which
            carries gradient: ``d(r k3)/d logp = r (logp - ref_logp)``.

    Returns:
        ``(loss, metrics)``: a float32 scalar, differentiable with respect to ``logp``, and
        detached float32 scalars (token means over this batch's completion tokens, weighted by
        ``completion_mask``): ``"kl"``,
        ``"clip_ratio/low_mean"`` (``r < 1 - eps_low`` and ``A < 0``), ``"clip_ratio/high_mean"``
        (``r > 1 + eps_high`` and ``A > 0``), ``"clip_ratio/region_mean"``, ``"ratio/mean"``,
        ``"ratio/min"``, ``"ratio/max"`` (NaN without tokens), ``"num_tokens"`` and, when
        ``entropy`` is given, ``"entropy"``.

    Backends: the fused CUDA kernels (``csrc/grpo``) on CUDA tensors, the PyTorch path otherwise.
    """
    if not isinstance(logp, torch.Tensor) or not logp.is_floating_point():
        raise TypeError(f"logp must be a floating-point [B, T] tensor, got {getattr(logp, 'dtype', type(logp).__name__)}")
    if logp.dim() != 2:
        raise ValueError(f"logp must be a floating-point [B, T] tensor, got shape {tuple(logp.shape)}")
    shape, device = tuple(logp.shape), logp.device
    logp = logp.float().contiguous()
    if not isinstance(completion_mask, torch.Tensor) or tuple(completion_mask.shape) != shape:
        raise ValueError(
            f"completion_mask must have shape {shape} (like logp), got {tuple(getattr(completion_mask, 'shape', ()))}"
        )
    if completion_mask.device != device:
        raise ValueError(f"completion_mask is on {completion_mask.device}, expected {device}")
    if completion_mask.is_complex():
        raise TypeError(f"completion_mask must be a bool, integer or real floating-point tensor, got {completion_mask.dtype}")
    mask = completion_mask.to(torch.float32).contiguous()
    advantages = _check_float("advantages", advantages, (shape[0],), device)
    old = logp.detach() if old_logp is None else _check_float("old_logp", old_logp, shape, device).detach()
    eps_low = _check_number("eps_low", eps_low, 0.0, 1.0)
    eps_high = eps_low if eps_high is None else _check_number("eps_high", eps_high)
    beta = _check_number("beta", beta)
    if beta > 0 and ref_logp is None:
        raise ValueError("ref_logp is required when beta > 0")
    ref = None if ref_logp is None else _check_float("ref_logp", ref_logp, shape, device).detach()
    sampler = None if sampler_logp is None else _check_float("sampler_logp", sampler_logp, shape, device).detach()
    tis_cap = _check_number("tis_cap", tis_cap, 0.0, low_open=True)
    ent = None if entropy is None else _check_float("entropy", entropy, shape, device).detach()
    if not isinstance(unbiased_kl, bool):
        raise TypeError(f"unbiased_kl must be a bool, got {type(unbiased_kl).__name__}")
    if loss_type not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss_type={loss_type!r} must be one of {LOSS_AGGREGATIONS}")

    stats = _grpo_sequence_stats(logp, old, ref, sampler, advantages.detach(), mask, ent,
                                 eps_low, eps_high, beta, tis_cap, unbiased_kl)
    loss_sum, tokens = stats[:, 0], stats[:, 1]
    batch = shape[0]
    if loss_type == "sequence-mean":
        loss = (loss_sum / tokens.clamp(min=1)).sum() / max(batch, 1)
    elif loss_type == "token-mean":
        loss = loss_sum.sum() / tokens.sum().clamp(min=1)
    elif loss_type == "global-token-mean":
        if num_global_tokens is None:
            raise ValueError("num_global_tokens (completion tokens over all ranks) is required for 'global-token-mean'")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        loss = loss_sum.sum() * world_size / _token_count("num_global_tokens", num_global_tokens, device)
    else:
        length = shape[1] if max_len is None else max_len
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"max_len must be a positive int, got {max_len!r}")
        loss = loss_sum.sum() / (max(batch, 1) * length)

    with torch.no_grad():
        detached = stats.detach()
        count = detached[:, 1].sum()
        denom = count.clamp(min=1)
        nan = torch.full((), math.nan, device=device)
        metrics = {
            "kl": detached[:, 2].sum() / denom,
            "clip_ratio/low_mean": detached[:, 3].sum() / denom,
            "clip_ratio/high_mean": detached[:, 4].sum() / denom,
            "clip_ratio/region_mean": (detached[:, 3] + detached[:, 4]).sum() / denom,
            "ratio/mean": detached[:, 5].sum() / denom,
            "ratio/min": torch.where(count > 0, detached[:, 6].amin(), nan) if batch else nan,
            "ratio/max": torch.where(count > 0, detached[:, 7].amax(), nan) if batch else nan,
            "num_tokens": count,
        }
        if ent is not None:
            metrics["entropy"] = detached[:, 8].sum() / denom
    return loss, metrics


def group_advantages(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-6, scale: bool = True
) -> torch.Tensor:
    """Group-relative advantages (DeepSeek-V2 eq. 34)::

        A_i = (r_i - mean(r_group(i))) / (std(r_group(i)) + eps)     (scale=True)
        A_i =  r_i - mean(r_group(i))                                (scale=False, Dr. GRPO)

    Args:
        rewards: ``[B]`` float, the G = ``group_size`` outputs of each question consecutive
            (TRL's and verl's layout).
        group_size: G; must divide B.
        eps: added to the std (a group of equal rewards gets advantages 0).
        scale: divide by the std. The std is the sample (Bessel-corrected) std, as TRL's and
            verl's ``torch.std``; 0 for groups of one output.

    Returns:
        float32 ``[B]``.
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a [B] tensor, got {getattr(rewards, 'shape', type(rewards))}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"group_size={group_size} does not divide the {rewards.shape[0]} rewards")
    # With scale, eps > 0 keeps a group of equal rewards (std 0) at advantage 0 instead of 0 / 0.
    eps = _check_number("eps", eps, 0.0, low_open=scale)
    grouped = rewards.float().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred)
        centred = centred / (std + eps)
    return centred.reshape(-1)


def combine_rewards(
    rewards_by_name: Mapping[str, torch.Tensor], coefficients: Mapping[str, float]
) -> torch.Tensor:
    """Weighted sum of reward models (DeepSeek-V2 eq. 36): ``r_i = sum_k c_k RM_k(o_i)``.

    Args:
        rewards_by_name: name -> ``[B]`` float rewards (e.g. ``{"helpful": ..., "safety": ...,
            "rule": ...}``).
        coefficients: name -> ``c_k``; exactly the names of ``rewards_by_name``.

    Returns:
        float32 ``[B]``.
    """
    if not rewards_by_name:
        raise ValueError("rewards_by_name is empty")
    missing = set(rewards_by_name) - set(coefficients)
    extra = set(coefficients) - set(rewards_by_name)
    if missing or extra:
        raise ValueError(
            f"coefficients must name exactly the rewards: missing {sorted(missing)}, unknown {sorted(extra)}"
        )
    total = None
    shape = None
    for name, reward in rewards_by_name.items():
        if not isinstance(reward, torch.Tensor) or reward.dim() != 1:
            raise ValueError(f"rewards_by_name[{name!r}] must be a [B] tensor")
        if shape is not None and reward.shape != shape:
            raise ValueError(f"rewards_by_name[{name!r}] has shape {tuple(reward.shape)}, expected {tuple(shape)}")
        shape = reward.shape
        term = _check_number(f"coefficients[{name!r}]", coefficients[name], -math.inf) * reward.float()
        total = term if total is None else total + term
    return total


# ---- SFT and DPO on the fused log-prob op ------------------------------------------------------------


def sft_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    num_tokens: int | float | torch.Tensor | None = None,
    reduction: str = "mean",
    temperature: float = 1.0,
    fp32_head: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy over the response tokens, through :func:`linear_logprobs` (no logits)::

        loss = -sum_{n: t_n != ignore_index} log softmax(W h_n / T)[t_n] / D

    with ``D`` = the number of response tokens (``reduction="mean"``), ``num_tokens`` (e.g. the
    count over all ranks / accumulation steps), or 1 (``reduction="sum"``). Prompt and padding
    tokens carry ``ignore_index`` and cost nothing. Arguments as in :func:`linear_logprobs`;
    returns a float32 scalar.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r} must be 'mean' or 'sum'")
    if reduction == "sum" and num_tokens is not None:
        raise ValueError("num_tokens divides the 'mean' reduction; it cannot be given with reduction='sum'")
    logp = linear_logprobs(hidden, weight, targets, temperature=temperature, ignore_index=ignore_index,
                           fp32_head=fp32_head, chunk_size=chunk_size)
    total = -logp.sum()
    if reduction == "sum":
        return total
    if num_tokens is None:
        return total / (targets != ignore_index).sum().clamp(min=1)
    return total / _token_count("num_tokens", num_tokens, total.device)


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sigmoid DPO loss (Rafailov et al., as used for DeepSeek LLM Chat) from sequence log-probs::

        u      = beta ((logp_c - ref_c) - (logp_r - ref_r))
        loss   = mean_i( -(1 - s) log sigmoid(u_i) - s log sigmoid(-u_i) )     (s = label_smoothing)

    With ``s = 0`` this is TRL's DPOTrainer with ``loss_type="sigmoid"`` (tests/test_grpo_trl.py
    compares loss, gradients and metrics end to end); ``s > 0`` is conservative DPO, which TRL 1.16's
    "sigmoid" loss no longer applies.

    Args:
        chosen_logps, rejected_logps: ``[B]`` sums of the response tokens' log-probs under the
            policy (differentiable, e.g. ``linear_logprobs(...).sum(-1)``).
        ref_chosen_logps, ref_rejected_logps: ``[B]`` the same under the reference model.
        beta: inverse temperature of the implicit reward.
        label_smoothing: conservative DPO's label noise ``s`` in ``[0, 0.5)``.

    Returns:
        ``(loss, metrics)``: float32 scalar, and detached means (TRL's names)
        ``"rewards/chosen"`` = beta (logp_c - ref_c), ``"rewards/rejected"``,
        ``"rewards/accuracies"`` (chosen reward > rejected reward), ``"rewards/margins"``.
    """
    if not isinstance(chosen_logps, torch.Tensor) or chosen_logps.dim() != 1:
        raise ValueError(f"chosen_logps must be a [B] tensor, got {getattr(chosen_logps, 'shape', None)}")
    shape, device = tuple(chosen_logps.shape), chosen_logps.device
    chosen = _check_float("chosen_logps", chosen_logps, shape, device)
    rejected = _check_float("rejected_logps", rejected_logps, shape, device)
    ref_chosen = _check_float("ref_chosen_logps", ref_chosen_logps, shape, device).detach()
    ref_rejected = _check_float("ref_rejected_logps", ref_rejected_logps, shape, device).detach()
    beta = _check_number("beta", beta, 0.0, low_open=True)
    label_smoothing = _check_number("label_smoothing", label_smoothing, 0.0, 0.5)
    if label_smoothing == 0.5:
        raise ValueError("label_smoothing must be < 0.5")
    chosen_rewards = beta * (chosen - ref_chosen)
    rejected_rewards = beta * (rejected - ref_rejected)
    margin = chosen_rewards - rejected_rewards
    losses = -(1 - label_smoothing) * torch.nn.functional.logsigmoid(margin)
    if label_smoothing:
        losses = losses - label_smoothing * torch.nn.functional.logsigmoid(-margin)
    loss = losses.mean()
    with torch.no_grad():
        metrics = {
            "rewards/chosen": chosen_rewards.detach().mean(),
            "rewards/rejected": rejected_rewards.detach().mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": margin.detach().mean(),
        }
    return loss, metrics
