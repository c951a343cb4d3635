"""The fused-head losses against Liger-Kernel's, the fused heads we benchmark against.

FusedLinearGRPOLoss vs LigerFusedLinearGRPOLoss: from the same hidden states, lm_head,
completions, advantages and old and reference log-probs, the loss, its gradients with respect to
the hidden states and the head, and the KL and clip-fraction metrics must agree for each
aggregation under Liger's (TRL's) name. FusedLinearDPOLoss vs LigerFusedLinearDPOLoss: from the
policy's and the reference's hidden states and heads, the loss, its gradients and the sequence
log-probs and rewards. FusedLinearSFTLoss vs LigerFusedLinearCrossEntropyLoss (a Triton kernel:
through the interpreter without a GPU): loss and gradients, mean and sum.

Liger computes in float32 whatever the input dtype, as does the CPU path of ours, so the
tolerances are float32's. Liger's uncompiled path is used: torch.compile on the CPU costs minutes
of CI and computes the same function. use_ref_model=True: with False, Liger ignores the reference
log-probs it is given and its KL term is 0.
"""

import pytest
import torch
from oracle_grpo import logprobs_oracle
from test_grpo import OURS_TO_TRL

from moe_align.modules.losses import FusedLinearDPOLoss, FusedLinearGRPOLoss, FusedLinearSFTLoss

chunked_loss = pytest.importorskip("liger_kernel.chunked_loss")  # a test dependency: present in CI

TOL = dict(rtol=1e-5, atol=1e-6)
BATCH, LENGTH, HIDDEN, VOCAB = 6, 9, 16, 1000  # V a multiple of no block size
EPS_LOW, EPS_HIGH, BETA, MAX_COMPLETION = 0.2, 0.28, 0.04, 12


def loss_and_gradients(loss_fn, hidden, weight):
    """``loss_fn(hidden, weight) -> (loss, extra)`` on fresh leaf copies of both; backpropagates
    the loss and returns ``(loss, extra, (hidden.grad, weight.grad))``."""
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, extra = loss_fn(hidden, weight)
    loss.backward()
    return loss, extra, (hidden.grad, weight.grad)


def grpo_inputs(seed=0):
    """Hidden states and head, completions with an empty row, and old / reference log-probs
    spread around the policy's own so that the ratios straddle both clip bounds."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(BATCH, LENGTH, HIDDEN, generator=g)
    weight = torch.randn(VOCAB, HIDDEN, generator=g) * 0.3
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=g)
    lengths = torch.randint(1, LENGTH + 1, (BATCH,), generator=g)
    lengths[1] = 0
    mask = torch.arange(LENGTH).unsqueeze(0) < lengths.unsqueeze(1)
    advantages = torch.randn(BATCH, generator=g)
    logp = logprobs_oracle(hidden.flatten(0, 1), weight, ids.flatten())[0].view(BATCH, LENGTH).float()
    old = logp + torch.randn(BATCH, LENGTH, generator=g) * 0.3
    ref = logp + torch.randn(BATCH, LENGTH, generator=g) * 0.3
    return hidden, weight, ids, mask, advantages, old, ref


@pytest.mark.parametrize("mode", list(OURS_TO_TRL))
@pytest.mark.parametrize("unbiased_kl", [False, True])  # Liger's use_bias_correction_kl
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_grpo_loss_gradients_and_metrics_equal_ligers(mode, unbiased_kl, temperature):
    hidden, weight, ids, mask, advantages, old, ref = grpo_inputs(seed=21)
    global_tokens = int(mask.sum()) + 13  # dapo: the tokens of the whole generation batch

    liger = chunked_loss.LigerFusedLinearGRPOLoss(
        beta=BETA, compiled=False, use_ref_model=True, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
        loss_type=OURS_TO_TRL[mode], max_completion_length=MAX_COMPLETION, use_bias_correction_kl=unbiased_kl,
        temperature=temperature)
    theirs, (their_kl, their_clipped), their_grads = loss_and_gradients(
        lambda h, w: liger(h, w, ids, mask.long(), advantages, ref_per_token_logps=ref, old_per_token_logps=old,
                           num_items_in_batch=global_tokens), hidden, weight)

    ours_module = FusedLinearGRPOLoss(eps_low=EPS_LOW, eps_high=EPS_HIGH, beta=BETA, loss_type=mode,
                                      max_len=MAX_COMPLETION, unbiased_kl=unbiased_kl, temperature=temperature)
    ours, metrics, our_grads = loss_and_gradients(
        lambda h, w: ours_module(h, w, ids, mask, advantages, old, ref, num_global_tokens=global_tokens, world_size=1),
        hidden, weight)

    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(our_grads, their_grads, **TOL)  # hidden, then weight
    assert our_grads[1].abs().sum() > 0
    assert metrics["kl"].item() == pytest.approx(their_kl.item(), rel=1e-5)
    # Liger counts a token as clipped where the clip binds for its advantage's sign: TRL's region
    assert metrics["clip_ratio/region_mean"].item() == pytest.approx(their_clipped.item(), rel=1e-5)
    assert 0 < their_clipped.item() < 1  # the batch straddles the bounds: the comparison is not vacuous


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_fused_dpo_loss_gradients_and_metrics_equal_ligers(beta):
    pairs = 3
    g = torch.Generator().manual_seed(22)
    hidden = torch.randn(2 * pairs, LENGTH, HIDDEN, generator=g)  # chosen rows, then rejected
    weight = torch.randn(VOCAB, HIDDEN, generator=g) * 0.3
    ref_hidden = hidden + torch.randn(hidden.shape, generator=g) * 0.5
    ref_weight = weight + torch.randn(weight.shape, generator=g) * 0.1
    targets = torch.randint(0, VOCAB, (2 * pairs, LENGTH), generator=g)
    prompt_lengths = torch.randint(0, LENGTH - 1, (2 * pairs,), generator=g)  # prompt tokens: ignored
    targets[torch.arange(LENGTH).unsqueeze(0) < prompt_lengths.unsqueeze(1)] = -100

    liger = chunked_loss.LigerFusedLinearDPOLoss(beta=beta, compiled=False, use_ref_model=True)
    theirs, aux, their_grads = loss_and_gradients(
        lambda h, w: liger(w, h, targets, ref_input=ref_hidden, ref_weight=ref_weight), hidden, weight)
    their_chosen, their_rejected, *_, their_chosen_rewards, their_rejected_rewards = aux

    ours_module = FusedLinearDPOLoss(beta=beta)
    ours, metrics, our_grads = loss_and_gradients(
        lambda h, w: ours_module(h, w, targets, ref_hidden=ref_hidden, ref_weight=ref_weight), hidden, weight)

    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(our_grads, their_grads, **TOL)  # hidden, then weight
    for name, want in (("logps/chosen", their_chosen), ("logps/rejected", their_rejected),
                       ("rewards/chosen", their_chosen_rewards), ("rewards/rejected", their_rejected_rewards)):
        assert metrics[name].item() == pytest.approx(want.mean().item(), rel=1e-5), name
    rewards_differ = their_chosen_rewards > their_rejected_rewards
    assert metrics["rewards/accuracies"].item() == pytest.approx(rewards_differ.float().mean().item())
    assert 0 < rewards_differ.float().mean() < 1  # pairs ranked right and wrong: the metrics are not vacuous


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_sft_loss_and_gradients_equal_ligers_fused_linear_cross_entropy(reduction):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    device = "cuda" if torch.cuda.is_available() else "cpu"  # Liger's kernel runs where Triton does
    g = torch.Generator().manual_seed(23)
    hidden = torch.randn(3, LENGTH, HIDDEN, generator=g).to(device)
    weight = (torch.randn(VOCAB, HIDDEN, generator=g) * 0.3).to(device)
    targets = torch.randint(0, VOCAB, (3, LENGTH), generator=g)
    targets[:, :4] = -100  # the prompt
    targets[1, 6:] = -100  # padding
    targets = targets.to(device)

    liger = LigerFusedLinearCrossEntropyLoss(reduction=reduction)
    theirs, _, their_grads = loss_and_gradients(
        lambda h, w: (liger(w, h.flatten(0, 1), targets.flatten()), None), hidden, weight)
    ours_module = FusedLinearSFTLoss(reduction=reduction)
    ours, metrics, our_grads = loss_and_gradients(lambda h, w: ours_module(h, w, targets), hidden, weight)

    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(our_grads, their_grads, **TOL)  # hidden, then weight
    assert metrics["num_tokens"].item() == int((targets != -100).sum()) == 12
