"""Learned reward models: losses against float64 hand computations, last-token pooling in packed
batches, training on the built-in pairs, files, the reward-function protocol, data errors, resume."""

import json
import math
import random
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import TORCHRUN_EPILOGUE, cpu_subprocess_env, interrupt_during_step

from moe_align.models.deepseek import DeepseekConfig, DeepseekForCausalLM
from moe_align.train import checkpoint as ckpt
from moe_align.train.data import DatasetError, encode_prompt_response
from moe_align.train.rm import (
    RewardModel,
    RewardModelTrainer,
    RMConfig,
    builtin_pointwise_records,
    builtin_preference_records,
    corrupt_answer,
    is_reward_model_dir,
    load_reward_function,
    pairwise_loss,
    pointwise_loss,
    register_reward_model,
)
from moe_align.train.tasks import ArithmeticTask
from moe_align.train.tokenizer import CharTokenizer

TOK = CharTokenizer()


def tiny_rm(seed=0):
    torch.manual_seed(seed)
    return RewardModel(DeepseekConfig(vocab_size=TOK.vocab_size)).eval()


def rm_config(tmp_path, **kw):
    base = dict(model="tiny", output_dir=str(tmp_path / "run"), lr=1e-2, batch_tokens=2048, max_seq_len=64,
                builtin_size=8, progress=False)
    base.update(kw)
    return RMConfig(**base)


def write_records(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# ---- float64 oracles, written out by hand ----------------------------------------------------------


def sigmoid64(x):
    return 1.0 / (1.0 + math.exp(-x))


def oracle_pairwise(chosen, rejected):
    return sum(-math.log(sigmoid64(c - r)) for c, r in zip(chosen, rejected)) / len(chosen)


def oracle_bce(rewards, labels):
    return sum(-(y * math.log(sigmoid64(r)) + (1 - y) * math.log(1 - sigmoid64(r)))
               for r, y in zip(rewards, labels)) / len(rewards)


def oracle_mse(rewards, labels):
    return sum((r - y) ** 2 for r, y in zip(rewards, labels)) / len(rewards)


# ---- losses -----------------------------------------------------------------------------------------


def test_losses_match_float64_hand_computation():
    chosen = [0.3, -1.25, 2.0, 0.0, 7.5, -3.0]
    rejected = [-0.2, 0.75, 2.0, 1e-3, -6.0, -2.5]
    got = pairwise_loss(torch.tensor(chosen), torch.tensor(rejected))
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(oracle_pairwise(chosen, rejected), rel=1e-6)
    none = pairwise_loss(torch.tensor(chosen), torch.tensor(rejected), reduction="none")
    for i, (c, r) in enumerate(zip(chosen, rejected)):
        assert float(none[i]) == pytest.approx(-math.log(sigmoid64(c - r)), rel=1e-6, abs=1e-7)
    # far margins stay finite and exact (a naive log(sigmoid) in float32 would give inf / 0)
    far = pairwise_loss(torch.tensor([-60.0, 60.0]), torch.tensor([60.0, -60.0]), reduction="none")
    assert far.tolist() == pytest.approx([120.0, math.exp(-120.0)], rel=1e-6, abs=1e-30)

    rewards = [0.5, -2.0, 3.25, 0.0, -0.1]
    labels = [1.0, 0.0, 0.0, 1.0, 0.25]
    got = pointwise_loss(torch.tensor(rewards), torch.tensor(labels), "binary")
    assert float(got) == pytest.approx(oracle_bce(rewards, labels), rel=1e-6)
    scores = [3.0, -1.5, 0.25]
    got = pointwise_loss(torch.tensor([0.5, -2.0, 3.25]), torch.tensor(scores), "regression", reduction="sum")
    assert float(got) == pytest.approx(3 * oracle_mse([0.5, -2.0, 3.25], scores), rel=1e-6)
    assert float(pairwise_loss(torch.zeros(0), torch.zeros(0))) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        pairwise_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="target"):
        pointwise_loss(torch.zeros(2), torch.zeros(2), "hinge")


def test_trainer_loss_is_the_mean_over_all_pairs_of_the_step(tmp_path):
    """Micro-batch losses summed over a step = the float64 mean over every pair of the step."""
    trainer = RewardModelTrainer(rm_config(tmp_path, batch_tokens=200, grad_accum=3))
    step = next(iter(trainer.loader))
    assert len(step) == 3
    total, pairs, metrics = 0.0, [], []
    with torch.no_grad():
        for mb in step:
            loss, m = trainer.compute_loss(mb, trainer.loss_denominator(step))
            total += float(loss)
            pairs += mb
            metrics.append(m)
    rm = trainer.model
    chosen, rejected = [], []
    for pair in pairs:  # every sequence alone
        for seq, out in ((pair.chosen, chosen), (pair.rejected, rejected)):
            with torch.no_grad():
                out.append(float(rm(*DeepseekForCausalLM.pack([seq.input_ids]))))
    assert total == pytest.approx(oracle_pairwise(chosen, rejected), rel=1e-5)
    assert sum(m["_count"] for m in metrics) == len(pairs)
    assert sum(float(m["accuracy"]) for m in metrics) == sum(c > r for c, r in zip(chosen, rejected))
    assert sum(m["num_tokens"] for m in metrics) == sum(len(p) for p in pairs)


def test_pointwise_trainer_loss_and_labels(tmp_path):
    records = [{"prompt": "Q:1+1=", "response": "1+1+0=02;A:2", "label": 1},
               {"prompt": "Q:1+1=", "response": "1+1+0=02;A:3", "label": False},
               {"prompt": "Q:2+2=", "response": "no idea", "label": 0.25},
               {"prompt": "Q:3+3=", "response": "maybe 6", "label": 0.5}]
    data = write_records(tmp_path / "p.jsonl", records)
    trainer = RewardModelTrainer(rm_config(tmp_path, data=data, loss="pointwise"))
    step = next(iter(trainer.loader))
    with torch.no_grad():
        loss, metrics = trainer.compute_loss(step[0], trainer.loss_denominator(step))
        rewards = [float(trainer.model(*DeepseekForCausalLM.pack([e.example.input_ids]))) for e in step[0]]
    labels = [e.label for e in step[0]]
    assert sorted(labels) == [0.0, 0.25, 0.5, 1.0]
    assert float(loss) == pytest.approx(oracle_bce(rewards, labels), rel=1e-5)
    assert metrics["_count"] == 4
    # a label of 0.5 or more counts as positive: right when the reward (the logit) is > 0
    assert int(metrics["accuracy"]) == sum((r > 0) == (y >= 0.5) for r, y in zip(rewards, labels))

    scores = write_records(tmp_path / "s.jsonl", [dict(r, label=s) for r, s in zip(records, [4.0, -2.0, 7.5])])
    trainer = RewardModelTrainer(rm_config(tmp_path, data=scores, loss="pointwise", pointwise_target="regression"))
    step = next(iter(trainer.loader))
    with torch.no_grad():
        loss, metrics = trainer.compute_loss(step[0], trainer.loss_denominator(step))
        rewards = [float(trainer.model(*DeepseekForCausalLM.pack([e.example.input_ids]))) for e in step[0]]
    assert float(loss) == pytest.approx(oracle_mse(rewards, [e.label for e in step[0]]), rel=1e-5)
    assert "accuracy" not in metrics


# ---- the model ----------------------------------------------------------------------------------------


def test_reward_is_the_head_on_each_sequences_last_token():
    rm = tiny_rm()
    gen = torch.Generator().manual_seed(1)
    lengths = [1, 7, 19, 4, 12]
    seqs = [torch.randint(4, TOK.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    ids, cu, max_len = DeepseekForCausalLM.pack(seqs)
    with torch.no_grad():
        packed = rm(ids, cu, max_len)
        assert packed.shape == (len(seqs),) and packed.dtype == torch.float32
        w = rm.score.weight.double()[0]
        for i, seq in enumerate(seqs):
            alone_ids, alone_cu, n = DeepseekForCausalLM.pack([seq])
            hidden = rm.hidden_states(alone_ids, alone_cu, n)
            expected = float((hidden[-1].double() * w).sum())  # float64 dot with the last hidden state
            assert float(packed[i]) == pytest.approx(expected, rel=1e-4, abs=1e-6), i
            assert float(packed[i]) == pytest.approx(float(rm(alone_ids, alone_cu, n)), rel=1e-4, abs=1e-6), i
        # the last token decides: changing any other token of a sequence moves its reward, but
        # never the reward of another sequence of the batch
        changed = ids.clone()
        changed[int(cu[2]) - 3] = (changed[int(cu[2]) - 3] - 3) % (TOK.vocab_size - 4) + 4
        moved = rm(changed, cu, max_len)
        assert float(moved[1]) != float(packed[1])
        torch.testing.assert_close(moved[[0, 2, 3, 4]], packed[[0, 2, 3, 4]], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="empty sequence"):
        rm(ids, torch.tensor([0, 0] + cu[1:].tolist(), dtype=torch.int32), max_len)
    with pytest.raises(ValueError, match="vocab_size"):
        rm(torch.full((3,), TOK.vocab_size), torch.tensor([0, 3], dtype=torch.int32), 3)


def test_score_texts_is_order_preserving_and_batch_independent():
    rm = tiny_rm()
    prompts = ["Q:1+2=", "Q:45+6=", "Q:9-3=", "Q:100+1="]
    completions = ["1+2+0=03;A:3", "x", "9-3-0=06;A:6 and more text", ""]
    together = rm.score_texts(TOK, prompts, completions)
    one_by_one = rm.score_texts(TOK, prompts, completions, batch_tokens=1)
    assert together == pytest.approx(one_by_one, rel=1e-4, abs=1e-6)
    for i in range(len(prompts)):
        ids = encode_prompt_response(TOK, prompts[i], completions[i]).input_ids
        assert ids[0] == TOK.bos_id and ids[-1] == TOK.eos_id
        with torch.no_grad():
            alone = float(rm(*DeepseekForCausalLM.pack([ids])))
        assert together[i] == pytest.approx(alone, rel=1e-4, abs=1e-6)
    assert rm.score_texts(TOK, [], []) == []
    rm.train()
    rm.score_texts(TOK, prompts[:1], completions[:1])
    assert rm.training  # the mode is restored
    with pytest.raises(ValueError, match="completions has 1"):
        rm.score_texts(TOK, prompts, completions[:1])


def test_save_load_round_trip_and_state_dict_names(tmp_path):
    rm = tiny_rm(3)
    keys = set(rm.state_dict())
    assert "score.weight" in keys and "model.embed_tokens.weight" in keys and "model.norm.weight" in keys
    assert not any(k.startswith("lm_head") for k in keys)
    assert rm.score.bias is None and rm.score.weight.shape == (1, rm.config.hidden_size)
    rm.save(str(tmp_path / "rm"), tokenizer="char")
    assert is_reward_model_dir(str(tmp_path / "rm"))
    loaded = RewardModel.load(str(tmp_path / "rm"))
    assert loaded.tokenizer_name == "char" and loaded.config == rm.config
    prompts, completions = ["Q:12+7=", "Q:5-5="], ["2+7+0=09,1+0+0=01;A:19", "5-5-0=00;A:0"]
    assert loaded.score_texts(TOK, prompts, completions) == rm.score_texts(TOK, prompts, completions)

    lm = DeepseekForCausalLM(DeepseekConfig(vocab_size=TOK.vocab_size))
    ckpt.save_model(lm, str(tmp_path / "lm"))
    assert not is_reward_model_dir(str(tmp_path / "lm"))
    with pytest.raises(ValueError, match="causal LM, not a reward model"):
        RewardModel.load(str(tmp_path / "lm"))
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        RewardModel.load(str(tmp_path / "nowhere"))
    shared = RewardModel(lm)
    assert shared.model is lm.model  # the decoder is shared, not copied


def test_trainer_starts_from_a_causal_lm_or_a_reward_model_directory(tmp_path):
    torch.manual_seed(5)
    lm = DeepseekForCausalLM(DeepseekConfig(vocab_size=TOK.vocab_size))
    ckpt.save_model(lm, str(tmp_path / "lm"))
    trainer = RewardModelTrainer(rm_config(tmp_path / "a", model=str(tmp_path / "lm"), max_steps=1))
    for name, value in lm.model.state_dict().items():
        assert torch.equal(trainer.model.model.state_dict()[name], value), name
    trainer.train()
    final = trainer.checkpoint_dir()
    assert is_reward_model_dir(final)
    again = RewardModelTrainer(rm_config(tmp_path / "b", model=final, max_steps=1))
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], value), name
    assert {p.data_ptr() for p in again.trainable} == {p.data_ptr() for p in again.model.parameters()}


# ---- training -----------------------------------------------------------------------------------------


def test_training_on_builtin_pairs_drives_the_loss_down(tmp_path):
    trainer = RewardModelTrainer(rm_config(tmp_path, lr=3e-3, max_steps=40))
    losses = []
    for step in trainer.loader:
        metrics = trainer.train_step(step)
        losses.append(metrics["loss"])
        if len(losses) == 40:
            break
    assert losses[0] == pytest.approx(math.log(2), abs=0.02)  # a fresh head: r_c ~ r_r
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses[::5]
    assert metrics["num_pairs"] == 8 and 0.0 <= metrics["accuracy"] <= 1.0


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    kw = dict(batch_tokens=200, max_steps=4, lr=3e-3, schedule="cosine")
    straight = RewardModelTrainer(rm_config(tmp_path / "a", **kw))
    straight.train()
    first = RewardModelTrainer(rm_config(tmp_path / "b", save_every=2, **kw))
    interrupt_during_step(first, 4)  # checkpoint-2 is the latest on disk
    with pytest.raises(KeyboardInterrupt):
        first.train()
    resumed = RewardModelTrainer(rm_config(tmp_path / "b", resume="auto", **kw))
    assert resumed.step == 2
    resumed.train()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


# ---- data ---------------------------------------------------------------------------------------------


def test_builtin_pairs_differ_only_in_a_wrong_final_answer():
    records = builtin_preference_records(50, seed=0)
    assert records == builtin_preference_records(50, seed=0)
    problems = ArithmeticTask().dataset(50, seed=0, split="train")
    for record, problem in zip(records, problems):
        assert record["prompt"] == problem["prompt"] and record["chosen"] == problem["response"]
        assert ArithmeticTask.is_correct(record["chosen"], problem["answer"])
        assert not ArithmeticTask.is_correct(record["rejected"], problem["answer"])
        assert ArithmeticTask.format_ok(record["rejected"]) and len(record["rejected"]) == len(record["chosen"])
        head = record["chosen"].rsplit("A:", 1)[0]
        assert record["rejected"].startswith(head)
    test_prompts = {r["prompt"] for r in builtin_preference_records(50, seed=0, split="test")}
    assert not test_prompts & {r["prompt"] for r in records}
    points = builtin_pointwise_records(5, seed=0)
    assert [p["label"] for p in points] == [1.0, 0.0] * 5
    rng = random.Random(0)
    for answer in ["0", "7", "10", "-305"]:
        wrong = corrupt_answer("...;A:" + answer, rng).split("A:")[1]
        assert wrong != answer and len(wrong) == len(answer) and str(int(wrong)) == wrong


def test_bad_records_name_the_file_and_line(tmp_path):
    good = {"prompt": "Q:1+1=", "chosen": "A:2", "rejected": "A:3"}
    data = write_records(tmp_path / "pairs.jsonl", [good, {"prompt": "Q:1+2=", "chosen": "A:3"}])
    with pytest.raises(DatasetError, match=r"pairs\.jsonl:2: .*'rejected'"):
        RewardModelTrainer(rm_config(tmp_path, data=data))
    data = write_records(tmp_path / "labels.jsonl", [{"prompt": "a", "response": "b", "label": 1},
                                                     {"prompt": "a", "response": "b", "label": 2.5}])
    with pytest.raises(DatasetError, match=r"labels\.jsonl:2: 'label' 2.5 is outside \[0, 1\]"):
        RewardModelTrainer(rm_config(tmp_path, data=data, loss="pointwise"))
    data = write_records(tmp_path / "text.jsonl", [{"prompt": "a", "response": "b", "label": "yes"}])
    with pytest.raises(DatasetError, match=r"text\.jsonl:1: 'label' must be a finite number"):
        RewardModelTrainer(rm_config(tmp_path, data=data, loss="pointwise", pointwise_target="regression"))
    data = write_records(tmp_path / "nolabel.jsonl", [{"prompt": "a", "response": "b"}])
    with pytest.raises(DatasetError, match=r"nolabel\.jsonl:1: a point-wise record needs"):
        RewardModelTrainer(rm_config(tmp_path, data=data, loss="pointwise"))
    with pytest.raises(ValueError, match="loss='hinge'"):
        RewardModelTrainer(rm_config(tmp_path, loss="hinge"))


# ---- in the reward mix (eq. 36) ------------------------------------------------------------------------


def test_reward_function_in_a_reward_mix(tmp_path):
    rewards = pytest.importorskip("moe_align.train.rewards")
    rm = tiny_rm(7)
    prompts = ["Q:12+7=", "Q:12+7=", "Q:5-5="]
    completions = ["2+7+0=09,1+0+0=01;A:19", "2+7+0=09,1+0+0=01;A:18", "5-5-0=00;A:0"]
    fn = rm.as_reward_function(TOK, "helpful")
    assert fn.__name__ == "helpful"
    expected = rm.score_texts(TOK, prompts, completions)
    assert fn(prompts, completions, answer=["19", "19", "0"]) == expected
    mix = rewards.RewardMix([(fn, 0.5), ("exact_answer", 2.0)])
    result = mix(prompts, completions, answer=["19", "19", "0"])
    assert result.per_function["helpful"].tolist() == pytest.approx(expected, rel=1e-6)
    exact = [1.0, 0.0, 1.0]
    assert result.total.tolist() == pytest.approx([0.5 * r + 2.0 * e for r, e in zip(expected, exact)], rel=1e-5)

    rm.save(str(tmp_path / "rm"))
    loaded = load_reward_function(str(tmp_path / "rm"), "safety", sigmoid=True)
    probs = loaded(prompts, completions)
    assert loaded.__name__ == "safety"
    assert probs == pytest.approx([1 / (1 + math.exp(-r)) for r in expected], rel=1e-6)
    saved = dict(rewards._REGISTRY)
    try:
        register_reward_model("rm_test_helpful", str(tmp_path / "rm"))
        by_name = rewards.RewardMix({"rm_test_helpful": 0.5, "exact_answer": 2.0})(prompts, completions,
                                                                                    answer=["19", "19", "0"])
        assert by_name.total.tolist() == result.total.tolist()
        key = "rm:" + str(tmp_path / "rm")  # a reward model named by its directory in a GRPO config
        by_dir = rewards.RewardMix({key: 0.5, "exact_answer": 2.0})(prompts, completions, answer=["19", "19", "0"])
        assert by_dir.per_function[key].tolist() == result.per_function["helpful"].tolist()
    finally:
        rewards._REGISTRY.clear()
        rewards._REGISTRY.update(saved)


# ---- processes and the command line --------------------------------------------------------------------

DDP_SCRIPT = textwrap.dedent("""
    import sys, torch
    from moe_align.train.rm import RMConfig, RewardModelTrainer

    def run(out, accum):
        trainer = RewardModelTrainer(RMConfig(model="tiny", output_dir=out, batch_tokens=200, max_seq_len=64,
                                              builtin_size=12, grad_accum=accum, lr=1e-3, grad_clip=0.0,
                                              progress=False))
        steps = iter(trainer.loader)
        metrics = trainer.train_step(next(steps))
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
        trainer.train_step(next(steps))  # DDP raises here if a trainable parameter got no gradient
        if trainer.dist.rank == 0:
            torch.save({"grads": grads, "metrics": metrics, "objective": type(trainer.objective).__name__},
                       out + "/grads.pt")

    if __name__ == "__main__":
        run(sys.argv[1], int(sys.argv[2]))
""")


def test_two_processes_match_one_process(tmp_path):
    script = tmp_path / "rm_ddp_step.py"
    script.write_text(DDP_SCRIPT + TORCHRUN_EPILOGUE)
    namespace = {}
    exec(compile(DDP_SCRIPT, str(script), "exec"), namespace)
    namespace["run"](str(tmp_path / "one"), 2)  # one process accumulating the two micro-batches
    env = cpu_subprocess_env()
    # --standalone, as the other 2-process tests: torchrun picks its own free port (one picked here
    # could be taken before torchrun binds it)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(script), str(tmp_path / "two"), "1"], check=True, env=env, timeout=300)
    one = torch.load(tmp_path / "one" / "grads.pt")
    two = torch.load(tmp_path / "two" / "grads.pt")
    assert (one["objective"], two["objective"]) == ("RewardModel", "DistributedDataParallel")
    for key in ("num_pairs", "num_tokens", "loss", "accuracy"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-6), key
    assert one["grads"].keys() == two["grads"].keys() and "score.weight" in one["grads"]
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_cli_trains_a_reward_model(tmp_path, capsys):
    from moe_align.train.cli import main

    assert main(["rm", "--model", "tiny", "--loss", "pointwise", "--builtin-size", "8", "--max-steps", "2",
                 "--batch-tokens", "512", "--lr", "1e-3", "--output-dir", str(tmp_path / "cli"),
                 "--no-progress"]) == 0
    assert "rm: 2 steps" in capsys.readouterr().out
    assert is_reward_model_dir(str(tmp_path / "cli" / "checkpoint-2"))
    records = [json.loads(line) for line in open(tmp_path / "cli" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2] and all("accuracy" in r and "loss" in r for r in records)
