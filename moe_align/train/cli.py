"""``moe-align <command> [options]`` (also ``python -m moe_align``).

Commands: sft, dpo, esft, rm, grpo (trainers; ``--help`` lists each one's options) and demo (the
SFT -> GRPO arithmetic demo). With no options a trainer runs on its built-in data with a small
preset; under ``torchrun --nproc_per_node=N`` it trains data-parallel.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

TRAINERS = {
    "sft": ("moe_align.train.sft", "SFTTrainer", "supervised fine-tuning on prompt/response or chat JSONL"),
    "dpo": ("moe_align.train.dpo", "DPOTrainer", "direct preference optimisation on chosen/rejected pairs"),
    "esft": ("moe_align.train.esft", "ESFTTrainer", "expert-specialised fine-tuning (only task-relevant experts)"),
    "rm": ("moe_align.train.rm", "RewardModelTrainer", "train a reward model (point-wise or pair-wise loss)"),
    "grpo": ("moe_align.train.grpo", "GRPOTrainer", "GRPO with rollouts and weighted rewards"),
}


def _trainer_class(command: str) -> type:
    module, name, _ = TRAINERS[command]
    return getattr(importlib.import_module(module), name)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = [*TRAINERS, "demo"]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        parser = argparse.ArgumentParser(prog="moe-align", description=__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        sub = parser.add_subparsers(dest="command", metavar="command")
        for command, (_, _, help_text) in TRAINERS.items():
            sub.add_parser(command, help=help_text)
        sub.add_parser("demo", help="SFT then GRPO on built-in arithmetic, evaluated on held-out problems")
        if not argv or argv[0] in ("-h", "--help"):
            parser.print_help()
            return 0 if argv else 2
        parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(commands)}")
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from moe_align.train.demo import main as demo_main

        return demo_main(rest)

    from moe_align.train.trainer import add_config_arguments, config_from_args

    trainer_class = _trainer_class(command)
    parser = argparse.ArgumentParser(prog=f"moe-align {command}", description=trainer_class.__doc__)
    add_config_arguments(parser, trainer_class.config_class)
    args = parser.parse_args(rest)
    trainer = trainer_class(config_from_args(trainer_class.config_class, args))
    metrics = trainer.train()
    if trainer.dist.is_main:
        print(f"{command}: {trainer.step} steps; last " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        print(f"checkpoint: {trainer.checkpoint_dir()}  metrics: {trainer.output_dir}/metrics.jsonl")
    trainer.close()  # after a failure torchrun stops the other ranks: no barrier to wait at then
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
