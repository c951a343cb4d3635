"""Supervised fine-tuning (DeepSeekMoE alignment, DeepSeek-V2 section 4.1).

Next-token cross-entropy on the response tokens only, over densely packed examples, through the
fused log-prob op (no ``[T, V]`` logits)::

    loss = - sum_{response tokens t of the global batch} log p(x_t | x_<t) / (number of those tokens)

Defaults follow the seed: AdamW at a constant learning rate of 1e-5, no dropout.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from moe_align.train.data import (Example, PackedBatch, PackedLoader, check_lengths, encode_sft_record,
                                  load_sft_dataset)
from moe_align.train.trainer import TrainConfig, Trainer


@dataclasses.dataclass
class SFTConfig(TrainConfig):
    """SFT options (see :class:`TrainConfig`). ``data``: JSONL of prompt/response or messages."""


class SFTTrainer(Trainer):
    """Response-only cross-entropy on packed prompt/response examples."""

    name = "sft"
    config_class = SFTConfig

    def examples(self) -> list[Example]:
        """The encoded dataset (``--data``, or the built-in arithmetic task), read once."""
        if getattr(self, "_examples", None) is None:
            config = self.config
            if config.data:
                self._examples = load_sft_dataset(config.data, self.tokenizer, config.max_seq_len)
            else:
                self._examples = [encode_sft_record(r, self.tokenizer, i) for i, r in enumerate(builtin_sft_records())]
                check_lengths(self._examples, config.max_seq_len)
        return self._examples

    def build_loader(self) -> PackedLoader:
        config = self.config
        return PackedLoader(self.examples(), config.batch_tokens, grad_accum=config.grad_accum,
                            world_size=self.dist.world_size, rank=self.dist.rank, seed=config.seed)

    def count_units(self, micro_batch: Sequence[Example]) -> int:
        return sum(example.num_targets for example in micro_batch)

    def compute_loss(self, micro_batch: Sequence[Example], denominator: float) -> tuple[torch.Tensor, dict]:
        batch = PackedBatch.from_examples(micro_batch).to(self.device)
        logp = self.token_logprobs(batch)
        nll = -logp.sum()
        metrics = {"loss": nll.detach(), "_count": batch.num_targets, "num_tokens": batch.input_ids.numel()}
        return nll / denominator, metrics


def builtin_sft_records(n: int = 2000, seed: int = 0) -> list[dict]:
    """The demo's data: step-by-step arithmetic problems (:class:`~moe_align.train.tasks.ArithmeticTask`)."""
    from moe_align.train.tasks import ArithmeticTask

    return ArithmeticTask().dataset(n, seed=seed, split="train")
