"""Float64 oracles of the log-prob, GRPO, SFT and DPO ops, written naively from the equations
(DeepSeek-V2 eq. 32-34 and 36; DPO as in Rafailov et al.). Independent of moe_align: no import
from the package. Every function takes float64 tensors (differentiable where the caller wants
gradients) and loops where the equation does."""

from __future__ import annotations

import math

import torch


def logprobs_oracle(hidden, weight, targets, temperature=1.0, ignore_index=-100):
    """(logp [N], entropy [N]) of softmax(W h / T) at each target; 0 where ignored."""
    logits = hidden.double() @ weight.double().T / temperature
    log_probs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    logp = log_probs.gather(1, safe.unsqueeze(1)).squeeze(1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    zero = torch.zeros_like(logp)
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero)


def grpo_token_loss_oracle(logp, old_logp, ref_logp, advantages, eps_low, eps_high, beta,
                           sampler_logp=None, tis_cap=math.inf, unbiased_kl=False):
    """[B, T] per-token loss: minus the bracket of eq. 32 (clipped surrogate - beta KL of eq. 33),
    the surrogate weighted by the truncated importance ratio pi_old / pi_sampler, the KL (with
    unbiased_kl) by the ratio pi / pi_old."""
    B, T = logp.shape
    rows = []
    for i in range(B):
        A = advantages[i]
        row = []
        for t in range(T):
            pi, pi_old = torch.exp(logp[i, t]), torch.exp(old_logp[i, t])
            ratio = pi / pi_old
            surrogate = torch.minimum(ratio * A, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * A)
            if sampler_logp is not None:
                weight = torch.clamp(pi_old / torch.exp(sampler_logp[i, t]), max=tis_cap)
                surrogate = surrogate * weight
            kl = torch.zeros((), dtype=torch.float64)
            if ref_logp is not None:
                pi_ref = torch.exp(ref_logp[i, t])
                kl = pi_ref / pi - torch.log(pi_ref / pi) - 1  # eq. 33
                if unbiased_kl:
                    kl = kl * ratio
            row.append(-(surrogate - beta * kl))
        rows.append(torch.stack(row) if row else torch.zeros(0, dtype=torch.float64))
    return torch.stack(rows) if rows else torch.zeros(0, T, dtype=torch.float64)


def aggregate_oracle(per_token, mask, loss_type, num_global_tokens=None, world_size=1, max_len=None):
    """Aggregation of the per-token losses, one sequence at a time."""
    B, T = per_token.shape
    seq_sums, seq_lens = [], []
    for i in range(B):
        total = torch.zeros((), dtype=torch.float64)
        n = 0.0
        for t in range(T):
            if mask[i, t]:
                total = total + per_token[i, t] * float(mask[i, t])
                n += float(mask[i, t])
        seq_sums.append(total)
        seq_lens.append(n)
    if loss_type == "sequence-mean":  # eq. 32: mean over tokens of each output, then over outputs
        return sum(s / max(n, 1.0) for s, n in zip(seq_sums, seq_lens)) / B
    if loss_type == "token-mean":
        return sum(seq_sums) / max(sum(seq_lens), 1.0)
    if loss_type == "global-token-mean":
        return sum(seq_sums) * world_size / num_global_tokens
    if loss_type == "dr-grpo":
        return sum(seq_sums) / (B * (T if max_len is None else max_len))
    raise ValueError(loss_type)


def group_advantages_oracle(rewards, group_size, eps=1e-6, scale=True):
    """Eq. 34 with the sample std (n - 1), group by group."""
    out = []
    values = [float(r) for r in rewards]
    for g in range(0, len(values), group_size):
        group = values[g:g + group_size]
        mean = sum(group) / len(group)
        var = sum((r - mean) ** 2 for r in group) / (len(group) - 1) if len(group) > 1 else 0.0
        for r in group:
            out.append((r - mean) / (math.sqrt(var) + eps) if scale else r - mean)
    return torch.tensor(out, dtype=torch.float64)


def combine_rewards_oracle(rewards_by_name, coefficients):
    """Eq. 36: r_i = sum_k c_k RM_k(o_i)."""
    names = list(rewards_by_name)
    size = len(rewards_by_name[names[0]])
    return torch.tensor(
        [sum(coefficients[k] * float(rewards_by_name[k][i]) for k in names) for i in range(size)],
        dtype=torch.float64,
    )


def sft_oracle(hidden, weight, targets, ignore_index=-100, temperature=1.0):
    """Mean negative log-likelihood of the response tokens."""
    logp, _ = logprobs_oracle(hidden, weight, targets, temperature, ignore_index)
    count = int((targets != ignore_index).sum())
    return -logp.sum() / max(count, 1)


def dpo_oracle(chosen, rejected, ref_chosen, ref_rejected, beta, label_smoothing=0.0):
    """Sigmoid DPO: -(1 - s) log sigmoid(u) - s log sigmoid(-u), u = beta (log-ratio margin)."""
    losses = []
    for c, r, rc, rr in zip(chosen, rejected, ref_chosen, ref_rejected):
        u = beta * ((c - rc) - (r - rr))
        losses.append(-(1 - label_smoothing) * torch.log(torch.sigmoid(u))
                      - label_smoothing * torch.log(torch.sigmoid(-u)))
    return torch.stack(losses).mean()
