"""mla_varlen_attention: forward, log-sum-exp and gradients against the float64 oracle."""

import pytest
import torch

from conftest import requires_cuda
from moe_align.ops.mla import mla_varlen_attention
from oracle_mla import varlen_attention_dense, varlen_attention_oracle

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


def random_lengths(seed, count=6, longest=30):
    """Random sequence lengths with a length-1 and an empty sequence among them."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, longest + 1, (count,), generator=g).tolist()
    lengths[1], lengths[3] = 1, 0
    return lengths


def cu_from(lengths, device="cpu"):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def make_inputs(lengths, heads, d_nope, d_rope, d_v, dtype, seed=0, device="cpu", d_lat=32):
    """Inputs laid out as MLAttention makes them: q_nope/q_rope and k_nope/v are strided views of
    packed projections, k_rope a [T, 1, D_rope] view of the latent projection."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(total, heads, d_nope + d_rope, generator=g)
    kv = torch.randn(total, heads, d_nope + d_v, generator=g)
    ckv = torch.randn(total, d_lat + d_rope, generator=g)
    q, kv, ckv = (t.to(device=device, dtype=dtype) for t in (q, kv, ckv))
    return (q[..., :d_nope], q[..., d_nope:], kv[..., :d_nope], ckv[:, None, d_lat:], kv[..., d_nope:])


def check_against_oracle(lengths, heads, dims, dtype, seed=0, device="cpu", oracle=varlen_attention_oracle,
                         strided_offsets=False):
    d_nope, d_rope, d_v = dims
    inputs = make_inputs(lengths, heads, d_nope, d_rope, d_v, dtype, seed, device)
    cu = cu_from(lengths, device)
    if strided_offsets:  # a column of a [len + 1, 2] tensor: stride 2
        cu = torch.stack([cu, torch.full_like(cu, 7)], dim=1)[:, 0]
        assert not cu.is_contiguous()
    scale = (d_nope + d_rope) ** -0.5
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    before = [t.detach().clone() for t in (*leaves, cu)]
    out, lse = mla_varlen_attention(*leaves, cu, max(lengths), scale)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == (sum(lengths), heads, d_v) and lse.shape == (sum(lengths), heads)

    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in inputs]
    ref_out, ref_lse = oracle(*ref_leaves, cu.cpu(), scale)
    tol = TOL[dtype]
    torch.testing.assert_close(out.cpu().double(), ref_out.detach(), **tol)
    torch.testing.assert_close(lse.cpu().double(), ref_lse.detach(), **tol)

    g = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(out.shape, generator=g).to(dtype)
    grad_lse = torch.randn(lse.shape, generator=g)
    ((out.float() * grad_out.to(device).float()).sum() + (lse * grad_lse.to(device)).sum()).backward()
    ((ref_out * grad_out.double()).sum() + (ref_lse * grad_lse.double()).sum()).backward()
    for name, leaf, ref in zip(("q_nope", "q_rope", "k_nope", "k_rope", "v"), leaves, ref_leaves):
        assert leaf.grad.shape == leaf.shape, name
        torch.testing.assert_close(leaf.grad.cpu().double(), ref.grad, **tol, msg=lambda m: f"d{name}: {m}")
    for t, b in zip((*leaves, cu), before):
        assert torch.equal(t.detach(), b), "an input was modified"


CASES = {
    # lengths, heads, (d_nope, d_rope, d_v), dtype
    "mixed_fp32": (random_lengths(1), 2, (16, 16, 32), torch.float32),
    "single_long_fp32": ([70], 2, (16, 16, 16), torch.float32),
    "mixed_fp16": (random_lengths(2), 2, (32, 16, 16), torch.float16),
    "odd_dims_3_heads": ([17, 1, 33], 3, (48, 16, 16), torch.float32),
}


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_oracle(backend, impl, case):
    backend(impl)
    lengths, heads, dims, dtype = CASES[case]
    check_against_oracle(lengths, heads, dims, dtype, seed=len(case))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_strided_offsets(backend, impl):
    """cu_seqlens as a non-contiguous view (the kernels read a dense array)."""
    backend(impl)
    check_against_oracle([3, 1, 5], 2, (16, 16, 16), torch.float32, seed=5, strided_offsets=True)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("lengths", [[], [0], [0, 3, 0]])
def test_empty(backend, impl, lengths):
    backend(impl)
    inputs = [t.requires_grad_() for t in make_inputs(lengths, 2, 16, 16, 16, torch.float32)]
    out, lse = mla_varlen_attention(*inputs, cu_from(lengths), max(lengths, default=0), 0.2)
    assert out.shape == (sum(lengths), 2, 16)
    if sum(lengths):
        out.sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in inputs)


def args_for_opcheck(dtype=torch.float32):
    lengths = [5, 1, 12]
    inputs = [t.detach().clone().requires_grad_() for t in make_inputs(lengths, 2, 16, 16, 16, dtype)]
    return (*inputs, cu_from(lengths), max(lengths), 0.25)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_opcheck(backend, impl):
    backend(impl)
    torch.library.opcheck(torch.ops.moe_align.mla_varlen_attention.default, args_for_opcheck())
    q_nope, q_rope, k_nope, k_rope, v, cu, max_seqlen, scale = args_for_opcheck()
    out, lse = torch.ops.moe_align.mla_varlen_attention(q_nope, q_rope, k_nope, k_rope, v, cu, max_seqlen, scale)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    tensors = [t.detach() for t in (q_nope, q_rope, k_nope, k_rope, v, out.detach(), lse.detach())]
    torch.library.opcheck(torch.ops.moe_align.mla_varlen_attention_backward.default,
                          (grad_out, grad_lse, *tensors[:5], *tensors[5:], cu, max_seqlen, scale))


def test_compiles_fullgraph():
    lengths = [7, 1, 9]
    cu = cu_from(lengths)
    q = torch.randn(17, 2, 32)
    kv = torch.randn(17, 2, 32)
    k_rope = torch.randn(17, 1, 16)

    def loss_fn(q, kv, k_rope):
        out, lse = mla_varlen_attention(q[..., :16], q[..., 16:], kv[..., :16], k_rope, kv[..., 16:],
                                        cu, 9, 0.2)
        return (out * out).sum() + lse.sum()

    eager = [t.clone().requires_grad_() for t in (q, kv, k_rope)]
    compiled = [t.clone().requires_grad_() for t in (q, kv, k_rope)]
    loss1 = loss_fn(*eager)
    loss2 = torch.compile(loss_fn, fullgraph=True)(*compiled)
    loss1.backward()
    loss2.backward()
    torch.testing.assert_close(loss1, loss2)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a.grad, b.grad)


def _bad(**change):
    q_nope, q_rope, k_nope, k_rope, v = make_inputs([3, 4], 2, 16, 16, 16, torch.float32)
    args = dict(q_nope=q_nope, q_rope=q_rope, k_nope=k_nope, k_rope=k_rope, v=v,
                cu_seqlens=cu_from([3, 4]), max_seqlen=4, softmax_scale=0.2)
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(k_nope=torch.randn(7, 3, 16)), ValueError, "k_nope"),
        (dict(v=torch.randn(7, 3, 16)), ValueError, "heads"),
        (dict(q_rope=torch.randn(7, 2, 8), k_rope=torch.randn(7, 1, 8)), ValueError, "multiple of 16"),
        (dict(v=torch.randn(7, 2, 24)), ValueError, "multiple of 16"),
        (dict(k_rope=torch.randn(7, 2, 16)), ValueError, "shared by the heads"),
        (dict(k_nope=torch.randn(7, 2, 16, dtype=torch.float16)), TypeError, "k_nope is torch.float16"),
        (dict(q_nope=torch.randn(7, 2, 16).long()), TypeError, "fp32, fp16 or bf16"),
        (dict(cu_seqlens=torch.tensor([0, 5, 3, 7], dtype=torch.int32)), ValueError, "must not decrease"),
        (dict(cu_seqlens=torch.tensor([0, 3, 7])), TypeError, "cu_seqlens must be torch.int32"),
        (dict(cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32)), ValueError, "end at T=7"),
        (dict(max_seqlen=3), ValueError, "max_seqlen=3 is below"),
        (dict(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    ],
)
def test_bad_input(change, error, match):
    with pytest.raises(error, match=match):
        mla_varlen_attention(**_bad(**change))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("lengths", [[1, 300, 7, 1, 129, 64], [1000]])
def test_cuda_matches_oracle(backend, dtype, lengths):
    backend("triton")
    check_against_oracle(lengths, 4, (128, 64, 128), dtype, seed=3, device="cuda",
                         oracle=varlen_attention_dense)
