"""Naive float64 oracles for the MLA ops and module, written from DeepSeek-V2's definition of MLA.

Deliberately plain: keys expanded per head, one query at a time, the cache read token by token
through the block table. They share no code with moe_align.
"""

import math

import torch


def varlen_attention_oracle(q_nope, q_rope, k_nope, k_rope, v, cu_seqlens, scale):
    """Causal attention per packed sequence. Inputs are float64 leaves (for gradients);
    k_rope is [T, 1, D_rope]. Returns (out [T, H, D_v], lse [T, H])."""
    total, heads, _ = q_nope.shape
    bounds = [int(x) for x in cu_seqlens]
    outs, lses = [None] * total, [None] * total
    for start, end in zip(bounds[:-1], bounds[1:]):
        for i in range(start, end):
            head_out, head_lse = [], []
            for h in range(heads):
                q = torch.cat([q_nope[i, h], q_rope[i, h]])
                keys = torch.stack([torch.cat([k_nope[j, h], k_rope[j, 0]]) for j in range(start, i + 1)])
                scores = keys @ q * scale
                lse = torch.logsumexp(scores, dim=0)
                probs = torch.exp(scores - lse)
                head_out.append(probs @ v[start:i + 1, h])
                head_lse.append(lse)
            outs[i] = torch.stack(head_out)
            lses[i] = torch.stack(head_lse)
    if total == 0:
        return q_nope.new_zeros((0, heads, v.shape[-1])), q_nope.new_zeros((0, heads))
    return torch.stack(outs), torch.stack(lses)


def decode_oracle(q_latent, q_rope, kv_cache, block_table, cache_seqlens, scale):
    """Absorbed MLA decode over a paged cache; query i of s_q sees positions <= L - s_q + i.
    A query that sees nothing gets out 0 and lse -inf. Returns float64 (out, lse)."""
    batch, s_q, heads, d_lat = q_latent.shape
    page = kv_cache.shape[1]
    out = torch.zeros(batch, s_q, heads, d_lat, dtype=torch.float64)
    lse = torch.full((batch, s_q, heads), -math.inf, dtype=torch.float64)
    for b in range(batch):
        length = int(cache_seqlens[b])
        rows = [kv_cache[int(block_table[b, j // page]), j % page].double() for j in range(length)]
        for i in range(s_q):
            visible = rows[: max(0, length - s_q + i + 1)]
            if not visible:
                continue
            for h in range(heads):
                q = torch.cat([q_latent[b, i, h], q_rope[b, i, h]]).double()
                scores = torch.stack([row @ q for row in visible]) * scale
                lse[b, i, h] = torch.logsumexp(scores, dim=0)
                probs = torch.exp(scores - lse[b, i, h])
                out[b, i, h] = sum(p * row[:d_lat] for p, row in zip(probs, visible))
    return out, lse


def _rms_norm(x, weight, eps):
    return weight * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def _rope(x, positions, inv_freq, scaling, interleave):
    """x [N, ..., D]; rotates pairs (x_2k, x_2k+1) (interleave) or (x_k, x_k+D/2) by position * inv_freq[k];
    interleaved pairs come out as [firsts..., seconds...] (DeepSeek-V3's layout in transformers)."""
    angle = positions[:, None] * inv_freq[None, :]
    while angle.dim() < x.dim():
        angle = angle.unsqueeze(1)
    cos, sin = torch.cos(angle) * scaling, torch.sin(angle) * scaling
    half = x.shape[-1] // 2
    a, b = (x[..., 0::2], x[..., 1::2]) if interleave else (x[..., :half], x[..., half:])
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def mla_layer_oracle(params, dims, hidden, positions, cu_seqlens, inv_freq, rope_scaling, softmax_scale,
                     interleave, eps=1e-6):
    """The MLA layer in float64 from its weights (a dict named as transformers' DeepseekV3Attention
    state dict), without weight absorption. hidden [T, hidden], positions [T]. Returns [T, hidden]."""
    p = {k: v.double() for k, v in params.items()}
    heads, d_nope, d_rope, d_v, d_lat = dims
    x = hidden.double()

    def linear(name, inp):
        out = inp @ p[f"{name}.weight"].t()
        return out + p[f"{name}.bias"] if f"{name}.bias" in p else out

    if "q_proj.weight" in p:
        q = linear("q_proj", x)
    else:
        q = linear("q_b_proj", _rms_norm(linear("q_a_proj", x), p["q_a_layernorm.weight"], eps))
    q = q.view(-1, heads, d_nope + d_rope)
    ckv = linear("kv_a_proj_with_mqa", x)
    latent = _rms_norm(ckv[:, :d_lat], p["kv_a_layernorm.weight"], eps)
    pos = positions.double()
    k_rope = _rope(ckv[:, d_lat:], pos, inv_freq.double(), rope_scaling, interleave)
    q_rope = _rope(q[..., d_nope:], pos, inv_freq.double(), rope_scaling, interleave)
    kv = linear("kv_b_proj", latent).view(-1, heads, d_nope + d_v)
    out, _ = varlen_attention_oracle(q[..., :d_nope], q_rope, kv[..., :d_nope], k_rope[:, None, :],
                                     kv[..., d_nope:], cu_seqlens, softmax_scale)
    return linear("o_proj", out.reshape(out.shape[0], heads * d_v))


def varlen_attention_dense(q_nope, q_rope, k_nope, k_rope, v, cu_seqlens, scale):
    """Vectorised float64 version of varlen_attention_oracle (expanded keys, a mask per
    sequence), for the larger GPU tests."""
    bounds = [int(x) for x in cu_seqlens]
    outs, lses = [], []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        heads = q_nope.shape[1]
        q = torch.cat([q_nope[start:end], q_rope[start:end]], dim=-1)
        k = torch.cat([k_nope[start:end], k_rope[start:end].expand(-1, heads, -1)], dim=-1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        n = end - start
        causal = torch.ones(n, n, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, -math.inf)
        lse = torch.logsumexp(scores, dim=-1)
        outs.append(torch.einsum("hqk,khd->qhd", torch.exp(scores - lse[..., None]), v[start:end]))
        lses.append(lse.t())
    return torch.cat(outs), torch.cat(lses)


def decode_dense(q_latent, q_rope, kv_cache, block_table, cache_seqlens, scale):
    """Vectorised float64 version of decode_oracle, for the larger GPU tests (runs on the
    inputs' device)."""
    batch, s_q, heads, d_lat = q_latent.shape
    page = kv_cache.shape[1]
    out = torch.zeros(q_latent.shape, dtype=torch.float64, device=q_latent.device)
    lse = torch.full((batch, s_q, heads), -math.inf, dtype=torch.float64, device=q_latent.device)
    for b in range(batch):
        length = int(cache_seqlens[b])
        if length == 0:
            continue
        pos = torch.arange(length, device=kv_cache.device)
        rows = kv_cache[block_table[b, pos // page].long(), pos % page].double()
        q = torch.cat([q_latent[b], q_rope[b]], dim=-1).double()
        scores = torch.einsum("shd,ld->shl", q, rows) * scale
        last = length - s_q + torch.arange(s_q, device=scores.device)
        scores = scores.masked_fill(pos[None, None, :] > last[:, None, None], -math.inf)
        row_lse = torch.logsumexp(scores, dim=-1)
        seen = torch.isfinite(row_lse)
        probs = torch.exp(scores - torch.where(seen, row_lse, 0)[..., None])
        out[b] = torch.einsum("shl,ld->shd", probs, rows[:, :d_lat])
        lse[b] = row_lse
    return out, lse
