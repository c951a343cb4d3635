"""Triton kernels of MLA decode over a paged latent cache, and of the cache append
(``moe_align.ops.mla.mla_decode`` / ``mla_cache_append``).

The cache holds per token the normalised latent ``c`` (``D_lat``, 512 in DeepSeek-V2/V3) and the
roped key ``r`` (``D_rope``, 64) as one row ``[c, r]`` of ``kv_cache[num_blocks, block_size,
D_lat + D_rope]``; token ``j`` of sequence ``b`` lives in block ``block_table[b, j // block_size]``
at offset ``j % block_size``. With the queries already absorbed (``ql = q_nope W_UK``), MLA decode
is multi-query attention whose value is the latent itself::

    s_j = c_scale (ql . c_j + qr . r_j),   o = sum_j softmax(s)_j c_j      (o is [D_lat])

so each key tile is loaded once and serves as both K and V. Query ``i`` of ``s_q`` new tokens of
sequence ``b`` (cache length ``L_b``, the new tokens included) sees positions ``j <= L_b - s_q + i``.

Split-KV (flash-decoding): the heads and new tokens of one sequence are flattened into
``s_q * heads`` query rows, so one key tile feeds a ``BLOCK_M``-row tensor-core product. A split
plan (``moe_align.ops.mla.mla_decode_plan``, computed on the device without a host sync) cuts
each sequence into splits of about equal work; one program per (work item = (sequence, split),
row tile) writes a float32 partial output and log-sum-exp, and a combine kernel merges the
splits of each sequence. The grid depends only on the plan's shape, never on its values, so a
decode step can be captured in a CUDA graph and the plan reused by every layer.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from . import ENABLE_FP_FUSION

__all__ = ["DecodeConfig", "default_config", "mla_cache_append_triton", "mla_decode_triton"]

LOG2E = 1.4426950408889634


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    block_m: int  # query rows (new tokens x heads) per program
    block_n: int  # cached tokens per tile (best a divisor of the plan's split granule)
    num_warps: int
    num_stages: int
    combine_block_m: int = 16
    combine_num_warps: int = 4


# Triton 3.9's code for the 64-row decode tile at D_lat = 512 spills 88 bytes per thread at 8 warps
# (Triton 3.6 to 3.8: 222 registers, no spills), and 16 warps cap a thread at 128 registers.
_TRITON_SPILLS_64_ROW_TILE = tuple(int(part) for part in triton.__version__.split(".")[:2]) >= (3, 9)


def default_config(device: torch.device, rows: int, d_lat: int, dtype: torch.dtype = torch.bfloat16) -> DecodeConfig:
    """Tiles for sm_90, chosen without a GPU at hand (untimed): a [BLOCK_M, D_lat] float32
    accumulator per program and a pipelined [BLOCK_N, D_lat + D_rope] key tile in shared memory
    (BLOCK_N = 32, D = 576, bf16: 36 KiB per stage), sized so that no kernel spills registers."""
    if device.type != "cuda":
        return DecodeConfig(16, 16, 1, 1, combine_num_warps=1)
    if dtype == torch.float32:  # exact products without tensor cores: a correctness reference
        return DecodeConfig(16, 16, 8, 2)
    block_m = 16 if rows <= 16 else (32 if rows <= 32 else 64)
    if d_lat > 256:  # at 512 / 64, sm_90, Triton 3.6: 192, 171 and 222 registers per thread, no spills
        if block_m == 64 and _TRITON_SPILLS_64_ROW_TILE:
            block_m = 32  # 165 registers on Triton 3.9
        return DecodeConfig(block_m, 32, 4 if block_m == 16 else 8, 3 if block_m == 16 else 2)
    return DecodeConfig(block_m, 64, 4, 3)


def _pow2(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


@triton.jit
def _decode_split_kernel(
    QL, QR, CACHE, BLOCK_TABLE, SEQLENS, WORK, SPLIT_OFFSETS, SPLIT_LEN, PART_O, PART_LSE,
    qk_scale,
    s_ql_b, s_ql_s, s_ql_h, s_qr_b, s_qr_s, s_qr_h,
    s_c_blk, s_c_tok, s_bt_b,
    S_Q, NUM_HEADS, PAGE_SIZE,
    D_LAT: tl.constexpr, D_ROPE: tl.constexpr, BLOCK_DL: tl.constexpr, BLOCK_DR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Row tiles of one work item are adjacent in launch order, so they share its key tiles in L2.
    row_tile = tl.program_id(0)
    w = tl.program_id(1)
    b = tl.load(WORK + 2 * w)
    if b < 0:  # padding of the plan
        return
    split = tl.load(WORK + 2 * w + 1)
    cache_len = tl.load(SEQLENS + b)
    num_splits = tl.load(SPLIT_OFFSETS + b + 1) - tl.load(SPLIT_OFFSETS + b)
    split_len = tl.load(SPLIT_LEN + b)
    kv_start = split * split_len
    # The last split runs to the end, so any plan covers the whole cache.
    kv_end = tl.where(split == num_splits - 1, cache_len, tl.minimum(kv_start + split_len, cache_len))

    rows_total = S_Q * NUM_HEADS
    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < rows_total
    qi = rows // NUM_HEADS
    head = rows % NUM_HEADS
    last_visible = cache_len - S_Q + qi
    offs_dl = tl.arange(0, BLOCK_DL)
    offs_dr = tl.arange(0, BLOCK_DR)
    b64 = b.to(tl.int64)
    ql = tl.load(QL + b64 * s_ql_b + qi[:, None] * s_ql_s + head[:, None] * s_ql_h + offs_dl[None, :],
                 mask=row_valid[:, None] & (offs_dl[None, :] < D_LAT), other=0.0)
    qr = tl.load(QR + b64 * s_qr_b + qi[:, None] * s_qr_s + head[:, None] * s_qr_h + offs_dr[None, :],
                 mask=row_valid[:, None] & (offs_dr[None, :] < D_ROPE), other=0.0)

    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DL], tl.float32)
    for n0 in range(kv_start, kv_end, BLOCK_N):
        pos = n0 + offs_n
        pvalid = pos < kv_end
        page = tl.load(BLOCK_TABLE + b64 * s_bt_b + pos // PAGE_SIZE, mask=pvalid, other=0)
        tok = page.to(tl.int64) * s_c_blk + (pos % PAGE_SIZE) * s_c_tok
        # Rows past the cache length (NaN-poisoned in the tests) are never loaded.
        lat_t = tl.load(CACHE + tok[None, :] + offs_dl[:, None],
                        mask=pvalid[None, :] & (offs_dl[:, None] < D_LAT), other=0.0)
        rope_t = tl.load(CACHE + tok[None, :] + D_LAT + offs_dr[:, None],
                         mask=pvalid[None, :] & (offs_dr[:, None] < D_ROPE), other=0.0)
        s = tl.dot(ql, lat_t, input_precision=DOT_PRECISION)
        s = tl.dot(qr, rope_t, s, input_precision=DOT_PRECISION)
        visible = pvalid[None, :] & (pos[None, :] <= last_visible[:, None])
        s = tl.where(visible, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(lat_t.dtype), tl.trans(lat_t), acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    seen = l_i > 0
    out = tl.where(seen[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    part_row = w.to(tl.int64) * rows_total + rows
    tl.store(PART_O + part_row[:, None] * BLOCK_DL + offs_dl[None, :], out, mask=row_valid[:, None])
    tl.store(PART_LSE + part_row, lse, mask=row_valid)


@triton.jit
def _decode_combine_kernel(
    PART_O, PART_LSE, SPLIT_OFFSETS, OUT, LSE,
    s_o_b, s_o_s, s_o_h, s_l_b, s_l_s, s_l_h,
    S_Q, NUM_HEADS,
    D_LAT: tl.constexpr, BLOCK_DL: tl.constexpr, BLOCK_M: tl.constexpr,
):
    b = tl.program_id(0)
    rows_total = S_Q * NUM_HEADS
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < rows_total
    offs_dl = tl.arange(0, BLOCK_DL)
    first = tl.load(SPLIT_OFFSETS + b)
    last = tl.load(SPLIT_OFFSETS + b + 1)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DL], tl.float32)
    part_base = first.to(tl.int64) * rows_total
    for _ in range(first, last):
        part_row = part_base + rows
        part_base += rows_total
        lse_w = tl.load(PART_LSE + part_row, mask=row_valid, other=float("-inf"))
        o_w = tl.load(PART_O + part_row[:, None] * BLOCK_DL + offs_dl[None, :], mask=row_valid[:, None], other=0.0)
        m_new = tl.maximum(m_i, lse_w)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_ref)
        beta = tl.exp(lse_w - m_ref)
        acc = acc * alpha[:, None] + o_w * beta[:, None]
        l_i = l_i * alpha + beta
        m_i = m_new
    seen = l_i > 0
    out = tl.where(seen[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    qi = rows // NUM_HEADS
    head = rows % NUM_HEADS
    b64 = b.to(tl.int64)
    tl.store(OUT + b64 * s_o_b + qi[:, None] * s_o_s + head[:, None] * s_o_h + offs_dl[None, :],
             out.to(OUT.dtype.element_ty), mask=row_valid[:, None] & (offs_dl[None, :] < D_LAT))
    tl.store(LSE + b64 * s_l_b + qi * s_l_s + head * s_l_h, lse, mask=row_valid)


@triton.jit
def _cache_append_kernel(
    CACHE, LATENT, ROPE, SLOTS,
    s_c_blk, s_c_tok, s_lat_t, s_rope_t, PAGE_SIZE,
    D_LAT: tl.constexpr, D_ROPE: tl.constexpr, BLOCK_DL: tl.constexpr, BLOCK_DR: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + t)
    if slot < 0:  # padding token: nothing to write
        return
    dst = CACHE + (slot // PAGE_SIZE) * s_c_blk + (slot % PAGE_SIZE) * s_c_tok
    offs_dl = tl.arange(0, BLOCK_DL)
    offs_dr = tl.arange(0, BLOCK_DR)
    lat = tl.load(LATENT + t * s_lat_t + offs_dl, mask=offs_dl < D_LAT)
    tl.store(dst + offs_dl, lat.to(CACHE.dtype.element_ty), mask=offs_dl < D_LAT)
    rope = tl.load(ROPE + t * s_rope_t + offs_dr, mask=offs_dr < D_ROPE)
    tl.store(dst + D_LAT + offs_dr, rope.to(CACHE.dtype.element_ty), mask=offs_dr < D_ROPE)


def mla_decode_triton(
    q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
    cache_seqlens: torch.Tensor, work: torch.Tensor, split_offsets: torch.Tensor,
    split_len: torch.Tensor, softmax_scale: float, config: DecodeConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes as in ``mla_decode``; q tensors and the cache have a unit last stride."""
    batch, s_q, num_heads, d_lat = q_latent.shape
    d_rope = q_rope.shape[-1]
    device = q_latent.device
    rows = s_q * num_heads
    cfg = config or default_config(device, rows, d_lat, q_latent.dtype)
    out = torch.empty((batch, s_q, num_heads, d_lat), dtype=q_latent.dtype, device=device)
    lse = torch.empty((batch, s_q, num_heads), dtype=torch.float32, device=device)
    if batch == 0 or rows == 0:
        return out, lse
    num_work = work.shape[0]
    block_dl = _pow2(d_lat)
    part_o = torch.empty((num_work, rows, block_dl), dtype=torch.float32, device=device)
    part_lse = torch.empty((num_work, rows), dtype=torch.float32, device=device)
    _decode_split_kernel[(triton.cdiv(rows, cfg.block_m), num_work)](
        q_latent, q_rope, kv_cache, block_table, cache_seqlens, work, split_offsets, split_len,
        part_o, part_lse, softmax_scale * LOG2E,
        q_latent.stride(0), q_latent.stride(1), q_latent.stride(2),
        q_rope.stride(0), q_rope.stride(1), q_rope.stride(2),
        kv_cache.stride(0), kv_cache.stride(1), block_table.stride(0),
        s_q, num_heads, kv_cache.shape[1],
        D_LAT=d_lat, D_ROPE=d_rope, BLOCK_DL=block_dl, BLOCK_DR=_pow2(d_rope),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        DOT_PRECISION="ieee" if q_latent.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=ENABLE_FP_FUSION,
    )
    _decode_combine_kernel[(batch, triton.cdiv(rows, cfg.combine_block_m))](
        part_o, part_lse, split_offsets, out, lse,
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
        s_q, num_heads, D_LAT=d_lat, BLOCK_DL=block_dl, BLOCK_M=cfg.combine_block_m,
        num_warps=cfg.combine_num_warps, enable_fp_fusion=ENABLE_FP_FUSION,
    )
    return out, lse


def mla_cache_append_triton(
    kv_cache: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor, slot_mapping: torch.Tensor,
) -> None:
    """Writes row ``t`` of ``latent`` / ``k_rope`` into cache slot ``slot_mapping[t]`` (skipped when
    negative). Shapes as in ``mla_cache_append``; unit last strides."""
    num_tokens, d_lat = latent.shape
    d_rope = k_rope.shape[-1]
    if num_tokens == 0:
        return
    _cache_append_kernel[(num_tokens,)](
        kv_cache, latent, k_rope, slot_mapping,
        kv_cache.stride(0), kv_cache.stride(1), latent.stride(0), k_rope.stride(0), kv_cache.shape[1],
        D_LAT=d_lat, D_ROPE=d_rope, BLOCK_DL=_pow2(d_lat), BLOCK_DR=_pow2(d_rope),
        num_warps=4 if kv_cache.is_cuda else 1, enable_fp_fusion=ENABLE_FP_FUSION,
    )
