import pytest
import torch

from moe_align.ops import (
    expert_balance_loss,
    expert_token_counts,
    sequence_balance_loss,
    update_correction_bias_,
)


def routing(num_tokens, num_experts, top_k, seed, sigmoid=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=g, dtype=torch.float64)
    scores = logits.sigmoid() if sigmoid else logits.softmax(-1)
    ids = torch.rand(num_tokens, num_experts, generator=g).topk(top_k, dim=1).indices.to(torch.int32)
    return scores, ids


def oracle_expert_loss(scores, ids, alpha):
    """DeepSeek-V2 eq.: L = alpha sum_i f_i P_i, f_i = E/(K T) #selects, P_i = mean_t s_it."""
    num_tokens, num_experts = scores.shape
    top_k = ids.shape[1]
    total = 0.0
    for i in range(num_experts):
        selects = sum(1 for t in range(num_tokens) if i in ids[t].tolist())
        f = num_experts / (top_k * num_tokens) * selects
        p = sum(scores[t, i] for t in range(num_tokens)) / num_tokens
        total = total + f * p
    return alpha * total


def oracle_sequence_loss(scores, ids, lengths, alpha):
    """DeepSeek-V3 sequence-wise loss, per sequence, averaged over non-empty sequences."""
    losses, start = [], 0
    for length in lengths:
        if length:
            seq = scores[start:start + length]
            normed = seq / seq.sum(dim=1, keepdim=True)
            losses.append(oracle_expert_loss(normed, ids[start:start + length], alpha))
        start += length
    return sum(losses) / len(losses)


def test_token_counts():
    _, ids = routing(50, 9, 3, seed=0)
    flat = ids.reshape(-1).tolist()
    want = [flat.count(e) for e in range(9)]
    assert expert_token_counts(ids, 9).tolist() == want
    assert expert_token_counts(ids.long(), 12).tolist() == want + [0, 0, 0]
    assert expert_token_counts(torch.zeros(0, 2, dtype=torch.int32), 4).tolist() == [0] * 4


@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 4, 1), (37, 16, 6)])
def test_expert_balance_loss(num_tokens, num_experts, top_k):
    scores, ids = routing(num_tokens, num_experts, top_k, seed=num_tokens)
    mine = scores.float().clone().requires_grad_()
    theirs = scores.clone().requires_grad_()
    got = expert_balance_loss(mine, ids, alpha=0.003)
    want = oracle_expert_loss(theirs, ids, 0.003)
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-9)
    got.backward()
    want.backward()
    torch.testing.assert_close(mine.grad.double(), theirs.grad, rtol=1e-5, atol=1e-9)


def test_uniform_routing_has_loss_alpha():
    # Perfect balance: f_i = 1 and P_i = 1/E, so L = alpha (the loss's minimum).
    ids = torch.arange(8, dtype=torch.int32).view(4, 2)
    scores = torch.full((4, 8), 1 / 8)
    torch.testing.assert_close(expert_balance_loss(scores, ids, alpha=0.5), torch.tensor(0.5))


def test_sequence_balance_loss():
    lengths = [5, 0, 1, 12]
    scores, ids = routing(sum(lengths), 10, 3, seed=7, sigmoid=True)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    mine = scores.float().clone().requires_grad_()
    theirs = scores.clone().requires_grad_()
    got = sequence_balance_loss(mine, ids, cu, alpha=1e-4)
    want = oracle_sequence_loss(theirs, ids, lengths, 1e-4)
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-12)
    got.backward()
    want.backward()
    torch.testing.assert_close(mine.grad.double(), theirs.grad, rtol=1e-5, atol=1e-12)


def test_losses_on_empty_batch():
    scores = torch.zeros(0, 4, requires_grad=True)
    ids = torch.zeros(0, 2, dtype=torch.int32)
    assert expert_balance_loss(scores, ids).item() == 0.0
    assert sequence_balance_loss(scores, ids, torch.tensor([0])).item() == 0.0


def test_bias_update_direction():
    bias = torch.tensor([0.5, 0.0, -0.25, 0.0])
    counts = torch.tensor([5, 1, 3, 3])  # mean 3: expert 0 overloaded, expert 1 underloaded
    out = update_correction_bias_(bias, counts, gamma=0.125)
    assert out is bias
    assert bias.tolist() == [0.375, 0.125, -0.25, 0.0]


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: expert_token_counts(torch.tensor([[0, 4]]), 4), "outside"),
        (lambda: expert_token_counts(torch.zeros(2, 2), 4), "int32 or int64"),
        (lambda: expert_balance_loss(torch.rand(3, 4), torch.zeros(2, 1, dtype=torch.int32)), "topk_ids"),
        (lambda: expert_balance_loss(torch.rand(3), torch.zeros(3, 1, dtype=torch.int32)), "scores"),
        (lambda: sequence_balance_loss(torch.rand(3, 4), torch.zeros(3, 1, dtype=torch.int32),
                                       torch.tensor([0, 2])), "cu_seqlens"),
        (lambda: sequence_balance_loss(torch.rand(3, 4), torch.zeros(3, 1, dtype=torch.int32),
                                       torch.tensor([0, 2, 1, 3])), "non-decreasing"),
        (lambda: update_correction_bias_(torch.zeros(4), torch.zeros(3), 0.1), "counts"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()
