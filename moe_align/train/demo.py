"""``moe-align demo``: SFT then GRPO on built-in arithmetic, the README's main job.

1. Data: step-by-step addition / subtraction problems (:class:`~moe_align.train.tasks.ArithmeticTask`),
   a training split for SFT and GRPO and a held-out split for evaluation (disjoint problems).
2. SFT on the ``small`` preset from scratch, long enough for a partly competent model.
3. GRPO from the SFT checkpoint with the exact-answer and format rewards (eq. 36 weights).
4. Greedy exact-match accuracy on the held-out problems after each stage (and every
   ``eval_every`` GRPO steps), a plot of loss, reward, KL and accuracy against steps
   (``demo.png``), ``summary.md`` / ``summary.json``, and the final checkpoint.

On a CPU-only machine the defaults finish in a few minutes on 2 cores; on a GPU it uses the GPU,
and ``--preset medium`` (or larger, with more steps) scales the same recipe up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Any, Sequence

import torch

from moe_align.train.grpo import GRPOConfig, GRPOTrainer
from moe_align.train.sft import SFTConfig, SFTTrainer
from moe_align.train.tasks import ArithmeticTask
from moe_align.train.trainer import add_config_arguments, config_from_args


@dataclasses.dataclass
class DemoConfig:
    """Options of ``moe-align demo`` (each also a flag)."""

    output_dir: str = "runs/demo"
    preset: str = "small"
    device: str = "auto"
    seed: int = 0
    max_digits: int = 2  # operands of 1 .. max_digits digits
    train_problems: int = 4000
    eval_problems: int = 400  # held-out problems for the accuracy after each stage
    # SFT stops at a partly competent model, leaving GRPO something to fix (at lr 3e-3 the
    # accuracy after SFT ranged 0.1-0.7 over seeds; see benchmarks/results/demo_cpu.md)
    sft_steps: int = 500
    sft_lr: float = 1e-3
    sft_batch_tokens: int = 1024
    grpo_steps: int = 120
    grpo_lr: float = 2e-5
    group_size: int = 8
    prompts_per_step: int = 16
    temperature: float = 1.0
    beta: float = 0.04
    num_iterations: int = 2
    rewards: dict = dataclasses.field(default_factory=lambda: {"exact_answer": 1.0, "format": 0.1})
    eval_every: int = 10  # held-out accuracy during GRPO every N steps (0: only at the end)
    progress: bool = True


def write_data(config: DemoConfig, task: ArithmeticTask) -> dict[str, str]:
    os.makedirs(config.output_dir, exist_ok=True)
    paths = {name: os.path.join(config.output_dir, f"{name}.jsonl") for name in ("train", "heldout")}
    task.write_jsonl(paths["train"], task.dataset(config.train_problems, seed=config.seed, split="train"))
    task.write_jsonl(paths["heldout"], task.dataset(config.eval_problems, seed=config.seed + 1, split="test"))
    return paths


@torch.no_grad()
def heldout_accuracy(model, tokenizer, task: ArithmeticTask, records: Sequence[dict], max_new_tokens: int,
                     batch: int = 100) -> float:
    """Greedy exact-match accuracy (``task.is_correct``) of ``model`` on ``records``."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(records), batch):
        chunk = records[start:start + batch]
        prompts = [[tokenizer.bos_id] + tokenizer.encode(r["prompt"]) for r in chunk]
        outputs = model.generate(prompts, max_new_tokens, temperature=0.0, stop_tokens=[tokenizer.eos_id])
        correct += sum(task.is_correct(tokenizer.decode(o), r["answer"]) for o, r in zip(outputs, chunk))
    model.train(was_training)
    return correct / max(len(records), 1)


def read_metrics(path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(path: str, sft: list[dict], grpo: list[dict], accuracy: list[tuple[int, float]], sft_steps: int) -> bool:
    """Loss (SFT), reward and KL (GRPO) and held-out accuracy against the global step; False
    when matplotlib is missing (``pip install 'moe_align[demo]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    series = [
        (axes[0, 0], "SFT loss", [(r["step"], r.get("loss")) for r in sft]),
        (axes[0, 1], "GRPO reward (mean over samples)", [(sft_steps + r["step"], r.get("reward")) for r in grpo]),
        (axes[1, 0], "GRPO KL to the SFT model", [(sft_steps + r["step"], r.get("kl")) for r in grpo]),
        (axes[1, 1], "held-out greedy accuracy", accuracy),
    ]
    for ax, title, points in series:
        points = [(x, y) for x, y in points if y is not None]
        if points:
            ax.plot(*zip(*points), marker="o" if len(points) < 30 else None)
        ax.axvline(sft_steps, color="grey", linestyle=":", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("step (SFT, then GRPO)")
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def run(config: DemoConfig) -> dict[str, Any]:
    """Run the demo; returns the summary (also written to ``summary.json``)."""
    start = time.perf_counter()
    task = ArithmeticTask(max_digits=config.max_digits)
    paths = write_data(config, task)
    heldout = [json.loads(line) for line in open(paths["heldout"])]
    max_new_tokens = task.max_response_chars + 2  # the response and its eos
    max_seq_len = task.max_prompt_chars + max_new_tokens + 2
    common = dict(device=config.device, seed=config.seed, progress=config.progress, max_seq_len=max_seq_len)

    sft = SFTTrainer(SFTConfig(model=config.preset, data=paths["train"],
                               output_dir=os.path.join(config.output_dir, "sft"), lr=config.sft_lr,
                               max_steps=config.sft_steps, batch_tokens=config.sft_batch_tokens,
                               schedule="cosine", warmup_steps=min(50, config.sft_steps // 10), min_lr_ratio=0.1,
                               **common))
    sft_time = time.perf_counter()
    sft.train()
    sft_time = time.perf_counter() - sft_time
    tokenizer = sft.tokenizer
    accuracy = [(config.sft_steps, heldout_accuracy(sft.model, tokenizer, task, heldout, max_new_tokens))]
    sft_accuracy = accuracy[0][1]
    print(f"SFT: {config.sft_steps} steps in {sft_time:.0f}s, held-out accuracy {sft_accuracy:.3f}")

    grpo = GRPOTrainer(GRPOConfig(model=sft.checkpoint_dir(), data=paths["train"], eval_data=paths["heldout"],
                                  eval_prompts=config.eval_problems, eval_every=config.eval_every,
                                  output_dir=os.path.join(config.output_dir, "grpo"), lr=config.grpo_lr,
                                  max_steps=config.grpo_steps, group_size=config.group_size,
                                  prompts_per_step=config.prompts_per_step, max_new_tokens=max_new_tokens,
                                  temperature=config.temperature, beta=config.beta,
                                  num_iterations=config.num_iterations, rewards=dict(config.rewards), **common))
    grpo_time = time.perf_counter()
    grpo.train()
    grpo_time = time.perf_counter() - grpo_time
    grpo_accuracy = heldout_accuracy(grpo.model, tokenizer, task, heldout, max_new_tokens)
    print(f"GRPO: {config.grpo_steps} steps in {grpo_time:.0f}s, held-out accuracy {grpo_accuracy:.3f}")

    sft_metrics = read_metrics(os.path.join(config.output_dir, "sft", "metrics.jsonl"))
    grpo_metrics = read_metrics(os.path.join(config.output_dir, "grpo", "metrics.jsonl"))
    accuracy += [(config.sft_steps + r["step"], r["eval/accuracy"]) for r in grpo_metrics if "eval/accuracy" in r]
    accuracy.append((config.sft_steps + config.grpo_steps, grpo_accuracy))
    plotted = plot(os.path.join(config.output_dir, "demo.png"), sft_metrics, grpo_metrics, sorted(set(accuracy)),
                   config.sft_steps)
    last = grpo_metrics[-1] if grpo_metrics else {}
    summary = {
        "config": dataclasses.asdict(config),
        "sft": {"steps": config.sft_steps, "seconds": round(sft_time, 1), "final_loss": sft_metrics[-1]["loss"],
                "heldout_accuracy": sft_accuracy},
        "grpo": {"steps": config.grpo_steps, "seconds": round(grpo_time, 1), "heldout_accuracy": grpo_accuracy,
                 "final_reward": last.get("reward"), "final_kl": last.get("kl")},
        "heldout_problems": len(heldout),
        "checkpoint": grpo.checkpoint_dir(),
        "plot": os.path.join(config.output_dir, "demo.png") if plotted else None,
        "seconds": round(time.perf_counter() - start, 1),
    }
    with open(os.path.join(config.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    table = summary_table(summary)
    with open(os.path.join(config.output_dir, "summary.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    if not plotted:
        print("(no plot: pip install matplotlib, or 'moe_align[demo]')")
    return summary


def summary_table(summary: dict[str, Any]) -> str:
    s, g = summary["sft"], summary["grpo"]
    rows = [
        "| stage | steps | seconds | held-out accuracy |",
        "| --- | ---: | ---: | ---: |",
        f"| SFT (from scratch) | {s['steps']} | {s['seconds']:.0f} | {s['heldout_accuracy']:.3f} |",
        f"| + GRPO | {g['steps']} | {g['seconds']:.0f} | {g['heldout_accuracy']:.3f} |",
    ]
    return "\n".join(rows) + (f"\n\n{summary['heldout_problems']} held-out problems, greedy decoding, exact match; "
                              f"total {summary['seconds']:.0f} s; checkpoint {summary['checkpoint']}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-align demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, DemoConfig)
    run(config_from_args(DemoConfig, parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
