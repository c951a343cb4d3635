"""Triton kernels of the routed experts of DeepSeekMoE (``moe_align.ops.fused_moe.fused_experts``).

For token ``t``, its ``k``-th expert ``e = topk_ids[t, k]``, routing weight ``w = w[t, k]`` and
the flat pair index ``p = t*K + k``::

    [g_p; u_p] = gate_up[e] @ x_t                 (g_p, u_p in R^I: the pre-activation ``gu_p``)
    a_p        = silu(g_p) * u_p                   (SwiGLU)
    y_p        = w_p * down[e] @ a_p               (R^H)
    out_t      = sum_k y_{tK+k}

and for an incoming gradient ``dy_t`` (``s = sigmoid(g)``, ``silu'(g) = s (1 + g (1 - s))``)::

    z_p       = down[e]^T dy_t                     (R^I)
    dw_p      = <z_p, a_p>
    dg_p      = w_p z_p * u_p * silu'(g_p),   du_p = w_p z_p * silu(g_p)
    dx_t      = sum_k gate_up[e]^T [dg_p; du_p]
    dgate_up[e] = sum_{p of e} [dg_p; du_p] x_t^T,   ddown[e] = sum_{p of e} dy_t (w_p a_p)^T

Layout: the pairs are grouped by expert with ``moe_align_block_size`` (``sorted_ids``, the
expert of each block of ``BLOCK_M`` slots, and the number of used slots), so every program of
a grouped GEMM multiplies one block of gathered rows by one expert's weights. Padding slots hold
the sentinel ``T*K`` and are masked. Everything stored per pair (``gu``, the activation, the
per-pair outputs, ``dgu``) is indexed by the flat pair index ``p``, so padding costs no memory.

Forward: (1) ``x @ gate_up[e]^T`` with SwiGLU in the epilogue (stores ``gu`` for the backward and
the activation), (2) ``a @ down[e]^T`` scaled by ``w`` in the epilogue, one row per pair,
(3) a sum over ``k`` back to token order. Backward: (a) ``dy @ down[e]`` with the SwiGLU
derivative, the routing-weight gradient (per-tile partial dot products, summed afterwards) and
``w_p a_p`` (recomputed from ``gu``) in the epilogue, (b) the weight gradients, one program per
(expert, output tile) looping over the expert's slots (experts without pairs get exact zeros),
(c) ``dgu @ gate_up[e]`` per pair, summed over ``k``. Nothing uses atomics: results are
deterministic.

Address arithmetic is 64-bit throughout (row indices are widened before they meet a stride), so
65536 tokens x hidden 7168 x top-8 is addressed correctly. ``x``, ``grad_out`` and the weights
are read through their strides (any strides); buffers the launchers allocate are contiguous.
Accumulation is float32; fp32 operands use IEEE dots unless torch allows TF32.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from . import ENABLE_FP_FUSION

__all__ = [
    "block_m_for",
    "expert_slot_starts",
    "fused_experts_backward",
    "fused_experts_forward",
]


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _tile_coords(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Program id -> (row block, column tile), GROUP_M row blocks at a time (L2 reuse of B)."""
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % rows, (pid % width) // rows


@triton.jit
def _expert_block_tile(sorted_ids_ptr, block_expert_ptr, pid_m, pid_n, num_pairs, num_cols,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (row block, column tile) of the expert-sorted layout: the block's expert, the flat pair
    indices of its slots and which of them are real pairs, the tile's columns and which of them
    are below ``num_cols`` (expert, pairs and columns as int64)."""
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    slots = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + slots).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return expert, pair, pair < num_pairs, cols.to(tl.int64), cols < num_cols


# --------------------------------------------------------------------------------------------
# Forward (1): gate_up GEMM + SwiGLU
# --------------------------------------------------------------------------------------------


@triton.jit
def _gate_up_swiglu_kernel(
    x_ptr, w_ptr, gu_ptr, act_ptr,
    sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
    num_pairs, top_k, hidden, inter, num_m,
    stride_xt, stride_xh, stride_we, stride_wn, stride_wh,
    SAVE_GU: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """gu[p] = gate_up[e] @ x[p // K] (both halves of one column tile), act[p] = silu(g) * u."""
    pid_m, pid_n = _tile_coords(tl.program_id(0), num_m, tl.cdiv(inter, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert, pair, valid, cols, col_ok = _expert_block_tile(
        sorted_ids_ptr, block_expert_ptr, pid_m, pid_n, num_pairs, inter, BLOCK_M, BLOCK_N)
    token = pair // top_k
    ks = tl.arange(0, BLOCK_K)
    stride_xh = tl.cast(stride_xh, tl.int64)
    stride_wh = tl.cast(stride_wh, tl.int64)

    x_ptrs = x_ptr + token[:, None] * stride_xt + ks.to(tl.int64)[None, :] * stride_xh
    w_ptrs = w_ptr + expert * stride_we + ks.to(tl.int64)[:, None] * stride_wh
    g_ptrs = w_ptrs + cols[None, :] * stride_wn
    u_ptrs = w_ptrs + (cols + inter)[None, :] * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_ok = ks < hidden - k0
        a = tl.load(x_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        b_g = tl.load(g_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        b_u = tl.load(u_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc_g = tl.dot(a, b_g, acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(a, b_u, acc_u, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xh
        g_ptrs += BLOCK_K * stride_wh
        u_ptrs += BLOCK_K * stride_wh

    mask = valid[:, None] & col_ok[None, :]
    out_ty = act_ptr.dtype.element_ty
    if SAVE_GU:
        gu_ptrs = gu_ptr + pair[:, None] * (2 * inter) + cols[None, :]
        tl.store(gu_ptrs, acc_g.to(out_ty), mask=mask)
        tl.store(gu_ptrs + inter, acc_u.to(out_ty), mask=mask)
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(act_ptr + pair[:, None] * inter + cols[None, :], act.to(out_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Forward (2) and backward (c): per-pair rows times the expert's weights
# --------------------------------------------------------------------------------------------


@triton.jit
def _pair_rows_gemm_kernel(
    a_ptr, b_ptr, c_ptr, scale_ptr,
    sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
    num_pairs, n_out, k_dim, num_m,
    stride_be, stride_bk, stride_bn,
    SCALE_ROWS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """c[p, :] = a[p, :] @ B_e (times scale[p] if SCALE_ROWS); a [P, k_dim], c [P, n_out]
    contiguous; B_e[k, n] = b[e*stride_be + k*stride_bk + n*stride_bn]."""
    pid_m, pid_n = _tile_coords(tl.program_id(0), num_m, tl.cdiv(n_out, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert, pair, valid, cols, col_ok = _expert_block_tile(
        sorted_ids_ptr, block_expert_ptr, pid_m, pid_n, num_pairs, n_out, BLOCK_M, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    stride_bk = tl.cast(stride_bk, tl.int64)

    a_ptrs = a_ptr + pair[:, None] * k_dim + ks.to(tl.int64)[None, :]
    b_ptrs = b_ptr + expert * stride_be + ks.to(tl.int64)[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        k_ok = ks < k_dim - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk

    if SCALE_ROWS:
        acc = acc * tl.load(scale_ptr + pair, mask=valid, other=0.0)[:, None]
    c_ptrs = c_ptr + pair[:, None] * n_out + cols[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])


# --------------------------------------------------------------------------------------------
# Forward (3) and the end of backward (c): sum the K rows of each token
# --------------------------------------------------------------------------------------------


@triton.jit
def _sum_over_topk_kernel(
    src_ptr, dst_ptr, num_tokens, top_k, width, stride_dst_t, stride_dst_h,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """dst[t, :] = sum_k src[t*K + k, :] in float32 (src contiguous [T*K, width])."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (tokens < num_tokens)[:, None] & (cols < width)[None, :]
    tokens = tokens.to(tl.int64)
    cols = cols.to(tl.int64)
    width = tl.cast(width, tl.int64)
    src_ptrs = src_ptr + tokens[:, None] * top_k * width + cols[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for _ in range(0, top_k):
        acc += tl.load(src_ptrs, mask=mask, other=0.0).to(tl.float32)
        src_ptrs += width
    dst_ptrs = dst_ptr + tokens[:, None] * stride_dst_t + cols[None, :] * stride_dst_h
    tl.store(dst_ptrs, acc.to(dst_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Backward (a): dy @ down[e] with the SwiGLU derivative and the routing-weight gradient
# --------------------------------------------------------------------------------------------


@triton.jit
def _swiglu_backward_kernel(
    dy_ptr, down_ptr, gu_ptr, weight_ptr, dgu_ptr, dw_part_ptr, wact_ptr,
    sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
    num_pairs, top_k, hidden, inter, num_m,
    stride_dyt, stride_dyh, stride_de, stride_dh, stride_di,
    WRITE_WACT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """z = dy[p // K] @ down[e] on one column tile of I; dw_part[p, tile] = <z, act>;
    dgu[p] = (w_p z * u * silu'(g), w_p z * silu(g)); wact[p] = w_p act (if WRITE_WACT)."""
    num_n = tl.cdiv(inter, BLOCK_N)
    pid_m, pid_n = _tile_coords(tl.program_id(0), num_m, num_n, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert, pair, valid, cols, col_ok = _expert_block_tile(
        sorted_ids_ptr, block_expert_ptr, pid_m, pid_n, num_pairs, inter, BLOCK_M, BLOCK_N)
    token = pair // top_k
    ks = tl.arange(0, BLOCK_K)
    stride_dyh = tl.cast(stride_dyh, tl.int64)
    stride_dh = tl.cast(stride_dh, tl.int64)

    a_ptrs = dy_ptr + token[:, None] * stride_dyt + ks.to(tl.int64)[None, :] * stride_dyh
    b_ptrs = down_ptr + expert * stride_de + ks.to(tl.int64)[:, None] * stride_dh + cols[None, :] * stride_di
    z = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_ok = ks < hidden - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        z = tl.dot(a, b, z, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_dyh
        b_ptrs += BLOCK_K * stride_dh

    mask = valid[:, None] & col_ok[None, :]
    gu_ptrs = gu_ptr + pair[:, None] * (2 * inter) + cols[None, :]
    g = tl.load(gu_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptrs + inter, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    act = silu * u
    tl.store(dw_part_ptr + pair * num_n + pid_n, tl.sum(z * act, axis=1), mask=valid)

    w = tl.load(weight_ptr + pair, mask=valid, other=0.0)[:, None]
    out_ty = dgu_ptr.dtype.element_ty
    if WRITE_WACT:
        tl.store(wact_ptr + pair[:, None] * inter + cols[None, :], (w * act).to(out_ty), mask=mask)
    dact = z * w
    dgu_ptrs = dgu_ptr + pair[:, None] * (2 * inter) + cols[None, :]
    tl.store(dgu_ptrs, (dact * u * sig * (1.0 + g * (1.0 - sig))).to(out_ty), mask=mask)
    tl.store(dgu_ptrs + inter, (dact * silu).to(out_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Backward (b): weight gradients, one program per (expert, output tile)
# --------------------------------------------------------------------------------------------


@triton.jit
def _expert_weight_grad_kernel(
    a_ptr, b_ptr, c_ptr,
    sorted_ids_ptr, slot_start_ptr,
    num_pairs, top_k, rows, cols,
    stride_a_row, stride_a_col, stride_b_row, stride_b_col, pairs_bucket,
    A_BY_TOKEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """c[e] = sum over the slots p of expert e of outer(A[p], B[p]), c contiguous [E, rows, cols].

    One operand is gathered by token (row p // K), the other by pair (row p): A by token and B
    by pair if A_BY_TOKEN (ddown = dy (x) w*act), else the reverse (dgate_up = dgu (x) x).
    ``pairs_bucket`` is only an autotuning key (the layout block size)."""
    expert = tl.program_id(1).to(tl.int64)
    num_c = tl.cdiv(cols, BLOCK_C)
    offs_r = (tl.program_id(0) // num_c) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = (tl.program_id(0) % num_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    r_ok = offs_r < rows
    c_ok = offs_c < cols
    offs_r = offs_r.to(tl.int64)
    offs_c = offs_c.to(tl.int64)
    start = tl.load(slot_start_ptr + expert)
    end = tl.load(slot_start_ptr + expert + 1)
    stride_a_col = tl.cast(stride_a_col, tl.int64)
    stride_b_col = tl.cast(stride_b_col, tl.int64)

    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for s0 in range(start, end, BLOCK_S):
        slots = s0 + tl.arange(0, BLOCK_S)
        pair = tl.load(sorted_ids_ptr + slots, mask=slots < end, other=num_pairs).to(tl.int64)
        valid = pair < num_pairs
        token = pair // top_k
        if A_BY_TOKEN:
            a_row, b_row = token, pair
        else:
            a_row, b_row = pair, token
        a = tl.load(a_ptr + a_row[None, :] * stride_a_row + offs_r[:, None] * stride_a_col,
                    mask=r_ok[:, None] & valid[None, :], other=0.0)
        b = tl.load(b_ptr + b_row[:, None] * stride_b_row + offs_c[None, :] * stride_b_col,
                    mask=valid[:, None] & c_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    c_ptrs = c_ptr + expert * rows * cols + offs_r[:, None] * cols + offs_c[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=r_ok[:, None] & c_ok[None, :])


# --------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------

# Under the interpreter: one small fixed configuration (tl.dot needs every block dim >= 16; the
# interpreter's cost is per program and per operation, nearly independent of the tile size).
_INTERPRETER_GEMM = dict(BLOCK_N=32, BLOCK_K=32, GROUP_M=2)
_INTERPRETER_WGRAD = dict(BLOCK_R=32, BLOCK_C=32, BLOCK_S=16)
# The I-tile of backward (a) is fixed per launch, not autotuned: it sizes the dw partials.
SWIGLU_BWD_BLOCK_N = 64


def block_m_for(num_pairs: int, num_experts: int) -> int:
    """Rows per block of the expert-sorted layout (``block_size`` of ``moe_align_block_size``),
    from the mean number of pairs per expert: small blocks waste less padding when experts
    receive few pairs, larger ones reuse each weight tile over more rows. (128 rows would make
    the two accumulators of the gate/up kernel and the SwiGLU-backward epilogue spill.)"""
    if _interpreted():
        return 16
    per_expert = num_pairs / max(1, num_experts)
    if per_expert <= 16:
        return 16
    if per_expert <= 64:
        return 32
    return 64


def _configs(keys: tuple[str, ...], shapes) -> list[triton.Config]:
    """One triton.Config per (*values of keys, num_warps, num_stages)."""
    return [triton.Config(dict(zip(keys, shape[:-2])), num_warps=shape[-2], num_stages=shape[-1])
            for shape in shapes]


# Candidate tiles, compiled for sm_90 by tests/sm90_compile.py (bf16, BLOCK_M 16 / 32 / 64): all
# within 227 KiB of shared memory, and without register spills except two 4-warp SwiGLU-backward
# tiles at BLOCK_M = 64 (16 bytes; the autotuner times them against the 8-warp ones).
# (BLOCK_N, BLOCK_K, GROUP_M, warps, stages). The gate/up kernel holds two accumulators.
_GATE_UP_SHAPES = [(64, 64, 8, 4, 3), (64, 64, 8, 4, 4), (64, 128, 8, 4, 3), (128, 64, 8, 8, 3),
                   (32, 128, 8, 4, 4)]
_PAIR_GEMM_SHAPES = [(64, 64, 8, 4, 3), (64, 128, 8, 4, 3), (128, 64, 8, 4, 3), (128, 64, 8, 8, 3),
                     (32, 128, 8, 4, 4), (128, 128, 8, 8, 3), (256, 64, 8, 8, 3), (128, 32, 8, 4, 4)]
# (BLOCK_K, GROUP_M, warps, stages); BLOCK_N is SWIGLU_BWD_BLOCK_N.
_SWIGLU_BWD_SHAPES = [(64, 8, 4, 3), (64, 8, 8, 3), (128, 8, 8, 3), (64, 8, 8, 4), (32, 8, 4, 4)]
# (BLOCK_R, BLOCK_C, BLOCK_S, warps, stages)
_WGRAD_SHAPES = [(64, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 64, 32, 8, 3), (128, 128, 32, 8, 3),
                 (64, 64, 64, 4, 3), (128, 128, 64, 8, 3)]


@functools.lru_cache(maxsize=None)
def _kernels(interpreted: bool) -> dict:
    """The launchable kernels: as written under the interpreter, autotuned on a GPU.

    Autotuning keys on the problem dimensions and the layout block size (which stands for the
    number of pairs per expert); every kernel overwrites its outputs, so re-running it while
    tuning is harmless."""
    if interpreted:
        return dict(gate_up=_gate_up_swiglu_kernel, pair_gemm=_pair_rows_gemm_kernel,
                    swiglu_bwd=_swiglu_backward_kernel, wgrad=_expert_weight_grad_kernel)
    gemm_keys = ("BLOCK_N", "BLOCK_K", "GROUP_M")
    return dict(
        gate_up=triton.autotune(_configs(gemm_keys, _GATE_UP_SHAPES), key=["hidden", "inter", "BLOCK_M"])(
            _gate_up_swiglu_kernel),
        pair_gemm=triton.autotune(_configs(gemm_keys, _PAIR_GEMM_SHAPES),
                                  key=["n_out", "k_dim", "BLOCK_M", "SCALE_ROWS"])(_pair_rows_gemm_kernel),
        swiglu_bwd=triton.autotune(_configs(("BLOCK_K", "GROUP_M"), _SWIGLU_BWD_SHAPES),
                                   key=["hidden", "inter", "BLOCK_M"])(_swiglu_backward_kernel),
        wgrad=triton.autotune(_configs(("BLOCK_R", "BLOCK_C", "BLOCK_S"), _WGRAD_SHAPES),
                              key=["rows", "cols", "pairs_bucket", "A_BY_TOKEN"])(_expert_weight_grad_kernel),
    )


def _dot_precision(dtype: torch.dtype) -> str:
    """IEEE fp32 dots unless torch itself allows TF32 for fp32 matmuls."""
    if dtype == torch.float32 and not _interpreted() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def expert_slot_starts(block_expert: torch.Tensor, num_experts: int, block_m: int) -> torch.Tensor:
    """int32 ``[E + 1]``: the first slot of each expert's run in the layout (entry ``E``: the end
    of the used slots), by binary search in the ascending block experts (no atomics, no sync)."""
    experts = torch.where(block_expert < 0, num_experts, block_expert)
    probes = torch.arange(num_experts + 1, device=block_expert.device, dtype=experts.dtype)
    return (torch.searchsorted(experts, probes) * block_m).to(torch.int32)


class _Launch:
    """What every launch of one forward or backward shares: the layout and the configuration."""

    def __init__(self, dtype, sorted_ids, block_expert, num_padded, block_m):
        self.interpreted = _interpreted()
        self.kernels = _kernels(self.interpreted)
        self.precision = _dot_precision(dtype)
        self.layout = (sorted_ids, block_expert, num_padded)
        self.block_m = block_m
        self.num_m = triton.cdiv(sorted_ids.numel(), block_m)

    def gemm_meta(self, **fixed) -> dict:
        meta = dict(_INTERPRETER_GEMM) if self.interpreted else {}
        return dict(meta, DOT_PRECISION=self.precision, BLOCK_M=self.block_m, **fixed)

    def gemm_grid(self, n: int):
        return lambda meta: (self.num_m * triton.cdiv(n, meta["BLOCK_N"]),)

    def pair_gemm(self, a, b, c, scale, n_out, k_dim, stride_be, stride_bk, stride_bn, scale_rows):
        """c[p] = a[p] @ B_e (times scale[p])."""
        self.kernels["pair_gemm"][self.gemm_grid(n_out)](
            a, b, c, scale, *self.layout, c.shape[0], n_out, k_dim, self.num_m,
            stride_be, stride_bk, stride_bn, **self.gemm_meta(SCALE_ROWS=scale_rows), enable_fp_fusion=ENABLE_FP_FUSION,
        )

    def weight_grad(self, a, b, c, num_pairs, top_k, slot_starts, a_by_token: bool):
        """c[e] = sum over the pairs p of e of outer(a row, b row); the operand indexed by token
        (row p // K) is read through its strides."""
        num_experts, rows, cols = c.shape
        meta = dict(_INTERPRETER_WGRAD) if self.interpreted else {}

        def grid(m):
            return triton.cdiv(rows, m["BLOCK_R"]) * triton.cdiv(cols, m["BLOCK_C"]), num_experts

        self.kernels["wgrad"][grid](
            a, b, c, self.layout[0], slot_starts, num_pairs, top_k, rows, cols,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), self.block_m,
            A_BY_TOKEN=a_by_token, DOT_PRECISION=self.precision, **meta, enable_fp_fusion=ENABLE_FP_FUSION,
        )


def _sum_over_topk(src: torch.Tensor, dst: torch.Tensor, top_k: int) -> None:
    """dst[t] = sum_k src[t*K + k] (float32 sum)."""
    num_tokens, width = dst.shape
    block_t, block_h = (32, 64) if _interpreted() else (4, 512)
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(width, block_h))
    _sum_over_topk_kernel[grid](src, dst, num_tokens, top_k, width, dst.stride(0), dst.stride(1),
                                BLOCK_T=block_t, BLOCK_H=block_h, enable_fp_fusion=ENABLE_FP_FUSION)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def fused_experts_forward(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    weights: torch.Tensor,
    top_k: int,
    sorted_ids: torch.Tensor,
    block_expert: torch.Tensor,
    num_padded: torch.Tensor,
    block_m: int,
    save_gate_up: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of the routed experts on the expert-sorted layout.

    Args: ``x [T, H]``, ``gate_up [E, 2I, H]``, ``down [E, H, I]`` (one float dtype, any
    strides), ``weights`` float32 contiguous ``[T*K]``, the layout of ``moe_align_block_size``
    for ``block_size = block_m`` (see :func:`block_m_for`).

    Returns ``(out [T, H], gu [T*K, 2I])`` in the dtype of ``x``; ``gu`` (the gate/up
    pre-activation by flat pair index, kept for the backward) is ``[0, 2I]`` unless
    ``save_gate_up``.
    """
    num_tokens, hidden = x.shape
    num_pairs = num_tokens * top_k
    inter = down.shape[2]
    dtype, device = x.dtype, x.device
    out = torch.empty((num_tokens, hidden), dtype=dtype, device=device)
    gu = torch.empty((num_pairs if save_gate_up else 0, 2 * inter), dtype=dtype, device=device)
    if num_tokens == 0:
        return out, gu
    launch = _Launch(dtype, sorted_ids, block_expert, num_padded, block_m)

    act = torch.empty((num_pairs, inter), dtype=dtype, device=device)
    launch.kernels["gate_up"][launch.gemm_grid(inter)](
        x, gate_up, gu, act, *launch.layout,
        num_pairs, top_k, hidden, inter, launch.num_m,
        x.stride(0), x.stride(1), gate_up.stride(0), gate_up.stride(1), gate_up.stride(2),
        **launch.gemm_meta(SAVE_GU=save_gate_up), enable_fp_fusion=ENABLE_FP_FUSION,
    )
    per_pair = torch.empty((num_pairs, hidden), dtype=dtype, device=device)
    launch.pair_gemm(act, down, per_pair, weights, hidden, inter,
                     down.stride(0), down.stride(2), down.stride(1), scale_rows=True)
    del act
    _sum_over_topk(per_pair, out, top_k)
    return out, gu


def fused_experts_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    weights: torch.Tensor,
    top_k: int,
    gu: torch.Tensor,
    sorted_ids: torch.Tensor,
    block_expert: torch.Tensor,
    num_padded: torch.Tensor,
    block_m: int,
    needs: tuple[bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Backward of :func:`fused_experts_forward`.

    ``grad_out [T, H]`` (dtype of ``x``, any strides), ``gu`` the saved pre-activation,
    ``needs`` = which of ``(dx, dgate_up, ddown, dweights)`` to compute. Returns those four
    (None where not needed): ``dx [T, H]``, ``dgate_up [E, 2I, H]``, ``ddown [E, H, I]`` in the
    dtype of ``x`` (contiguous; experts without pairs get zeros) and ``dweights`` float32 ``[T*K]``.
    """
    need_x, need_gate_up, need_down, need_weights = needs
    num_tokens, hidden = x.shape
    num_experts, two_inter, _ = gate_up.shape
    inter = two_inter // 2
    num_pairs = num_tokens * top_k
    dtype, device = x.dtype, x.device
    # Every kernel below writes all of its output, so the buffers start uninitialised.
    alloc = functools.partial(torch.zeros if num_tokens == 0 else torch.empty, device=device)
    dx = alloc((num_tokens, hidden), dtype=dtype) if need_x else None
    dgate_up = alloc((num_experts, two_inter, hidden), dtype=dtype) if need_gate_up else None
    ddown = alloc((num_experts, hidden, inter), dtype=dtype) if need_down else None
    dweights = alloc((num_pairs,), dtype=torch.float32) if need_weights else None
    if num_tokens == 0 or not any(needs):
        return dx, dgate_up, ddown, dweights
    launch = _Launch(dtype, sorted_ids, block_expert, num_padded, block_m)

    block_n = _INTERPRETER_GEMM["BLOCK_N"] if launch.interpreted else SWIGLU_BWD_BLOCK_N
    num_n = triton.cdiv(inter, block_n)
    dgu = torch.empty((num_pairs, two_inter), dtype=dtype, device=device)
    dw_part = torch.empty((num_pairs, num_n), dtype=torch.float32, device=device)
    wact = torch.empty((num_pairs if need_down else 0, inter), dtype=dtype, device=device)
    launch.kernels["swiglu_bwd"][(launch.num_m * num_n,)](
        grad_out, down, gu, weights, dgu, dw_part, wact, *launch.layout,
        num_pairs, top_k, hidden, inter, launch.num_m,
        grad_out.stride(0), grad_out.stride(1), down.stride(0), down.stride(1), down.stride(2),
        **launch.gemm_meta(BLOCK_N=block_n, WRITE_WACT=need_down), enable_fp_fusion=ENABLE_FP_FUSION,
    )
    if need_weights:
        torch.sum(dw_part, dim=1, out=dweights)
    slot_starts = expert_slot_starts(block_expert, num_experts, block_m)
    if need_down:
        launch.weight_grad(grad_out, wact, ddown, num_pairs, top_k, slot_starts, a_by_token=True)
    if need_gate_up:
        launch.weight_grad(dgu, x, dgate_up, num_pairs, top_k, slot_starts, a_by_token=False)
    if need_x:
        per_pair = torch.empty((num_pairs, hidden), dtype=dtype, device=device)
        launch.pair_gemm(dgu, gate_up, per_pair, weights, hidden, two_inter,
                         gate_up.stride(0), gate_up.stride(1), gate_up.stride(2), scale_rows=False)
        _sum_over_topk(per_pair, dx, top_k)
    return dx, dgate_up, ddown, dweights
