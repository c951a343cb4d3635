import pytest
import torch

from moe_align.ops.gate import grouped_topk
from oracle_routing import gate_oracle
from conftest import requires_cuda

# name: (experts, top_k, kwargs) — the three model presets of ARCHITECTURE.md, and odd ones.
CONFIGS = {
    "v2_lite": (64, 6, dict()),
    "v2": (160, 6, dict(n_group=8, topk_group=3, routed_scaling_factor=16.0)),
    "v3": (256, 8, dict(n_group=8, topk_group=4, scoring_func="sigmoid", renormalize=True,
                        routed_scaling_factor=2.5, bias=True)),
    "odd_softmax_norm": (7, 3, dict(renormalize=True)),
    "top1_groups": (12, 1, dict(n_group=4, topk_group=1)),
    "sigmoid_groups_max": (30, 4, dict(n_group=5, topk_group=2, scoring_func="sigmoid", group_score="max")),
    "sigmoid_bias_no_groups": (48, 5, dict(scoring_func="sigmoid", bias=True, renormalize=True)),
}


def distinct_logits(num_tokens, num_experts, dtype, generator, jitter=True):
    """Rows of distinct values, exactly representable in bf16, so the choice has no ties."""
    keys = torch.rand(num_tokens, num_experts, generator=generator)
    grid = (keys.argsort(dim=1).float() - num_experts / 2) / 32
    if jitter and dtype == torch.float32:
        grid = grid + torch.rand(grid.shape, generator=generator) / 64
    return grid.to(dtype)


def make_case(name, num_tokens, dtype, seed=0):
    num_experts, top_k, kwargs = CONFIGS[name]
    kwargs = dict(kwargs)
    g = torch.Generator().manual_seed(seed)
    logits = distinct_logits(num_tokens, num_experts, dtype, g)
    bias = torch.randn(num_experts, generator=g) * 0.05 if kwargs.pop("bias", False) else None
    return logits, top_k, kwargs, bias


def oracle_for(logits, top_k, kwargs, bias):
    group_score = kwargs.get("group_score") or ("top2_sum" if bias is not None else "max")
    return gate_oracle(
        logits, top_k, n_group=kwargs.get("n_group", 1), topk_group=kwargs.get("topk_group"),
        scoring_func=kwargs.get("scoring_func", "softmax"), bias=bias, group_score=group_score,
        renormalize=kwargs.get("renormalize", False), scale=kwargs.get("routed_scaling_factor", 1.0),
    )


def check_against_oracle(logits, top_k, kwargs, bias, backward=True):
    x = logits.detach().clone().requires_grad_(backward)
    weights, ids = grouped_topk(x, top_k, correction_bias=bias, **kwargs)
    want_w, want_ids, logits64 = oracle_for(logits.cpu(), top_k, kwargs, None if bias is None else bias.cpu())
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert weights.shape == ids.shape == (logits.shape[0], top_k)
    # Both sides list experts in descending order of their selection score.
    assert torch.equal(ids.cpu().long(), want_ids)
    torch.testing.assert_close(weights.cpu().double(), want_w.detach(), rtol=1e-5, atol=1e-6)
    if backward and logits.shape[0]:
        grad_out = torch.randn(weights.shape, generator=torch.Generator().manual_seed(9))
        (weights * grad_out.to(weights.device)).sum().backward()
        (want_w * grad_out.double()).sum().backward()
        tol = dict(rtol=1e-5, atol=1e-6) if logits.dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
        torch.testing.assert_close(x.grad.cpu().double(), logits64.grad, **tol)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("num_tokens", [0, 1, 19])
def test_matches_oracle_fp32(name, num_tokens):
    check_against_oracle(*make_case(name, num_tokens, torch.float32, seed=num_tokens))


@pytest.mark.parametrize("name", ["v2", "v3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_oracle_half(name, dtype):
    check_against_oracle(*make_case(name, 11, dtype, seed=3))


def test_renormalised_tiny_scores_keep_their_proportions():
    """Sigmoid scores near 1e-11: w / (sum(w) + 1e-20) still sums to the scaling factor."""
    logits, top_k, kwargs, bias = make_case("v3", 5, torch.float32, seed=7)
    logits = logits - 25.0
    check_against_oracle(logits, top_k, kwargs, bias)
    weights, _ = grouped_topk(logits, top_k, correction_bias=bias, **kwargs)
    torch.testing.assert_close(weights.sum(dim=1), torch.full((5,), 2.5), rtol=1e-5, atol=0)


def test_non_contiguous_logits_not_modified():
    logits, top_k, kwargs, bias = make_case("v3", 9, torch.float32, seed=5)
    strided = logits.t().contiguous().t()  # same values, column-major
    assert not strided.is_contiguous()
    before = strided.clone()
    check_against_oracle(strided, top_k, kwargs, bias, backward=False)
    assert torch.equal(strided, before)


def test_bias_only_steers_the_choice():
    # A large bias forces expert 5 in, but its weight is its unbiased score.
    logits = torch.zeros(1, 8)
    logits[0, 0] = 3.0
    bias = torch.zeros(8)
    bias[5] = 10.0
    weights, ids = grouped_topk(logits, 2, scoring_func="sigmoid", correction_bias=bias)
    assert ids.tolist() == [[5, 0]]
    torch.testing.assert_close(weights, torch.tensor([[0.5, torch.sigmoid(torch.tensor(3.0)).item()]]))


def test_dropped_groups_never_chosen():
    # Group 1 holds the single best expert but group 0 wins on its top-2 sum.
    logits = torch.tensor([[2.0, 1.9, -5.0, 2.5]])
    _, ids = grouped_topk(logits, 2, n_group=2, topk_group=1, scoring_func="sigmoid",
                          correction_bias=torch.zeros(4))
    assert sorted(ids.tolist()[0]) == [0, 1]


def test_opcheck():
    for name in ("v2", "v3", "odd_softmax_norm"):
        logits, top_k, kwargs, bias = make_case(name, 6, torch.float32, seed=1)
        n_group = kwargs.get("n_group", 1)
        args = (logits.requires_grad_(), bias, top_k, n_group, kwargs.get("topk_group", n_group),
                kwargs.get("scoring_func") == "sigmoid", bias is not None and n_group > 1,
                kwargs.get("renormalize", False), kwargs.get("routed_scaling_factor", 1.0))
        torch.library.opcheck(torch.ops.moe_align.grouped_topk.default, args)


def test_compiles_fullgraph():
    logits, top_k, kwargs, bias = make_case("v3", 13, torch.float32, seed=2)

    def route(x):
        weights, ids = grouped_topk(x, top_k, correction_bias=bias, **kwargs)
        return (weights * weights).sum(), ids

    x1 = logits.clone().requires_grad_()
    x2 = logits.clone().requires_grad_()
    loss1, ids1 = route(x1)
    loss2, ids2 = torch.compile(route, fullgraph=True)(x2)
    loss1.backward()
    loss2.backward()
    assert torch.equal(ids1, ids2)
    torch.testing.assert_close(loss1, loss2)
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x: grouped_topk(x.long(), 2), "fp32, fp16 or bf16"),
        (lambda x: grouped_topk(x[0], 2), r"\[tokens, experts\]"),
        (lambda x: grouped_topk(x, 2, n_group=3), "n_group"),
        (lambda x: grouped_topk(x, 2, n_group=4, topk_group=5), "topk_group"),
        (lambda x: grouped_topk(x, 9), "top_k"),
        (lambda x: grouped_topk(x, 5, n_group=4, topk_group=2), "top_k"),
        (lambda x: grouped_topk(x, 2, scoring_func="relu"), "scoring_func"),
        (lambda x: grouped_topk(x, 2, correction_bias=torch.zeros(7)), "correction_bias"),
        (lambda x: grouped_topk(x, 2, correction_bias=torch.zeros(8, dtype=torch.float64)), "fp32"),
        (lambda x: grouped_topk(x, 2, n_group=8, group_score="top2_sum"), "2 experts per group"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call(torch.randn(3, 8))


@requires_cuda
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_kernel_matches_oracle(backend, name, dtype):
    backend("cuda")
    logits, top_k, kwargs, bias = make_case(name, 300, dtype, seed=7)
    check_against_oracle(logits.cuda(), top_k, kwargs, None if bias is None else bias.cuda())


@pytest.mark.parametrize("name", ["v2_lite", "v3"])
def test_direct_cpu_call_equals_the_op(name):
    """Without autograd, CPU calls skip the torch.library dispatch: the same result as the op's."""
    logits, top_k, kwargs, bias = make_case(name, 9, torch.float32, seed=3)
    with torch.no_grad():
        weights, ids = grouped_topk(logits, top_k, correction_bias=bias, **kwargs)
    n_group = kwargs.get("n_group", 1)
    group_score = kwargs.get("group_score") or ("top2_sum" if bias is not None else "max")
    op_weights, op_ids = torch.ops.moe_align.grouped_topk(
        logits, bias, top_k, n_group, kwargs.get("topk_group") or n_group, kwargs.get("scoring_func") == "sigmoid",
        group_score == "top2_sum" and n_group > 1, kwargs.get("renormalize", False),
        kwargs.get("routed_scaling_factor", 1.0))
    assert torch.equal(weights, op_weights) and torch.equal(ids, op_ids)
    check_against_oracle(logits, top_k, kwargs, bias, backward=False)
