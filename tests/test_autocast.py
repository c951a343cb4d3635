"""The ops under ``torch.autocast`` (CPU, bf16).

Two rules (moe_align/ops/_autocast.py): a public op casts its matmul operands to the autocast
dtype, as autocast casts a linear's; and inside every op, backward included, autocast is off, so
an op computes in the dtypes it was given. The first is checked against the same op called on
explicitly cast inputs outside autocast (bit for bit, gradients included); the second against
float64 oracles at fp32 tolerance, which a bf16 matmul leaking in would miss by orders of
magnitude.
"""

from __future__ import annotations

import pytest
import torch

from moe_align.modules import FusedLinearDPOLoss, FusedLinearGRPOLoss, FusedLinearSFTLoss
from moe_align.ops import fused_experts, grouped_topk, linear_logprobs, mla_cache_append, mla_decode
from moe_align.ops import mla_varlen_attention
from oracle_experts import experts_oracle
from oracle_grpo import logprobs_oracle
from oracle_mla import decode_oracle, varlen_attention_oracle
from test_mla_decode import make_case

BF16 = torch.bfloat16
FP32_TOL = dict(rtol=1e-5, atol=1e-5)


def bf16_autocast():
    return torch.autocast("cpu", dtype=BF16)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]


def run_and_backward(fn, inputs, grad_seed=0):
    """``fn(*inputs)``'s first output, after backpropagating a random projection of it."""
    out = fn(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    g = torch.Generator().manual_seed(grad_seed)
    (out.float() * torch.randn(out.shape, generator=g)).sum().backward()
    return out.detach()


def assert_autocast_is_an_explicit_cast(fn, inputs, cast_positions):
    """``fn`` under autocast on fp32 ``inputs`` == ``fn`` outside autocast on the inputs at
    ``cast_positions`` cast to bf16: same output and same (fp32) gradients, bit for bit."""
    auto_in = leaves(*inputs)
    with bf16_autocast():
        out = run_and_backward(fn, auto_in)
    ref_in = leaves(*inputs)
    ref_out = run_and_backward(fn, [t.to(BF16) if i in cast_positions else t for i, t in enumerate(ref_in)])
    assert out.dtype == ref_out.dtype
    assert torch.equal(out, ref_out)
    for leaf, ref_leaf in zip(auto_in, ref_in):
        assert leaf.grad.dtype == torch.float32
        assert torch.equal(leaf.grad, ref_leaf.grad)


def test_linear_logprobs_casts_hidden_and_weight_like_a_linear():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(7, 32, generator=g), torch.randn(53, 32, generator=g) * 0.2
    targets = torch.randint(0, 53, (7,), generator=g)
    targets[3] = -100
    assert_autocast_is_an_explicit_cast(
        lambda h, w: linear_logprobs(h, w, targets, return_entropy=True), [hidden, weight], {0, 1})


def test_autocast_does_not_cast_a_non_float_input_into_range():
    """An integer tensor where a float one belongs is reported under autocast as outside it,
    not cast to bf16 and computed on."""
    weight, targets = torch.randn(10, 16), torch.zeros(3, dtype=torch.long)
    with bf16_autocast(), pytest.raises(TypeError, match="hidden must be an fp32, bf16 or fp16 tensor"):
        linear_logprobs(torch.ones(3, 16, dtype=torch.long), weight, targets)


def test_linear_logprobs_fp32_head_under_autocast_computes_in_fp32():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 5, 48, generator=g).to(BF16)  # as an autocast model's hidden states
    weight = torch.randn(71, 48, generator=g) * 0.2  # an fp32 lm_head parameter
    targets = torch.randint(0, 71, (2, 5), generator=g)
    with bf16_autocast():
        logp = linear_logprobs(hidden, weight, targets, fp32_head=True)
        plain = linear_logprobs(hidden, weight, targets)
    want = logprobs_oracle(hidden.double().flatten(0, 1), weight.double(), targets.flatten())[0].view(2, 5)
    torch.testing.assert_close(logp.double(), want, **FP32_TOL)
    # without fp32_head the head runs in bf16, which is visibly less accurate
    assert (plain.double() - want).abs().max() > 100 * (logp.double() - want).abs().max()


def varlen_case(seed=6, total=13, heads=2):
    g = torch.Generator().manual_seed(seed)
    q_nope, k_nope = torch.randn(2, total, heads, 32, generator=g)
    q_rope = torch.randn(total, heads, 16, generator=g)
    k_rope = torch.randn(total, 1, 16, generator=g)
    v = torch.randn(total, heads, 16, generator=g)
    return [q_nope, q_rope, k_nope, k_rope, v], torch.tensor([0, 5, 5, 13], dtype=torch.int32)


def raw_op_case(name):
    """fp32 inputs, the raw ``torch.ops.moe_align`` call and its float64 oracle (first output)."""
    if name == "linear_logprobs":
        g = torch.Generator().manual_seed(3)
        inputs = [torch.randn(9, 40, generator=g), torch.randn(67, 40, generator=g) * 0.2]
        targets = torch.randint(0, 67, (9,), generator=g)
        return (inputs, lambda h, w: torch.ops.moe_align.linear_logprobs(h, w, targets, 1.0, -100, False, False, 4),
                lambda h, w: logprobs_oracle(h, w, targets)[0])
    if name == "fused_experts":
        x, gate_up, down, weights, ids = experts_case()
        return ([x, gate_up, down, weights], lambda *a: torch.ops.moe_align.fused_experts(*a, ids, True),
                lambda *a: experts_oracle(*a, ids))
    inputs, cu = varlen_case()
    return (inputs, lambda *a: torch.ops.moe_align.mla_varlen_attention(*a, cu, 8, 0.15),
            lambda *a: varlen_attention_oracle(*a, cu, 0.15)[0])


@pytest.mark.parametrize("backward_inside_autocast", [False, True])
@pytest.mark.parametrize("name", ["linear_logprobs", "fused_experts", "mla_varlen_attention"])
def test_autocast_does_not_reach_inside_the_ops(name, backward_inside_autocast):
    """fp32 inputs straight to ``torch.ops.moe_align``: the op's PyTorch path and its backward
    compute in fp32 although autocast is on (their matmuls would otherwise run in bf16)."""
    inputs, raw_op, oracle = raw_op_case(name)
    got_in, want_in = leaves(*inputs), [t.double().requires_grad_() for t in inputs]
    with bf16_autocast():
        out = run_and_backward(raw_op, got_in) if backward_inside_autocast else raw_op(*got_in)[0]
    if not backward_inside_autocast:
        out = run_and_backward(lambda *_: out, got_in)
    want = run_and_backward(oracle, want_in)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, **FP32_TOL)
    for got, ref in zip(got_in, want_in):
        torch.testing.assert_close(got.grad.double(), ref.grad, **FP32_TOL)


def experts_case(seed=4, tokens=11, hidden=32, inter=16, experts=5, top_k=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=g) * 0.2
    down = torch.randn(experts, hidden, inter, generator=g) * 0.2
    weights = torch.rand(tokens, top_k, generator=g)
    ids = torch.stack([torch.randperm(experts - 1, generator=g)[:top_k] for _ in range(tokens)])  # expert 4 idle
    return x, gate_up, down, weights, ids


def test_fused_experts_casts_hidden_and_expert_weights():
    x, gate_up, down, weights, ids = experts_case()
    assert_autocast_is_an_explicit_cast(
        lambda x, gu, d, w: fused_experts(x, gu, d, w, ids), [x, gate_up, down, weights], {0, 1, 2})


def test_fused_experts_without_grad_under_autocast():
    x, gate_up, down, weights, ids = experts_case(seed=5)
    with torch.no_grad(), bf16_autocast():
        out = fused_experts(x, gate_up, down, weights, ids)
        fp32_out = torch.ops.moe_align.fused_experts(x, gate_up, down, weights, ids, False)[0]
    assert out.dtype == BF16
    assert torch.equal(out, fused_experts(x.to(BF16), gate_up.to(BF16), down.to(BF16), weights, ids))
    want = experts_oracle(x.double(), gate_up.double(), down.double(), weights.double(), ids)
    torch.testing.assert_close(fp32_out.double(), want, **FP32_TOL)


def test_mla_varlen_attention_casts_queries_keys_and_values():
    inputs, cu = varlen_case()
    assert_autocast_is_an_explicit_cast(lambda *qkv: mla_varlen_attention(*qkv, cu, 8, 0.15), inputs,
                                        {0, 1, 2, 3, 4})


def test_mla_decode_and_cache_append_take_the_cache_dtype_under_autocast():
    q_latent, q_rope, cache, block_table, lengths = make_case([20, 1, 7], 1, 2, 32, 16, 16, torch.float32, seed=7)
    cache = torch.nan_to_num(cache)
    slots = (block_table[:, 0].long() * 16).contiguous()  # each sequence's first slot
    g = torch.Generator().manual_seed(8)
    latent, k_rope = torch.randn(3, 32, generator=g), torch.randn(3, 16, generator=g)

    bf16_cache, ref_cache = cache.to(BF16), cache.to(BF16)
    with bf16_autocast():
        mla_cache_append(bf16_cache, latent, k_rope, slots)
        out, lse = mla_decode(q_latent, q_rope, bf16_cache, block_table, lengths, 0.2)
    mla_cache_append(ref_cache, latent.to(BF16), k_rope.to(BF16), slots)
    ref_out, ref_lse = mla_decode(q_latent.to(BF16), q_rope.to(BF16), ref_cache, block_table, lengths, 0.2)
    assert torch.equal(bf16_cache, ref_cache)
    assert out.dtype == BF16 and torch.equal(out, ref_out) and torch.equal(lse, ref_lse)

    # an fp32 cache: fp32 queries stay fp32 and the decode computes in fp32
    with bf16_autocast():
        out32, lse32 = mla_decode(q_latent, q_rope, cache, block_table, lengths, 0.2)
    want_out, want_lse = decode_oracle(q_latent.double(), q_rope.double(), cache.double(), block_table, lengths, 0.2)
    torch.testing.assert_close(out32.double(), want_out, **FP32_TOL)
    torch.testing.assert_close(lse32.double(), want_lse, **FP32_TOL)


def test_grouped_topk_keeps_its_inputs_under_autocast():
    logits = torch.randn(6, 16, generator=torch.Generator().manual_seed(9))
    bias = torch.randn(16, generator=torch.Generator().manual_seed(10)) * 0.1
    with bf16_autocast():
        weights, ids = grouped_topk(logits, 4, n_group=4, topk_group=2, scoring_func="sigmoid",
                                    correction_bias=bias, renormalize=True)
    ref_weights, ref_ids = grouped_topk(logits, 4, n_group=4, topk_group=2, scoring_func="sigmoid",
                                        correction_bias=bias, renormalize=True)
    assert weights.dtype == torch.float32 and torch.equal(weights, ref_weights) and torch.equal(ids, ref_ids)


def loss_case(seed=11, batch=4, seq=6, hidden=32, vocab=45):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=g).to(BF16)  # an autocast model's hidden states
    w = torch.randn(vocab, hidden, generator=g) * 0.2  # the fp32 lm_head parameter
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return g, h, w, ids


def loss_module_case(loss_name, seed):
    """``(h, w, make)``: bf16 hidden states, the fp32 lm_head weight, and ``make(**options)`` ->
    ``loss(h, w)`` of that loss module (built with ``options``) on fixed targets and inputs."""
    g, h, w, ids = loss_case(seed)
    if loss_name == "grpo":
        mask = (torch.rand(ids.shape, generator=g) > 0.3).int()
        adv, ref = torch.randn(4, generator=g), torch.randn(ids.shape, generator=g) - 2

        def make(**options):
            module = FusedLinearGRPOLoss(beta=0.1, compute_entropy=True, **options)
            return lambda h, w: module(h, w, ids, mask, adv, ref_logp=ref)[0]
    elif loss_name == "sft":
        targets = ids.masked_fill(torch.rand(ids.shape, generator=g) > 0.6, -100)

        def make(**options):
            module = FusedLinearSFTLoss(**options)
            return lambda h, w: module(h, w, targets)[0]
    else:
        ref_c, ref_r = torch.randn(2, generator=g) - 5, torch.randn(2, generator=g) - 5

        def make(**options):
            module = FusedLinearDPOLoss(beta=0.2, **options)
            return lambda h, w: module(h, w, ids, ref_c, ref_r)[0]
    return h, w, make


@pytest.mark.parametrize("loss_name", ["grpo", "sft", "dpo"])
def test_loss_modules_under_autocast_use_the_head_in_the_autocast_dtype(loss_name):
    """The loss modules take bf16 hidden states and the fp32 ``lm_head.weight`` under autocast
    (they raised a dtype error before), and match the head run on the bf16-cast weight."""
    h, w, make = loss_module_case(loss_name, seed=11)
    fn = make()
    w_auto, w_ref = leaves(w, w)
    h_auto, h_ref = leaves(h, h)
    with bf16_autocast():
        loss = fn(h_auto, w_auto)
    loss.backward()
    ref_loss = fn(h_ref, w_ref.to(BF16))
    ref_loss.backward()
    assert torch.equal(loss, ref_loss)
    assert w_auto.grad.dtype == torch.float32 and torch.equal(w_auto.grad, w_ref.grad)
    assert h_auto.grad.dtype == BF16 and torch.equal(h_auto.grad, h_ref.grad)


@pytest.mark.parametrize("loss_name", ["grpo", "sft", "dpo"])
def test_loss_modules_with_fp32_head_compute_the_head_in_fp32(loss_name):
    """``fp32_head=True`` reaches linear_logprobs from every loss module: under bf16 autocast the
    loss and gradients are those of the fp32 head on the same (bf16) hidden states."""
    h, w, make = loss_module_case(loss_name, seed=14)
    h_auto, w_auto = leaves(h, w)
    h_ref, w_ref = leaves(h.float(), w)
    with bf16_autocast():
        loss = make(fp32_head=True)(h_auto, w_auto)
    loss.backward()
    want = make()(h_ref, w_ref)
    want.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want, **FP32_TOL)
    torch.testing.assert_close(w_auto.grad, w_ref.grad, **FP32_TOL)
    torch.testing.assert_close(h_auto.grad, h_ref.grad.to(BF16))  # a bf16 gradient: bf16 tolerance


def test_compiled_under_autocast_matches_eager():
    """torch.compile(fullgraph=True) traces the casts and the ops' autocast rule."""
    torch._dynamo.reset()
    x, gate_up, down, weights, ids = experts_case(seed=12)
    lm_head = torch.randn(29, x.shape[1], generator=torch.Generator().manual_seed(13)) * 0.2
    targets = torch.arange(x.shape[0]) % 29

    def loss(x, gate_up, down, weights, lm_head):
        y = fused_experts(x, gate_up, down, weights.softmax(-1), ids)
        return -linear_logprobs(y, lm_head, targets).mean()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (loss, compiled):
        inputs = leaves(x, gate_up, down, weights, lm_head)
        with bf16_autocast():
            out = fn(*inputs)
        out.backward()
        results.append((out, [t.grad for t in inputs]))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for a, b in zip(got_grads, want_grads):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)
