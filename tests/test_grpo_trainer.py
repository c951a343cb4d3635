"""The GRPO trainer (moe_align.train.grpo) and its rollout engine (moe_align.train.rollout).

The loss of a step is checked against the float64 oracles of tests/oracle_grpo.py (eq. 32-34,
36); the rest on the tiny model: a bandit GRPO must solve, greedy cached generation against full
forwards, exact resume, reward errors, and one process against two.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import TORCHRUN_EPILOGUE, cpu_subprocess_env, requires_cuda

from moe_align.modules.moe import DeepseekMoE
from moe_align.train.data import Example
from moe_align.train.grpo import (GRPOConfig, GRPOTrainer, completion_logps, grpo_step_loss,
                                  masked_group_advantages, reward_columns)
from moe_align.train.rewards import RewardError, RewardWarning, register_reward
from moe_align.train.rollout import PolicyRolloutEngine, Rollout, find_stop, truncate_at_stop
from moe_align.train.tokenizer import CharTokenizer
from oracle_grpo import (aggregate_oracle, combine_rewards_oracle, group_advantages_oracle,
                         grpo_token_loss_oracle)



def length_reward(prompts, completions, **kwargs):
    return [len(c) / 10 for c in completions]


def digits_reward(prompts, completions, **kwargs):
    return [sum(ch.isdigit() for ch in c) for c in completions]


register_reward("test_length", length_reward, override=True)
register_reward("test_digits", digits_reward, override=True)


def write_prompts(path, prompts, **columns) -> str:
    with open(path, "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"prompt": p, **{k: v[i] for k, v in columns.items()}}) + "\n")
    return str(path)


def read_metrics(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def tiny_config(tmp_path, name="run", **overrides) -> GRPOConfig:
    fields = dict(model="tiny", output_dir=str(tmp_path / name), group_size=4, prompts_per_step=2,
                  max_new_tokens=6, max_seq_len=64, lr=1e-3, progress=False)
    return GRPOConfig(**(fields | overrides))


class ScriptedEngine:
    """A RolloutEngine with fixed completions: ``script(prompt_text, j)`` for the j-th of G."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script = tokenizer, script

    def generate(self, prompts, *, n, max_new_tokens, temperature, top_p, stop_token_ids, stop_strings, generator):
        out = []
        for p in prompts:
            for j in range(n):
                text = self.script(self.tokenizer.decode(p), j)
                ids = self.tokenizer.encode(text)[: max_new_tokens - 1] + [self.tokenizer.eos_id]
                out.append(Rollout(list(p), ids, self.tokenizer.decode(ids), "stop", len(ids)))
        return out

    def update_weights(self, model):
        pass


# ---- 1. the loss of a step: eq. 32-34 against the float64 oracle ---------------------------------------


@pytest.mark.parametrize("loss_type", ["sequence-mean", "token-mean", "global-token-mean", "dr-grpo"])
@pytest.mark.parametrize("unbiased_kl", [False, True])
def test_step_loss_over_ranks_and_micro_batches_matches_oracle(loss_type, unbiased_kl):
    g = torch.Generator().manual_seed(0)
    G, T, eps_low, eps_high, beta = 3, 7, 0.2, 0.28, 0.04
    lens = [7, 3, 1, 5, 2, 6, 4, 7, 2]
    B = len(lens)
    rewards = torch.randint(0, 3, (B,), generator=g).float()
    rewards[6:9] = 1.0  # a group of equal rewards: advantages 0
    valid = torch.ones(B, dtype=torch.bool)
    valid[4] = False  # skipped by reward_on_error="skip"
    mask = (torch.arange(T) < torch.tensor(lens).unsqueeze(1)) & valid.unsqueeze(1)
    logp = (-2 * torch.rand(B, T, generator=g)).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(B, T, generator=g)  # ratios on both sides of the clip range
    ref = logp.detach() + 0.2 * torch.randn(B, T, generator=g)

    # eq. 34 within each group, over its valid outputs
    advantages = masked_group_advantages(rewards, valid, G)
    expected = torch.zeros(B, dtype=torch.float64)
    for start in range(0, B, G):
        keep = [i for i in range(start, start + G) if valid[i]]
        expected[keep] = group_advantages_oracle(rewards[keep], len(keep))
    torch.testing.assert_close(advantages.double(), expected, rtol=1e-5, atol=1e-6)

    # two ranks, each with two micro-batches, normalised by the global counts; DDP averages ranks
    ranks = [[[0, 1], [2, 3, 4]], [[5, 6, 7], [8]]]
    total = torch.zeros(())
    for micro_batches in ranks:
        for rows in micro_batches:
            width = max(lens[i] for i in rows)
            loss, _ = grpo_step_loss(logp[rows, :width], advantages[rows], mask[rows, :width].float(),
                                     old[rows, :width], ref[rows, :width], num_sequences=float(valid.sum()),
                                     num_tokens=float(mask.sum()), world_size=2, eps_low=eps_low, eps_high=eps_high,
                                     beta=beta, loss_type=loss_type, max_len=T, unbiased_kl=unbiased_kl)
            total = total + loss
    total = total / 2
    total.backward()

    keep = valid.nonzero().squeeze(1)
    logp64 = logp.detach().double()[keep].requires_grad_(True)
    per_token = grpo_token_loss_oracle(logp64, old.double()[keep], ref.double()[keep], expected[keep],
                                       eps_low, eps_high, beta, unbiased_kl=unbiased_kl)
    oracle_type = "token-mean" if loss_type == "global-token-mean" else loss_type
    oracle = aggregate_oracle(per_token, mask[keep], oracle_type, max_len=T)
    oracle.backward()
    torch.testing.assert_close(total.double(), oracle.detach(), rtol=1e-5, atol=1e-7)
    grad = torch.zeros(B, T, dtype=torch.float64)
    grad[keep] = logp64.grad
    torch.testing.assert_close(logp.grad.double(), grad, rtol=1e-5, atol=1e-7)
    assert not logp.grad[4].any()  # the skipped output contributes nothing


def test_completion_logps_gathers_the_completion_tokens():
    g = torch.Generator().manual_seed(1)
    prompt_lens, completion_lens = [3, 1, 5], [4, 2, 1]
    lengths = [p + c for p, c in zip(prompt_lens, completion_lens)]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    logp = torch.randn(sum(lengths), generator=g)
    out, mask = completion_logps(logp, cu, prompt_lens, completion_lens)
    assert out.shape == (3, 4) and mask.sum() == sum(completion_lens)
    for b in range(3):
        for j in range(4):
            # the log-prob of completion token j sits at the position that predicts it
            want = float(logp[int(cu[b]) + prompt_lens[b] - 1 + j]) if j < completion_lens[b] else 0.0
            assert float(out[b, j]) == want and bool(mask[b, j]) == (j < completion_lens[b])


def test_plan_splits_the_rollouts_into_minibatches_of_micro_batches(tmp_path):
    """Every output once, in order; minibatches of sizes differing by at most one; micro-batches
    of at most batch_tokens tokens (an output alone may exceed it)."""
    trainer = GRPOTrainer(tiny_config(tmp_path, batch_tokens=10), rollout_engine=ScriptedEngine(CharTokenizer(), None))

    def plan(lengths, minibatches):
        trainer.config.minibatches = minibatches
        batch = type("Batch", (), {"examples": [Example([0] * n, [0] * n) for n in lengths]})()
        return trainer.plan(batch)

    assert plan([4, 6, 3, 3, 5], 2) == [[[0, 1], [2]], [[3, 4]]]
    assert plan([4, 6, 3, 3, 5], 3) == [[[0, 1]], [[2, 3]], [[4]]]
    assert plan([12, 2, 9, 1], 1) == [[[0], [1], [2, 3]]]


def test_make_batch_masks_skipped_outputs_and_pads_completions(tmp_path):
    trainer = GRPOTrainer(tiny_config(tmp_path), rollout_engine=ScriptedEngine(CharTokenizer(), None))
    rollouts = [Rollout([1, 5], [7, 8, 9], "", "stop"), Rollout([1], [7], "", "stop"),
                Rollout([1, 5, 6], [7, 8], "", "stop")]
    valid = torch.tensor([True, False, True])
    batch = trainer.make_batch(rollouts, torch.tensor([0.5, 0.0, -0.5]), valid)
    assert batch.mask.tolist() == [[1, 1, 1], [0, 0, 0], [1, 1, 0]]
    assert batch.prompt_lens == [2, 1, 3] and batch.completion_lens == [3, 1, 2]
    assert batch.examples[2].input_ids == [1, 5, 6, 7, 8] and batch.examples[2].labels == [-100] * 3 + [7, 8]
    assert batch.sampler_logp is None


def test_reward_columns_repeat_each_record_for_its_group():
    records = [{"prompt": "a", "answer": "1", "_source": "f:1"}, {"prompt": "b", "answer": "2", "extra": 3}]
    assert reward_columns(records, 2) == {"answer": ["1", "1", "2", "2"], "extra": [None, None, 3, 3]}


def test_unscaled_advantages_are_reward_minus_group_mean(tmp_path):
    tok = CharTokenizer()
    engine = ScriptedEngine(tok, lambda prompt, j: ["1", "22", "4444", "333"][j] + prompt[-2])
    trainer = GRPOTrainer(tiny_config(tmp_path, scale_rewards=False, rewards={"test_length": 1.0}),
                          rollout_engine=engine)
    trainer.train_step(next(iter(trainer.loader)))
    samples, G = trainer.last_samples, trainer.config.group_size
    for start in range(0, len(samples), G):
        rewards = torch.tensor([s["reward"] for s in samples[start:start + G]], dtype=torch.float64)
        advantages = torch.tensor([s["advantage"] for s in samples[start:start + G]], dtype=torch.float64)
        torch.testing.assert_close(advantages, rewards - rewards.mean(), rtol=1e-6, atol=1e-6)
        assert rewards.std() > 0.1


# ---- 2. a bandit with a known optimal policy ----------------------------------------------------------


def test_grpo_learns_the_rewarded_arm(tmp_path):
    """Completions of one token over the alphabet {a, b} (+ specials): reward 1 for "a" only.
    The optimal policy puts all its mass on "a"; GRPO gets it above 0.9 in a few dozen steps."""
    register_reward("test_pick_a", lambda prompts, completions, **kw: [float(c == "a") for c in completions],
                    override=True)
    tok = CharTokenizer("ab")
    prompts = ["a", "b", "ab", "ba"]
    data = write_prompts(tmp_path / "p.jsonl", prompts)
    config = tiny_config(tmp_path, data=data, max_new_tokens=1, group_size=8, prompts_per_step=4, lr=1e-2,
                         beta=0.01, max_steps=20, rewards={"test_pick_a": 1.0})
    trainer = GRPOTrainer(config, tokenizer=tok)
    model, a = trainer.model, tok.encode("a")[0]

    def prob_a() -> float:
        with torch.no_grad():
            hidden = model(*model.pack([[tok.bos_id] + tok.encode(p) for p in prompts]))
            cu = torch.tensor([0] + [len(p) + 1 for p in prompts]).cumsum(0)
            last = hidden[cu[1:] - 1]
            return float(torch.softmax(last @ model.lm_head.weight.T, -1)[:, a].mean())

    assert prob_a() < 0.3
    trainer.train()
    assert prob_a() > 0.9
    log = read_metrics(config.output_dir)
    assert log[-1]["accuracy"] > 0.9 and log[0]["accuracy"] < 0.5
    # one pass per batch: the old log-probs (recorded right after sampling, with the entropy) are
    # exactly the update's, so the ratio is exactly 1 and nothing is clipped
    assert all(m["ratio/mean"] == 1.0 and m["clip_ratio/region_mean"] == 0.0 for m in log)
    assert all(0 < m["entropy"] < math.log(tok.vocab_size) for m in log)


def test_bf16_autocast_first_pass_ratio_is_exactly_one(tmp_path):
    """Under bf16 autocast (the GPU default) the old log-probs, taken with the entropy, go through
    the casts of the update's fused head, so the first pass's ratio is still exactly 1."""
    register_reward("test_pick_a", lambda prompts, completions, **kw: [float(c == "a") for c in completions],
                    override=True)
    tok = CharTokenizer("ab")
    data = write_prompts(tmp_path / "p.jsonl", ["a", "b", "ab", "ba"])
    config = tiny_config(tmp_path, data=data, max_new_tokens=3, group_size=4, prompts_per_step=2, bf16="on",
                         beta=0.01, max_steps=2, rewards={"test_pick_a": 1.0})
    GRPOTrainer(config, tokenizer=tok).train()
    log = read_metrics(config.output_dir)
    assert len(log) == 2 and all(m["ratio/mean"] == 1.0 for m in log)


@requires_cuda
@pytest.mark.trainer_gpu
def test_grpo_step_on_the_gpu(tmp_path):
    """device="auto" on a GPU machine: paged-cache rollouts, bf16 autocast, ratio exactly 1 on the
    first pass, finite metrics."""
    register_reward("test_pick_a", lambda prompts, completions, **kw: [float(c == "a") for c in completions],
                    override=True)
    tok = CharTokenizer("ab")
    data = write_prompts(tmp_path / "p.jsonl", ["a", "b", "ab", "ba"])
    config = tiny_config(tmp_path, data=data, max_new_tokens=4, beta=0.01, max_steps=2,
                         rewards={"test_pick_a": 1.0})
    trainer = GRPOTrainer(config, tokenizer=tok)
    assert trainer.device.type == "cuda" and trainer.autocast_dtype == torch.bfloat16
    trainer.train()
    log = read_metrics(config.output_dir)
    assert len(log) == 2 and all(m["ratio/mean"] == 1.0 and math.isfinite(m["loss"]) for m in log)


# ---- 3. rewards combine as eq. 36; two stages -----------------------------------------------------------


def test_logged_rewards_combine_as_eq36_per_stage(tmp_path):
    stages = [{"name": "reasoning", "steps": 1, "rewards": {"test_length": 1.0}},
              {"name": "preference", "steps": 2, "rewards": {"test_length": 0.7, "test_digits": -0.3}}]
    tok = CharTokenizer()
    engine = ScriptedEngine(tok, lambda prompt, j: ["12a", "x", "345678", "9"][j])
    trainer = GRPOTrainer(tiny_config(tmp_path, stages=stages, num_iterations=2), rollout_engine=engine)
    assert trainer.total_steps == 3
    trainer.train()
    log = read_metrics(trainer.config.output_dir)
    assert [m["stage"] for m in log] == [0, 1, 1]
    assert "reward/test_digits/mean" not in log[0] and "reward/test_digits/mean" in log[1]
    coefficients = {"test_length": 0.7, "test_digits": -0.3}
    samples = trainer.last_samples
    oracle = combine_rewards_oracle({k: [s["rewards"][k] for s in samples] for k in coefficients}, coefficients)
    torch.testing.assert_close(torch.tensor([s["reward"] for s in samples], dtype=torch.float64), oracle,
                               rtol=1e-6, atol=1e-6)
    last = log[-1]
    assert last["reward"] == pytest.approx(float(oracle.mean()), rel=1e-6)
    assert last["reward"] == pytest.approx(sum(c * last[f"reward/{k}/mean"] for k, c in coefficients.items()),
                                           rel=1e-6)
    # the second pass over the rollouts runs off-policy: the ratio moves away from 1
    assert log[0]["ratio/mean"] != 1.0 and "clip_ratio/region_mean" in log[0]


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_each_optimizer_step_has_the_gradient_of_its_own_minibatch(tmp_path):
    """lr = 0 keeps the weights: the second pass over the rollouts must see the first pass's
    gradients again, minibatch by minibatch (nothing carried over between optimizer steps)."""
    engine = ScriptedEngine(CharTokenizer(), lambda prompt, j: "1234"[: j + 1])
    trainer = GRPOTrainer(tiny_config(tmp_path, lr=0.0, grad_clip=0.0, num_iterations=2, minibatches=2,
                                      rewards={"test_length": 1.0}), rollout_engine=engine)
    grads, step = [], trainer.optimizer.step

    def capture():
        grads.append([p.grad.clone() for p in trainer.trainable])
        step()

    trainer.optimizer.step = capture
    trainer.train_step(next(iter(trainer.loader)))
    assert len(grads) == 4
    assert any(not torch.equal(a, b) for a, b in zip(grads[0], grads[1]))
    assert any(g.abs().sum() > 0 for g in grads[0])
    for first, second in ((0, 2), (1, 3)):
        for a, b in zip(grads[first], grads[second]):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)


def test_a_step_of_skipped_samples_leaves_the_weights(tmp_path):
    """Every sample skipped: no optimizer step (AdamW's momentum would still move the weights)."""
    broken = {"now": False}

    def sometimes_offline(prompts, completions, **kwargs):
        if broken["now"]:
            raise RuntimeError("offline")
        return [len(c) / 10 for c in completions]

    register_reward("test_sometimes_offline", sometimes_offline, override=True)
    engine = ScriptedEngine(CharTokenizer(), lambda prompt, j: "1234"[: j + 1])
    trainer = GRPOTrainer(tiny_config(tmp_path, reward_on_error="skip", rewards={"test_sometimes_offline": 1.0}),
                          rollout_engine=engine)
    steps = iter(trainer.loader)
    trainer.train_step(next(steps))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    broken["now"] = True
    with pytest.warns(RewardWarning):
        metrics = trainer.train_step(next(steps))
    assert metrics["reward/num_skipped"] == 8
    for name, value in trainer.model.state_dict().items():
        if "tokens_per_expert" not in name:
            assert torch.equal(value, before[name]), name


def test_rollouts_and_old_logprobs_do_not_count_expert_tokens(tmp_path):
    """The V3 bias update counts the tokens of the update's forward only: sampling and the old
    log-probs run in eval mode, and the model's mode is restored."""
    trainer = GRPOTrainer(tiny_config(tmp_path, max_new_tokens=4))
    moe = [m for m in trainer.model.modules() if isinstance(m, DeepseekMoE)]
    assert moe and trainer.model.training
    for m in moe:
        m.pop_tokens_per_expert()
    prompts = next(iter(trainer.loader))
    rollouts = trainer.generate_rollouts(prompts)
    batch = trainer.make_batch(rollouts, torch.zeros(len(rollouts)), torch.ones(len(rollouts), dtype=torch.bool))
    trainer.policy_logprobs(batch)
    assert trainer.model.training
    assert all(int(m.pop_tokens_per_expert().sum()) == 0 for m in moe)


def test_sampling_streams_differ_per_step_and_repeat_per_step(tmp_path):
    trainer = GRPOTrainer(tiny_config(tmp_path, max_new_tokens=8))
    prompts = next(iter(trainer.loader))
    sample = lambda: [r.completion_ids for r in trainer.generate_rollouts(prompts)]  # noqa: E731
    first = sample()
    assert sample() == first
    trainer.step = 1
    assert sample() != first


# ---- 4. generation through the paged cache ---------------------------------------------------------------


def test_greedy_rollouts_match_full_forward_argmax():
    tok = CharTokenizer()
    torch.manual_seed(0)
    from moe_align.models.deepseek import DeepseekConfig, DeepseekForCausalLM, PRESETS

    model = DeepseekForCausalLM(DeepseekConfig(**dict(PRESETS["tiny"], vocab_size=tok.vocab_size))).eval()
    prompts = [[tok.bos_id] + tok.encode(p) for p in ["Q:12+5=", "Q:999-998=", "x"]]
    engine = PolicyRolloutEngine(model, tok)
    rollouts = engine.generate(prompts, n=2, max_new_tokens=10, temperature=0.0, top_p=1.0,
                               stop_token_ids=[tok.eos_id], stop_strings=[], generator=None)
    assert len(rollouts) == 6
    for i, prompt in enumerate(prompts):
        sequence, expected = list(prompt), []
        with torch.no_grad():
            for _ in range(10):
                hidden = model(*model.pack([sequence]))
                token = int((hidden[-1] @ model.lm_head.weight.T).argmax())
                expected.append(token)
                sequence.append(token)
                if token == tok.eos_id:
                    break
        for r in rollouts[2 * i: 2 * i + 2]:
            assert r.prompt_ids == prompt and r.completion_ids == expected
            assert r.text == tok.decode(expected)
            assert r.finish_reason == ("stop" if expected[-1] == tok.eos_id else "length")
    # a stop token ends a completion (and is kept): finish_reason "stop"
    free = rollouts[0].completion_ids
    stop = free[2]
    cut = engine.generate(prompts[:1], n=1, max_new_tokens=10, temperature=0.0, top_p=1.0, stop_token_ids=[stop],
                          stop_strings=[], generator=None)[0]
    assert cut.completion_ids == free[: free.index(stop) + 1] and cut.finish_reason == "stop"


def test_stop_strings_truncate_text_and_tokens():
    tok = CharTokenizer()
    ids = tok.encode("7+8+0=15;A:15\nQ:1")
    kept, text, stopped = truncate_at_stop(ids, tok, ["\n"])
    assert stopped and text == "7+8+0=15;A:15" and tok.decode(kept) == "7+8+0=15;A:15\n"
    kept, text, stopped = truncate_at_stop(ids, tok, ["Q:", ";A"])  # the earliest stop string wins
    assert stopped and text == "7+8+0=15" and tok.decode(kept) == "7+8+0=15;A"
    assert truncate_at_stop(ids, tok, ["zz"]) == (ids, tok.decode(ids), False)
    # a stop string completed by the last token keeps every token
    assert truncate_at_stop(tok.encode("12;"), tok, [";"]) == (tok.encode("12;"), "12", True)
    # at the same position the longest stop string wins
    assert find_stop("xA:1", ["A", "A:"]) == find_stop("xA:1", ["A:", "A"]) == (1, "A:")
    assert find_stop("xA:1", ["1", ":"]) == (2, ":") and find_stop("x", ["y"]) is None

    torch.manual_seed(0)
    from moe_align.models.deepseek import DeepseekConfig, DeepseekForCausalLM, PRESETS

    model = DeepseekForCausalLM(DeepseekConfig(**dict(PRESETS["tiny"], vocab_size=tok.vocab_size)))
    engine = PolicyRolloutEngine(model, tok)
    args = dict(n=3, max_new_tokens=24, temperature=1.0, top_p=0.95, stop_token_ids=[tok.eos_id])
    free = engine.generate([[tok.bos_id]], stop_strings=[], generator=torch.Generator().manual_seed(3), **args)
    stop = free[0].text[len(free[0].text) // 2]
    cut = engine.generate([[tok.bos_id]], stop_strings=[stop], generator=torch.Generator().manual_seed(3), **args)
    assert model.training  # the engine restores the mode
    for a, b in zip(free, cut):
        if stop in a.text:
            assert b.text == a.text[: a.text.index(stop)] and b.finish_reason == "stop"
            # the shortest prefix of the tokens that produces the stop string
            n = len(b.completion_ids)
            assert b.completion_ids == a.completion_ids[:n] and tok.decode(b.completion_ids) == b.text + stop
            assert stop not in tok.decode(b.completion_ids[: n - 1])
        else:
            assert b == a


# ---- 5. exact resume ------------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


class InterruptedTrainer(GRPOTrainer):
    def train_step(self, prompts):
        if self.step == 2:
            raise Interrupted
        return super().train_step(prompts)


def test_resume_is_exact(tmp_path):
    stages = [{"name": "reasoning", "steps": 2, "rewards": {"test_length": 1.0}},
              {"name": "preference", "steps": 2, "rewards": {"test_length": 0.5, "test_digits": 0.2}}]
    options = dict(stages=stages, num_iterations=2, minibatches=2, batch_tokens=48, temperature=1.5, lr=3e-3,
                   schedule="cosine", warmup_steps=1, ref_on_cpu=True, optimizer_on_cpu=True, stop_strings=[";"])
    straight = GRPOTrainer(tiny_config(tmp_path, "straight", **options))
    straight.train()

    config = tiny_config(tmp_path, "resumed", save_every=2, **options)
    with pytest.raises(Interrupted):
        InterruptedTrainer(config).train()
    assert os.path.isdir(tmp_path / "resumed" / "checkpoint-2")
    resumed = GRPOTrainer(tiny_config(tmp_path, "resumed", resume="auto", **options))
    assert resumed.step == 2 and resumed.stage_index(resumed.step) == 1
    resumed.train()

    assert all(m["grad_norm"] > 0 for m in read_metrics(tmp_path / "straight"))
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    keys = ("loss", "reward", "reward/test_length/mean", "kl", "completion_length/mean", "lr", "grad_norm")
    one, two = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [m["step"] for m in two] == [1, 2, 3, 4]
    assert [[m[k] for k in keys] for m in one] == [[m[k] for k in keys] for m in two]
    # the resumed run checks that its KL reference is the original starting model
    other = tiny_config(tmp_path, "resumed", resume="auto", seed=1, **options)
    with pytest.raises(ValueError, match="reference"):
        GRPOTrainer(other)


# ---- sampler log-probs from the engine (e.g. vLLM) ------------------------------------------------------


class ReportingEngine(ScriptedEngine):
    """Reports a sampler log-prob of -100 per token: the truncated importance weight
    min(pi_old / pi_sampler, tis_cap) is then tis_cap on every token."""

    def generate(self, prompts, **kwargs):
        rollouts = super().generate(prompts, **kwargs)
        for r in rollouts:
            r.logprobs = [-100.0] * len(r.completion_ids)
        return rollouts


def test_sampler_logprobs_weight_the_policy_term(tmp_path):
    tok = CharTokenizer()
    losses = []
    for engine_class in (ScriptedEngine, ReportingEngine):
        engine = engine_class(tok, lambda prompt, j: "1234"[: j + 1])
        config = tiny_config(tmp_path, engine_class.__name__, max_steps=1, beta=0.0, tis_cap=2.0,
                             rewards={"test_length": 1.0})
        losses.append(GRPOTrainer(config, rollout_engine=engine).train()["loss"])
    assert losses[0] != 0 and losses[1] == pytest.approx(2 * losses[0], rel=1e-5)


def test_config_options_reach_the_step_loss(tmp_path, monkeypatch):
    import moe_align.train.grpo as grpo_module

    seen = []
    step_loss = grpo_module.grpo_step_loss

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return step_loss(*args, **kwargs)

    monkeypatch.setattr(grpo_module, "grpo_step_loss", spy)
    config = tiny_config(tmp_path, "spy", max_steps=1, unbiased_kl=True, tis_cap=3.0, eps_low=0.1, eps_high=0.3,
                         beta=0.02, loss_type="dr-grpo")
    GRPOTrainer(config).train()
    assert seen and all(
        (kw["unbiased_kl"], kw["tis_cap"], kw["eps_low"], kw["eps_high"], kw["beta"], kw["loss_type"])
        == (True, 3.0, 0.1, 0.3, 0.02, "dr-grpo") for kw in seen)


# ---- 6. reward errors -----------------------------------------------------------------------------------


def flaky(prompts, completions, **kwargs):
    if "y" in prompts:
        if len(prompts) > 1:
            raise RuntimeError("batch")  # RewardMix retries sample by sample
        raise ValueError("cannot score prompt y")
    return [1.0] * len(prompts)


def nan_reward(prompts, completions, **kwargs):
    return [math.nan if p == "y" else 0.5 for p in prompts]


@pytest.mark.parametrize("fn", [flaky, nan_reward])
@pytest.mark.parametrize("on_error", ["raise", "zero", "skip"])
def test_reward_errors(tmp_path, fn, on_error):
    name = f"test_{fn.__name__}"
    register_reward(name, fn, override=True)
    data = write_prompts(tmp_path / "p.jsonl", ["x", "y"])
    tok = CharTokenizer()
    engine = ScriptedEngine(tok, lambda prompt, j: "ab"[: j + 1])
    config = tiny_config(tmp_path, data=data, max_steps=1, rewards={name: 1.0, "format": 0.1}, reward_on_error=on_error)
    trainer = GRPOTrainer(config, rollout_engine=engine)
    if on_error == "raise":
        with pytest.raises(RewardError, match=name) as info:
            trainer.train()
        assert info.value.name == name and info.value.prompt == "y"
        assert "sample" in str(info.value) and "GRPO step 1" in "\n".join(info.value.__notes__)
        return
    with pytest.warns(RewardWarning, match=name):
        trainer.train()
    metrics = read_metrics(config.output_dir)[0]
    bad = [s for s in trainer.last_samples if s["prompt"] == "y"]
    assert len(bad) == 4 and metrics["reward/num_errors"] == 4
    assert all(s["rewards"][name] == 0.0 for s in bad)
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["reward"])
    with open(tmp_path / "run" / "reward_errors.jsonl") as f:
        errors = [json.loads(line) for line in f]
    assert len(errors) == 4 and all(name in e["error"] for e in errors)
    if on_error == "skip":
        assert metrics["reward/num_skipped"] == 4
        assert all(not s["valid"] and s["advantage"] == 0.0 for s in bad)
    else:
        assert metrics["reward/num_skipped"] == 0 and all(s["valid"] for s in bad)


def test_zero_std_fraction_counts_valid_outputs_only(tmp_path):
    """frac_reward_zero_std counts the groups whose advantages are all 0: those whose valid outputs
    are fewer than two or tie. A skipped output's placeholder total of 0 adds no spread."""

    def unscorable_shortest(prompts, completions, **kwargs):
        return [math.nan if c == "a" else (0.0 if p == "y" else 1.0) for p, c in zip(prompts, completions)]

    register_reward("test_unscorable_shortest", unscorable_shortest, override=True)
    data = write_prompts(tmp_path / "p.jsonl", ["x", "y"])
    engine = ScriptedEngine(CharTokenizer(), lambda prompt, j: "abcd"[: j + 1])
    config = tiny_config(tmp_path, data=data, max_steps=1, reward_on_error="skip",
                         rewards={"test_unscorable_shortest": 1.0})
    trainer = GRPOTrainer(config, rollout_engine=engine)
    with pytest.warns(RewardWarning):
        trainer.train()
    metrics = read_metrics(config.output_dir)[0]
    # x: [skipped, 1, 1, 1] and y: [skipped, 0, 0, 0]: both groups tie among their valid outputs
    assert metrics["reward/num_skipped"] == 2
    assert metrics["frac_reward_zero_std"] == 1.0
    assert all(s["advantage"] == 0.0 for s in trainer.last_samples)


# ---- data parallelism and the command line ----------------------------------------------------------------


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch
    from moe_align.train.grpo import GRPOConfig, GRPOTrainer
    from moe_align.train.rollout import Rollout
    from moe_align.train.tokenizer import CharTokenizer

    class Scripted:  # completions that depend on the prompt only: the same global batch on any world size
        def __init__(self, tok):
            self.tok = tok
        def generate(self, prompts, *, n, max_new_tokens, **kwargs):
            out = []
            for p in prompts:
                for j in range(n):
                    # j = 1 answers wrongly: rewards (and advantages) differ within each group
                    text = "x" * j + ";A:" + str(eval(self.tok.decode(p)[2:-1]) + (j == 1))
                    ids = self.tok.encode(text) + [self.tok.eos_id]
                    out.append(Rollout(list(p), ids, text, "stop", len(ids)))
            return out
        def update_weights(self, model):
            pass

    out = sys.argv[1]
    grads = {}
    for loss_type in ("sequence-mean", "token-mean"):
        config = GRPOConfig(model="tiny", output_dir=out + "/" + loss_type, group_size=3, prompts_per_step=4,
                            max_new_tokens=8, batch_tokens=40, minibatches=2, loss_type=loss_type, lr=1e-3,
                            grad_clip=0.0, rewards={"exact_answer": 1.0, "length_penalty": 1.0}, progress=False)
        trainer = GRPOTrainer(config, rollout_engine=Scripted(CharTokenizer()))
        step = trainer.optimizer.step
        def capture():
            grads.setdefault(loss_type, []).append({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
            step()
        trainer.optimizer.step = capture
        metrics = trainer.train_step(next(iter(trainer.loader)))
        grads[loss_type + "/metrics"] = metrics
    if trainer.dist.rank == 0:
        torch.save(grads, out + "/grads.pt")
""")


def test_two_processes_match_one_process(tmp_path):
    script = tmp_path / "ddp_step.py"
    script.write_text(DDP_SCRIPT + TORCHRUN_EPILOGUE)
    env = cpu_subprocess_env()
    subprocess.run([sys.executable, str(script), str(tmp_path / "one")], check=True, env=env)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(script), str(tmp_path / "two")], check=True, env=env)
    one = torch.load(tmp_path / "one" / "grads.pt")
    two = torch.load(tmp_path / "two" / "grads.pt")
    for loss_type in ("sequence-mean", "token-mean"):
        m1, m2 = one[loss_type + "/metrics"], two[loss_type + "/metrics"]
        for key in ("loss", "reward", "num_tokens", "accuracy", "kl"):
            assert m1[key] == pytest.approx(m2[key], rel=1e-5, abs=1e-7), (loss_type, key)
        assert len(one[loss_type]) == len(two[loss_type]) == 2  # two minibatches: two optimizer steps
        for g1, g2 in zip(one[loss_type], two[loss_type]):
            for name, grad in g1.items():
                torch.testing.assert_close(g2[name], grad, rtol=1e-4, atol=1e-7, msg=f"{loss_type} {name}")


def test_cli_runs_two_stages(tmp_path):
    out = subprocess.run([sys.executable, "-m", "moe_align", "grpo", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--group-size" in out.stdout and "--stages" in out.stdout
    stages = json.dumps([{"name": "reasoning", "steps": 1, "rewards": {"exact_answer": 1.0}},
                         {"name": "preference", "steps": 1, "rewards": {"format": 1.0, "length_penalty": 0.5}}])
    out = subprocess.run([sys.executable, "-m", "moe_align", "grpo", "--model", "tiny", "--group-size", "2",
                          "--prompts-per-step", "2", "--max-new-tokens", "4", "--stages", stages,
                          "--stop-strings", '["\\n"]', "--output-dir", str(tmp_path / "cli"), "--no-progress"],
                         capture_output=True, text=True, env=cpu_subprocess_env())
    assert out.returncode == 0, out.stderr
    assert [m["stage"] for m in read_metrics(tmp_path / "cli")] == [0, 1]
    assert os.path.isfile(tmp_path / "cli" / "checkpoint-2" / "model.safetensors")


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="group_size"):
        GRPOTrainer(tiny_config(tmp_path, group_size=1))
    with pytest.raises(ValueError, match="loss_type"):
        GRPOTrainer(tiny_config(tmp_path, loss_type="mean"))
    with pytest.raises(ValueError, match="unknown reward"):
        GRPOTrainer(tiny_config(tmp_path, rewards={"no_such_reward": 1.0}))
    with pytest.raises(ValueError, match=r"stages\[0\].steps"):
        GRPOTrainer(tiny_config(tmp_path, stages=[{"name": "a", "steps": 0}]))
    with pytest.raises(ValueError, match="max_steps"):
        GRPOTrainer(tiny_config(tmp_path, max_steps=5, stages=[{"name": "a", "steps": 2}]))
    with pytest.raises(ValueError, match="max_new_tokens=64 leaves no room"):
        GRPOTrainer(tiny_config(tmp_path, max_new_tokens=64, max_seq_len=64))
    data = write_prompts(tmp_path / "p.jsonl", ["", ""])  # [bos] alone: one prompt token
    GRPOTrainer(tiny_config(tmp_path, max_new_tokens=63, max_seq_len=64, data=data))
