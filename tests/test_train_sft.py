"""SFT trainer machinery: JSONL errors, loss masks, packing, SFT, resume, data parallelism, CLI."""

import argparse
import copy
import json
import math
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import TORCHRUN_EPILOGUE, cpu_subprocess_env, interrupt_during_step, requires_cuda

from moe_align.models.deepseek import DeepseekConfig, DeepseekForCausalLM
from moe_align.train import checkpoint as ckpt
from moe_align.train.data import (IGNORE_INDEX, DatasetError, Example, PackedBatch, PackedLoader, check_lengths,
                                  encode_sft_record, load_sft_dataset, pack_bins, read_jsonl)
from moe_align.train.sft import SFTConfig, SFTTrainer
from moe_align.train.tokenizer import CharTokenizer, HFTokenizer
from moe_align.train.trainer import add_config_arguments, config_from_args, lr_factor

TOK = CharTokenizer()


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def addition_records(n=24):
    return [{"prompt": f"{a}+{b}=", "response": str(a + b)} for a in range(7) for b in range(7)][:n]


def write_records(path, records):
    return write_lines(path, [json.dumps(r) for r in records])


def tiny_config(tmp_path, data, **kw):
    base = dict(model="tiny", data=data, output_dir=str(tmp_path / "run"), lr=3e-3, batch_tokens=64,
                max_seq_len=32, progress=False, grad_clip=0.0)
    base.update(kw)
    return SFTConfig(**base)


# ---- data -------------------------------------------------------------------------------------------


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ['{"prompt": "a", "response": "b"}', "", "{not json"])
    with pytest.raises(DatasetError, match=r"bad\.jsonl:3"):
        read_jsonl(path)
    path = write_lines(tmp_path / "list.jsonl", ['{"prompt": "a", "response": "b"}', "[1, 2]"])
    with pytest.raises(DatasetError, match=r"list\.jsonl:2: expected a JSON object"):
        read_jsonl(path)
    path = write_lines(tmp_path / "field.jsonl", ['{"prompt": "a"}'])
    with pytest.raises(DatasetError, match=r"field\.jsonl:1: an SFT record needs"):
        load_sft_dataset(path, TOK, 64)
    path = write_lines(tmp_path / "type.jsonl", ['{"prompt": "a", "response": 3}'])
    with pytest.raises(DatasetError, match=r"type\.jsonl:1: field 'response' must be a string"):
        load_sft_dataset(path, TOK, 64)
    with pytest.raises(DatasetError, match="empty"):
        read_jsonl(write_lines(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_too_long_sequence_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "long.jsonl", ['{"prompt": "1+1=", "response": "2"}',
                                                  json.dumps({"prompt": "x" * 40, "response": "y"})])
    with pytest.raises(DatasetError, match=r"long\.jsonl:2: the example has 43 tokens, more than max_seq_len=32"):
        load_sft_dataset(path, TOK, 32)


def test_required_fields_and_the_length_limit(tmp_path):
    path = write_lines(tmp_path / "r.jsonl", ['{"prompt": "a", "answer": "1"}', '{"prompt": "b"}'])
    with pytest.raises(DatasetError, match=r"r\.jsonl:2: missing field\(s\) \['answer'\]"):
        read_jsonl(path, required=("prompt", "answer"))
    example = encode_sft_record({"prompt": "ab", "response": "c", "_source": "x.jsonl:7"}, TOK)
    assert len(example) == 5
    check_lengths([example], 5)  # exactly max_seq_len tokens fit
    with pytest.raises(DatasetError, match=r"x\.jsonl:7: the example has 5 tokens, more than max_seq_len=4"):
        check_lengths([example], 4)


def test_hf_tokenizer_special_ids_fall_back_to_eos():
    class Fake:
        def __init__(self, bos, eos, pad):
            self.bos_token_id, self.eos_token_id, self.pad_token_id = bos, eos, pad

        def __len__(self):
            return 100

    tok = HFTokenizer(Fake(5, 7, 9))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (5, 7, 9, 100)
    tok = HFTokenizer(Fake(None, 7, None))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (7, 7, 7)
    with pytest.raises(ValueError, match="no eos"):
        HFTokenizer(Fake(5, None, 9))


def test_loss_mask_is_on_the_response_and_eos_only():
    ex = encode_sft_record({"prompt": "12+3=", "response": "15"}, TOK)
    assert ex.input_ids == [TOK.bos_id] + TOK.encode("12+3=15") + [TOK.eos_id]
    assert ex.labels == [IGNORE_INDEX] * 6 + TOK.encode("15") + [TOK.eos_id]
    chat = encode_sft_record({"messages": [{"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": "yo"}]}, TOK)
    text = TOK.decode(chat.input_ids)
    assert text == "user: hi\nassistant: yo\n"
    trained = TOK.decode([t for t in chat.labels if t != IGNORE_INDEX])
    assert trained == "yo\n" and chat.labels[-1] == TOK.eos_id
    with pytest.raises(DatasetError, match="no assistant reply"):
        encode_sft_record({"messages": [{"role": "user", "content": "hi"}]}, TOK)
    with pytest.raises(DatasetError, match=r"messages\[1\] must be"):
        encode_sft_record({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "yo"}]}, TOK)


def test_pack_bins_first_fit_decreasing():
    assert pack_bins([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]  # 6+2, 5+3, 4
    lengths = [int(x) for x in torch.randint(1, 9, (50,), generator=torch.Generator().manual_seed(0))]
    bins = pack_bins(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(50))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) <= -(-sum(lengths) // 10) + 2  # within a couple of bins of the volume bound
    with pytest.raises(ValueError, match="capacity"):
        pack_bins([3, 11], 10)


def test_packed_loss_equals_each_sequence_alone():
    torch.manual_seed(0)
    model = DeepseekForCausalLM(DeepseekConfig(vocab_size=TOK.vocab_size)).eval()
    examples = [encode_sft_record(r, TOK) for r in [{"prompt": "1+2=", "response": "3"},
                                                      {"prompt": "45+6=", "response": "51"},
                                                      {"prompt": "9=", "response": "nine!"}]]
    batch = PackedBatch.from_examples(examples)
    packed, _ = model.token_logprobs(batch.input_ids, batch.cu_seqlens, batch.max_seqlen, batch.labels)
    alone = []
    for ex in examples:
        one = PackedBatch.from_examples([ex])
        alone.append(model.token_logprobs(one.input_ids, one.cu_seqlens, one.max_seqlen, one.labels)[0])
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-5, atol=1e-6)
    assert batch.num_targets == sum(PackedBatch.from_examples([e]).num_targets for e in examples) == (1 + 1) + (2 + 1) + (5 + 1)


def test_num_targets_leave_out_each_sequence_start():
    """The first token of a sequence is predicted by nothing, even when its label is kept."""
    a, b, c = Example([5, 6, 7], [5, 6, 7]), Example([8, 9], [IGNORE_INDEX, 9]), Example([4], [4])
    assert (a.num_targets, b.num_targets, c.num_targets) == (2, 1, 0)
    assert PackedBatch.from_examples([a, b, c]).num_targets == 3
    assert PackedBatch.from_examples([c, a]).num_targets == 2
    empty = Example([], [])  # an empty sequence starts where the next one does: that start counts once
    assert PackedBatch.from_examples([empty, a, empty, empty, c, empty]).num_targets == 2


def test_loader_drops_the_partial_step_reshuffles_epochs_and_strides_ranks():
    items = [encode_sft_record(r, TOK) for r in addition_records(40)]
    num_bins = len(pack_bins([len(e) for e in items], 32))  # the same count in any item order
    assert num_bins % 3, num_bins  # a partial step to drop
    loader = PackedLoader(items, 32, grad_accum=3, seed=5)
    assert loader.steps_per_epoch() == num_bins // 3
    steps = iter(loader)
    epochs = [[next(steps) for _ in range(num_bins // 3)] for _ in range(2)]
    assert all(len(step) == 3 for epoch in epochs for step in epoch)
    flat = [[e.input_ids for step in epoch for b in step for e in b] for epoch in epochs]
    assert flat[0] != flat[1]  # each epoch shuffles anew
    # rank r of W takes the step's bins r, r + W, ...
    one = iter(PackedLoader(items, 32, grad_accum=4, seed=5))
    ranks = [iter(PackedLoader(items, 32, grad_accum=2, world_size=2, rank=r, seed=5)) for r in range(2)]
    for _ in range(3):
        whole = next(one)
        for r, it in enumerate(ranks):
            assert next(it) == whole[r::2]


def test_loader_shards_the_same_global_batch_and_resumes():
    items = [encode_sft_record(r, TOK) for r in addition_records(40)]
    one = PackedLoader(items, 32, grad_accum=2, seed=3)
    ranks = [PackedLoader(items, 32, grad_accum=1, world_size=2, rank=r, seed=3) for r in range(2)]
    steps = iter(one)
    rank_steps = [iter(r) for r in ranks]
    for _ in range(one.steps_per_epoch() + 2):  # into the second epoch
        whole = next(steps)
        split = [next(it)[0] for it in rank_steps]
        assert [e.input_ids for b in whole for e in b] == [e.input_ids for b in split for e in b]
    state = one.state_dict()
    expected = next(steps)
    again = PackedLoader(items, 32, grad_accum=2, seed=3)
    again.load_state_dict(state)
    assert [e.input_ids for b in next(iter(again)) for e in b] == [e.input_ids for b in expected for e in b]


# ---- training ---------------------------------------------------------------------------------------


def test_sft_memorises_a_small_set(tmp_path):
    data = write_records(tmp_path / "d.jsonl", addition_records(16))
    trainer = SFTTrainer(tiny_config(tmp_path, data, max_steps=60, lr=1e-2, batch_tokens=128))
    losses = []
    for step_batches in trainer.loader:
        losses.append(trainer.train_step(step_batches)["loss"])
        if len(losses) == 60:
            break
    assert losses[-1] < 0.35 * losses[0], losses[::10]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    data = write_records(tmp_path / "d.jsonl", addition_records(24))
    straight = SFTTrainer(tiny_config(tmp_path / "a", data, max_steps=5, schedule="cosine", warmup_steps=2,
                                      bias_update_speed=1e-3))
    straight.train()
    first = SFTTrainer(tiny_config(tmp_path / "b", data, max_steps=5, schedule="cosine", warmup_steps=2,
                                   bias_update_speed=1e-3, save_every=2))
    interrupt_during_step(first, 4)  # checkpoint-2 is the latest on disk
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert sorted(os.listdir(tmp_path / "b" / "run")) == ["checkpoint-2", "metrics.jsonl"]
    resumed = SFTTrainer(tiny_config(tmp_path / "b", data, max_steps=5, schedule="cosine", warmup_steps=2,
                                     bias_update_speed=1e-3, resume="auto"))
    assert resumed.step == 2
    resumed.train()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    lines = lambda run: [json.loads(x) for x in open(tmp_path / run / "run" / "metrics.jsonl")]  # noqa: E731
    straight_loss = [r["loss"] for r in lines("a")]
    resumed_loss = {r["step"]: r["loss"] for r in lines("b")}  # steps 1-3, then 3-5 again
    assert [resumed_loss[s] for s in range(1, 6)] == straight_loss


def test_lr_schedule_hand_values():
    """Linear warmup over 2 steps, then decay over the remaining 8 to a floor of 0.1."""
    for step, want in ((0, 0.5), (1, 1.0), (2, 1.0), (6, 0.55), (10, 0.1), (14, 0.1)):
        assert lr_factor(step, 10, "cosine", 2, 0.1) == pytest.approx(want, abs=1e-12), step
    for step, want in ((0, 0.5), (2, 1.0), (4, 0.775), (10, 0.1)):
        assert lr_factor(step, 10, "linear", 2, 0.1) == pytest.approx(want, abs=1e-12), step
    assert lr_factor(3, 10, "cosine", 0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)), abs=1e-12)
    assert [lr_factor(s, 10, "constant", 4, 0.5) for s in (0, 3, 4, 9)] == [0.25, 1.0, 1.0, 1.0]


def test_grad_accumulation_gives_the_gradient_of_the_mean_over_the_step(tmp_path):
    data = write_records(tmp_path / "d.jsonl", addition_records(24))
    trainer = SFTTrainer(tiny_config(tmp_path, data, grad_accum=2, batch_tokens=24))
    micro_batches = next(iter(trainer.loader))
    model = copy.deepcopy(trainer.model).train()
    trainer.train_step(micro_batches)
    # oracle: the mean of -log p over every response target of the step, each example alone
    examples = [e for mb in micro_batches for e in mb]
    nll, count = 0.0, 0
    for e in examples:
        ids, cu, max_len = model.pack([e.input_ids])
        nll = nll - model.token_logprobs(ids, cu, max_len, torch.tensor(e.labels))[0].double().sum()
        count += sum(label != IGNORE_INDEX for label in e.labels[1:])
    (nll / count).backward()
    grads = dict(model.named_parameters())
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-7, msg=name)


def test_grad_clip_clips_the_step_and_reports_the_norm_before(tmp_path):
    data = write_records(tmp_path / "d.jsonl", addition_records(16))
    norms = {}
    for clip in (0.0, 1e-3):
        trainer = SFTTrainer(tiny_config(tmp_path / str(clip), data, grad_clip=clip))
        reported = trainer.train_step(next(iter(trainer.loader)))["grad_norm"]
        actual = float(torch.stack([p.grad.double().norm() for p in trainer.trainable if p.grad is not None]).norm())
        norms[clip] = reported, actual
    unclipped, _ = norms[0.0]
    assert norms[0.0][1] == pytest.approx(unclipped, rel=1e-5) and unclipped > 1e-2
    assert norms[1e-3][0] == pytest.approx(unclipped, rel=1e-5)  # the norm before clipping
    assert norms[1e-3][1] == pytest.approx(1e-3, rel=1e-4)


def test_latest_checkpoint_and_rng_round_trip(tmp_path):
    for name, complete in (("checkpoint-9", True), ("checkpoint-10", True), ("checkpoint-12", False),
                           ("checkpoint-11.tmp", True)):
        os.makedirs(tmp_path / "runs" / name)
        if complete:
            (tmp_path / "runs" / name / ckpt.STATE_NAME).write_text("{}")
    assert ckpt.latest_checkpoint(str(tmp_path / "runs")) == str(tmp_path / "runs" / "checkpoint-10")
    assert ckpt.latest_checkpoint(str(tmp_path / "nowhere")) is None

    # every random generator of the process is saved and restored
    data = write_records(tmp_path / "d.jsonl", addition_records(8))
    trainer = SFTTrainer(tiny_config(tmp_path, data, max_steps=1))
    random.random(), np.random.rand(), torch.rand(2)  # move the generators off their seeds
    trainer.save_checkpoint()
    expected = random.random(), float(np.random.rand()), torch.rand(3).tolist()
    SFTTrainer(tiny_config(tmp_path, data, max_steps=1, resume="auto"))
    assert (random.random(), float(np.random.rand()), torch.rand(3).tolist()) == expected


def test_missing_checkpoint_and_failed_save_lose_nothing(tmp_path, monkeypatch):
    data = write_records(tmp_path / "d.jsonl", addition_records(8))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        SFTTrainer(tiny_config(tmp_path, data, max_steps=1, resume=str(tmp_path / "nowhere")))
    trainer = SFTTrainer(tiny_config(tmp_path, data, max_steps=1))
    trainer.train()
    good = trainer.checkpoint_dir()
    before = open(os.path.join(good, "model.safetensors"), "rb").read()
    trainer.step_batches = next(iter(trainer.loader))
    import moe_align.train.checkpoint as ckpt

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_model", broken)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(good)  # overwrite the same step's checkpoint, fails midway
    assert open(os.path.join(good, "model.safetensors"), "rb").read() == before


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch
    from moe_align.train.sft import SFTConfig, SFTTrainer
    data, out, accum = sys.argv[1], sys.argv[2], int(sys.argv[3])
    trainer = SFTTrainer(SFTConfig(model="tiny", data=data, output_dir=out, batch_tokens=48, max_seq_len=32,
                                   grad_accum=accum, lr=1e-3, grad_clip=0.0, progress=False))
    metrics = trainer.train_step(next(iter(trainer.loader)))
    if trainer.dist.rank == 0:
        torch.save({"grads": {n: p.grad for n, p in trainer.model.named_parameters()}, "metrics": metrics},
                   out + "/grads.pt")
""")


def test_two_processes_match_one_process(tmp_path):
    data = write_records(tmp_path / "d.jsonl", addition_records(30))
    script = tmp_path / "ddp_step.py"
    script.write_text(DDP_SCRIPT + TORCHRUN_EPILOGUE)
    env = cpu_subprocess_env()
    subprocess.run([sys.executable, str(script), data, str(tmp_path / "one"), "2"], check=True, env=env, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(script), data, str(tmp_path / "two"), "1"], check=True, env=env, timeout=300)
    one = torch.load(tmp_path / "one" / "grads.pt")
    two = torch.load(tmp_path / "two" / "grads.pt")
    assert one["metrics"]["num_tokens"] == two["metrics"]["num_tokens"]
    assert one["metrics"]["loss"] == pytest.approx(two["metrics"]["loss"], rel=1e-5)
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_resolve_device_gives_cuda_this_processes_index(monkeypatch):
    """torch.cuda.set_device and DDP need an index: "cuda" and "auto" mean cuda:LOCAL_RANK."""
    from moe_align.train.trainer import resolve_device

    assert resolve_device("cpu", 1) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", 1) == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cuda", 1) == torch.device("cuda", 1)
    assert resolve_device("auto", 1) == torch.device("cuda", 1)
    assert resolve_device("cuda:0", 1) == torch.device("cuda", 0)


def test_flags_override_the_config_file(tmp_path):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, SFTConfig)
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr": 0.5, "max_steps": 7, "progress": True}))
    config = config_from_args(SFTConfig, parser.parse_args(["--config", str(path), "--lr", "0.25", "--no-progress"]))
    assert (config.lr, config.max_steps, config.progress, config.batch_tokens) == (0.25, 7, False, 2048)
    path.write_text(json.dumps({"learning_rate": 0.5}))
    with pytest.raises(ValueError, match="unknown option"):
        config_from_args(SFTConfig, parser.parse_args(["--config", str(path)]))


def test_cli_help_and_a_short_run(tmp_path):
    out = subprocess.run([sys.executable, "-m", "moe_align", "sft", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--batch-tokens" in out.stdout and "--resume" in out.stdout
    data = write_records(tmp_path / "d.jsonl", addition_records(8))
    out = subprocess.run([sys.executable, "-m", "moe_align", "sft", "--model", "tiny", "--data", data,
                          "--max-steps", "2", "--batch-tokens", "64", "--output-dir", str(tmp_path / "cli"),
                          "--no-progress"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert os.path.isfile(tmp_path / "cli" / "checkpoint-2" / "model.safetensors")
    assert len(open(tmp_path / "cli" / "metrics.jsonl").readlines()) == 2
    out = subprocess.run([sys.executable, "-m", "moe_align", "nonsense"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown command" in out.stderr


def test_cli_under_torchrun_trains_data_parallel_and_exits_cleanly(tmp_path):
    """``torchrun ... -m moe_align sft``, the documented command with nothing appended: both
    ranks train (the global token count exceeds one rank's micro-batch) and the run exits 0
    through the interpreter's own teardown, after Trainer.close has left the process group."""
    data = write_records(tmp_path / "d.jsonl", addition_records(30))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "moe_align", "sft", "--model", "tiny", "--data", data, "--max-steps", "2",
                          "--batch-tokens", "64", "--max-seq-len", "32", "--output-dir", str(tmp_path / "cli"),
                          "--no-progress"], capture_output=True, text=True, env=cpu_subprocess_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert os.path.isfile(tmp_path / "cli" / "checkpoint-2" / "model.safetensors")
    records = [json.loads(line) for line in open(tmp_path / "cli" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["num_tokens"] > 64 for r in records)  # summed over the two ranks' micro-batches


CLOSE_SCRIPT = textwrap.dedent("""
    import sys, torch.distributed as dist
    from moe_align.train.sft import SFTConfig, SFTTrainer
    data, out, callers_group = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    if callers_group:
        dist.init_process_group("gloo")
    trainer = SFTTrainer(SFTConfig(model="tiny", data=data, output_dir=out, batch_tokens=48, max_seq_len=32,
                                   max_steps=1, progress=False))
    assert trainer.dist.world_size == 2 and trainer.dist.owns_group == (not callers_group)
    trainer.train()
    trainer.close()
    assert dist.is_initialized() == callers_group  # a group the caller made stays the caller's
    if not callers_group:
        trainer.close()  # a second call does nothing
""")


@pytest.mark.parametrize("callers_group", [False, True])
def test_close_leaves_only_the_group_the_trainer_created(tmp_path, callers_group):
    data = write_records(tmp_path / "d.jsonl", addition_records(30))
    script = tmp_path / "close.py"
    # the caller's group is the caller's to destroy: the epilogue does it
    script.write_text(CLOSE_SCRIPT + (TORCHRUN_EPILOGUE if callers_group else ""))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), data, str(tmp_path / "run"), str(int(callers_group))],
                         capture_output=True, text=True, env=cpu_subprocess_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


FSDP_SCRIPT = textwrap.dedent("""
    import sys, torch
    from moe_align.train.sft import SFTConfig, SFTTrainer
    data, out, accum, fsdp, steps, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", \\
        int(sys.argv[5]), sys.argv[6] if len(sys.argv) > 6 else ""
    trainer = SFTTrainer(SFTConfig(model="tiny", data=data, output_dir=out, batch_tokens=48, max_seq_len=32,
                                   grad_accum=accum, lr=1e-2, grad_clip=1.0, progress=False, fsdp=fsdp,
                                   max_steps=steps, resume=resume))
    trainer.train()
    state = trainer.model_state_dict()
    if trainer.dist.rank == 0:
        torch.save(state, out + "/final.pt")
""")


def test_fsdp_two_processes_train_and_resume_like_one_process(tmp_path):
    """FSDP2 (fully_shard per decoder layer, gloo): 2 steps, a sharded checkpoint (full tensors,
    gathered optimizer state), a resumed third step — the same weights as one process."""
    data = write_records(tmp_path / "d.jsonl", addition_records(30))
    script = tmp_path / "fsdp_run.py"
    script.write_text(FSDP_SCRIPT + TORCHRUN_EPILOGUE)
    env = cpu_subprocess_env()
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), data]
    subprocess.run([sys.executable, str(script), data, str(tmp_path / "one"), "2", "0", "3"], check=True, env=env,
                   timeout=300)
    subprocess.run(run + [str(tmp_path / "two"), "1", "1", "2"], check=True, env=env, timeout=300)
    subprocess.run(run + [str(tmp_path / "two"), "1", "1", "3", "auto"], check=True, env=env, timeout=300)
    one, two = torch.load(tmp_path / "one" / "final.pt"), torch.load(tmp_path / "two" / "final.pt")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)
    steps = [json.loads(x)["step"] for x in open(tmp_path / "two" / "metrics.jsonl")]
    assert steps == [1, 2, 3]


@requires_cuda
@pytest.mark.trainer_gpu
def test_sft_on_the_gpu_with_bf16_autocast(tmp_path):
    """device="auto" on a GPU machine: cuda:0, bf16 autocast; the loss falls and is finite."""
    data = write_records(tmp_path / "d.jsonl", addition_records(24))
    trainer = SFTTrainer(SFTConfig(model="tiny", data=data, output_dir=str(tmp_path / "run"), batch_tokens=64,
                                   max_seq_len=32, lr=1e-2, max_steps=12, progress=False))
    assert trainer.device == torch.device("cuda", 0) and trainer.autocast_dtype == torch.bfloat16
    trainer.train()
    log = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert all(torch.isfinite(torch.tensor(m["loss"])) and m["peak_mem_gb"] > 0 for m in log)
    assert log[-1]["loss"] < log[0]["loss"]
