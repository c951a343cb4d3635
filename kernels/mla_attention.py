"""Triton kernels of MLA training / prefill attention over packed variable-length sequences
(``moe_align.ops.mla.mla_varlen_attention``).

For one head of one sequence with queries ``q_i = [qn_i, qr_i]`` and keys ``k_j = [kn_j, kr_j]``
(``kr_j`` is the rope part of the key, shared by every head and read from a ``[T, 1, D_rope]``
tensor, never expanded)::

    s_ij  = c (qn_i . kn_j + qr_i . kr_j)            for j <= i (causal), c = softmax_scale
    lse_i = log sum_j exp(s_ij),   p_ij = exp(s_ij - lse_i),   o_i = sum_j p_ij v_j

and for an incoming gradient ``do`` (``delta_i = do_i . o_i``)::

    dp_ij = do_i . v_j,   ds_ij = p_ij (dp_ij - delta_i)
    dqn_i = c sum_j ds_ij kn_j,   dqr_i = c sum_j ds_ij kr_j
    dkn_j = c sum_i ds_ij qn_i,   dv_j = sum_i p_ij do_i
    dkr_j = c sum_heads sum_i ds_ij qr_i              (the key's rope part is shared by the heads)

Forward (flash-attention 2 style): one program per (query tile, sequence, head) streams the key
tiles of its sequence up to the diagonal through an online softmax in base 2; tiles strictly
below the diagonal skip the causal mask. Only the output and the log-sum-exp are stored.

Backward: ``delta`` is computed by a small kernel, then two kernels recompute the probabilities
from the stored log-sum-exp. One program per (key tile, sequence, group of heads) owns ``dkn`` and
``dv`` of its heads and sums ``dkr`` over them, writing one float32 partial per head group
(summed over groups afterwards: no atomics, deterministic); one program per (query tile,
sequence, head) owns ``dqn`` and ``dqr``. Nothing of size T x T is ever stored.

Every head dimension may be any multiple of 16 (tiles are padded to a power of two and masked);
tensors may have any token and head strides, with a unit stride along the head dimension.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from . import ENABLE_FP_FUSION

__all__ = ["VarlenConfig", "default_config", "mla_varlen_bwd", "mla_varlen_fwd"]

LOG2E = 1.4426950408889634


@dataclasses.dataclass(frozen=True)
class VarlenConfig:
    """Tile sizes of the three kernels. The forward and the dq kernel need ``block_m % block_n
    == 0``, the dk/dv kernel ``dkdv_block_n % dkdv_block_m == 0``, so that the diagonal starts on
    a tile boundary."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    dkdv_block_m: int
    dkdv_block_n: int
    dkdv_num_warps: int
    dq_block_m: int
    dq_block_n: int
    dq_num_warps: int
    bwd_num_stages: int

    def __post_init__(self):
        if self.block_m % self.block_n or self.dq_block_m % self.dq_block_n or self.dkdv_block_n % self.dkdv_block_m:
            raise ValueError(f"inconsistent tile sizes {self}")


def default_config(device: torch.device, d_qk: int, d_v: int, dtype: torch.dtype = torch.bfloat16) -> VarlenConfig:
    """The interpreter gets the smallest tiles tl.dot takes. The CUDA tiles follow flash-attention
    2's Triton kernels, sized for sm_90 so that no kernel spills registers; they were chosen
    without a GPU at hand (untimed). float32 (exact products, no tensor cores: a correctness
    reference) gets small tiles."""
    if device.type != "cuda":
        return VarlenConfig(16, 16, 1, 1, 16, 16, 1, 16, 16, 1, 1)
    if dtype == torch.float32:
        return VarlenConfig(16, 16, 4, 2, 16, 32, 8, 32, 32, 8, 2)
    if d_qk + d_v > 384:
        return VarlenConfig(64, 32, 4, 2, 16, 32, 8, 64, 32, 8, 2)
    # At DeepSeek's 192 / 128, AOT-compiled for sm_90 with Triton 3.6: 252, 236 and 221 registers
    # per thread for the three kernels and no spills.
    return VarlenConfig(128, 64, 8, 2, 32, 32, 8, 128, 32, 8, 2)


def _pow2(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _query_tile(
    QN, QR, seq_start, seq_len, m_start, head, s_qn_t, s_qn_h, s_qr_t, s_qr_h,
    D_NOPE: tl.constexpr, D_ROPE: tl.constexpr,
    BLOCK_DN: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Query rows ``m_start ..`` of one sequence and head: (offs_m, rows, row_valid, q_nope, q_rope),
    ``rows`` the int64 token indices, ``offs_m`` the positions in the sequence."""
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_dn = tl.arange(0, BLOCK_DN)
    offs_dr = tl.arange(0, BLOCK_DR)
    row_valid = offs_m < seq_len
    rows = (seq_start + offs_m).to(tl.int64)
    q_nope = tl.load(QN + rows[:, None] * s_qn_t + head * s_qn_h + offs_dn[None, :],
                     mask=row_valid[:, None] & (offs_dn[None, :] < D_NOPE), other=0.0)
    q_rope = tl.load(QR + rows[:, None] * s_qr_t + head * s_qr_h + offs_dr[None, :],
                     mask=row_valid[:, None] & (offs_dr[None, :] < D_ROPE), other=0.0)
    return offs_m, rows, row_valid, q_nope, q_rope


@triton.jit
def _fwd_tile(
    acc, l_i, m_i, q_nope, q_rope,
    kn_base, kr_base, v_base, s_kn_t, s_kr_t, s_v_t,
    n0, offs_m, offs_n, offs_dn, offs_dr, offs_dv, seq_len, qk_scale,
    D_NOPE: tl.constexpr, D_ROPE: tl.constexpr, D_V: tl.constexpr,
    CAUSAL_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    kpos = n0 + offs_n
    kvalid = kpos < seq_len
    krow = kpos.to(tl.int64)
    kn_t = tl.load(kn_base + krow[None, :] * s_kn_t + offs_dn[:, None],
                   mask=kvalid[None, :] & (offs_dn[:, None] < D_NOPE), other=0.0)
    kr_t = tl.load(kr_base + krow[None, :] * s_kr_t + offs_dr[:, None],
                   mask=kvalid[None, :] & (offs_dr[:, None] < D_ROPE), other=0.0)
    s = tl.dot(q_nope, kn_t, input_precision=DOT_PRECISION)
    s = tl.dot(q_rope, kr_t, s, input_precision=DOT_PRECISION)
    s = s * qk_scale
    if CAUSAL_MASK:
        visible = (kpos[None, :] <= offs_m[:, None]) & kvalid[None, :]
        s = tl.where(visible, s, float("-inf"))
    # Every row sees key 0 in its first tile, so m_new is finite and no NaN can arise.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    v = tl.load(v_base + krow[:, None] * s_v_t + offs_dv[None, :],
                mask=kvalid[:, None] & (offs_dv[None, :] < D_V), other=0.0)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    l_i = l_i * alpha + tl.sum(p, 1)
    return acc, l_i, m_new


@triton.jit
def _mla_fwd_kernel(
    QN, QR, KN, KR, V, O, LSE, CU_SEQLENS,
    qk_scale,
    s_qn_t, s_qn_h, s_qr_t, s_qr_h, s_kn_t, s_kn_h, s_kr_t, s_v_t, s_v_h, s_o_t, s_o_h,
    NUM_HEADS,
    D_NOPE: tl.constexpr, D_ROPE: tl.constexpr, D_V: tl.constexpr,
    BLOCK_DN: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    seq_start = tl.load(CU_SEQLENS + seq)
    seq_len = tl.load(CU_SEQLENS + seq + 1) - seq_start
    m_start = pid_m * BLOCK_M
    if m_start >= seq_len:
        return

    offs_m, rows, row_valid, q_nope, q_rope = _query_tile(
        QN, QR, seq_start, seq_len, m_start, head, s_qn_t, s_qn_h, s_qr_t, s_qr_h,
        D_NOPE, D_ROPE, BLOCK_DN, BLOCK_DR, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dn = tl.arange(0, BLOCK_DN)
    offs_dr = tl.arange(0, BLOCK_DR)
    offs_dv = tl.arange(0, BLOCK_DV)

    base = seq_start.to(tl.int64)
    kn_base = KN + base * s_kn_t + head * s_kn_h
    kr_base = KR + base * s_kr_t
    v_base = V + base * s_v_t + head * s_v_h

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    # Key tiles entirely below the diagonal of this query tile: no mask.
    for n0 in range(0, m_start, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(
            acc, l_i, m_i, q_nope, q_rope, kn_base, kr_base, v_base, s_kn_t, s_kr_t, s_v_t,
            n0, offs_m, offs_n, offs_dn, offs_dr, offs_dv, seq_len, qk_scale,
            D_NOPE, D_ROPE, D_V, False, DOT_PRECISION)
    # Tiles crossing the diagonal.
    for n0 in range(m_start, tl.minimum(m_start + BLOCK_M, seq_len), BLOCK_N):
        acc, l_i, m_i = _fwd_tile(
            acc, l_i, m_i, q_nope, q_rope, kn_base, kr_base, v_base, s_kn_t, s_kr_t, s_v_t,
            n0, offs_m, offs_n, offs_dn, offs_dr, offs_dv, seq_len, qk_scale,
            D_NOPE, D_ROPE, D_V, True, DOT_PRECISION)

    acc = acc / l_i[:, None]
    tl.store(O + rows[:, None] * s_o_t + head * s_o_h + offs_dv[None, :],
             acc.to(O.dtype.element_ty), mask=row_valid[:, None] & (offs_dv[None, :] < D_V))
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + rows * NUM_HEADS + head, lse, mask=row_valid)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _bwd_delta_kernel(
    O, DO, DELTA, TOTAL_ROWS, NUM_HEADS, s_o_t, s_o_h, s_do_t, s_do_h,
    D_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_R: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # row = token * NUM_HEADS + head
    valid = r < TOTAL_ROWS
    tok = (r // NUM_HEADS).to(tl.int64)
    head = r % NUM_HEADS
    offs_d = tl.arange(0, BLOCK_DV)
    mask = valid[:, None] & (offs_d[None, :] < D_V)
    o = tl.load(O + tok[:, None] * s_o_t + head[:, None] * s_o_h + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + tok[:, None] * s_do_t + head[:, None] * s_do_h + offs_d[None, :], mask=mask, other=0.0)
    tl.store(DELTA + r, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=valid)


@triton.jit
def _bwd_dkdv_tile(
    dkn, dkr, dv, kn, kr, v,
    qn_base, qr_base, do_base, lse_base, delta_base, s_qn_t, s_qr_t, s_do_t, num_heads,
    m0, kpos, offs_m, offs_dn, offs_dr, offs_dv, seq_len, qk_scale,
    D_NOPE: tl.constexpr, D_ROPE: tl.constexpr, D_V: tl.constexpr,
    CAUSAL_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    qpos = m0 + offs_m
    qvalid = qpos < seq_len
    qrow = qpos.to(tl.int64)
    qn = tl.load(qn_base + qrow[:, None] * s_qn_t + offs_dn[None, :],
                 mask=qvalid[:, None] & (offs_dn[None, :] < D_NOPE), other=0.0)
    qr = tl.load(qr_base + qrow[:, None] * s_qr_t + offs_dr[None, :],
                 mask=qvalid[:, None] & (offs_dr[None, :] < D_ROPE), other=0.0)
    do = tl.load(do_base + qrow[:, None] * s_do_t + offs_dv[None, :],
                 mask=qvalid[:, None] & (offs_dv[None, :] < D_V), other=0.0)
    lse2 = tl.load(lse_base + qrow * num_heads, mask=qvalid, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_base + qrow * num_heads, mask=qvalid, other=0.0)
    # Transposed scores: rows are keys, columns queries.
    s_t = tl.dot(kn, tl.trans(qn), input_precision=DOT_PRECISION)
    s_t = tl.dot(kr, tl.trans(qr), s_t, input_precision=DOT_PRECISION)
    p_t = tl.exp2(s_t * qk_scale - lse2[None, :])
    if CAUSAL_MASK:
        p_t = tl.where((kpos[:, None] <= qpos[None, :]) & qvalid[None, :], p_t, 0.0)
    else:
        p_t = tl.where(qvalid[None, :], p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = (p_t * (dp_t - delta[None, :])).to(qn.dtype)
    dkn = tl.dot(ds_t, qn, dkn, input_precision=DOT_PRECISION)
    dkr = tl.dot(ds_t, qr, dkr, input_precision=DOT_PRECISION)
    return dkn, dkr, dv


@triton.jit
def _mla_bwd_dkdv_kernel(
    QN, QR, KN, KR, V, DO, LSE, DELTA, DKN, DKR_PART, DV, CU_SEQLENS,
    qk_scale, sm_scale,
    s_qn_t, s_qn_h, s_qr_t, s_qr_h, s_kn_t, s_kn_h, s_kr_t, s_v_t, s_v_h, s_do_t, s_do_h,
    s_dkn_t, s_dkn_h, s_dv_t, s_dv_h, s_dkr_g,
    NUM_HEADS,
    HEADS_PER_PROGRAM: tl.constexpr,
    D_NOPE: tl.constexpr, D_ROPE: tl.constexpr, D_V: tl.constexpr,
    BLOCK_DN: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    seq = tl.program_id(1)
    group = tl.program_id(2)
    seq_start = tl.load(CU_SEQLENS + seq)
    seq_len = tl.load(CU_SEQLENS + seq + 1) - seq_start
    n_start = pid_n * BLOCK_N
    if n_start >= seq_len:
        return

    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_dn = tl.arange(0, BLOCK_DN)
    offs_dr = tl.arange(0, BLOCK_DR)
    offs_dv = tl.arange(0, BLOCK_DV)
    kpos = n_start + offs_n
    kvalid = kpos < seq_len
    krows = (seq_start + kpos).to(tl.int64)
    base = seq_start.to(tl.int64)
    kr = tl.load(KR + krows[:, None] * s_kr_t + offs_dr[None, :],
                 mask=kvalid[:, None] & (offs_dr[None, :] < D_ROPE), other=0.0)
    dkr = tl.zeros([BLOCK_N, BLOCK_DR], tl.float32)
    diag_end = tl.minimum(n_start + BLOCK_N, seq_len)

    for hh in range(HEADS_PER_PROGRAM):
        head = group * HEADS_PER_PROGRAM + hh
        kn = tl.load(KN + krows[:, None] * s_kn_t + head * s_kn_h + offs_dn[None, :],
                     mask=kvalid[:, None] & (offs_dn[None, :] < D_NOPE), other=0.0)
        v = tl.load(V + krows[:, None] * s_v_t + head * s_v_h + offs_dv[None, :],
                    mask=kvalid[:, None] & (offs_dv[None, :] < D_V), other=0.0)
        qn_base = QN + base * s_qn_t + head * s_qn_h
        qr_base = QR + base * s_qr_t + head * s_qr_h
        do_base = DO + base * s_do_t + head * s_do_h
        lse_base = LSE + base * NUM_HEADS + head
        delta_base = DELTA + base * NUM_HEADS + head
        dkn = tl.zeros([BLOCK_N, BLOCK_DN], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
        # Query tiles on the diagonal of this key tile, then those entirely below it.
        for m0 in range(n_start, diag_end, BLOCK_M):
            dkn, dkr, dv = _bwd_dkdv_tile(
                dkn, dkr, dv, kn, kr, v, qn_base, qr_base, do_base, lse_base, delta_base,
                s_qn_t, s_qr_t, s_do_t, NUM_HEADS, m0, kpos, offs_m, offs_dn, offs_dr, offs_dv,
                seq_len, qk_scale, D_NOPE, D_ROPE, D_V, True, DOT_PRECISION)
        for m0 in range(n_start + BLOCK_N, seq_len, BLOCK_M):
            dkn, dkr, dv = _bwd_dkdv_tile(
                dkn, dkr, dv, kn, kr, v, qn_base, qr_base, do_base, lse_base, delta_base,
                s_qn_t, s_qr_t, s_do_t, NUM_HEADS, m0, kpos, offs_m, offs_dn, offs_dr, offs_dv,
                seq_len, qk_scale, D_NOPE, D_ROPE, D_V, False, DOT_PRECISION)
        tl.store(DKN + krows[:, None] * s_dkn_t + head * s_dkn_h + offs_dn[None, :],
                 (dkn * sm_scale).to(DKN.dtype.element_ty),
                 mask=kvalid[:, None] & (offs_dn[None, :] < D_NOPE))
        tl.store(DV + krows[:, None] * s_dv_t + head * s_dv_h + offs_dv[None, :],
                 dv.to(DV.dtype.element_ty), mask=kvalid[:, None] & (offs_dv[None, :] < D_V))
    tl.store(DKR_PART + group * s_dkr_g + krows[:, None] * D_ROPE + offs_dr[None, :], dkr * sm_scale,
             mask=kvalid[:, None] & (offs_dr[None, :] < D_ROPE))


@triton.jit
def _bwd_dq_tile(
    dqn, dqr, qn, qr, do, lse2, delta,
    kn_base, kr_base, v_base, s_kn_t, s_kr_t, s_v_t,
    n0, offs_m, offs_n, offs_dn, offs_dr, offs_dv, seq_len, qk_scale,
    D_NOPE: tl.constexpr, D_ROPE: tl.constexpr, D_V: tl.constexpr,
    CAUSAL_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    kpos = n0 + offs_n
    kvalid = kpos < seq_len
    krow = kpos.to(tl.int64)
    kn = tl.load(kn_base + krow[:, None] * s_kn_t + offs_dn[None, :],
                 mask=kvalid[:, None] & (offs_dn[None, :] < D_NOPE), other=0.0)
    kr = tl.load(kr_base + krow[:, None] * s_kr_t + offs_dr[None, :],
                 mask=kvalid[:, None] & (offs_dr[None, :] < D_ROPE), other=0.0)
    v = tl.load(v_base + krow[:, None] * s_v_t + offs_dv[None, :],
                mask=kvalid[:, None] & (offs_dv[None, :] < D_V), other=0.0)
    s = tl.dot(qn, tl.trans(kn), input_precision=DOT_PRECISION)
    s = tl.dot(qr, tl.trans(kr), s, input_precision=DOT_PRECISION)
    p = tl.exp2(s * qk_scale - lse2[:, None])
    if CAUSAL_MASK:
        p = tl.where((kpos[None, :] <= offs_m[:, None]) & kvalid[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = (p * (dp - delta[:, None])).to(kn.dtype)
    dqn = tl.dot(ds, kn, dqn, input_precision=DOT_PRECISION)
    dqr = tl.dot(ds, kr, dqr, input_precision=DOT_PRECISION)
    return dqn, dqr


@triton.jit
def _mla_bwd_dq_kernel(
    QN, QR, KN, KR, V, DO, LSE, DELTA, DQN, DQR, CU_SEQLENS,
    qk_scale, sm_scale,
    s_qn_t, s_qn_h, s_qr_t, s_qr_h, s_kn_t, s_kn_h, s_kr_t, s_v_t, s_v_h, s_do_t, s_do_h,
    s_dqn_t, s_dqn_h, s_dqr_t, s_dqr_h,
    NUM_HEADS,
    D_NOPE: tl.constexpr, D_ROPE: tl.constexpr, D_V: tl.constexpr,
    BLOCK_DN: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    seq_start = tl.load(CU_SEQLENS + seq)
    seq_len = tl.load(CU_SEQLENS + seq + 1) - seq_start
    m_start = pid_m * BLOCK_M
    if m_start >= seq_len:
        return

    offs_m, rows, row_valid, qn, qr = _query_tile(
        QN, QR, seq_start, seq_len, m_start, head, s_qn_t, s_qn_h, s_qr_t, s_qr_h,
        D_NOPE, D_ROPE, BLOCK_DN, BLOCK_DR, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dn = tl.arange(0, BLOCK_DN)
    offs_dr = tl.arange(0, BLOCK_DR)
    offs_dv = tl.arange(0, BLOCK_DV)
    do = tl.load(DO + rows[:, None] * s_do_t + head * s_do_h + offs_dv[None, :],
                 mask=row_valid[:, None] & (offs_dv[None, :] < D_V), other=0.0)
    lse2 = tl.load(LSE + rows * NUM_HEADS + head, mask=row_valid, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + rows * NUM_HEADS + head, mask=row_valid, other=0.0)

    base = seq_start.to(tl.int64)
    kn_base = KN + base * s_kn_t + head * s_kn_h
    kr_base = KR + base * s_kr_t
    v_base = V + base * s_v_t + head * s_v_h
    dqn = tl.zeros([BLOCK_M, BLOCK_DN], tl.float32)
    dqr = tl.zeros([BLOCK_M, BLOCK_DR], tl.float32)
    for n0 in range(0, m_start, BLOCK_N):
        dqn, dqr = _bwd_dq_tile(
            dqn, dqr, qn, qr, do, lse2, delta, kn_base, kr_base, v_base, s_kn_t, s_kr_t, s_v_t,
            n0, offs_m, offs_n, offs_dn, offs_dr, offs_dv, seq_len, qk_scale,
            D_NOPE, D_ROPE, D_V, False, DOT_PRECISION)
    for n0 in range(m_start, tl.minimum(m_start + BLOCK_M, seq_len), BLOCK_N):
        dqn, dqr = _bwd_dq_tile(
            dqn, dqr, qn, qr, do, lse2, delta, kn_base, kr_base, v_base, s_kn_t, s_kr_t, s_v_t,
            n0, offs_m, offs_n, offs_dn, offs_dr, offs_dv, seq_len, qk_scale,
            D_NOPE, D_ROPE, D_V, True, DOT_PRECISION)
    tl.store(DQN + rows[:, None] * s_dqn_t + head * s_dqn_h + offs_dn[None, :],
             (dqn * sm_scale).to(DQN.dtype.element_ty),
             mask=row_valid[:, None] & (offs_dn[None, :] < D_NOPE))
    tl.store(DQR + rows[:, None] * s_dqr_t + head * s_dqr_h + offs_dr[None, :],
             (dqr * sm_scale).to(DQR.dtype.element_ty),
             mask=row_valid[:, None] & (offs_dr[None, :] < D_ROPE))


# --------------------------------------------------------------------------------------------
# Launchers (arguments already validated by moe_align.ops.mla)
# --------------------------------------------------------------------------------------------


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products (TF32 would miss fp32 tolerances).
    return "ieee" if dtype == torch.float32 else "tf32"


def _heads_per_program(num_heads: int, key_tiles: int, device: torch.device) -> int:
    """Heads summed in one dk/dv program: as many as keep >= ~4 programs per SM (fewer float32
    partials of the shared rope gradient), at most 16."""
    if device.type != "cuda":
        return 2 if num_heads % 2 == 0 else 1
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    best = 1
    for g in range(1, min(num_heads, 16) + 1):
        if num_heads % g == 0 and key_tiles * (num_heads // g) >= target:
            best = g
    return best


def mla_varlen_fwd(
    q_nope: torch.Tensor, q_rope: torch.Tensor, k_nope: torch.Tensor, k_rope: torch.Tensor,
    v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, softmax_scale: float,
    config: VarlenConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes as in ``mla_varlen_attention``; every tensor has a unit last stride."""
    total, num_heads, d_nope = q_nope.shape
    d_rope, d_v = q_rope.shape[-1], v.shape[-1]
    cfg = config or default_config(q_nope.device, d_nope + d_rope, d_v, q_nope.dtype)
    out = torch.empty((total, num_heads, d_v), dtype=q_nope.dtype, device=q_nope.device)
    lse = torch.empty((total, num_heads), dtype=torch.float32, device=q_nope.device)
    batch = cu_seqlens.shape[0] - 1
    if total == 0 or batch == 0 or max_seqlen == 0:
        return out, lse
    grid = (triton.cdiv(max_seqlen, cfg.block_m), batch, num_heads)
    _mla_fwd_kernel[grid](
        q_nope, q_rope, k_nope, k_rope, v, out, lse, cu_seqlens,
        softmax_scale * LOG2E,
        q_nope.stride(0), q_nope.stride(1), q_rope.stride(0), q_rope.stride(1),
        k_nope.stride(0), k_nope.stride(1), k_rope.stride(0), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        num_heads,
        D_NOPE=d_nope, D_ROPE=d_rope, D_V=d_v,
        BLOCK_DN=_pow2(d_nope), BLOCK_DR=_pow2(d_rope), BLOCK_DV=_pow2(d_v),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DOT_PRECISION=_dot_precision(q_nope.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=ENABLE_FP_FUSION,
    )
    return out, lse


def mla_varlen_bwd(
    grad_out: torch.Tensor, q_nope: torch.Tensor, q_rope: torch.Tensor, k_nope: torch.Tensor,
    k_rope: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens: torch.Tensor, max_seqlen: int, softmax_scale: float,
    grad_lse: torch.Tensor | None = None, config: VarlenConfig | None = None,
    heads_per_program: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dq_nope, dq_rope, dk_nope, dk_rope [T, 1, D_rope], dv)`` in the input dtypes.
    ``grad_lse`` (float32 ``[T, H]``), the gradient of the log-sum-exp, enters as
    ``ds_ij = p_ij (dp_ij - delta_i + grad_lse_i)``."""
    total, num_heads, d_nope = q_nope.shape
    d_rope, d_v = q_rope.shape[-1], v.shape[-1]
    device = q_nope.device
    cfg = config or default_config(device, d_nope + d_rope, d_v, q_nope.dtype)
    dq_nope = torch.empty((total, num_heads, d_nope), dtype=q_nope.dtype, device=device)
    dq_rope = torch.empty((total, num_heads, d_rope), dtype=q_rope.dtype, device=device)
    dk_nope = torch.empty((total, num_heads, d_nope), dtype=k_nope.dtype, device=device)
    dv = torch.empty((total, num_heads, d_v), dtype=v.dtype, device=device)
    batch = cu_seqlens.shape[0] - 1
    if total == 0 or batch == 0 or max_seqlen == 0:
        return dq_nope, dq_rope, dk_nope, torch.zeros_like(k_rope), dv

    delta = torch.empty((total, num_heads), dtype=torch.float32, device=device)
    block_r = 16
    _bwd_delta_kernel[(triton.cdiv(total * num_heads, block_r),)](
        out, grad_out, delta, total * num_heads, num_heads,
        out.stride(0), out.stride(1), grad_out.stride(0), grad_out.stride(1),
        D_V=d_v, BLOCK_DV=_pow2(d_v), BLOCK_R=block_r, enable_fp_fusion=ENABLE_FP_FUSION,
    )
    if grad_lse is not None:
        delta -= grad_lse
    common = dict(D_NOPE=d_nope, D_ROPE=d_rope, D_V=d_v, BLOCK_DN=_pow2(d_nope),
                  BLOCK_DR=_pow2(d_rope), BLOCK_DV=_pow2(d_v), DOT_PRECISION=_dot_precision(q_nope.dtype),
                  enable_fp_fusion=ENABLE_FP_FUSION)
    strides = (q_nope.stride(0), q_nope.stride(1), q_rope.stride(0), q_rope.stride(1),
               k_nope.stride(0), k_nope.stride(1), k_rope.stride(0), v.stride(0), v.stride(1),
               grad_out.stride(0), grad_out.stride(1))

    key_tiles = triton.cdiv(max_seqlen, cfg.dkdv_block_n)
    group = heads_per_program or _heads_per_program(num_heads, key_tiles * batch, device)
    if num_heads % group:
        raise ValueError(f"heads_per_program={group} must divide num_heads={num_heads}")
    num_groups = num_heads // group
    dkr_part = torch.empty((num_groups, total, d_rope), dtype=torch.float32, device=device)
    _mla_bwd_dkdv_kernel[(key_tiles, batch, num_groups)](
        q_nope, q_rope, k_nope, k_rope, v, grad_out, lse, delta, dk_nope, dkr_part, dv, cu_seqlens,
        softmax_scale * LOG2E, softmax_scale, *strides,
        dk_nope.stride(0), dk_nope.stride(1), dv.stride(0), dv.stride(1), dkr_part.stride(0),
        num_heads, HEADS_PER_PROGRAM=group,
        BLOCK_M=cfg.dkdv_block_m, BLOCK_N=cfg.dkdv_block_n,
        num_warps=cfg.dkdv_num_warps, num_stages=cfg.bwd_num_stages, **common,
    )
    _mla_bwd_dq_kernel[(triton.cdiv(max_seqlen, cfg.dq_block_m), batch, num_heads)](
        q_nope, q_rope, k_nope, k_rope, v, grad_out, lse, delta, dq_nope, dq_rope, cu_seqlens,
        softmax_scale * LOG2E, softmax_scale, *strides,
        dq_nope.stride(0), dq_nope.stride(1), dq_rope.stride(0), dq_rope.stride(1),
        num_heads, BLOCK_M=cfg.dq_block_m, BLOCK_N=cfg.dq_block_n,
        num_warps=cfg.dq_num_warps, num_stages=cfg.bwd_num_stages, **common,
    )
    dk_rope = dkr_part.sum(dim=0).to(k_rope.dtype).view(total, 1, d_rope)
    return dq_nope, dq_rope, dk_nope, dk_rope, dv


