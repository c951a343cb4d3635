"""Direct preference optimisation (DeepSeek LLM's chat alignment): sigmoid loss against a frozen
reference model, on pairs of chosen / rejected responses::

    u = beta ((log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x)))
    loss = mean over the pairs of the global batch of -log sigmoid(u)

Sequence log-probs are sums over the response tokens (fused log-prob op); each micro-batch packs
both responses of its pairs into one variable-length batch.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Sequence

import torch

from moe_align.ops.grpo import dpo_loss
from moe_align.train.data import (PackedBatch, PackedLoader, PreferencePair, check_lengths,
                                  encode_preference_record, load_preference_dataset)
from moe_align.train.trainer import TrainConfig, Trainer


@dataclasses.dataclass
class DPOConfig(TrainConfig):
    """DPO options (see :class:`TrainConfig`). ``data``: JSONL of {"prompt", "chosen", "rejected"}."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    lr: float = 5e-6
    ref_on_cpu: bool = False  # keep the frozen reference on the CPU between its forwards


def sequence_logprobs(logp: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Per-sequence sums ``[N]`` of packed per-token log-probs ``[T]`` (0 on ignored targets), as
    differences of a float64 prefix sum: deterministic on a GPU too (index_add's atomics are not)."""
    prefix = torch.nn.functional.pad(logp.double().cumsum(0), (1, 0))
    bounds = cu_seqlens.long()
    return (prefix[bounds[1:]] - prefix[bounds[:-1]]).to(logp.dtype)


class DPOTrainer(Trainer):
    """Sigmoid DPO against a frozen copy of the starting model."""

    name = "dpo"
    config_class = DPOConfig

    def setup_model(self) -> None:
        self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        if self.config.ref_on_cpu:
            self.reference.to("cpu")

    def build_loader(self) -> PackedLoader:
        config = self.config
        if config.data:
            pairs = load_preference_dataset(config.data, self.tokenizer, config.max_seq_len)
        else:
            pairs = [encode_preference_record(r, self.tokenizer, i) for i, r in enumerate(builtin_preference_records())]
            check_lengths([e for p in pairs for e in (p.chosen, p.rejected)], config.max_seq_len)
        return PackedLoader(pairs, config.batch_tokens, grad_accum=config.grad_accum,
                            world_size=self.dist.world_size, rank=self.dist.rank, seed=config.seed)

    @torch.no_grad()
    def reference_logprobs(self, batch: PackedBatch) -> torch.Tensor:
        if self.config.ref_on_cpu and self.device.type != "cpu":
            self.reference.to(self.device)
        with self.autocast():
            logp = self.reference.token_logprobs(batch.input_ids, batch.cu_seqlens, batch.max_seqlen, batch.labels)[0]
        if self.config.ref_on_cpu and self.device.type != "cpu":
            self.reference.to("cpu")
        return logp

    def count_units(self, micro_batch: Sequence[PreferencePair]) -> int:
        return len(micro_batch)

    def compute_loss(self, micro_batch: Sequence[PreferencePair], denominator: float) -> tuple[torch.Tensor, dict]:
        n = len(micro_batch)
        batch = PackedBatch.from_examples([p.chosen for p in micro_batch] + [p.rejected for p in micro_batch])
        batch = batch.to(self.device)
        policy = sequence_logprobs(self.token_logprobs(batch), batch.cu_seqlens)
        ref = sequence_logprobs(self.reference_logprobs(batch), batch.cu_seqlens)
        loss, metrics = dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], beta=self.config.beta,
                                 label_smoothing=self.config.label_smoothing)
        sums = {"loss": loss.detach() * n, "_count": n, "num_tokens": batch.input_ids.numel()}
        sums.update({k.replace("rewards/", "reward_"): v * n for k, v in metrics.items()})
        return loss * n / denominator, sums


def builtin_preference_records(n: int = 1000, seed: int = 0) -> list[dict]:
    """The demo's pairs: a correct step-by-step arithmetic answer over one with a wrong result."""
    from moe_align.train.tasks import ArithmeticTask

    records = []
    for r in ArithmeticTask().dataset(n, seed=seed, split="train"):
        wrong = str(int(r["answer"]) + (1 if len(records) % 2 else -1))
        rejected = r["response"][: len(r["response"]) - len(r["answer"])] + wrong
        records.append({"prompt": r["prompt"], "chosen": r["response"], "rejected": rejected})
    return records
