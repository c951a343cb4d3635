"""Group Relative Policy Optimization (DeepSeek-V2 section 4.2; DeepSeekMath).

One step of the trainer (one step of the base :meth:`Trainer.train` loop, one learning-rate
schedule step) is one batch of rollouts::

    1. rollout     for each of this rank's prompts q, sample G outputs o_1..o_G from pi_old
                   (the current policy) with the rollout engine (paged-cache generation)
    2. rewards     r_i = sum_k c_k RM_k(q, o_i)                         (eq. 36, RewardMix)
    3. advantages  A_i = (r_i - mean(r_group)) / std(r_group)           (eq. 34)
    4. old logps   log pi_old(o_it), a no-grad forward right after generation (+ entropy)
    5. ref logps   log pi_ref(o_it) from the frozen starting model (if beta > 0)
    6. update      num_iterations x minibatches optimizer steps on
                   -1/G sum_i 1/|o_i| sum_t [min(r_it A_i, clip(r_it, 1-eps_low, 1+eps_high) A_i)
                                             - beta KL_k3(pi || pi_ref)]    (eq. 32-33)
                   with r_it = pi(o_it) / pi_old(o_it), via moe_align.ops.grpo.grpo_loss

Data parallelism: ``prompts_per_step`` counts prompts over all ranks; each rank samples its own
share and keeps the G outputs of a prompt (its group, hence its advantages) on itself. Each
optimizer step's loss is normalised over the whole global minibatch (sequences, or tokens for
the token-level losses; see :func:`grpo_step_loss`), so N processes take the same step as one
process would on the union of their rollouts.

Two-stage schedules (DeepSeek-V2's reasoning alignment, then preference alignment): ``stages``
is a list of ``{"name", "steps", "rewards"}``, each with its own reward mix and step count; the
stage of a step follows from the step number, so a resumed run continues in the right stage.

Exact resume: the sampling generator is reseeded at each step from ``(seed, rank, step)`` (so
no generator state needs saving), the prompt loader's position is checkpointed, the stage
follows from the step, and the reference model is the starting model (rebuilt from ``--model``
and checked against a fingerprint saved in the checkpoint).

Reward errors follow ``reward_on_error`` (RewardMix's ``on_error``): "raise" stops the run with
the function and sample named; "zero" scores the sample 0; "skip" drops it (it is left out of
its group's advantage statistics and its completion mask is zeroed). Errors are counted in the
metrics and written to ``reward_errors.jsonl``.

Log-probs in the loss are those of the policy itself (temperature 1), as in eq. 32; the sampling
temperature and top-p only shape exploration.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import time
from typing import Any, Sequence

import torch

from moe_align.modules.moe import update_correction_biases_
from moe_align.ops.grpo import LOSS_AGGREGATIONS, group_advantages, grpo_loss
from moe_align.ops.logprobs import linear_logprobs
from moe_align.train.data import (IGNORE_INDEX, DatasetError, Example, PackedBatch, ResumableLoader,
                                  load_prompt_dataset)
from moe_align.train.rewards import ON_ERROR, RewardError, RewardMix, RewardResult
from moe_align.train.rollout import FINISH_STOP, PolicyRolloutEngine, Rollout, RolloutEngine
from moe_align.train.trainer import TrainConfig, Trainer

BUILTIN_PROMPTS = 400  # problems of the built-in arithmetic task's train split: one epoch is 50 steps of 8


@dataclasses.dataclass
class GRPOConfig(TrainConfig):
    """GRPO options (see :class:`TrainConfig`). ``data``: JSONL of ``{"prompt", ...}``; the other
    fields (e.g. ``"answer"``) reach the reward functions as columns. Default: the built-in
    arithmetic task. ``batch_tokens`` bounds the packed micro-batches of the forward passes;
    ``grad_accum`` is not used (``minibatches`` splits a rollout batch into optimizer steps)."""

    lr: float = 1e-6  # DeepSeekMath's GRPO policy learning rate (the V2 seed gives none)
    group_size: int = 8  # G: outputs sampled per prompt
    prompts_per_step: int = 8  # prompts per step over all ranks (a multiple of the world size)
    max_new_tokens: int = 64
    temperature: float = 1.0  # sampling temperature (> 0)
    top_p: float = 1.0
    stop_strings: list = dataclasses.field(default_factory=list)  # e.g. ["\n"]; eos always stops
    beta: float = 0.04  # KL coefficient (eq. 32); 0: no reference model
    unbiased_kl: bool = False  # weight eq. 33's k3 by the ratio (DeepSeek-V3.2; TRL's use_bias_correction_kl)
    eps_low: float = 0.2  # clip range [1 - eps_low, 1 + eps_high]
    eps_high: float = 0.2
    num_iterations: int = 1  # mu: passes over each batch of rollouts (TRL's name)
    minibatches: int = 1  # optimizer steps per pass (the rank's rollouts split in order)
    loss_type: str = "sequence-mean"  # sequence-mean (eq. 32) | token-mean | global-token-mean | dr-grpo
    scale_rewards: bool = True  # divide by the group std (eq. 34); False: Dr. GRPO's A = r - mean
    rewards: dict = dataclasses.field(default_factory=lambda: {"exact_answer": 1.0, "format": 0.2})  # eq. 36
    stages: list = dataclasses.field(default_factory=list)  # [{"name", "steps", "rewards"}, ...]
    reward_on_error: str = "raise"  # raise | zero | skip (drop the sample from the update)
    main_reward: str = ""  # the reward behind "accuracy" (default exact_answer if used, else the first)
    tis_cap: float = 2.0  # truncated importance weight cap, when the engine reports sampler log-probs
    ref_on_cpu: bool = False  # keep the reference on the CPU except during its forward
    optimizer_on_cpu: bool = False  # keep the AdamW state on the CPU except during the update
    log_entropy: bool = True  # token entropy of the sampling policy (from the old-logp forward)
    log_completions: int = 0  # write this many samples per step to completions.jsonl
    eval_every: int = 0  # greedy evaluation every N steps (0: never)
    eval_prompts: int = 64  # problems of the evaluation set
    eval_data: str = ""  # JSONL of prompts to evaluate on (default: the arithmetic task's test split)


@dataclasses.dataclass(frozen=True)
class Stage:
    """A phase of training with its own reward mix (``steps == 0``: until the end)."""

    name: str
    steps: int
    rewards: dict


def parse_stages(config: GRPOConfig) -> list[Stage]:
    """``config.stages`` (or one stage with ``config.rewards``), checked."""
    if not isinstance(config.rewards, dict) or not config.rewards:
        raise ValueError(f"rewards must be a non-empty JSON object name -> coefficient, got {config.rewards!r}")
    if not config.stages:
        return [Stage("grpo", 0, dict(config.rewards))]
    if not isinstance(config.stages, list):
        raise ValueError(f"stages must be a JSON list of {{'name', 'steps', 'rewards'}}, got {config.stages!r}")
    stages = []
    for i, spec in enumerate(config.stages):
        if not isinstance(spec, dict) or set(spec) - {"name", "steps", "rewards"}:
            raise ValueError(f"stages[{i}] must be an object with keys name, steps, rewards; got {spec!r}")
        steps = spec.get("steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"stages[{i}].steps must be a positive int, got {steps!r}")
        rewards = spec.get("rewards", config.rewards)
        if not isinstance(rewards, dict) or not rewards:
            raise ValueError(f"stages[{i}].rewards must be a non-empty object name -> coefficient, got {rewards!r}")
        stages.append(Stage(str(spec.get("name", f"stage{i}")), steps, dict(rewards)))
    return stages


# ---- prompts ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class PromptItem:
    """A prompt record (``"prompt"`` and reward columns) and its tokens ``[bos] + encode(prompt)``."""

    record: dict
    prompt_ids: list[int]


class PromptLoader(ResumableLoader):
    """Epochs of prompts, ``prompts_per_step`` per step over all ranks (:class:`ResumableLoader`).

    Each epoch shuffles the prompts with ``seed + epoch`` and cuts them into steps; rank ``r`` gets
    prompts ``r, r + world_size, ...`` of a step. An epoch's prompts beyond a whole number of steps
    are dropped.
    """

    def __init__(self, items: Sequence[PromptItem], prompts_per_step: int, *, world_size: int = 1, rank: int = 0,
                 seed: int = 0) -> None:
        super().__init__(world_size=world_size, rank=rank, seed=seed)
        if isinstance(prompts_per_step, bool) or not isinstance(prompts_per_step, int) or prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be a positive int, got {prompts_per_step!r}")
        if prompts_per_step % world_size:
            raise ValueError(f"prompts_per_step={prompts_per_step} must be a multiple of the {world_size} processes")
        if len(items) < prompts_per_step:
            raise DatasetError(f"the dataset has {len(items)} prompts, fewer than prompts_per_step={prompts_per_step}")
        self.items = items
        self.prompts_per_step = prompts_per_step

    def epoch_steps(self, epoch: int) -> list[list[int]]:
        order = list(range(len(self.items)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        n = self.prompts_per_step
        return [order[i * n:(i + 1) * n] for i in range(len(order) // n)]

    def take(self, indices: list[int]) -> list[PromptItem]:
        return [self.items[i] for i in indices]


def builtin_prompt_records(n: int = BUILTIN_PROMPTS, seed: int = 1, split: str = "train") -> list[dict]:
    """Problems of the built-in arithmetic task (:class:`~moe_align.train.tasks.ArithmeticTask`):
    ``{"prompt", "response", "answer"}``."""
    from moe_align.train.tasks import ArithmeticTask

    return ArithmeticTask().dataset(n, seed=seed, split=split)


def encode_prompts(records: Sequence[dict], tokenizer, max_prompt_len: int) -> list[PromptItem]:
    """``[bos] + encode(prompt)`` (as SFT encodes a prompt); each must fit ``max_prompt_len``."""
    items = []
    for i, record in enumerate(records):
        ids = [tokenizer.bos_id] + tokenizer.encode(record["prompt"])
        if len(ids) > max_prompt_len:
            raise DatasetError(f"{record.get('_source', f'record {i}')}: the prompt has {len(ids)} tokens; with "
                               f"max_new_tokens it must fit max_seq_len (at most {max_prompt_len} prompt tokens)")
        items.append(PromptItem(record, ids))
    return items


def reward_columns(records: Sequence[dict], repeat: int) -> dict[str, list]:
    """The records' fields other than ``"prompt"`` (and ``"_..."``) as columns, each record
    repeated ``repeat`` times (None where a record lacks a field)."""
    keys = sorted({k for r in records for k in r if k != "prompt" and not k.startswith("_")})
    return {k: [r.get(k) for r in records for _ in range(repeat)] for k in keys}


# ---- the objective ----------------------------------------------------------------------------------


def masked_group_advantages(rewards: torch.Tensor, valid: torch.Tensor, group_size: int,
                            scale: bool = True) -> torch.Tensor:
    """Eq. 34 within each group of ``group_size`` consecutive outputs, over its valid outputs only
    (:func:`moe_align.ops.grpo.group_advantages`); invalid outputs get 0. float32 ``[B]``."""
    if bool(valid.all()):
        return group_advantages(rewards, group_size, scale=scale)
    out = torch.zeros(rewards.shape[0], dtype=torch.float32, device=rewards.device)
    for start in range(0, rewards.shape[0], group_size):
        keep = valid[start:start + group_size].nonzero().squeeze(1) + start
        if keep.numel():
            out[keep] = group_advantages(rewards[keep], keep.numel(), scale=scale)
    return out


def completion_logps(logp: torch.Tensor, cu_seqlens: torch.Tensor, prompt_lens: Sequence[int],
                     completion_lens: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed next-token log-probs ``[T]`` -> the completions' ``[B, L]`` (``L`` the longest
    completion) and their mask. Completion token ``j`` of sequence ``b`` is predicted at packed
    position ``cu_seqlens[b] + prompt_lens[b] - 1 + j``."""
    device = logp.device
    plen = torch.tensor(prompt_lens, dtype=torch.long, device=device)
    clen = torch.tensor(completion_lens, dtype=torch.long, device=device)
    width = max(completion_lens, default=0)
    offsets = torch.arange(width, device=device)
    mask = offsets.unsqueeze(0) < clen.unsqueeze(1)
    index = cu_seqlens[:-1].long().unsqueeze(1) + plen.unsqueeze(1) - 1 + offsets.unsqueeze(0)
    index = torch.where(mask, index, torch.zeros_like(index))
    return torch.where(mask, logp[index], 0.0), mask


def grpo_step_loss(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
                   ref_logp: torch.Tensor | None, *, num_sequences: float, num_tokens: float, world_size: int = 1,
                   eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.04, loss_type: str = "sequence-mean",
                   max_len: int | None = None, sampler_logp: torch.Tensor | None = None, tis_cap: float = 2.0,
                   unbiased_kl: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A micro-batch's share of one optimizer step's GRPO loss (eq. 32-33, to minimise).

    ``num_sequences`` (valid outputs) and ``num_tokens`` (their completion tokens) count the whole
    global minibatch of the optimizer step, all micro-batches of all ranks. The returned losses,
    summed over the micro-batches of a rank and averaged over ranks (DDP), give::

        sequence-mean      1/N_seq sum_i 1/|o_i| sum_t l_it          (eq. 32)
        token-mean,
        global-token-mean  1/N_tok sum_i sum_t l_it
        dr-grpo            1/(N_seq max_len) sum_i sum_t l_it

    with ``l_it`` the per-token loss of :func:`moe_align.ops.grpo.grpo_loss`. Rows with an all-zero
    mask (skipped outputs) add nothing. Returns ``(loss, grpo_loss metrics)``.
    """
    rows = logp.shape[0]
    common = dict(old_logp=old_logp, ref_logp=ref_logp, eps_low=eps_low, eps_high=eps_high, beta=beta,
                  sampler_logp=sampler_logp, tis_cap=tis_cap, unbiased_kl=unbiased_kl)
    if loss_type in ("token-mean", "global-token-mean"):
        return grpo_loss(logp, advantages, mask, loss_type="global-token-mean", num_global_tokens=num_tokens,
                         world_size=world_size, **common)
    if loss_type not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss_type={loss_type!r} must be one of {LOSS_AGGREGATIONS}")
    # grpo_loss divides by the rows of this micro-batch; rescale to the global count
    loss, metrics = grpo_loss(logp, advantages, mask, loss_type=loss_type, max_len=max_len, **common)
    return loss * (rows * world_size / max(num_sequences, 1.0)), metrics


# ---- the rollouts of a step ---------------------------------------------------------------------------


@dataclasses.dataclass
class RolloutBatch:
    """This rank's rollouts of a step, ready for the forward passes (``B`` outputs, completions
    padded to ``L``; tensors on the training device)."""

    examples: list[Example]  # [bos] + prompt + completion, labels on the completion
    prompt_lens: list[int]
    completion_lens: list[int]
    advantages: torch.Tensor  # [B]
    valid: torch.Tensor  # [B] bool (False: dropped by reward_on_error="skip")
    mask: torch.Tensor  # [B, L] float, completion tokens of valid outputs
    old_logp: torch.Tensor  # [B, L]
    ref_logp: torch.Tensor | None = None  # [B, L]
    sampler_logp: torch.Tensor | None = None  # [B, L], when the engine reports its log-probs
    entropy: torch.Tensor | None = None  # [B, L]


class GRPOTrainer(Trainer):
    """GRPO with rollouts from the policy, weighted rewards (eq. 36) and a frozen reference.

    Args (besides :class:`Trainer`'s):
        rollout_engine: a :class:`~moe_align.train.rollout.RolloutEngine`; default
            :class:`~moe_align.train.rollout.PolicyRolloutEngine` on the policy itself.
    """

    name = "grpo"
    config_class = GRPOConfig

    def __init__(self, config: GRPOConfig, model=None, tokenizer=None, *,
                 rollout_engine: RolloutEngine | None = None) -> None:
        check_grpo_config(config)
        self.stages = parse_stages(config)
        self.reward_mixes = [RewardMix(stage.rewards, on_error=config.reward_on_error) for stage in self.stages]
        for stage, mix in zip(self.stages, self.reward_mixes):
            if config.main_reward and config.main_reward not in mix.names:
                raise ValueError(f"main_reward={config.main_reward!r} is not a reward of stage {stage.name!r} "
                                 f"({mix.names})")
        self._engine = rollout_engine
        self.last_samples: list[dict] = []  # this rank's samples of the last step
        super().__init__(config, model, tokenizer)

    # ---- setup -----------------------------------------------------------------------------------

    def setup_model(self) -> None:
        config = self.config
        self.reference = None
        if config.beta > 0:
            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
            if config.ref_on_cpu:
                self.reference.to("cpu")
        self.reference_fingerprint = model_fingerprint(self.reference) if self.reference is not None else None
        self.engine = self._engine if self._engine is not None else PolicyRolloutEngine(self.model, self.tokenizer)
        self.sampling_generator = torch.Generator(device=self.device)
        self.eval_items = self._eval_items()

    def build_loader(self) -> PromptLoader:
        config = self.config
        records = load_prompt_dataset(config.data) if config.data else builtin_prompt_records()
        items = encode_prompts(records, self.tokenizer, config.max_seq_len - config.max_new_tokens)
        loader = PromptLoader(items, config.prompts_per_step, world_size=self.dist.world_size, rank=self.dist.rank,
                              seed=config.seed)
        local = config.prompts_per_step // self.dist.world_size * config.group_size
        if config.minibatches > local:
            raise ValueError(f"minibatches={config.minibatches} is more than the {local} outputs each process "
                             f"samples per step")
        return loader

    def compute_total_steps(self) -> int:
        if self.stages[0].steps == 0:  # no stages: max_steps or epochs
            return super().compute_total_steps()
        total = sum(stage.steps for stage in self.stages)
        if self.config.max_steps > total:
            raise ValueError(f"max_steps={self.config.max_steps} is more than the stages' {total} steps")
        return self.config.max_steps or total

    def stage_index(self, step: int) -> int:
        """The stage of (0-based) step ``step``."""
        end = 0
        for i, stage in enumerate(self.stages):
            end += stage.steps
            if stage.steps == 0 or step < end:
                return i
        return len(self.stages) - 1

    def _eval_items(self) -> list[PromptItem]:
        config = self.config
        if not config.eval_every:
            return []
        if config.eval_data:
            records = load_prompt_dataset(config.eval_data)[: config.eval_prompts]
        elif config.data:
            raise ValueError("eval_every needs eval_data when data is set")
        else:
            records = builtin_prompt_records(config.eval_prompts, seed=0, split="test")
        return encode_prompts(records, self.tokenizer, config.max_seq_len - config.max_new_tokens)

    # ---- checkpoints -----------------------------------------------------------------------------

    def extra_state(self) -> dict[str, Any]:
        index = self.stage_index(self.step)  # the stage of the next step
        return {"stage": index, "stage_name": self.stages[index].name,
                "reference_fingerprint": self.reference_fingerprint}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        saved, current = state.get("reference_fingerprint"), self.reference_fingerprint
        if saved is not None and current is not None and not fingerprints_match(saved, current):
            raise ValueError("the starting model differs from the one the checkpoint was trained from (the KL "
                             "reference): resume with the same --model as the original run")

    # ---- one step --------------------------------------------------------------------------------

    def train_step(self, prompts: Sequence[PromptItem]) -> dict[str, float]:
        """Rollout -> rewards -> advantages -> old/ref log-probs -> num_iterations x minibatches
        optimizer steps, then one learning-rate schedule step."""
        config = self.config
        stage = self.stage_index(self.step)
        metrics: dict[str, float] = {"stage": stage}
        with self.phase("rollout", metrics):
            rollouts = self.generate_rollouts(prompts)
        with self.phase("reward", metrics):
            scores = self.score(prompts, rollouts, stage)
            advantages = masked_group_advantages(scores.total, scores.valid, config.group_size, config.scale_rewards)
        batch = self.make_batch(rollouts, advantages, scores.valid)
        with self.phase("policy_logp", metrics):
            self.policy_logprobs(batch)
        if self.reference is not None:
            with self.phase("ref_logp", metrics):
                self.reference_logprobs(batch)
        with self.phase("update", metrics):
            metrics.update(self.update(batch))
        self.engine.update_weights(self.model)
        metrics.update(self.rollout_metrics(rollouts, scores, batch, stage, metrics))
        self.record_samples(prompts, rollouts, scores, advantages)
        if config.eval_every and (self.step + 1) % config.eval_every == 0:
            metrics.update(self.evaluate())
        return metrics

    @contextlib.contextmanager
    def phase(self, name: str, metrics: dict[str, float]):
        """Time a phase (``time/<name>_s``) and, on CUDA, its peak memory (``mem/<name>_gb``)."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize(self.device)
            metrics[f"mem/{name}_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        metrics[f"time/{name}_s"] = time.perf_counter() - start

    # ---- 1. rollout ------------------------------------------------------------------------------

    def generate_rollouts(self, prompts: Sequence[PromptItem]) -> list[Rollout]:
        """G samples of each prompt from the current policy (``rollouts[i * G + j]``)."""
        config = self.config
        # A fresh stream per (seed, rank, step): resuming at any step samples what the
        # uninterrupted run sampled.
        self.sampling_generator.manual_seed(sampling_seed(config.seed, self.dist.rank, self.step))
        with self.autocast():  # bf16 sampling on a GPU (a bf16 latent cache), as the update computes
            rollouts = self.engine.generate([p.prompt_ids for p in prompts], n=config.group_size,
                                            max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                            top_p=config.top_p, stop_token_ids=[self.tokenizer.eos_id],
                                            stop_strings=config.stop_strings, generator=self.sampling_generator)
        if len(rollouts) != len(prompts) * config.group_size:
            raise RuntimeError(f"the rollout engine returned {len(rollouts)} rollouts for {len(prompts)} prompts "
                               f"x group_size {config.group_size}")
        return rollouts

    # ---- 2. rewards ------------------------------------------------------------------------------

    def score(self, prompts: Sequence[PromptItem], rollouts: Sequence[Rollout], stage: int) -> RewardResult:
        """The stage's reward mix (eq. 36) on the completions' text; reward errors are handled by
        ``reward_on_error`` and written to ``reward_errors.jsonl``."""
        G = self.config.group_size
        records = [p.record for p in prompts]
        texts = [r["prompt"] for r in records for _ in range(G)]
        try:
            result = self.reward_mixes[stage](texts, [r.text for r in rollouts], **reward_columns(records, G))
        except RewardError as e:
            e.add_note(f"(GRPO step {self.step + 1}, stage {self.stages[stage].name!r}, rank {self.dist.rank}; "
                       f"reward_on_error='raise')")
            raise
        if result.errors:
            self.log_reward_errors(result.errors, stage)
        return result

    def log_reward_errors(self, errors: Sequence[str], stage: int) -> None:
        suffix = "" if self.dist.world_size == 1 else f".rank{self.dist.rank}"
        path = os.path.join(self.output_dir, f"reward_errors{suffix}.jsonl")
        os.makedirs(self.output_dir, exist_ok=True)
        with open(path, "a") as f:
            for message in errors:
                f.write(json.dumps({"step": self.step + 1, "stage": self.stages[stage].name, "error": message}) + "\n")

    # ---- 3-5. batch and log-probs ----------------------------------------------------------------

    def make_batch(self, rollouts: Sequence[Rollout], advantages: torch.Tensor, valid: torch.Tensor) -> RolloutBatch:
        examples = [Example(r.prompt_ids + r.completion_ids, [IGNORE_INDEX] * len(r.prompt_ids) + r.completion_ids)
                    for r in rollouts]
        completion_lens = [len(r.completion_ids) for r in rollouts]
        width = max(completion_lens, default=0)
        lens = torch.tensor(completion_lens, device=self.device)
        valid = valid.to(self.device)
        mask = (torch.arange(width, device=self.device).unsqueeze(0) < lens.unsqueeze(1)) & valid.unsqueeze(1)
        batch = RolloutBatch(examples, [len(r.prompt_ids) for r in rollouts], completion_lens,
                             advantages.to(self.device), valid, mask.float(),
                             torch.zeros(len(rollouts), width, device=self.device))
        if rollouts and all(r.logprobs is not None for r in rollouts):
            batch.sampler_logp = torch.zeros_like(batch.old_logp)
            for i, r in enumerate(rollouts):
                if len(r.logprobs) != len(r.completion_ids):
                    raise ValueError(f"rollout {i} has {len(r.logprobs)} log-probs for {len(r.completion_ids)} "
                                     f"completion tokens")
                batch.sampler_logp[i, :len(r.logprobs)] = torch.tensor(r.logprobs, dtype=torch.float32)
        return batch

    def plan(self, batch: RolloutBatch) -> list[list[list[int]]]:
        """The optimizer steps of one pass: ``minibatches`` consecutive parts of the rollouts, each
        a list of micro-batches (consecutive outputs, at most ``batch_tokens`` tokens unless one
        output alone is longer). The no-grad passes use the same micro-batches as the update."""
        size = len(batch.examples)
        parts, start = [], 0
        for k in range(self.config.minibatches):
            stop = start + size // self.config.minibatches + (k < size % self.config.minibatches)
            micro, current, used = [], [], 0
            for i in range(start, stop):
                n = len(batch.examples[i])
                if current and used + n > self.config.batch_tokens:
                    micro.append(current)
                    current, used = [], 0
                current.append(i)
                used += n
            if current:
                micro.append(current)
            parts.append(micro)
            start = stop
        return parts

    def packed(self, batch: RolloutBatch, indices: Sequence[int]) -> PackedBatch:
        return PackedBatch.from_examples([batch.examples[i] for i in indices]).to(self.device)

    def _completions(self, logp: torch.Tensor, packed: PackedBatch, batch: RolloutBatch,
                     indices: Sequence[int]) -> torch.Tensor:
        return completion_logps(logp, packed.cu_seqlens, [batch.prompt_lens[i] for i in indices],
                                [batch.completion_lens[i] for i in indices])[0]

    @torch.no_grad()
    def policy_logprobs(self, batch: RolloutBatch) -> None:
        """``batch.old_logp`` (and ``batch.entropy``): log pi_old right after sampling, in eval
        mode (no expert counting), through the same computation as the update's forward."""
        model = self.model
        was_training = model.training
        model.eval()
        if self.config.log_entropy:
            batch.entropy = torch.zeros_like(batch.old_logp)
        for part in self.plan(batch):
            for indices in part:
                packed = self.packed(batch, indices)
                with self.autocast():
                    if self.config.log_entropy:
                        hidden = model(packed.input_ids, packed.cu_seqlens, packed.max_seqlen)
                        targets = model.shift_targets(packed.labels, packed.cu_seqlens)
                        # as model.token_logprobs computes, so that the first pass's ratio is exactly 1
                        logp, entropy = linear_logprobs(hidden, model.lm_head.weight, targets, return_entropy=True)
                    else:
                        logp = model.token_logprobs(packed.input_ids, packed.cu_seqlens, packed.max_seqlen,
                                                    packed.labels)[0]
                width = max(batch.completion_lens[i] for i in indices)
                batch.old_logp[indices, :width] = self._completions(logp, packed, batch, indices)
                if self.config.log_entropy:
                    batch.entropy[indices, :width] = self._completions(entropy, packed, batch, indices)
        model.train(was_training)

    @torch.no_grad()
    def reference_logprobs(self, batch: RolloutBatch) -> None:
        """``batch.ref_logp`` under the frozen reference (moved to the device and back when
        ``ref_on_cpu``)."""
        offload = self.config.ref_on_cpu and self.device.type != "cpu"
        if offload:
            self.reference.to(self.device)
        batch.ref_logp = torch.zeros_like(batch.old_logp)
        for part in self.plan(batch):
            for indices in part:
                packed = self.packed(batch, indices)
                with self.autocast():
                    logp = self.reference.token_logprobs(packed.input_ids, packed.cu_seqlens, packed.max_seqlen,
                                                         packed.labels)[0]
                width = max(batch.completion_lens[i] for i in indices)
                batch.ref_logp[indices, :width] = self._completions(logp, packed, batch, indices)
        if offload:
            self.reference.to("cpu")

    # ---- 6. update -------------------------------------------------------------------------------

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """``num_iterations`` passes over the rollouts, each ``minibatches`` optimizer steps; then
        one schedule step. Returns the loss and grpo_loss metrics (token means over all passes)."""
        config = self.config
        self.model.train()
        self.move_optimizer_state(self.device)
        plan = self.plan(batch)
        # the global size of each part (valid outputs, their tokens): its optimizer step's normaliser
        local = {}
        for k, part in enumerate(plan):
            rows = [i for indices in part for i in indices]
            local[f"{k}/seq"], local[f"{k}/tok"] = float(batch.valid[rows].sum()), float(batch.mask[rows].sum())
        counts = self.reduce_sums(local)
        sums: dict[str, float] = {}
        grad_norms, tokens = [], 0
        for _ in range(config.num_iterations):
            for k, part in enumerate(plan):
                num_sequences, num_tokens = counts[f"{k}/seq"], counts[f"{k}/tok"]
                self.optimizer.zero_grad(set_to_none=True)
                for j, indices in enumerate(part):
                    with self.no_sync(last=j == len(part) - 1):
                        loss, stats = self.micro_batch_loss(batch, indices, num_sequences, num_tokens)
                        loss.backward()
                    tokens += sum(len(batch.examples[i]) for i in indices)
                    weight = float(stats["num_tokens"])
                    add(sums, "loss", float(loss.detach()) / self.dist.world_size)
                    add(sums, "_tokens", weight)
                    for name in ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                                 "ratio/mean"):
                        add(sums, name, float(stats[name]) * weight)
                grad_norms.append(self.clip_gradients())
                if num_sequences > 0:  # every sample of the minibatch was skipped: nothing to learn
                    self.optimizer.step()
                    if config.bias_update_speed:
                        update_correction_biases_(self.model, config.bias_update_speed, reduce=self.all_reduce_)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if config.optimizer_on_cpu:
            self.move_optimizer_state(torch.device("cpu"))
        out = self.reduce_sums(sums | {"update_tokens": float(tokens)})
        steps = config.num_iterations * len(plan)
        metrics = {"loss": out["loss"] / steps, "grad_norm": sum(grad_norms) / len(grad_norms),
                   "optimizer_steps": steps, "update_tokens": out["update_tokens"]}
        for name in ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "ratio/mean"):
            metrics[name] = out[name] / max(out["_tokens"], 1.0)
        return metrics

    def micro_batch_loss(self, batch: RolloutBatch, indices: Sequence[int], num_sequences: float,
                         num_tokens: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The gradient-carrying forward (through the DDP-wrapped objective) and the loss share of
        one micro-batch (:func:`grpo_step_loss`)."""
        config = self.config
        packed = self.packed(batch, indices)
        logp = self._completions(self.token_logprobs(packed), packed, batch, indices)
        width = logp.shape[1]
        rows = torch.tensor(indices, device=self.device)

        def take(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[rows, :width]

        return grpo_step_loss(logp, batch.advantages[rows], take(batch.mask), take(batch.old_logp),
                              take(batch.ref_logp), num_sequences=num_sequences, num_tokens=num_tokens,
                              world_size=self.dist.world_size, eps_low=config.eps_low, eps_high=config.eps_high,
                              beta=config.beta, loss_type=config.loss_type, max_len=config.max_new_tokens,
                              sampler_logp=take(batch.sampler_logp), tis_cap=config.tis_cap,
                              unbiased_kl=config.unbiased_kl)

    def move_optimizer_state(self, device: torch.device) -> None:
        """Move AdamW's moments (not its step counters) to ``device`` (``optimizer_on_cpu``)."""
        if not self.config.optimizer_on_cpu or self.device.type == "cpu":
            return
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and key != "step":
                    state[key] = value.to(device)

    # ---- logging ---------------------------------------------------------------------------------

    def reduce_sums(self, values: dict[str, float]) -> dict[str, float]:
        """Sums over all ranks of named numbers (one collective)."""
        if self.dist.world_size == 1 or not values:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        self.all_reduce_(t)
        return dict(zip(keys, t.tolist()))

    def main_reward(self, stage: int) -> str:
        names = self.reward_mixes[stage].names
        if self.config.main_reward:
            return self.config.main_reward
        return "exact_answer" if "exact_answer" in names else names[0]

    def rollout_metrics(self, rollouts: Sequence[Rollout], scores: RewardResult, batch: RolloutBatch, stage: int,
                        timings: dict[str, float]) -> dict[str, float]:
        """Reward mean/std (total and per function, over the valid samples of the global batch),
        accuracy (main reward == 1), lengths, entropy, error counts and throughput."""
        G = self.config.group_size
        valid = scores.valid.cpu()
        sums: dict[str, float] = {"n": float(valid.sum()), "samples": float(len(rollouts))}
        columns = {"reward": scores.total.cpu()} | {f"reward/{k}": v.cpu() for k, v in scores.per_function.items()}
        for name, values in columns.items():
            v = values[valid].double()
            sums[name + "/sum"], sums[name + "/sq"] = float(v.sum()), float(v.square().sum())
        main = scores.per_function[self.main_reward(stage)].cpu()
        sums["correct"] = float(((main >= 1.0) & valid).sum())
        lengths = torch.tensor([len(r.completion_ids) for r in rollouts], dtype=torch.float64)
        sums["length"] = float(lengths.sum())
        sums["stopped"] = float(sum(r.finish_reason == FINISH_STOP for r in rollouts))
        sums["generated"] = float(sum(r.num_generated or len(r.completion_ids) for r in rollouts))
        sums["tokens"] = float(sum(len(e) for e in batch.examples))
        # A group gives no signal when its valid outputs (those masked_group_advantages uses) are
        # fewer than two or all scored alike; skipped outputs' placeholder totals do not count.
        grouped, grouped_valid = scores.total.cpu().view(-1, G), valid.view(-1, G)
        highest = grouped.masked_fill(~grouped_valid, -math.inf).amax(dim=1)
        lowest = grouped.masked_fill(~grouped_valid, math.inf).amin(dim=1)
        no_signal = (grouped_valid.sum(dim=1) < 2) | (highest == lowest)
        sums["zero_std_groups"] = float(no_signal.sum())
        sums["groups"] = float(grouped.shape[0])
        sums["errors"] = float(len(scores.errors))
        sums["skipped"] = float((~valid).sum())
        if batch.entropy is not None:
            sums["entropy"] = float((batch.entropy * batch.mask).sum())
            sums["entropy_tokens"] = float(batch.mask.sum())
        g = self.reduce_sums(sums)
        n = max(g["n"], 1.0)
        out: dict[str, float] = {}
        for name in columns:  # "reward", "reward_std"; "reward/<fn>/mean", "reward/<fn>/std"
            mean = g[name + "/sum"] / n
            std = math.sqrt(max(g[name + "/sq"] / n - mean * mean, 0.0))
            mean_key, std_key = ("reward", "reward_std") if name == "reward" else (name + "/mean", name + "/std")
            out[mean_key], out[std_key] = mean, std
        out["accuracy"] = g["correct"] / n
        out["completion_length/mean"] = g["length"] / max(g["samples"], 1.0)
        out["completions/stopped_frac"] = g["stopped"] / max(g["samples"], 1.0)
        out["frac_reward_zero_std"] = g["zero_std_groups"] / max(g["groups"], 1.0)
        out["reward/num_errors"] = g["errors"]
        out["reward/num_skipped"] = g["skipped"]
        if "entropy" in g:
            out["entropy"] = g["entropy"] / max(g["entropy_tokens"], 1.0)
        out["num_tokens"] = g["tokens"]
        out["rollout_tokens_per_s"] = g["generated"] / max(timings["time/rollout_s"], 1e-9)
        out["update_tokens_per_s"] = timings["update_tokens"] / max(timings["time/update_s"], 1e-9)
        return out

    def record_samples(self, prompts: Sequence[PromptItem], rollouts: Sequence[Rollout], scores: RewardResult,
                       advantages: torch.Tensor) -> None:
        """Keep this rank's samples in :attr:`last_samples`; the first ``log_completions`` go to
        ``completions.jsonl`` (main process)."""
        G = self.config.group_size
        self.last_samples = [
            {"prompt": prompts[i // G].record["prompt"], "completion": r.text, "finish_reason": r.finish_reason,
             "reward": float(scores.total[i]), "rewards": {k: float(v[i]) for k, v in scores.per_function.items()},
             "advantage": float(advantages[i]), "valid": bool(scores.valid[i])}
            for i, r in enumerate(rollouts)]
        if self.config.log_completions and self.dist.is_main:
            os.makedirs(self.output_dir, exist_ok=True)
            with open(os.path.join(self.output_dir, "completions.jsonl"), "a") as f:
                for sample in self.last_samples[: self.config.log_completions]:
                    f.write(json.dumps({"step": self.step + 1, **sample}) + "\n")

    # ---- evaluation ------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, items: Sequence[PromptItem] | None = None) -> dict[str, float]:
        """Greedy completions of the evaluation prompts (sharded over ranks), scored by the current
        stage's reward mix: ``eval/reward`` and ``eval/accuracy`` (main reward == 1)."""
        items = list(self.eval_items if items is None else items)
        if not items:
            return {}
        stage = self.stage_index(self.step)
        mine = items[self.dist.rank::self.dist.world_size]
        with self.autocast():
            rollouts = self.engine.generate([p.prompt_ids for p in mine], n=1,
                                            max_new_tokens=self.config.max_new_tokens, temperature=0.0, top_p=1.0,
                                            stop_token_ids=[self.tokenizer.eos_id],
                                            stop_strings=self.config.stop_strings, generator=None)
        records = [p.record for p in mine]
        scores = self.reward_mixes[stage]([r["prompt"] for r in records], [r.text for r in rollouts],
                                          **reward_columns(records, 1)) if mine else None
        sums = {"n": 0.0, "reward": 0.0, "correct": 0.0}
        if scores is not None:
            valid = scores.valid
            sums = {"n": float(valid.sum()), "reward": float(scores.total[valid].sum()),
                    "correct": float(((scores.per_function[self.main_reward(stage)] >= 1.0) & valid).sum())}
        g = self.reduce_sums(sums)
        n = max(g["n"], 1.0)
        return {"eval/reward": g["reward"] / n, "eval/accuracy": g["correct"] / n, "eval/num": g["n"]}


# ---- helpers ----------------------------------------------------------------------------------------


def add(sums: dict[str, float], key: str, value: float) -> None:
    sums[key] = sums.get(key, 0.0) + value


def sampling_seed(seed: int, rank: int, step: int) -> int:
    """The sampling generator's seed at a step: a function of (seed, rank, step) only."""
    return (seed * 1_000_003 + step) * 7919 + rank + 1


def model_fingerprint(model: torch.nn.Module) -> list[float]:
    """Sums and sums of squares (float64) of the parameters: identifies the starting model."""
    with torch.no_grad():
        params = [p.detach().double() for p in model.parameters()]
        return [float(sum(p.sum() for p in params)), float(sum(p.square().sum() for p in params))]


def fingerprints_match(a: Sequence[float], b: Sequence[float], rtol: float = 1e-9) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rtol * max(abs(x), abs(y), 1e-12) for x, y in zip(a, b))


def check_grpo_config(config: GRPOConfig) -> None:
    """Raise ValueError naming the first out-of-range GRPO option."""

    def positive_int(name: str, low: int = 1) -> None:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")

    positive_int("group_size", 2)
    for name in ("prompts_per_step", "max_new_tokens", "num_iterations", "minibatches"):
        positive_int(name)
    for name in ("eval_every", "log_completions", "eval_prompts"):
        positive_int(name, 0)
    if not config.temperature > 0:
        raise ValueError(f"temperature must be > 0 (the G samples of a prompt must differ), got {config.temperature}")
    if not 0 < config.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {config.top_p}")
    if not config.beta >= 0:
        raise ValueError(f"beta must be >= 0, got {config.beta}")
    for name in ("eps_low", "eps_high"):
        if not 0 <= getattr(config, name) <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {getattr(config, name)}")
    if not config.tis_cap > 0:
        raise ValueError(f"tis_cap must be > 0, got {config.tis_cap}")
    if config.loss_type not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss_type={config.loss_type!r} must be one of {LOSS_AGGREGATIONS}")
    if config.reward_on_error not in ON_ERROR:
        raise ValueError(f"reward_on_error={config.reward_on_error!r} must be one of {ON_ERROR}")
    if not isinstance(config.stop_strings, list) or not all(isinstance(s, str) for s in config.stop_strings):
        raise ValueError(f"stop_strings must be a JSON list of strings, got {config.stop_strings!r}")
    if config.max_new_tokens >= config.max_seq_len:
        raise ValueError(f"max_new_tokens={config.max_new_tokens} leaves no room for the prompt in "
                         f"max_seq_len={config.max_seq_len}")
    if config.fsdp:
        raise ValueError("GRPO does not support --fsdp: the rollout engine generates with the full weights")


__all__ = ["GRPOConfig", "GRPOTrainer", "PromptLoader", "PromptItem", "RolloutBatch", "Stage", "parse_stages",
           "masked_group_advantages", "completion_logps", "grpo_step_loss", "builtin_prompt_records",
           "reward_columns", "encode_prompts"]
