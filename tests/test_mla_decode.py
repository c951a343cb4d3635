"""mla_decode, mla_decode_plan and mla_cache_append against naive float64 oracles.

Caches are poisoned: every slot the sequences do not use holds NaN, block tables are shuffled,
non-contiguous and hold out-of-range ids past each sequence's last block.
"""

import math

import pytest
import torch

from conftest import requires_cuda
from moe_align.ops import mla as mla_ops
from moe_align.ops.mla import mla_cache_append, mla_decode, mla_decode_plan
from oracle_mla import decode_dense, decode_oracle

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
PAD_BLOCK_ID = -7  # block-table entries past a sequence's last block: never read


def make_case(lengths, s_q, heads, d_lat, d_rope, page, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    used = [math.ceil(n / page) for n in lengths]
    num_blocks = sum(used) + 3  # spare blocks stay NaN
    max_blocks = max(used, default=0) + 1
    cache = torch.full((num_blocks, page, d_lat + d_rope), float("nan"))
    order = torch.randperm(num_blocks, generator=g).tolist()
    table = torch.full((max_blocks, batch), PAD_BLOCK_ID, dtype=torch.int32)  # stored transposed
    for b, n in enumerate(lengths):
        for j in range(used[b]):
            table[j, b] = order.pop()
        for pos in range(n):
            cache[table[pos // page, b], pos % page] = torch.randn(d_lat + d_rope, generator=g)
    # Queries stored [B, H, s_q, D] and viewed [B, s_q, H, D]: non-contiguous.
    q_latent = torch.randn(batch, heads, s_q, d_lat, generator=g).transpose(1, 2)
    q_rope = torch.randn(batch, heads, s_q, d_rope, generator=g).transpose(1, 2)
    to = dict(device=device, dtype=dtype)
    block_table = table.to(device).t()
    assert max_blocks == 1 or not block_table.is_contiguous()
    return (q_latent.to(**to), q_rope.to(**to), cache.to(**to), block_table,
            torch.tensor(lengths, dtype=torch.int32, device=device))


def check_decode(lengths, s_q, page, dtype, plan_kwargs=None, heads=2, d_lat=32, d_rope=16, seed=0,
                 device="cpu", oracle=decode_oracle):
    q_latent, q_rope, cache, table, seqlens = make_case(lengths, s_q, heads, d_lat, d_rope, page, dtype,
                                                        seed, device)
    scale = 0.3
    plan = None if plan_kwargs is None else mla_decode_plan(seqlens, heads, s_q, **plan_kwargs)
    before = [t.clone() for t in (q_latent, q_rope, cache, table, seqlens)]
    out, lse = mla_decode(q_latent, q_rope, cache, table, seqlens, scale, plan)
    assert out.dtype == dtype and out.shape == q_latent.shape
    assert lse.dtype == torch.float32 and lse.shape == q_latent.shape[:3]
    ref_out, ref_lse = oracle(q_latent.cpu(), q_rope.cpu(), cache.cpu(), table.cpu(), seqlens.cpu(), scale)
    torch.testing.assert_close(out.cpu().double(), ref_out, **TOL[dtype])
    torch.testing.assert_close(lse.cpu().double(), ref_lse, **TOL[dtype])
    for t, b in zip((q_latent, q_rope, cache, table, seqlens), before):
        assert torch.equal(t.nan_to_num(7.0), b.nan_to_num(7.0))  # unused cache rows hold NaN
    return out, lse


# Cache lengths: not multiples of the block size, an empty sequence, one shorter than s_q = 4.
LENGTHS = [37, 0, 70, 2, 16, 5]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("s_q", [1, 2, 4])
@pytest.mark.parametrize("page", [8, 32])
def test_matches_oracle(backend, impl, s_q, page):
    backend(impl)
    # num_parts=3 with 16-token granules: several splits for the long sequences.
    check_decode(LENGTHS, s_q, page, torch.float32, plan_kwargs=dict(num_parts=3, split_granule=16),
                 seed=s_q * page)


@pytest.mark.parametrize("s_q", [1, 2])
def test_plan_of_shorter_caches_still_covers_them(backend, s_q):
    """A plan made before the caches grew (e.g. outside a CUDA graph that is replayed at later
    steps) stays correct: a sequence's last split runs to its current end."""
    backend("triton")
    lengths, earlier = [61, 9, 100, 2, 40, 5], [37, 0, 70, 2, 16, 5]
    q_latent, q_rope, cache, table, seqlens = make_case(lengths, s_q, 2, 32, 16, 8, torch.float32, seed=11)
    plan = mla_decode_plan(torch.tensor(earlier, dtype=torch.int32), 2, s_q, num_parts=3, split_granule=16)
    out, lse = mla_decode(q_latent, q_rope, cache, table, seqlens, 0.3, plan)
    ref_out, ref_lse = decode_oracle(q_latent, q_rope, cache, table, seqlens, 0.3)
    torch.testing.assert_close(out.double(), ref_out, **TOL[torch.float32])
    torch.testing.assert_close(lse.double(), ref_lse, **TOL[torch.float32])


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_fp16_default_plan_block_64(backend, impl):
    backend(impl)
    check_decode([100, 1, 64], 2, 64, torch.float16, seed=5)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_empty_cache_gives_zero_and_minus_inf(backend, impl):
    backend(impl)
    out, lse = check_decode([0, 0], 2, 16, torch.float32)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()


# Cache lengths far apart: the PyTorch path pads every sequence to the longest (or, over its
# memory budget, to the longest of its group).
SPREAD = [1, 300, 0, 17, 64, 2, 129]


@pytest.mark.parametrize("budget", [None, 4096])
@pytest.mark.parametrize("s_q", [1, 3])
def test_torch_batched_decode_very_different_lengths(backend, monkeypatch, budget, s_q):
    backend("torch")
    if budget is not None:  # a small budget: groups of similar lengths, one sequence alone
        monkeypatch.setattr(mla_ops, "TORCH_PATH_SCORE_ELEMENTS", budget)
    check_decode(SPREAD, s_q, 16, torch.float32, heads=4, seed=11 + s_q)
    check_decode(SPREAD, s_q, 16, torch.float16, heads=4, seed=12 + s_q)


@pytest.mark.parametrize("poison", [float("inf"), float("-inf"), 3e38, "stale"])
def test_torch_decode_ignores_any_value_in_unused_slots(backend, poison):
    """Unused slots and blocks may hold anything: infinities, finite values whose products
    overflow, or stale finite values (the case where the path skips zeroing them)."""
    backend("torch")
    q_latent, q_rope, cache, table, seqlens = make_case(SPREAD, 2, 2, 32, 16, 8, torch.float32, seed=5)
    ref_out, ref_lse = decode_oracle(q_latent, q_rope, cache, table, seqlens, 0.3)
    unused = cache.isnan()
    cache[unused] = torch.randn(int(unused.sum())) if poison == "stale" else poison
    out, lse = mla_decode(q_latent, q_rope, cache, table, seqlens, 0.3)
    torch.testing.assert_close(out.double(), ref_out, **TOL[torch.float32])
    torch.testing.assert_close(lse.double(), ref_lse, **TOL[torch.float32])


def test_eager_cpu_calls_equal_the_ops(backend):
    """In eager mode on the CPU the public functions run the PyTorch paths without the op's
    dispatch; through torch.ops (as under compile or fake tensors) the result is the same."""
    backend("torch")
    q_latent, q_rope, cache, table, seqlens = make_case([9, 0, 20], 2, 2, 32, 16, 8, torch.float32)
    cache = cache.nan_to_num()
    out, lse = mla_decode(q_latent, q_rope, cache, table, seqlens, 0.3)
    op_out, op_lse = torch.ops.moe_align.mla_decode(q_latent, q_rope, cache, table, seqlens, None, None, None, 0.3)
    assert torch.equal(out, op_out) and torch.equal(lse, op_lse)
    slots = torch.tensor([3, -1, 17], dtype=torch.int64)
    latent, k_rope = torch.randn(3, 32), torch.randn(3, 16)
    direct, via_op = cache.clone(), cache.clone()
    mla_cache_append(direct, latent, k_rope, slots)
    torch.ops.moe_align.mla_cache_append(via_op, latent, k_rope, slots)
    assert torch.equal(direct, via_op) and not torch.equal(direct, cache)
    # Inputs that require grad go through the op, which has no backward.
    out, _ = mla_decode(q_latent.clone().requires_grad_(), q_rope, cache, table, seqlens, 0.3)
    with pytest.raises(RuntimeError):
        out.sum().backward()


def test_append_and_decode_compile_fullgraph(backend):
    """Under torch.compile the public functions trace as the ops (fake kernels, no eager shortcut)."""
    backend("torch")
    q_latent, q_rope, cache, table, seqlens = make_case([9, 0, 20], 1, 2, 32, 16, 8, torch.float32)
    cache, table = cache.nan_to_num(), table.contiguous()
    latent, k_rope = torch.randn(2, 32), torch.randn(2, 16)
    # One new token for sequences 0 and 2, at positions 9 and 20 (pages of 8).
    slots = torch.tensor([int(table[0, 1]) * 8 + 1, int(table[2, 2]) * 8 + 4], dtype=torch.int64)
    seqlens = seqlens + torch.tensor([1, 0, 1], dtype=torch.int32)

    def step(kv, latent, k_rope):
        mla_cache_append(kv, latent, k_rope, slots)
        return mla_decode(q_latent, q_rope, kv, table, seqlens, 0.3)

    eager_cache, compiled_cache = cache.clone(), cache.clone()
    out, lse = step(eager_cache, latent, k_rope)
    out_c, lse_c = torch.compile(step, fullgraph=True, backend="aot_eager")(compiled_cache, latent, k_rope)
    assert torch.equal(compiled_cache, eager_cache)
    torch.testing.assert_close(out_c, out)
    torch.testing.assert_close(lse_c, lse)


def test_plan_covers_every_sequence():
    for lengths, num_parts in (([37, 0, 70, 2, 16, 5], 3), ([32768], 132), ([100] * 64, 16), ([], 4)):
        seqlens = torch.tensor(lengths, dtype=torch.int32)
        work, offsets, split_len = mla_decode_plan(seqlens, 16, 1, num_parts=num_parts)
        batch = len(lengths)
        assert work.dtype == offsets.dtype == split_len.dtype == torch.int32
        assert work.shape == (num_parts + batch, 2) and offsets.shape == (batch + 1,)
        splits = (offsets[1:] - offsets[:-1]).tolist()
        assert int(offsets[0]) == 0 and int(offsets[-1]) <= num_parts + batch
        expected = [(b, s) for b in range(batch) for s in range(splits[b])]
        expected += [(-1, 0)] * (work.shape[0] - len(expected))
        assert [tuple(r) for r in work.tolist()] == expected
        for b, n in enumerate(lengths):
            assert splits[b] >= 1 and split_len[b] % 64 == 0
            assert (splits[b] - 1) * int(split_len[b]) < max(n, 1)  # every split holds tokens
    one_long = mla_decode_plan(torch.tensor([32768], dtype=torch.int32), 16, 1, num_parts=132)
    assert int(one_long.split_offsets[-1]) >= 100  # a single long sequence fills the machine
    many_short = mla_decode_plan(torch.tensor([100] * 64, dtype=torch.int32), 16, 1, num_parts=16)
    assert int(many_short.split_offsets[-1]) == 64  # short sequences are not split


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_append(backend, impl, dtype):
    backend(impl)
    g = torch.Generator().manual_seed(1)
    num_blocks, page, d_lat, d_rope = 5, 8, 32, 16
    cache = torch.full((num_blocks, page, d_lat + d_rope), float("nan"), dtype=dtype)
    slots = torch.randperm(num_blocks * page, generator=g)[:11]
    slots[[2, 7]] = -1  # padding tokens
    # Inputs as strided views of one projection, as MLAttention produces them.
    ckv = torch.randn(11, d_lat + d_rope + 4, generator=g).to(dtype)
    latent, k_rope = ckv[:, :d_lat], ckv[:, d_lat + 4:]
    mla_cache_append(cache, latent, k_rope, slots)
    flat = cache.view(-1, d_lat + d_rope)
    written = torch.zeros(num_blocks * page, dtype=torch.bool)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(flat[slot], torch.cat([latent[t], k_rope[t]]))
            written[slot] = True
    assert flat[~written].isnan().all()


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_opcheck(backend, impl):
    backend(impl)
    q_latent, q_rope, cache, table, seqlens = make_case([9, 0, 20], 2, 2, 32, 16, 8, torch.float32)
    plan = mla_decode_plan(seqlens, 2, 2, num_parts=2, split_granule=16)
    torch.library.opcheck(torch.ops.moe_align.mla_decode.default,
                          (q_latent, q_rope, cache.nan_to_num(), table.contiguous(), seqlens, *plan, 0.3))
    torch.library.opcheck(torch.ops.moe_align.mla_decode.default,  # no plan: made where needed
                          (q_latent, q_rope, cache.nan_to_num(), table.contiguous(), seqlens, None, None, None, 0.3))
    slots = torch.tensor([3, -1, 17], dtype=torch.int64)
    torch.library.opcheck(torch.ops.moe_align.mla_cache_append.default,
                          (cache.nan_to_num(), torch.randn(3, 32), torch.randn(3, 16), slots))


def _decode_args(**change):
    q_latent, q_rope, cache, table, seqlens = make_case([9, 20], 1, 2, 32, 16, 8, torch.float32)
    args = dict(q_latent=q_latent, q_rope=q_rope, kv_cache=cache, block_table=table.contiguous(),
                cache_seqlens=seqlens, softmax_scale=0.3)
    for key, value in change.items():
        args[key] = value(args) if callable(value) else value
    return args


def _set(t, index, value):
    t = t.clone()
    t[index] = value
    return t


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(block_table=lambda a: _set(a["block_table"], (1, 0), 1000)), ValueError,
         r"block_table\[1, 0\]=1000 points outside the cache"),
        (dict(block_table=lambda a: _set(a["block_table"], (0, 1), -1)), ValueError, "points outside"),
        (dict(cache_seqlens=lambda a: _set(a["cache_seqlens"], 1, 33)), ValueError,
         r"cache_seqlens\[1\]=33 is outside \[0, 32\]"),
        (dict(cache_seqlens=lambda a: _set(a["cache_seqlens"], 0, -1)), ValueError, "outside"),
        (dict(q_rope=torch.randn(2, 1, 3, 16)), ValueError, "q_rope must be"),
        (dict(q_latent=torch.randn(2, 1, 2, 24)), ValueError, "multiple of 16"),
        (dict(kv_cache=lambda a: a["kv_cache"][..., :40]), ValueError, "kv_cache rows must hold"),
        (dict(kv_cache=lambda a: a["kv_cache"].half()), TypeError, "kv_cache is torch.float16"),
        (dict(block_table=lambda a: a["block_table"].long()), TypeError, "block_table must be torch.int32"),
        (dict(cache_seqlens=torch.tensor([9, 20, 3], dtype=torch.int32)), ValueError, "one row per sequence"),
        (dict(plan=mla_decode_plan(torch.tensor([1, 2, 3], dtype=torch.int32), 2)), ValueError,
         "plan was not made for a batch of 2"),
        (dict(q_latent=torch.randn(2, 0, 2, 32), q_rope=torch.randn(2, 0, 2, 16)), ValueError,
         "q_latent must hold s_q >= 1 new tokens of >= 1 heads"),
        (dict(q_latent=torch.randn(2, 1, 0, 32), q_rope=torch.randn(2, 1, 0, 16)), ValueError,
         "q_latent must hold s_q >= 1"),
        (dict(kv_cache=torch.zeros(4, 0, 48)), ValueError, "kv_cache must have a block size >= 1"),
    ],
)
def test_bad_decode_input(change, error, match):
    with pytest.raises(error, match=match):
        mla_decode(**_decode_args(**change))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(slot_mapping=torch.tensor([0, 40])), ValueError, "slot 40, outside the cache"),
        (dict(slot_mapping=torch.tensor([0, 1], dtype=torch.int32)), TypeError, "slot_mapping must be torch.int64"),
        (dict(latent=torch.randn(2, 16)), ValueError, "kv_cache rows must hold"),
        (dict(k_rope=torch.randn(3, 16)), ValueError, "k_rope must be"),
        (dict(latent=torch.randn(2, 32).half()), TypeError, "latent is torch.float16"),
    ],
)
def test_bad_append_input(kwargs, error, match):
    args = dict(kv_cache=torch.zeros(5, 8, 48), latent=torch.randn(2, 32), k_rope=torch.randn(2, 16),
                slot_mapping=torch.tensor([0, 1]))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        mla_cache_append(**args)


# ---- GPU --------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("heads,s_q", [(16, 1), (16, 2), (128, 1), (128, 4)])
def test_cuda_matches_oracle(backend, dtype, heads, s_q):
    backend("triton")
    lengths = [1, 4096 + 5, 0, 777, 64, 2000]
    check_decode(lengths, s_q, 64, dtype, heads=heads, d_lat=512, d_rope=64, seed=heads + s_q,
                 device="cuda", oracle=decode_dense)


@requires_cuda
def test_cuda_single_long_sequence_many_splits(backend):
    backend("triton")
    check_decode([32768 - 3], 1, 64, torch.bfloat16, heads=16, d_lat=512, d_rope=64, device="cuda",
                 oracle=decode_dense)


@requires_cuda
def test_cuda_graph_capture(backend):
    """Plan + decode captured once, replayed after the cache lengths grew: no host sync inside."""
    backend("triton")
    # every replayed length stays within the blocks its sequence owns (200 -> 4 blocks of 64)
    q_latent, q_rope, cache, table, seqlens = make_case([300, 17, 200], 1, 16, 512, 64, 64, torch.bfloat16,
                                                        device="cuda")
    cache = cache.nan_to_num()
    table = table.contiguous()
    static = dict(q_latent=q_latent.contiguous(), q_rope=q_rope.contiguous(), seqlens=seqlens.clone())

    def step():
        plan = mla_decode_plan(static["seqlens"], 16, 1)
        return mla_decode(static["q_latent"], static["q_rope"], cache, table, static["seqlens"], 0.1, plan)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up (compiles the kernels)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = step()
    static["seqlens"].copy_(torch.tensor([310, 1, 256], dtype=torch.int32, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    ref_out, ref_lse = decode_dense(static["q_latent"], static["q_rope"], cache, table, static["seqlens"], 0.1)
    torch.testing.assert_close(out.double(), ref_out, **TOL[torch.bfloat16])
    torch.testing.assert_close(lse.double(), ref_lse, **TOL[torch.bfloat16])


@requires_cuda
@pytest.mark.parametrize("impl", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_cache_append(backend, impl, dtype):
    from moe_align.ops._native import has_cuda_kernels

    if impl == "cuda" and not has_cuda_kernels():
        pytest.skip("extension built without CUDA kernels")
    backend(impl)
    cache = torch.full((40, 64, 576), float("nan"), dtype=dtype, device="cuda")
    slots = torch.randperm(40 * 64, device="cuda")[:300]
    slots[::7] = -1
    ckv = torch.randn(300, 576 + 8, device="cuda").to(dtype)
    latent, k_rope = ckv[:, :512], ckv[:, 520:]
    mla_cache_append(cache, latent, k_rope, slots)
    flat = cache.view(-1, 576)
    keep = slots >= 0
    assert torch.equal(flat[slots[keep]], torch.cat([latent, k_rope], dim=1)[keep])
    written = torch.zeros(40 * 64, dtype=torch.bool, device="cuda")
    written[slots[keep]] = True
    assert flat[~written].isnan().all()
