"""Naive float64 oracles for the routing ops, written from the DeepSeek papers' definitions.

Deliberately simple loops over tokens; they share no code with moe_align.
"""

import math

import torch


def gate_oracle(logits, top_k, n_group=1, topk_group=None, scoring_func="softmax", bias=None,
                group_score="max", renormalize=False, scale=1.0):
    """Returns (weights float64 [T, K] differentiable w.r.t. a float64 copy of logits, ids [T, K],
    logits64). Ids per token are in descending order of the selection score."""
    logits64 = logits.detach().double().clone().requires_grad_(True)
    num_tokens, num_experts = logits.shape
    topk_group = n_group if topk_group is None else topk_group
    per_group = num_experts // n_group
    all_weights, all_ids = [], []
    for t in range(num_tokens):
        row = logits64[t]
        if scoring_func == "softmax":
            exps = [torch.exp(row[e] - row.max()) for e in range(num_experts)]
            total = sum(exps)
            scores = [x / total for x in exps]
        else:
            scores = [1.0 / (1.0 + torch.exp(-row[e])) for e in range(num_experts)]
        choice = [float(s.detach()) + (float(bias[e]) if bias is not None else 0.0) for e, s in enumerate(scores)]
        if n_group > 1:
            group_vals = []
            for g in range(n_group):
                members = sorted(choice[g * per_group:(g + 1) * per_group], reverse=True)
                group_vals.append(members[0] if group_score == "max" else members[0] + members[1])
            kept = sorted(range(n_group), key=lambda g: -group_vals[g])[:topk_group]
            choice = [c if e // per_group in kept else -math.inf for e, c in enumerate(choice)]
        ids = sorted(range(num_experts), key=lambda e: -choice[e])[:top_k]
        weights = [scores[e] for e in ids]
        if renormalize:
            total = sum(weights) + 1e-20
            weights = [w / total for w in weights]
        all_weights.append(torch.stack([w * scale for w in weights]))
        all_ids.append(ids)
    weights = torch.stack(all_weights) if num_tokens else torch.zeros(0, top_k, dtype=torch.float64)
    ids = torch.tensor(all_ids, dtype=torch.long).reshape(num_tokens, top_k)
    return weights, ids, logits64


def align_oracle(topk_ids, num_experts, block_size):
    """moe_align_block_size's contract, slot by slot."""
    flat = topk_ids.reshape(-1).tolist()
    numel = len(flat)
    max_padded = numel + min(num_experts, numel) * (block_size - 1)
    num_blocks = -(-max_padded // block_size)
    buckets = [[] for _ in range(num_experts)]
    for i, x in enumerate(flat):
        buckets[x].append(i)
    sorted_ids, expert_of_block = [], []
    for e in range(num_experts):
        mine = buckets[e]
        if not mine:
            continue
        padded = -(-len(mine) // block_size) * block_size
        sorted_ids += mine + [numel] * (padded - len(mine))
        expert_of_block += [e] * (padded // block_size)
    total = len(sorted_ids)
    sorted_ids += [numel] * (max_padded - total)
    expert_of_block += [-1] * (num_blocks - len(expert_of_block))
    return (torch.tensor(sorted_ids, dtype=torch.int32), torch.tensor(expert_of_block, dtype=torch.int32),
            torch.tensor([total], dtype=torch.int32))
