"""The demo end to end at toy length, and its held-out accuracy against a hand-made case."""

import json
import os

import torch

from moe_align.train.demo import DemoConfig, heldout_accuracy, run
from moe_align.train.tasks import ArithmeticTask
from moe_align.train.tokenizer import CharTokenizer


class ScriptedModel(torch.nn.Module):
    """generate() answers from a fixed table: right for some prompts, wrong or malformed for others."""

    def __init__(self, tokenizer, answers):
        super().__init__()
        self.tokenizer, self.answers = tokenizer, answers

    def generate(self, prompts, max_new_tokens, temperature=0.0, stop_tokens=()):
        assert temperature == 0.0
        texts = [self.answers[self.tokenizer.decode(p)] for p in prompts]
        return [self.tokenizer.encode(t)[:max_new_tokens] + [self.tokenizer.eos_id] for t in texts]


def test_heldout_accuracy_counts_exact_answers():
    tok, task = CharTokenizer(), ArithmeticTask(max_digits=2)
    records = [task.example(12, "+", 30), task.example(45, "-", 7), task.example(9, "+", 9), task.example(50, "-", 50)]
    answers = {records[0]["prompt"]: records[0]["response"],  # right
               records[1]["prompt"]: records[1]["response"][:-1] + "9",  # wrong final digit
               records[2]["prompt"]: records[2]["response"],  # right
               records[3]["prompt"]: "no idea"}  # no answer marker
    assert heldout_accuracy(ScriptedModel(tok, answers), tok, task, records, 40, batch=3) == 0.5


def test_demo_writes_its_outputs(tmp_path):
    out = str(tmp_path / "demo")
    summary = run(DemoConfig(output_dir=out, sft_steps=6, grpo_steps=2, eval_every=1, eval_problems=6,
                             train_problems=60, group_size=2, prompts_per_step=2, progress=False))
    for name in ("train.jsonl", "heldout.jsonl", "summary.json", "summary.md", "demo.png",
                 "sft/metrics.jsonl", "grpo/metrics.jsonl", "grpo/checkpoint-2/model.safetensors"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert summary == json.load(open(os.path.join(out, "summary.json")))
    assert 0.0 <= summary["sft"]["heldout_accuracy"] <= 1.0 and summary["heldout_problems"] == 6
    grpo_steps = [json.loads(line) for line in open(os.path.join(out, "grpo", "metrics.jsonl"))]
    assert [r["step"] for r in grpo_steps] == [1, 2] and all("eval/accuracy" in r for r in grpo_steps)
    train = {json.loads(line)["prompt"] for line in open(os.path.join(out, "train.jsonl"))}
    heldout = {json.loads(line)["prompt"] for line in open(os.path.join(out, "heldout.jsonl"))}
    assert not train & heldout
