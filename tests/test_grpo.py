import math

import pytest
import torch

from conftest import requires_cuda
from moe_align.modules.losses import FusedLinearDPOLoss, FusedLinearGRPOLoss, FusedLinearSFTLoss
from moe_align.ops.grpo import combine_rewards, dpo_loss, group_advantages, grpo_loss, sft_loss
from oracle_grpo import (
    aggregate_oracle,
    combine_rewards_oracle,
    dpo_oracle,
    group_advantages_oracle,
    grpo_token_loss_oracle,
    logprobs_oracle,
    sft_oracle,
)

MODES = ["sequence-mean", "token-mean", "global-token-mean", "dr-grpo"]
TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-5, atol=1e-5)


def make_batch(batch=6, length=9, seed=0, spread=0.3, empty_row=True):
    """Log-probs of policy / old / reference / sampler whose ratios straddle both clip bounds."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(batch, length, generator=g) * 3 - 0.1
    old = logp + torch.randn(batch, length, generator=g) * spread
    ref = logp + torch.randn(batch, length, generator=g) * spread
    sampler = old + torch.randn(batch, length, generator=g) * spread
    advantages = torch.randn(batch, generator=g)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    if empty_row:
        lengths[1] = 0
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    return logp, old, ref, sampler, advantages, mask


def oracle_loss(logp, old, ref, adv, mask, mode, eps_low=0.2, eps_high=0.28, beta=0.04, sampler=None,
                tis_cap=math.inf, unbiased_kl=False, **agg):
    per_token = grpo_token_loss_oracle(logp, old, ref, adv, eps_low, eps_high, beta, sampler, tis_cap, unbiased_kl)
    return aggregate_oracle(per_token, mask, mode, **agg)


def agg_kwargs(mode, mask):
    if mode == "global-token-mean":
        return dict(num_global_tokens=int(mask.sum()) * 3, world_size=3)
    if mode == "dr-grpo":
        return dict(max_len=16)
    return {}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("importance_sampling, unbiased_kl", [(False, False), (True, False), (False, True)])
def test_grpo_loss_matches_oracle(mode, importance_sampling, unbiased_kl):
    logp, old, ref, sampler, adv, mask = make_batch(seed=1)
    x = logp.clone().requires_grad_()
    extra = dict(sampler_logp=sampler, tis_cap=1.5) if importance_sampling else {}
    loss, metrics = grpo_loss(x, adv, mask, old, ref, eps_low=0.2, eps_high=0.28, beta=0.04, loss_type=mode,
                              unbiased_kl=unbiased_kl, **agg_kwargs(mode, mask), **extra)
    x64 = logp.double().requires_grad_()
    want = oracle_loss(x64, old.double(), ref.double(), adv.double(), mask, mode,
                       sampler=sampler.double() if importance_sampling else None,
                       tis_cap=1.5 if importance_sampling else math.inf, unbiased_kl=unbiased_kl,
                       **agg_kwargs(mode, mask))
    torch.testing.assert_close(loss.double(), want.detach(), **TOL)
    loss.backward()
    want.backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, **GRAD_TOL)
    assert metrics["num_tokens"] == mask.sum()


def test_metrics_match_their_definitions():
    logp, old, ref, _, adv, mask = make_batch(seed=2, spread=0.5)
    entropy = torch.rand_like(logp) * 5
    _, metrics = grpo_loss(logp, adv, mask, old, ref, eps_low=0.2, eps_high=0.25, entropy=entropy)
    m = mask
    ratio = torch.exp(logp.double() - old.double())
    a = adv.double().unsqueeze(1).expand_as(ratio)
    kl = torch.exp(ref.double() - logp.double()) - (ref.double() - logp.double()) - 1
    want = {
        "kl": kl[m].mean(),
        "clip_ratio/low_mean": ((ratio < 0.8) & (a < 0))[m].double().mean(),
        "clip_ratio/high_mean": ((ratio > 1.25) & (a > 0))[m].double().mean(),
        "ratio/mean": ratio[m].mean(),
        "ratio/min": ratio[m].min(),
        "ratio/max": ratio[m].max(),
        "entropy": entropy.double()[m].mean(),
    }
    want["clip_ratio/region_mean"] = want["clip_ratio/low_mean"] + want["clip_ratio/high_mean"]
    assert want["clip_ratio/low_mean"] > 0 and want["clip_ratio/high_mean"] > 0
    for name, value in want.items():
        torch.testing.assert_close(metrics[name].double(), value, **TOL, msg=name)


# TRL's GRPOTrainer loss types, written from their documented definitions (GRPOConfig.loss_type:
# "grpo" normalises each sequence by its length then averages over sequences; "bnpo" by the active
# tokens of the local batch; "dapo" by the active tokens of the global accumulated batch, i.e.
# num_items_in_batch / num_processes per process; "dr_grpo" by batch size x max_completion_length).
TRL = {
    "grpo": lambda l, m, **_: ((l * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean(),
    "bnpo": lambda l, m, **_: (l * m).sum() / m.sum().clamp(min=1.0),
    "dapo": lambda l, m, num_items_in_batch, num_processes, **_: (l * m).sum() / (num_items_in_batch / num_processes),
    "dr_grpo": lambda l, m, max_completion_length, **_: (l * m).sum() / (l.size(0) * max_completion_length),
}
OURS_TO_TRL = {"sequence-mean": "grpo", "token-mean": "bnpo", "global-token-mean": "dapo", "dr-grpo": "dr_grpo"}
# verl's core_algos.agg_loss modes (on a batch without empty sequences): "seq-mean-token-mean" averages
# per-sequence token means; "token-mean" divides the token sum by the (global) token count times
# dp_size; "seq-mean-token-sum-norm" divides the token sum by loss_scale_factor only.
VERL = {
    "seq-mean-token-mean": lambda l, m, **_: ((l * m).sum(-1) / (m.sum(-1) + 1e-8)).mean(),
    "token-mean": lambda l, m, batch_num_tokens, dp_size, **_: (l * m).sum() / batch_num_tokens * dp_size,
    "seq-mean-token-sum-norm": lambda l, m, loss_scale_factor, **_: (l * m).sum() / loss_scale_factor,
}


@pytest.mark.parametrize("mode", MODES)
def test_modes_match_trl_and_verl(mode):
    logp, old, ref, _, adv, mask = make_batch(seed=3, empty_row=False)
    maskf = mask.double()
    per_token = grpo_token_loss_oracle(logp.double(), old.double(), ref.double(), adv.double(), 0.2, 0.2, 0.04)
    world, global_tokens, max_len = 4, float(mask.sum()) * 4 + 3, 12
    kwargs = dict(num_items_in_batch=global_tokens, num_processes=world, max_completion_length=max_len)
    ours, _ = grpo_loss(logp, adv, mask, old, ref, eps_low=0.2, beta=0.04, loss_type=mode,
                        num_global_tokens=global_tokens, world_size=world, max_len=max_len)
    torch.testing.assert_close(ours.double(), TRL[OURS_TO_TRL[mode]](per_token, maskf, **kwargs), **TOL)
    verl_kwargs = dict(batch_num_tokens=global_tokens, dp_size=world, loss_scale_factor=max_len)
    verl = {
        "sequence-mean": VERL["seq-mean-token-mean"](per_token, maskf),
        "token-mean": VERL["token-mean"](per_token, maskf, batch_num_tokens=maskf.sum(), dp_size=1),
        "global-token-mean": VERL["token-mean"](per_token, maskf, **verl_kwargs),
        "dr-grpo": VERL["seq-mean-token-sum-norm"](per_token, maskf, **verl_kwargs) / logp.shape[0],
    }[mode]
    torch.testing.assert_close(ours.double(), verl, **TOL)


def test_global_token_mean_over_ranks_is_the_token_mean_of_the_whole_batch():
    logp, old, ref, _, adv, mask = make_batch(batch=8, seed=4)
    whole, _ = grpo_loss(logp, adv, mask, old, ref, loss_type="token-mean")
    total = int(mask.sum())
    # Two data-parallel ranks with a batch each; DDP averages their gradients (losses).
    ranks = [grpo_loss(logp[s], adv[s], mask[s], old[s], ref[s], loss_type="global-token-mean",
                       num_global_tokens=torch.tensor(total), world_size=2)[0]
             for s in (slice(0, 3), slice(3, 8))]
    torch.testing.assert_close(sum(ranks) / 2, whole, **TOL)


def test_on_policy_ratio_is_exactly_one():
    logp, _, ref, _, adv, mask = make_batch(seed=5)
    x = logp.clone().requires_grad_()
    loss, metrics = grpo_loss(x, adv, mask, None, ref, beta=0.0)
    assert metrics["ratio/mean"] == 1 and metrics["ratio/min"] == 1 and metrics["ratio/max"] == 1
    assert metrics["clip_ratio/region_mean"] == 0
    loss2, metrics2 = grpo_loss(logp, adv, mask, logp.clone(), ref, beta=0.0)
    assert metrics2["ratio/min"] == 1 and metrics2["ratio/max"] == 1
    torch.testing.assert_close(loss, loss2)
    # d/dlogp of -r A at r = 1 is -A: the policy gradient of eq. 32.
    loss.backward()
    lengths = mask.sum(1, keepdim=True).clamp(min=1)
    want = torch.where(mask, -adv.unsqueeze(1) / lengths / mask.shape[0], 0.0)
    torch.testing.assert_close(x.grad, want, **TOL)


def test_beta_zero_needs_no_reference_and_ignores_it():
    logp, old, ref, _, adv, mask = make_batch(seed=6)
    without, metrics = grpo_loss(logp, adv, mask, old, None, beta=0.0)
    with_ref, _ = grpo_loss(logp, adv, mask, old, ref, beta=0.0)
    torch.testing.assert_close(without, with_ref)
    assert metrics["kl"] == 0
    with pytest.raises(ValueError, match="ref_logp is required"):
        grpo_loss(logp, adv, mask, old, None, beta=0.1)


def test_equal_rewards_give_zero_advantages_and_pure_kl_loss():
    rewards = torch.full((8,), 0.7)
    adv = group_advantages(rewards, 4)
    assert torch.equal(adv, torch.zeros(8))
    logp, old, ref, _, _, mask = make_batch(batch=8, seed=7)
    loss, _ = grpo_loss(logp, adv, mask, old, ref, beta=0.5)
    want = oracle_loss(logp.double(), old.double(), ref.double(), adv.double(), mask, "sequence-mean", beta=0.5)
    torch.testing.assert_close(loss.double(), want, **TOL)


def test_padding_may_hold_anything():
    logp, old, ref, sampler, adv, mask = make_batch(seed=8)
    poisoned = [t.masked_fill(~mask, math.nan) for t in (logp, old, ref, sampler)]
    x = poisoned[0].clone().requires_grad_()
    loss, metrics = grpo_loss(x, adv, mask, *poisoned[1:3], sampler_logp=poisoned[3], entropy=poisoned[0])
    clean, _ = grpo_loss(logp, adv, mask, old, ref, sampler_logp=sampler)
    torch.testing.assert_close(loss, clean)
    loss.backward()
    assert torch.isfinite(x.grad).all() and torch.all(x.grad[~mask] == 0)
    assert all(torch.isfinite(v) for v in metrics.values())


def test_empty_batch_and_no_tokens():
    logp, old, ref, _, adv, mask = make_batch(seed=9)
    loss, metrics = grpo_loss(logp, adv, torch.zeros_like(mask), old, ref)
    assert loss == 0 and metrics["num_tokens"] == 0 and math.isnan(metrics["ratio/max"])
    loss, _ = grpo_loss(logp[:0], adv[:0], mask[:0], old[:0], ref[:0])
    assert loss == 0
    # Completions of length 0 (T = 0), with and without the entropy metric, op and module.
    for entropy in (None, logp[:, :0]):
        x = logp[:, :0].clone().requires_grad_()
        loss, metrics = grpo_loss(x, adv, mask[:, :0], old[:, :0], ref[:, :0], entropy=entropy)
        loss.backward()
        assert loss == 0 and metrics["num_tokens"] == 0 and x.grad.shape == (6, 0)
    loss, _ = FusedLinearGRPOLoss()(torch.randn(2, 0, 8), torch.randn(10, 8), torch.zeros(2, 0, dtype=torch.long),
                                    torch.zeros(2, 0), torch.randn(2), ref_logp=torch.zeros(2, 0))
    assert loss == 0


def test_token_weights_weight_the_loss_and_every_metric():
    """A float completion_mask of non-negative weights: the loss of eq. 32 and each token-mean
    metric are weighted means (tokens of weight 0 are left out, as padding)."""
    logp, old, ref, _, adv, mask = make_batch(seed=13, spread=0.5)
    weights = mask * torch.rand(mask.shape, generator=torch.Generator().manual_seed(14))
    weights[0, 0] = 0.0
    entropy = torch.rand_like(logp) * 5
    for mode in MODES:
        loss, metrics = grpo_loss(logp, adv, weights, old, ref, eps_low=0.2, eps_high=0.25, loss_type=mode,
                                  entropy=entropy, **agg_kwargs(mode, mask))
        want = oracle_loss(logp.double(), old.double(), ref.double(), adv.double(), weights.double(), mode,
                           eps_high=0.25, **agg_kwargs(mode, mask))
        torch.testing.assert_close(loss.double(), want, **TOL)
    w, m = weights.double(), weights > 0
    ratio = torch.exp(logp.double() - old.double())
    a = adv.double().unsqueeze(1).expand_as(ratio)
    kl = torch.exp(ref.double() - logp.double()) - (ref.double() - logp.double()) - 1

    def weighted_mean(x):
        return (x * w).sum() / w.sum()

    want = {
        "kl": weighted_mean(kl),
        "clip_ratio/low_mean": weighted_mean(((ratio < 0.8) & (a < 0)).double()),
        "clip_ratio/high_mean": weighted_mean(((ratio > 1.25) & (a > 0)).double()),
        "ratio/mean": weighted_mean(ratio),
        "ratio/min": ratio[m].min(),
        "ratio/max": ratio[m].max(),
        "entropy": weighted_mean(entropy.double()),
        "num_tokens": w.sum(),
    }
    want["clip_ratio/region_mean"] = want["clip_ratio/low_mean"] + want["clip_ratio/high_mean"]
    assert want["clip_ratio/low_mean"] > 0 and want["clip_ratio/high_mean"] > 0
    for name, value in want.items():
        torch.testing.assert_close(metrics[name].double(), value, **TOL, msg=name)


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("group_size", [1, 4, 8])
def test_group_advantages_match_eq34(scale, group_size):
    rewards = torch.randn(16, generator=torch.Generator().manual_seed(10))
    rewards[4:8] = 1.0  # a group of equal rewards
    got = group_advantages(rewards, group_size, scale=scale)
    torch.testing.assert_close(got.double(), group_advantages_oracle(rewards, group_size, scale=scale), **TOL)


def test_combine_rewards_matches_eq36():
    g = torch.Generator().manual_seed(11)
    rewards = {k: torch.randn(10, generator=g) for k in ("helpful", "safety", "rule")}
    coefficients = {"helpful": 1.0, "safety": 0.5, "rule": 2.0}
    torch.testing.assert_close(combine_rewards(rewards, coefficients).double(),
                               combine_rewards_oracle(rewards, coefficients), **TOL)


def test_sft_loss_matches_cross_entropy_over_the_response():
    g = torch.Generator().manual_seed(12)
    hidden, weight = torch.randn(20, 16, generator=g), torch.randn(70, 16, generator=g) * 0.4
    targets = torch.randint(0, 70, (20,), generator=g)
    targets[:6] = -100  # the prompt
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = sft_loss(h, w, targets)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    want = sft_oracle(h64, w64, targets)
    torch.testing.assert_close(loss.double(), want.detach(), **TOL)
    loss.backward()
    want.backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, **GRAD_TOL)
    torch.testing.assert_close(w.grad.double(), w64.grad, **GRAD_TOL)
    torch.testing.assert_close(sft_loss(hidden, weight, targets, reduction="sum"), loss * 14, **TOL)
    torch.testing.assert_close(sft_loss(hidden, weight, targets, num_tokens=28), loss / 2, **TOL)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_dpo_loss_matches_oracle(label_smoothing):
    g = torch.Generator().manual_seed(13)
    chosen, rejected, ref_c, ref_r = (torch.randn(5, generator=g) * 10 - 30 for _ in range(4))
    c, r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    loss, metrics = dpo_loss(c, r, ref_c, ref_r, beta=0.2, label_smoothing=label_smoothing)
    c64, r64 = chosen.double().requires_grad_(), rejected.double().requires_grad_()
    want = dpo_oracle(c64, r64, ref_c.double(), ref_r.double(), 0.2, label_smoothing)
    torch.testing.assert_close(loss.double(), want.detach(), **TOL)
    loss.backward()
    want.backward()
    torch.testing.assert_close(c.grad.double(), c64.grad, **GRAD_TOL)
    torch.testing.assert_close(r.grad.double(), r64.grad, **GRAD_TOL)
    reward_c = 0.2 * (chosen - ref_c)
    reward_r = 0.2 * (rejected - ref_r)
    torch.testing.assert_close(metrics["rewards/chosen"], reward_c.mean())
    torch.testing.assert_close(metrics["rewards/margins"], (reward_c - reward_r).mean())
    assert metrics["rewards/accuracies"] == (reward_c > reward_r).float().mean()


def test_dpo_reference_is_frozen_and_ties_are_not_accurate():
    """The reference log-probs get no gradient even when they carry one; a tie counts as wrong (TRL)."""
    policy_c, policy_r = torch.tensor([-3.0, -5.0, -2.0]), torch.tensor([-4.0, -5.0, -1.0])
    ref_c, ref_r = torch.tensor([-3.5, -5.0, -2.5]), torch.tensor([-4.5, -5.0, -1.0])
    inputs = [x.clone().requires_grad_() for x in (policy_c, policy_r, ref_c, ref_r)]
    loss, metrics = dpo_loss(*inputs, beta=0.5)
    loss.backward()
    assert inputs[0].grad is not None and inputs[1].grad is not None
    assert inputs[2].grad is None and inputs[3].grad is None
    # rewards: chosen 0.25, 0, 0.25; rejected 0.25, 0, 0 -> margins 0, 0, 0.25: one of three is right
    assert metrics["rewards/accuracies"].item() == pytest.approx(1 / 3)
    assert metrics["rewards/margins"].item() == pytest.approx(0.25 / 3)


# ---- modules: gradients reach hidden states and lm_head as through the unfused computation -------


def lm_inputs(batch, length, hidden_size=16, vocab=90, seed=14):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, hidden_size, generator=g)
    weight = torch.randn(vocab, hidden_size, generator=g) * 0.5
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    return hidden, weight, ids


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["sequence-mean", "dr-grpo"])
def test_fused_grpo_module_matches_unfused(backend, backend_name, mode):
    backend(backend_name)
    hidden, weight, ids = lm_inputs(6, 9)
    *_, adv, mask = make_batch(6, 9, seed=15)
    # Unfused, in float64: logits -> log_softmax -> gather (-> eq. 32-33 -> aggregation below).
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logp64, ent64 = logprobs_oracle(h64.reshape(-1, 16), w64, ids.reshape(-1), temperature=0.9)
    logp64 = logp64.view(6, 9)
    # old, reference and sampler log-probs around the policy's own, so that the ratios and the
    # truncated importance weights straddle every bound
    g = torch.Generator().manual_seed(23)
    policy = logp64.detach().float()
    old = policy + 0.3 * torch.randn(6, 9, generator=g)
    ref = policy + 0.3 * torch.randn(6, 9, generator=g)
    sampler = old + 0.5 * torch.randn(6, 9, generator=g)
    ratio, tis = (policy - old).exp()[mask], (old - sampler).exp()[mask]
    assert (ratio < 0.85).any() and ((ratio > 1.15) & (ratio < 1.3)).any() and (ratio > 1.3).any()
    assert (tis > 1.5).any() and ((tis > 1) & (tis < 1.5)).any()
    # every hyper-parameter away from its default, so that the module must pass each one on
    max_len = 11 if mode == "dr-grpo" else None
    module = FusedLinearGRPOLoss(eps_low=0.15, eps_high=0.3, beta=0.05, loss_type=mode, temperature=0.9,
                                 compute_entropy=True, tis_cap=1.5, max_len=max_len, chunk_size=5, unbiased_kl=True)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    padded_ids = ids.masked_fill(~mask, -1)  # padding outside the completion is never read
    loss, metrics = module(h, w, padded_ids, mask, adv, old, ref, sampler_logp=sampler)
    loss.backward()
    want = oracle_loss(logp64, old.double(), ref.double(), adv.double(), mask, mode, eps_low=0.15, eps_high=0.3,
                       beta=0.05, sampler=sampler.double(), tis_cap=1.5, max_len=max_len, unbiased_kl=True)
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), **TOL)
    torch.testing.assert_close(h.grad.double(), h64.grad, **GRAD_TOL)
    torch.testing.assert_close(w.grad.double(), w64.grad, **GRAD_TOL)
    assert torch.all(h.grad[~mask] == 0)  # tokens outside the completion cost nothing
    torch.testing.assert_close(metrics["entropy"].double(), ent64.view(6, 9)[mask].mean(), **TOL)


def test_fused_sft_module_matches_unfused(backend):
    backend("torch")
    hidden, weight, ids = lm_inputs(3, 6, seed=16)
    ids[:, :2] = -100
    module = FusedLinearSFTLoss()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, metrics = module(h, w, ids)
    loss.backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logits = h64 @ w64.T
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 90), ids.reshape(-1), ignore_index=-100)
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), **TOL)
    torch.testing.assert_close(h.grad.double(), h64.grad, **GRAD_TOL)
    torch.testing.assert_close(w.grad.double(), w64.grad, **GRAD_TOL)
    assert metrics["num_tokens"] == 12

    # Options away from their defaults: another ignore_index, a temperature, a chunk, the denominator.
    ids[:, :2] = -1
    module = FusedLinearSFTLoss(ignore_index=-1, temperature=0.8, chunk_size=4)
    mean_nll = sft_oracle(hidden.double().reshape(-1, 16), weight.double(), ids.reshape(-1), ignore_index=-1,
                          temperature=0.8)
    loss, metrics = module(hidden, weight, ids, num_tokens=20)
    torch.testing.assert_close(loss.double(), mean_nll * 12 / 20, **TOL)
    assert metrics["num_tokens"] == 12
    loss, _ = FusedLinearSFTLoss(ignore_index=-1, temperature=0.8, reduction="sum")(hidden, weight, ids)
    torch.testing.assert_close(loss.double(), mean_nll * 12, **TOL)


def test_fused_dpo_module_matches_unfused(backend):
    backend("torch")
    hidden, weight, ids = lm_inputs(4, 5, seed=17)  # 2 chosen, then 2 rejected
    ids[:, :2] = -1
    ref_hidden = hidden + 0.1 * torch.randn(hidden.shape, generator=torch.Generator().manual_seed(18))
    module = FusedLinearDPOLoss(beta=0.3, label_smoothing=0.1, temperature=1.2, chunk_size=3, ignore_index=-1)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, metrics = module(h, w, ids, ref_hidden=ref_hidden, ref_weight=weight)
    loss.backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    seq = logprobs_oracle(h64.reshape(-1, 16), w64, ids.reshape(-1), temperature=1.2,
                          ignore_index=-1)[0].view(4, 5).sum(-1)
    ref = logprobs_oracle(ref_hidden.reshape(-1, 16).double(), weight.double(), ids.reshape(-1),
                          temperature=1.2, ignore_index=-1)[0].view(4, 5).sum(-1)
    want = dpo_oracle(seq[:2], seq[2:], ref[:2], ref[2:], 0.3, label_smoothing=0.1)
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), **TOL)
    torch.testing.assert_close(h.grad.double(), h64.grad, **GRAD_TOL)
    torch.testing.assert_close(w.grad.double(), w64.grad, **GRAD_TOL)
    torch.testing.assert_close(metrics["logps/chosen"].double(), seq[:2].mean().detach(), **TOL)
    loss2, _ = module(hidden, weight, ids, ref[:2].float(), ref[2:].float())
    torch.testing.assert_close(loss2, loss.detach(), **TOL)


def test_opcheck():
    logp, old, ref, sampler, adv, mask = make_batch(seed=19)
    maskf = mask.float()
    for ref_, sampler_, entropy in ((ref, sampler, logp.abs()), (None, None, None)):
        for unbiased_kl in (False, True):
            args = (logp.clone().requires_grad_(), old, ref_, sampler_, adv, maskf, entropy, 0.2, 0.28, 0.04, 2.0,
                    unbiased_kl)
            torch.library.opcheck(torch.ops.moe_align.grpo_sequence_stats.default, args)
    bwd_args = (torch.randn(6), logp, old, ref, sampler, adv, maskf, 0.2, 0.28, 0.04, 2.0, True)
    torch.library.opcheck(torch.ops.moe_align.grpo_sequence_stats_backward.default, bwd_args)


def test_compiles_fullgraph(backend):
    backend("torch")
    hidden, weight, ids = lm_inputs(3, 5, seed=20)
    _, old, ref, _, adv, mask = make_batch(3, 5, seed=21)
    module = FusedLinearGRPOLoss(loss_type="token-mean", compute_entropy=True)

    def step(h, w):
        loss, metrics = module(h, w, ids, mask, adv, old, ref)
        return loss, metrics["kl"], metrics["entropy"]

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    eager = step(h1, w1)
    compiled = torch.compile(step, fullgraph=True)(h2, w2)
    eager[0].backward()
    compiled[0].backward()
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)


def _grpo(**overrides):
    logp, old, ref, sampler, adv, mask = make_batch(seed=22)
    args = dict(logp=logp, advantages=adv, completion_mask=mask, old_logp=old, ref_logp=ref)
    args.update(overrides)
    return grpo_loss(**args)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: _grpo(completion_mask=torch.ones(6, 8, dtype=torch.bool)), ValueError, "completion_mask must have shape"),
        (lambda: _grpo(advantages=torch.zeros(5)), ValueError, "advantages must have shape"),
        (lambda: _grpo(old_logp=torch.zeros(6, 8)), ValueError, "old_logp must have shape"),
        (lambda: _grpo(ref_logp=torch.zeros(6, 9, dtype=torch.long)), TypeError, "ref_logp must be a floating"),
        (lambda: _grpo(logp=torch.zeros(6)), ValueError, r"logp must be a floating-point \[B, T\]"),
        (lambda: _grpo(logp=torch.zeros(6, 9, dtype=torch.long)), TypeError, "logp must be a floating-point"),
        (lambda: _grpo(completion_mask=-torch.ones(6, 9)), ValueError, "completion_mask must be >= 0"),
        (lambda: _grpo(completion_mask=torch.full((6, 9), math.nan)), ValueError, "completion_mask must be >= 0"),
        (lambda: _grpo(completion_mask=torch.ones(6, 9, dtype=torch.complex64)), TypeError,
         "completion_mask must be a bool, integer or real"),
        (lambda: _grpo(loss_type="global-token-mean", num_global_tokens=torch.tensor([3.0, 4.0])), ValueError,
         "num_global_tokens must be a number or a one-element"),
        (lambda: _grpo(loss_type="global-token-mean", num_global_tokens=math.nan), ValueError, "num_global_tokens"),
        (lambda: _grpo(loss_type="global-token-mean", num_global_tokens=-5), ValueError, "num_global_tokens"),
        (lambda: _grpo(loss_type="global-token-mean", num_global_tokens="12"), TypeError, "num_global_tokens"),
        (lambda: sft_loss(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long),
                          num_tokens=torch.ones(2)), ValueError, "num_tokens must be a number"),
        (lambda: sft_loss(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long),
                          num_tokens=6, reduction="sum"), ValueError, "num_tokens divides the 'mean' reduction"),
        (lambda: sft_loss(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long),
                          temperature="a"), TypeError, "temperature must be a number"),
        (lambda: group_advantages(torch.zeros(8), 4, eps=0.0), ValueError, "eps"),
        (lambda: FusedLinearGRPOLoss(loss_type="dapo"), ValueError, "loss_type='dapo' must be one of"),
        (lambda: FusedLinearSFTLoss(reduction="none"), ValueError, "reduction='none' must be"),
        (lambda: FusedLinearGRPOLoss()(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long),
                                       torch.ones(3), torch.zeros(3)), ValueError, r"hidden must be a \[B, T, H\]"),
        (lambda: FusedLinearDPOLoss()(torch.zeros(4, 8), torch.zeros(10, 8), torch.zeros(4, dtype=torch.long),
                                      torch.zeros(2), torch.zeros(2)), ValueError, r"hidden must be \[2B, T, H\]"),
        (lambda: _grpo(loss_type="dapo"), ValueError, "loss_type"),
        (lambda: _grpo(loss_type="global-token-mean"), ValueError, "num_global_tokens"),
        (lambda: _grpo(eps_low=-0.1), ValueError, "eps_low"),
        (lambda: _grpo(beta=-1.0), ValueError, "beta"),
        (lambda: _grpo(tis_cap=0.0, sampler_logp=torch.zeros(6, 9)), ValueError, "tis_cap"),
        (lambda: _grpo(unbiased_kl=1), TypeError, "unbiased_kl must be a bool"),
        (lambda: group_advantages(torch.zeros(10), 4), ValueError, "group_size=4 does not divide"),
        (lambda: group_advantages(torch.zeros(10, 2), 2), ValueError, "rewards must be a"),
        (lambda: combine_rewards({"a": torch.zeros(3)}, {"b": 1.0}), ValueError, "coefficients must name"),
        (lambda: combine_rewards({"a": torch.zeros(3), "b": torch.zeros(4)}, {"a": 1, "b": 1}), ValueError,
         r"rewards_by_name\['b'\]"),
        (lambda: dpo_loss(torch.zeros(3), torch.zeros(2), torch.zeros(3), torch.zeros(3)), ValueError,
         "rejected_logps must have shape"),
        (lambda: FusedLinearGRPOLoss()(torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(2, 4, dtype=torch.long),
                                       torch.ones(2, 3), torch.zeros(2)), ValueError, "completion_ids must have shape"),
        (lambda: FusedLinearGRPOLoss()(torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(2, 3, dtype=torch.long),
                                       torch.ones(3, 2), torch.zeros(2)), ValueError, "completion_mask must have shape"),
        (lambda: FusedLinearDPOLoss()(torch.zeros(3, 2, 4), torch.zeros(5, 4), torch.zeros(3, 2, dtype=torch.long)),
         ValueError, "2B sequences"),
        (lambda: FusedLinearDPOLoss()(torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(2, 3, dtype=torch.long)),
         ValueError, "give ref_chosen_logps and ref_rejected_logps, or ref_hidden and ref_weight"),
        (lambda: FusedLinearDPOLoss()(torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(2, 3, dtype=torch.long),
                                      ref_hidden=torch.zeros(2, 2, 4), ref_weight=torch.zeros(5, 4)),
         ValueError, r"ref_hidden must have shape \(2, 3, 4\)"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---- GPU: the fused CUDA kernel against the PyTorch path -------------------------------------------


@requires_cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("unbiased_kl", [False, True])
def test_cuda_kernel_matches_oracle(backend, mode, unbiased_kl):
    backend("cuda")
    logp, old, ref, sampler, adv, mask = make_batch(batch=33, length=517, seed=30)
    # Token weights (the metrics are weighted means): exercises the kernel's use of the mask value.
    mask = mask * (0.25 + torch.rand(mask.shape, generator=torch.Generator().manual_seed(32)))
    cuda = [t.cuda() for t in (logp, old, ref, sampler, adv, mask)]
    x = cuda[0].clone().requires_grad_()
    entropy = cuda[0].abs()
    loss, metrics = grpo_loss(x, cuda[4], cuda[5], cuda[1], cuda[2], eps_high=0.28, loss_type=mode,
                              sampler_logp=cuda[3], tis_cap=1.5, entropy=entropy, unbiased_kl=unbiased_kl,
                              **agg_kwargs(mode, mask))
    loss.backward()
    backend("torch")
    y = logp.clone().requires_grad_()
    want, want_metrics = grpo_loss(y, adv, mask, old, ref, eps_high=0.28, loss_type=mode, sampler_logp=sampler,
                                   tis_cap=1.5, entropy=logp.abs(), unbiased_kl=unbiased_kl,
                                   **agg_kwargs(mode, mask))
    want.backward()
    torch.testing.assert_close(loss.cpu(), want, **TOL)
    torch.testing.assert_close(x.grad.cpu(), y.grad, **GRAD_TOL)
    for name, value in want_metrics.items():
        torch.testing.assert_close(metrics[name].cpu(), value, **TOL, msg=name)


@requires_cuda
def test_cuda_kernel_deterministic_and_opcheck(backend):
    backend("cuda")
    logp, old, ref, sampler, adv, mask = (t.cuda() for t in make_batch(batch=64, length=2048, seed=31))
    maskf = mask.float()
    hyper = (0.2, 0.2, 0.04, 2.0, False)
    first = torch.ops.moe_align.grpo_sequence_stats(logp, old, ref, sampler, adv, maskf, None, *hyper)
    second = torch.ops.moe_align.grpo_sequence_stats(logp, old, ref, sampler, adv, maskf, None, *hyper)
    assert torch.equal(first, second)
    args = (logp.clone().requires_grad_(), old, ref, sampler, adv, maskf, None, *hyper)
    torch.library.opcheck(torch.ops.moe_align.grpo_sequence_stats.default, args)
    native = (logp, old, ref, sampler, adv, maskf, logp.abs(), 0.2, 0.2, 0.04, 2.0, True)
    torch.library.opcheck(torch.ops.moe_align.fused_grpo_fwd.default, native)
    native_bwd = (torch.randn(64, device="cuda"), logp, old, None, sampler, adv, maskf, 0.2, 0.2, 0.04, 2.0, True)
    torch.library.opcheck(torch.ops.moe_align.fused_grpo_bwd.default, native_bwd)
