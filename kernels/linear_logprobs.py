"""Triton kernels of the fused linear + log-softmax gather (``moe_align.ops.linear_logprobs``).

For tokens ``n`` with hidden state ``h_n`` (``[H]``), the head ``W`` (``[V, H]``), a temperature
``T`` and a target ``t_n``::

    z_n     = W h_n / T                         (the logits, never stored whole)
    lse_n   = log sum_v exp(z_nv)
    logp_n  = z_n[t_n] - lse_n
    ent_n   = lse_n - sum_v p_nv z_nv = -sum_v p_nv log p_nv,     p_n = softmax(z_n)

and, for incoming gradients ``g_n`` (of ``logp_n``) and ``e_n`` (of ``ent_n``)::

    dz_nv   = g_n (1[v = t_n] - p_nv) - e_n p_nv (log p_nv + ent_n)
    dH      = dz W / T,     dW = dz^T H / T

Forward: one program per (vocabulary split, token tile) streams the split's vocabulary tiles
through an online log-sum-exp (running max ``m``, ``s = sum exp(z - m)``, ``d = sum exp(z - m)
(z - m)`` for the entropy, and the target logit), then a combine kernel merges the splits of each
token in split order. Split boundaries and tile sizes depend only on the configuration, never on
the number of tokens, so a token's result does not depend on the batch it is in.

Backward: the vocabulary is cut into chunks of ``chunk_cols`` columns such that the buffer
``dz[N_valid, chunk_cols]`` stays within a memory budget. For each chunk, one kernel recomputes the
logits tile by tile (a GEMM whose epilogue turns them into ``dz``), then two GEMMs consume it:
``dW[chunk] = dz^T H`` (complete: its reduction runs over all tokens inside one program, so no
float32 ``[V, H]`` accumulator and no atomics), and ``dH += dz W[chunk]`` into a float32
``[N_valid, H]`` accumulator, the last chunk writing the result in the input dtype. Every output
tile is owned by one program and chunks run in a fixed order: the gradients are deterministic.

Rows are addressed through ``row_ids`` (the tokens whose target is not ignored), so ignored tokens
are never loaded and cost nothing.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from . import ENABLE_FP_FUSION


@dataclasses.dataclass(frozen=True)
class LogprobsConfig:
    """Tile sizes. ``split_cols`` (a multiple of ``block_v``) fixes the vocabulary splits of the
    forward; a token's log-prob depends on it and on the block sizes, never on the batch.
    ``mm_dw`` and ``mm_dh`` are the (BLOCK_M, BLOCK_N, BLOCK_K) of the backward's GEMMs
    ``dW = dz^T H`` (M: vocabulary, K: tokens) and ``dH = dz W`` (M: tokens, K: vocabulary)."""

    block_n: int
    block_v: int
    block_k: int
    split_cols: int
    mm_dw: tuple[int, int, int]
    mm_dh: tuple[int, int, int]
    num_warps: int = 4
    num_stages: int = 1
    group_m: int = 8

    def __post_init__(self):
        if self.split_cols % self.block_v:
            raise ValueError("split_cols must be a multiple of block_v")
        if min(self.block_n, self.block_v, self.block_k, *self.mm_dw, *self.mm_dh) < 16:
            raise ValueError("tl.dot needs blocks of at least 16")


def default_config(device: torch.device, fp32_dot: bool, vocab: int) -> LogprobsConfig:
    """Fixed per device and precision; under Triton's interpreter scaled with the vocabulary
    (the interpreter's cost is per tile, so it wants few, large tiles). Never depends on N."""
    if device.type != "cuda":
        bv = min(4096, max(64, triton.next_power_of_2(triton.cdiv(vocab, 8))))
        return LogprobsConfig(16, bv, 32, 4 * bv, mm_dw=(bv, 32, 32), mm_dh=(32, 32, bv))
    if fp32_dot:  # float32 FMA (input_precision="ieee"): smaller tiles, fewer registers.
        return LogprobsConfig(64, 64, 32, 8192, mm_dw=(64, 64, 32), mm_dh=(64, 64, 32),
                              num_warps=8, num_stages=2)
    return LogprobsConfig(128, 128, 64, 8192, mm_dw=(128, 128, 64), mm_dh=(128, 128, 64),
                          num_warps=8, num_stages=3)


@triton.jit
def _dot(a, b, acc, FP32_DOT: tl.constexpr):
    # if/else, not an early return: Triton type-checks the statements after a constexpr if.
    if FP32_DOT:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _load_rows(rows_ptr, offs, mask, HAS_ROWS: tl.constexpr):
    """Original token index of compacted rows ``offs`` (int64)."""
    if HAS_ROWS:
        rows = tl.load(rows_ptr + offs, mask=mask, other=0).to(tl.int64)
    else:
        rows = offs.to(tl.int64)
    return rows


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, n_mask, cols, v_mask, H, stride_h, stride_w, inv_temp,
                 FP32_DOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """z[rows, cols] = h[rows] . w[cols] / T, float32 ``[BLOCK_N, BLOCK_V]``."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + rows[:, None] * stride_h + offs_k[None, :]
    b_ptrs = w_ptr + cols.to(tl.int64)[None, :] * stride_w + offs_k[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_mask = (k0 + offs_k) < H
        a = tl.load(a_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & v_mask[None, :], other=0.0)
        acc = _dot(a, b, acc, FP32_DOT)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc * inv_temp


@triton.jit
def _fwd_partials_kernel(
    h_ptr, w_ptr, tgt_ptr, rows_ptr, part_ptr,
    Nv, H, V, split_cols, num_splits, inv_temp, stride_h, stride_w,
    HAS_ROWS: tl.constexpr, ENTROPY: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Online log-sum-exp of one token tile over one vocabulary split.

    Writes ``part[0..3, split, row]`` = (max m, sum exp(z - m), sum exp(z - m) (z - m), z[target]).
    """
    pid_s = tl.program_id(0)  # splits vary fastest: concurrent programs share hidden tiles in L2
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < Nv
    rows = _load_rows(rows_ptr, offs_n, n_mask, HAS_ROWS)
    tgt = tl.load(tgt_ptr + rows, mask=n_mask, other=-1).to(tl.int32)

    v_begin = pid_s * split_cols
    v_end = tl.minimum(v_begin + split_cols, V)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    d = tl.zeros([BLOCK_N], dtype=tl.float32)
    z_tgt = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        v_mask = cols < v_end
        z = _logits_tile(h_ptr, w_ptr, rows, n_mask, cols, v_mask, H, stride_h, stride_w, inv_temp,
                         FP32_DOT, BLOCK_N, BLOCK_V, BLOCK_K)
        z = tl.where(v_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))  # finite: every tile has a valid column
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])
        if ENTROPY:
            # Re-centre the running sum of exp(z - m)(z - m) on the new max; guard the first tile
            # (m = -inf, s = 0), where the product would be -inf * 0.
            shift = (tl.where(s > 0, m, m_new) - m_new) * s
            z_rel = tl.where(v_mask[None, :], z - m_new[:, None], 0.0)
            d = alpha * (d + shift) + tl.sum(p * z_rel, axis=1)
        s = s * alpha + tl.sum(p, axis=1)
        z_tgt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        m = m_new

    out = part_ptr + pid_s * Nv + offs_n
    plane = num_splits * Nv
    tl.store(out, m, mask=n_mask)
    tl.store(out + plane, s, mask=n_mask)
    if ENTROPY:
        tl.store(out + 2 * plane, d, mask=n_mask)
    tl.store(out + 3 * plane, z_tgt, mask=n_mask)


@triton.jit
def _fwd_combine_kernel(
    part_ptr, rows_ptr, logp_ptr, ent_ptr, lse_ptr, Nv, num_splits,
    HAS_ROWS: tl.constexpr, ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):
    """Merge the splits of each token in split order; write results at the original rows."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < Nv
    plane = num_splits * Nv
    m_all = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    for i in range(0, num_splits):
        m_all = tl.maximum(m_all, tl.load(part_ptr + i * Nv + offs, mask=mask, other=0.0))
    s_all = tl.zeros([BLOCK], dtype=tl.float32)
    d_all = tl.zeros([BLOCK], dtype=tl.float32)
    z_tgt = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, num_splits):
        ptr = part_ptr + i * Nv + offs
        m_i = tl.load(ptr, mask=mask, other=0.0)
        s_i = tl.load(ptr + plane, mask=mask, other=0.0)
        scale = tl.exp(m_i - m_all)
        s_all += s_i * scale
        if ENTROPY:
            d_i = tl.load(ptr + 2 * plane, mask=mask, other=0.0)
            d_all += scale * (d_i + (m_i - m_all) * s_i)
        z_tgt += tl.load(ptr + 3 * plane, mask=mask, other=0.0)
    log_s = tl.log(tl.where(mask, s_all, 1.0))
    lse = m_all + log_s
    rows = _load_rows(rows_ptr, offs, mask, HAS_ROWS)
    tl.store(logp_ptr + rows, z_tgt - lse, mask=mask)
    tl.store(lse_ptr + rows, lse, mask=mask)
    if ENTROPY:
        tl.store(ent_ptr + rows, log_s - d_all / tl.where(mask, s_all, 1.0), mask=mask)


@triton.jit
def _grouped_pid(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (tile row, tile column), GROUP_M tile rows at a time for L2 reuse."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _bwd_dlogits_kernel(
    h_ptr, w_ptr, tgt_ptr, rows_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr, dz_ptr,
    Nv, H, v_start, chunk_cols, inv_temp, stride_h, stride_w, stride_dz,
    HAS_ROWS: tl.constexpr, ENTROPY_GRAD: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dz[:, chunk] (already divided by T) for the vocabulary chunk starting at ``v_start``."""
    pid_n, pid_v = _grouped_pid(Nv, chunk_cols, BLOCK_N, BLOCK_V, GROUP_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < Nv
    rows = _load_rows(rows_ptr, offs_n, n_mask, HAS_ROWS)
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_mask = local < chunk_cols
    cols = v_start + local
    z = _logits_tile(h_ptr, w_ptr, rows, n_mask, cols, v_mask, H, stride_h, stride_w, inv_temp,
                     FP32_DOT, BLOCK_N, BLOCK_V, BLOCK_K)
    lse = tl.load(lse_ptr + rows, mask=n_mask, other=0.0)
    g = tl.load(glogp_ptr + rows, mask=n_mask, other=0.0)
    tgt = tl.load(tgt_ptr + rows, mask=n_mask, other=-1).to(tl.int32)
    logp = z - lse[:, None]
    p = tl.exp(logp)
    dz = tl.where(cols[None, :] == tgt[:, None], g[:, None], 0.0) - g[:, None] * p
    if ENTROPY_GRAD:
        e = tl.load(gent_ptr + rows, mask=n_mask, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=n_mask, other=0.0)
        dz -= e[:, None] * p * (logp + ent[:, None])
    dz = dz * inv_temp
    out = dz_ptr + offs_n.to(tl.int64)[:, None] * stride_dz + local[None, :]
    tl.store(out, dz.to(dz_ptr.dtype.element_ty), mask=n_mask[:, None] & v_mask[None, :])


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, acc_ptr, b_rows_ptr, c_rows_ptr,
    M, N, K, stride_am, stride_ak, stride_bk, stride_cm, stride_accm,
    B_ROWS: tl.constexpr, C_ROWS: tl.constexpr, LOAD_ACC: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[m, :] = (ACC[m, :] if LOAD_ACC) + sum_k A[m, k] B[k, :], float32 accumulation.

    B's rows may be gathered (``b_rows``), C's rows scattered (``c_rows``); unit column strides.
    """
    pid_m, pid_n = _grouped_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < K
        a = tl.load(a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + ks.to(tl.int64)[None, :] * stride_ak,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if B_ROWS:
            b_rows = tl.load(b_rows_ptr + ks, mask=k_mask, other=0).to(tl.int64)
        else:
            b_rows = ks.to(tl.int64)
        b = tl.load(b_ptr + b_rows[:, None] * stride_bk + offs_n[None, :],
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = _dot(a, b, acc, FP32_DOT)
    mask = m_mask[:, None] & n_mask[None, :]
    if LOAD_ACC:
        acc += tl.load(acc_ptr + offs_m.to(tl.int64)[:, None] * stride_accm + offs_n[None, :], mask=mask, other=0.0)
    if C_ROWS:
        c_rows = tl.load(c_rows_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    else:
        c_rows = offs_m.to(tl.int64)
    tl.store(c_ptr + c_rows[:, None] * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)


# ---- launchers ---------------------------------------------------------------------------------


def _matmul(a, b, out, *, stride_am, stride_ak, M, K, b_rows=None, out_rows=None, acc=None,
            fp32_dot, blocks: tuple[int, int, int], cfg: LogprobsConfig):
    """``out[(out_rows)] = (acc +) A @ B[(b_rows)]`` with A given by pointer and strides."""
    N = out.shape[1]
    block_m, block_n, block_k = blocks
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _matmul_kernel[grid](
        a, b, out, acc if acc is not None else out, b_rows if b_rows is not None else out,
        out_rows if out_rows is not None else out,
        M, N, K, stride_am, stride_ak, b.stride(0), out.stride(0),
        acc.stride(0) if acc is not None else 0,
        B_ROWS=b_rows is not None, C_ROWS=out_rows is not None, LOAD_ACC=acc is not None,
        FP32_DOT=fp32_dot, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=ENABLE_FP_FUSION,
    )


def _fp32_dot(hidden: torch.Tensor, fp32_head: bool) -> bool:
    return fp32_head or hidden.dtype == torch.float32


def logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    row_ids: torch.Tensor | None,
    temperature: float,
    return_entropy: bool,
    fp32_head: bool,
    config: LogprobsConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, lse), float32 ``[N]`` each (entropy ``[0]`` unless asked), zero at rows not
    in ``row_ids`` (None: every row). ``hidden`` [N, H] and ``weight`` [V, H] have unit inner
    strides; targets are valid at ``row_ids``."""
    num_tokens, hidden_size = hidden.shape
    vocab = weight.shape[0]
    fp32_dot = _fp32_dot(hidden, fp32_head)
    cfg = config or default_config(hidden.device, fp32_dot, vocab)
    logp = torch.zeros(num_tokens, device=hidden.device, dtype=torch.float32)
    lse = torch.zeros_like(logp)
    entropy = torch.zeros(num_tokens if return_entropy else 0, device=hidden.device, dtype=torch.float32)
    num_valid = num_tokens if row_ids is None else row_ids.numel()
    if num_valid == 0:
        return logp, entropy, lse
    num_splits = triton.cdiv(vocab, cfg.split_cols)
    partials = torch.empty(4, num_splits, num_valid, device=hidden.device, dtype=torch.float32)
    rows = row_ids if row_ids is not None else logp  # dummy pointer when every row is valid
    _fwd_partials_kernel[(num_splits, triton.cdiv(num_valid, cfg.block_n))](
        hidden, weight, targets, rows, partials,
        num_valid, hidden_size, vocab, cfg.split_cols, num_splits, 1.0 / temperature,
        hidden.stride(0), weight.stride(0),
        HAS_ROWS=row_ids is not None, ENTROPY=return_entropy, FP32_DOT=fp32_dot,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=ENABLE_FP_FUSION,
    )
    combine_block = 128
    _fwd_combine_kernel[(triton.cdiv(num_valid, combine_block),)](
        partials, rows, logp, entropy if return_entropy else logp, lse, num_valid, num_splits,
        HAS_ROWS=row_ids is not None, ENTROPY=return_entropy, BLOCK=combine_block, enable_fp_fusion=ENABLE_FP_FUSION,
    )
    return logp, entropy, lse


def chunk_columns(num_valid: int, vocab: int, budget_elems: int, block: int) -> int:
    """Vocabulary columns per backward chunk: ``num_valid * cols <= budget_elems`` where possible,
    a multiple of ``block``, at least ``block``, at most the vocabulary."""
    cols = max(block, (budget_elems // max(num_valid, 1)) // block * block)
    return min(cols, vocab)


def logprobs_backward(
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    row_ids: torch.Tensor | None,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
    fp32_head: bool,
    budget_elems: int,
    need_hidden: bool = True,
    need_weight: bool = True,
    config: LogprobsConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_hidden, grad_weight) in the dtypes of hidden and weight (an empty tensor for one not
    needed); ``grad_logp`` and ``grad_entropy`` float32 ``[N]`` contiguous. The dz buffer holds
    at most ``max(budget_elems, N_valid * block_v)`` elements."""
    num_tokens, hidden_size = hidden.shape
    vocab = weight.shape[0]
    fp32_dot = _fp32_dot(hidden, fp32_head)
    cfg = config or default_config(hidden.device, fp32_dot, vocab)
    grad_hidden = torch.zeros_like(hidden) if need_hidden else hidden.new_empty(0)
    grad_weight = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    num_valid = num_tokens if row_ids is None else row_ids.numel()
    if num_valid == 0 or not (need_hidden or need_weight):
        return grad_hidden, grad_weight.zero_()
    dz_dtype = torch.float32 if fp32_dot else hidden.dtype
    cols = chunk_columns(num_valid, vocab, budget_elems, cfg.block_v)
    dz = torch.empty(num_valid, cols, device=hidden.device, dtype=dz_dtype)
    chunks = list(range(0, vocab, cols))
    dh_acc = None
    if need_hidden and len(chunks) > 1:
        dh_acc = torch.empty(num_valid, hidden_size, device=hidden.device, dtype=torch.float32)
    rows = row_ids if row_ids is not None else lse
    entropy_grad = grad_entropy is not None and entropy.numel() > 0
    for i, v_start in enumerate(chunks):
        chunk = min(cols, vocab - v_start)
        grid = (triton.cdiv(num_valid, cfg.block_n) * triton.cdiv(chunk, cfg.block_v),)
        _bwd_dlogits_kernel[grid](
            hidden, weight, targets, rows, lse, entropy if entropy_grad else lse,
            grad_logp, grad_entropy if entropy_grad else grad_logp, dz,
            num_valid, hidden_size, v_start, chunk, 1.0 / temperature,
            hidden.stride(0), weight.stride(0), dz.stride(0),
            HAS_ROWS=row_ids is not None, ENTROPY_GRAD=entropy_grad, FP32_DOT=fp32_dot,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=ENABLE_FP_FUSION,
        )
        if need_weight:
            # dW[chunk] = dz^T H: the reduction over all tokens stays inside one program per tile.
            _matmul(dz, hidden, grad_weight[v_start:v_start + chunk], stride_am=1, stride_ak=dz.stride(0),
                    M=chunk, K=num_valid, b_rows=row_ids, fp32_dot=fp32_dot, blocks=cfg.mm_dw, cfg=cfg)
        if not need_hidden:
            continue
        # dH (+)= dz W[chunk]; the last chunk writes grad_hidden at the original rows.
        last = i == len(chunks) - 1
        _matmul(dz, weight[v_start:v_start + chunk], grad_hidden if last else dh_acc,
                stride_am=dz.stride(0), stride_ak=1, M=num_valid, K=chunk,
                out_rows=row_ids if last else None, acc=dh_acc if i > 0 else None,
                fp32_dot=fp32_dot, blocks=cfg.mm_dh, cfg=cfg)
    return grad_hidden, grad_weight
