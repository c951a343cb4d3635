"""DPO raises the chosen-vs-rejected margin; ESFT trains only the selected experts."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import TORCHRUN_EPILOGUE, cpu_subprocess_env

from moe_align.models.deepseek import DeepseekConfig, DeepseekForCausalLM
from moe_align.train.data import PackedBatch, encode_sft_record
from moe_align.train.dpo import DPOConfig, DPOTrainer, sequence_logprobs
from moe_align.train.esft import ESFTConfig, ESFTTrainer, expert_token_shares, select_experts
from moe_align.train.tokenizer import CharTokenizer

TOK = CharTokenizer()



def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_sequence_logprobs_sums_each_sequence():
    logp = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=torch.float64)
    cu = torch.tensor([0, 2, 2, 6], dtype=torch.int32)
    torch.testing.assert_close(sequence_logprobs(logp, cu), torch.tensor([3.0, 0.0, 18.0], dtype=torch.float64))


def pairs(n=12):
    return [{"prompt": f"{a}+{a}=", "chosen": str(2 * a), "rejected": str(2 * a + 1)} for a in range(n)]


def test_dpo_raises_the_margin_and_matches_a_hand_computation(tmp_path):
    data = write(tmp_path / "pairs.jsonl", pairs())
    trainer = DPOTrainer(DPOConfig(model="tiny", data=data, output_dir=str(tmp_path / "run"), lr=3e-3, beta=0.5,
                                   batch_tokens=80, max_seq_len=16, progress=False))
    # the reference is a frozen copy: at step 0 every implicit reward is 0, the loss log 2
    step_batches = next(iter(trainer.loader))
    first = trainer.train_step(step_batches)
    assert first["loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), rel=1e-5)
    assert first["reward_margins"] == pytest.approx(0.0, abs=1e-5)
    for name, p in trainer.reference.named_parameters():
        assert not p.requires_grad, name
    margins = [trainer.train_step(b)["reward_margins"] for b, _ in zip(trainer.loader, range(25))]
    assert margins[-1] > 0.5 and sum(margins[-5:]) > sum(margins[:5])

    # the last step's loss against a float64 hand computation from the model's own sequence log-probs
    batch_pairs = next(iter(trainer.loader))[0]
    policy = [sum(trainer.model.token_logprobs(*_packed(e))[0].double().tolist()) for p in batch_pairs
              for e in (p.chosen, p.rejected)]
    ref = [sum(trainer.reference.token_logprobs(*_packed(e))[0].double().tolist()) for p in batch_pairs
           for e in (p.chosen, p.rejected)]
    u = [0.5 * ((policy[2 * i] - ref[2 * i]) - (policy[2 * i + 1] - ref[2 * i + 1])) for i in range(len(batch_pairs))]
    expected = sum(-torch.nn.functional.logsigmoid(torch.tensor(x, dtype=torch.float64)) for x in u) / len(u)
    trainer.optimizer.zero_grad()
    loss, metrics = trainer.compute_loss(batch_pairs, trainer.loss_denominator([batch_pairs]))
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)


def test_dpo_label_smoothing_is_conservative_dpo(tmp_path):
    data = write(tmp_path / "pairs.jsonl", pairs(6))
    s, beta = 0.25, 0.5
    trainer = DPOTrainer(DPOConfig(model="tiny", data=data, output_dir=str(tmp_path / "run"), beta=beta,
                                   label_smoothing=s, batch_tokens=80, max_seq_len=16, progress=False))
    with torch.no_grad():  # move the policy off the reference: margins of both signs
        trainer.model.lm_head.weight.add_(0.3 * torch.randn(trainer.model.lm_head.weight.shape,
                                                            generator=torch.Generator().manual_seed(0)))
    batch_pairs = next(iter(trainer.loader))[0]
    logps = [[sum(m.token_logprobs(*_packed(e))[0].double().tolist()) for m in (trainer.model, trainer.reference)]
             for p in batch_pairs for e in (p.chosen, p.rejected)]
    u = torch.tensor([beta * ((logps[2 * i][0] - logps[2 * i][1]) - (logps[2 * i + 1][0] - logps[2 * i + 1][1]))
                      for i in range(len(batch_pairs))], dtype=torch.float64)
    assert (u.abs() > 1e-3).all()
    logsigmoid = torch.nn.functional.logsigmoid
    expected = (-(1 - s) * logsigmoid(u) - s * logsigmoid(-u)).mean()
    with torch.no_grad():
        loss, _ = trainer.compute_loss(batch_pairs, trainer.loss_denominator([batch_pairs]))
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def _packed(example):
    b = PackedBatch.from_examples([example])
    return b.input_ids, b.cu_seqlens, b.max_seqlen, b.labels


def test_select_experts_by_cumulative_share():
    shares = torch.tensor([0.05, 0.4, 0.15, 0.3, 0.1], dtype=torch.float64)
    assert select_experts(shares, 0.4) == [1]
    assert select_experts(shares, 0.5) == [1, 3]
    assert select_experts(shares, 1.0) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="threshold"):
        select_experts(shares, 0.0)


def test_expert_shares_count_routed_choices():
    torch.manual_seed(0)
    model = DeepseekForCausalLM(DeepseekConfig(vocab_size=TOK.vocab_size))
    batch = PackedBatch.from_examples([encode_sft_record({"prompt": "12+3=", "response": "15"}, TOK)])
    shares = expert_token_shares(model, [batch])
    layer = model.model.layers[1].mlp
    _, _, ids = layer.gate(model.model.layers[1].post_attention_layernorm(
        _hidden_before_mlp(model, batch)).reshape(-1, model.config.hidden_size))
    expected = torch.bincount(ids.flatten().long(), minlength=model.config.n_routed_experts).double()
    torch.testing.assert_close(shares["model.layers.1.mlp"], expected / expected.sum())


def _hidden_before_mlp(model, batch):
    x = model.model.embed_tokens(batch.input_ids)
    x = model.model.layers[0](x, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
    layer = model.model.layers[1]
    return x + layer.self_attn(layer.input_layernorm(x), cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)


def test_esft_leaves_frozen_experts_bit_identical(tmp_path):
    data = write(tmp_path / "d.jsonl", [{"prompt": f"{a}*{b}=", "response": str(a * b)} for a in range(6) for b in range(4)])
    trainer = ESFTTrainer(ESFTConfig(model="tiny", data=data, output_dir=str(tmp_path / "run"), lr=1e-2,
                                     threshold=0.3, batch_tokens=64, max_seq_len=16, progress=False,
                                     unfreeze=["model.norm.*"]))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    selected = trainer.selected["model.layers.1.mlp"]
    assert 1 <= len(selected) < trainer.model.config.n_routed_experts
    for step_batches, _ in zip(trainer.loader, range(4)):
        trainer.train_step(step_batches)
    after = trainer.model.state_dict()
    for name in ("experts.gate_up_proj", "experts.down_proj"):
        key = f"model.layers.1.mlp.{name}"
        frozen = [e for e in range(trainer.model.config.n_routed_experts) if e not in selected]
        assert torch.equal(after[key][frozen], before[key][frozen]), key
        assert not torch.equal(after[key][selected], before[key][selected]), key
    assert not torch.equal(after["model.norm.weight"], before["model.norm.weight"])  # unfrozen by pattern
    for key in before:
        if "experts.gate_up_proj" in key or "experts.down_proj" in key or key == "model.norm.weight":
            continue
        if "tokens_per_expert" in key:
            continue
        assert torch.equal(after[key], before[key]), key
    report = json.load(open(tmp_path / "run" / "esft_experts.json"))
    assert report["model.layers.1.mlp"]["selected"] == selected
    with pytest.raises(ValueError, match="weight_decay"):
        ESFTTrainer(ESFTConfig(model="tiny", data=data, output_dir=str(tmp_path / "r2"), weight_decay=0.1,
                               batch_tokens=64, max_seq_len=16, progress=False))


def test_esft_relevance_is_measured_on_the_first_relevance_tokens(tmp_path):
    records = [{"prompt": f"{a}*{b}=", "response": str(a * b)} for a in range(6) for b in range(4)]
    data = write(tmp_path / "d.jsonl", records)
    examples = [encode_sft_record(r, TOK) for r in records]
    budget = sum(len(e) for e in examples[:5]) + 1  # five examples fit, the sixth does not
    trainer = ESFTTrainer(ESFTConfig(model="tiny", data=data, output_dir=str(tmp_path / "run"), threshold=0.3,
                                     batch_tokens=64, max_seq_len=16, progress=False, relevance_tokens=budget))
    # the routing of a token does not depend on the other sequences of its batch: count each alone
    alone = lambda k: expert_token_shares(trainer.model, [PackedBatch.from_examples([e])  # noqa: E731
                                                           for e in examples[:k]])
    five, six = alone(5), alone(6)
    assert any(not torch.equal(five[name], six[name]) for name in five)
    for name, shares in trainer.shares.items():
        torch.testing.assert_close(shares, five[name], rtol=1e-12, atol=0.0, msg=name)


ESFT_FSDP_SCRIPT = textwrap.dedent("""
    import sys, torch
    from moe_align.train.esft import ESFTConfig, ESFTTrainer, local_rows
    data, out, fsdp, accum = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
    trainer = ESFTTrainer(ESFTConfig(model="tiny", data=data, output_dir=out, lr=1e-2, threshold=0.3, batch_tokens=64,
                                     max_seq_len=16, grad_clip=1.0, progress=False, fsdp=fsdp, max_steps=3,
                                     grad_accum=accum, unfreeze=["model.norm.*"]))
    initial = {k: v.clone() for k, v in trainer.model_state_dict().items()}
    trainer.train()
    state = trainer.model_state_dict()
    if fsdp:  # local_rows cuts a dim-0 DTensor as DTensor does, also unevenly (5 rows over 2 ranks)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor
        full = torch.arange(10.0).view(5, 2)
        local, first = local_rows(distribute_tensor(full, init_device_mesh("cpu", (2,)), [Shard(0)]))
        assert torch.equal(local, full[first:first + local.shape[0]]), (first, local)
    if trainer.dist.rank == 0:
        torch.save({"initial": initial, "final": state, "selected": trainer.selected}, out + "/result.pt")
""")


def test_esft_under_fsdp_trains_the_same_experts_as_one_process(tmp_path):
    """ESFT with FSDP2 on 2 processes (gloo): the masks reach the sharded gradients, so the frozen
    experts stay bit-identical and the weights equal a one-process run's over the same global
    batches (2 micro-batches per step)."""
    records = [{"prompt": f"{a}*{b}=", "response": str(a * b)} for a in range(6) for b in range(4)]
    data = write(tmp_path / "d.jsonl", records)
    script = tmp_path / "esft_fsdp.py"
    script.write_text(ESFT_FSDP_SCRIPT + TORCHRUN_EPILOGUE)
    env = cpu_subprocess_env()
    subprocess.run([sys.executable, str(script), data, str(tmp_path / "one"), "0", "2"], check=True, env=env,
                   timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                    data, str(tmp_path / "two"), "1", "1"], check=True, env=env, timeout=300)
    one, two = torch.load(tmp_path / "one" / "result.pt"), torch.load(tmp_path / "two" / "result.pt")
    assert one["selected"] == two["selected"]
    selected = one["selected"]["model.layers.1.mlp"]
    frozen = [e for e in range(DeepseekConfig.preset("tiny").n_routed_experts) if e not in selected]
    assert selected and frozen
    for name in ("gate_up_proj", "down_proj"):
        key = f"model.layers.1.mlp.experts.{name}"
        assert torch.equal(two["final"][key][frozen], two["initial"][key][frozen]), key
        assert not torch.equal(two["final"][key][selected], two["initial"][key][selected]), key
    for key in one["final"]:
        torch.testing.assert_close(two["final"][key], one["final"][key], rtol=1e-4, atol=1e-6, msg=key)
