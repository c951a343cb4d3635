"""Learned reward models (DeepSeek-V2 section 4.2): a scalar head on our model, trained with a
point-wise or a pair-wise loss, then used as one term ``RM_k`` of the reward mix of eq. 36.

The model (:class:`RewardModel`) is the decoder of a :class:`DeepseekForCausalLM` (embedding,
layers, final norm; its ``lm_head`` is not used and not kept) and a linear head
``score: H -> 1`` without bias, named as in transformers' ``DeepseekV3ForSequenceClassification``
(state dict keys ``model.*`` and ``score.weight``). The reward of a sequence is the head applied to
the final hidden state of its last token; a sequence is encoded as for SFT,
``[bos] + prompt + response + [eos]``, so the last token is the eos that closes the response::

    r(prompt, response) = score . h_last          (h_last: the eos's normed hidden state, [H])

Losses, over the ``B`` pairs or examples of a global batch (``sigma`` the logistic function):

* pair-wise (Bradley-Terry, records ``{"prompt", "chosen", "rejected"}``)::

      L = 1/B sum_b -log sigma(r(x_b, y_b^chosen) - r(x_b, y_b^rejected))

  Rewards are defined up to a constant; only their differences carry meaning.
* point-wise (records ``{"prompt", "response", "label"}``), ``pointwise_target``:

  - ``"binary"`` (default; labels in [0, 1], e.g. 1/0 correctness against ground truth as the
    seed does for mathematical data): binary cross-entropy with the reward as the logit,
    ``L = 1/B sum_b -[y_b log sigma(r_b) + (1 - y_b) log(1 - sigma(r_b))]``, so that
    ``sigma(r)`` estimates the probability of a label of 1;
  - ``"regression"`` (any finite labels, e.g. graded scores): ``L = 1/B sum_b (r_b - y_b)^2``.

The seed initialises its reward models from the SFT model: ``--model`` names a preset (a fresh
backbone), a causal-LM directory (e.g. an SFT checkpoint: its decoder, a new head), or a reward
model directory (training continues). A reward model directory is a model directory as
:mod:`~moe_align.train.checkpoint` writes it: ``config.json`` (the :class:`DeepseekConfig` and the
tokenizer name) and one ``model.safetensors`` holding ``model.*`` and ``score.weight``. Every
``checkpoint-N`` of the ``rm`` trainer is one, so :meth:`RewardModel.load` reads it directly.

In GRPO, :meth:`RewardModel.as_reward_function` (or :func:`load_reward_function`) gives a reward
function of the protocol of :mod:`~moe_align.train.rewards`, to put in a ``RewardMix`` with its
coefficient ``c_k`` (eq. 36).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import random
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moe_align.models.deepseek import DeepseekConfig, DeepseekForCausalLM
from moe_align.train import checkpoint as ckpt
from moe_align.train.data import (
    DatasetError,
    Example,
    PackedBatch,
    PackedLoader,
    check_lengths,
    encode_preference_record,
    encode_prompt_response,
    load_preference_dataset,
    pack_bins,
    read_jsonl,
)
from moe_align.train.tokenizer import Tokenizer, load_tokenizer
from moe_align.train.trainer import TrainConfig, Trainer

LOSSES = ("pairwise", "pointwise")
POINTWISE_TARGETS = ("binary", "regression")
HEAD_KEY = "score.weight"


# ---- the model ------------------------------------------------------------------------------------


class RewardModel(nn.Module):
    """A DeepSeek decoder with a scalar head: packed sequences -> one reward each.

    Args:
        config_or_backbone: a :class:`DeepseekForCausalLM` (its decoder is shared, not copied;
            its ``lm_head`` is left out), or anything :class:`DeepseekForCausalLM` accepts (a
            :class:`DeepseekConfig`, a preset name, a transformers config) for a fresh decoder.
        device, dtype: of a fresh decoder and of the head.

    Attributes: ``config``, ``model`` (the decoder: ``embed_tokens``, ``layers``, ``norm``),
    ``score`` (``nn.Linear(hidden_size, 1, bias=False)``, initialised ``N(0, initializer_range)``),
    ``tokenizer_name`` (the tokenizer the model was trained with, when loaded from a directory).
    """

    def __init__(self, config_or_backbone: Any, *, device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(config_or_backbone, DeepseekForCausalLM):
            backbone = config_or_backbone
            param = backbone.lm_head.weight
            device = param.device if device is None else device
            dtype = param.dtype if dtype is None else dtype
        else:
            backbone = DeepseekForCausalLM(config_or_backbone, device=device, dtype=dtype)
        self.config: DeepseekConfig = backbone.config
        self.model = backbone.model
        self.score = nn.Linear(self.config.hidden_size, 1, bias=False, device=device, dtype=dtype)
        if torch.device(device or "cpu").type != "meta":
            with torch.no_grad():
                nn.init.normal_(self.score.weight, 0.0, self.config.initializer_range)
        self.tokenizer_name = "char"

    # ---- forward ---------------------------------------------------------------------------------

    def hidden_states(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final normed hidden states ``[T, H]`` of a packed batch (as
        :meth:`DeepseekForCausalLM.forward`, with the same argument checks)."""
        DeepseekForCausalLM._check_packed(self, input_ids, cu_seqlens, max_seqlen)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, position_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards of a packed batch.

        Args:
            input_ids: int64/int32 ``[T]``, ``N`` sequences delimited by ``cu_seqlens``.
            cu_seqlens: int32 ``[N + 1]``, ``0 = c_0 < c_1 < ... < c_N = T`` (no empty sequence:
                each needs a last token).
            max_seqlen: int ``>= max_i (c_{i+1} - c_i)``.
            position_ids: optional int ``[T]`` (default ``0 ..`` within each sequence).

        Returns:
            float32 ``[N]``: ``r_i = score . h[c_{i+1} - 1]``, the head on the hidden state of
            sequence ``i``'s last token, computed in float32 (also under autocast).
        """
        if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dim() == 1 and bool((cu_seqlens.diff() <= 0).any()):
            raise ValueError(f"cu_seqlens has an empty sequence (lengths {cu_seqlens.diff().tolist()}); each "
                             f"sequence needs a token to take its reward from")
        hidden = self.hidden_states(input_ids, cu_seqlens, max_seqlen, position_ids)
        last = hidden[cu_seqlens[1:].long() - 1]
        with torch.autocast(hidden.device.type, enabled=False):
            return F.linear(last.float(), self.score.weight.float()).squeeze(-1)

    @property
    def device(self) -> torch.device:
        return self.score.weight.device

    # ---- scoring text ----------------------------------------------------------------------------

    @torch.no_grad()
    def score_texts(self, tokenizer: Tokenizer | str, prompts: Sequence[str], completions: Sequence[str],
                    batch_tokens: int = 8192) -> list[float]:
        """Rewards of ``(prompt, completion)`` pairs, each encoded ``[bos] + prompt + completion
        + [eos]`` (:func:`~moe_align.train.data.encode_prompt_response`), packed into batches of
        at most ``batch_tokens`` tokens (a longer sequence gets a batch of its own), without
        gradients and in eval mode (the training mode is restored). Returns one float per pair,
        in order.
        """
        tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        prompts, completions = list(prompts), list(completions)
        if len(prompts) != len(completions):
            raise ValueError(f"prompts has {len(prompts)} items but completions has {len(completions)}")
        if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
            raise ValueError(f"batch_tokens must be a positive int, got {batch_tokens!r}")
        for name, texts in (("prompts", prompts), ("completions", completions)):
            for i, text in enumerate(texts):
                if not isinstance(text, str):
                    raise TypeError(f"{name}[{i}] must be a str, got {type(text).__name__}")
        if not prompts:
            return []
        sequences = [encode_prompt_response(tokenizer, p, c).input_ids for p, c in zip(prompts, completions)]
        capacity = max(batch_tokens, max(len(s) for s in sequences))
        rewards = [0.0] * len(sequences)
        was_training = self.training
        self.eval()
        try:
            for indices in pack_bins([len(s) for s in sequences], capacity):
                indices = sorted(indices)
                ids, cu, max_len = DeepseekForCausalLM.pack([sequences[i] for i in indices], device=self.device)
                for i, r in zip(indices, self(ids, cu, max_len).tolist()):
                    rewards[i] = r
        finally:
            self.train(was_training)
        return rewards

    def as_reward_function(self, tokenizer: Tokenizer | str, name: str = "reward_model", *,
                           batch_tokens: int = 8192, sigmoid: bool = False) -> Callable[..., list[float]]:
        """This model as a reward function ``fn(prompts, completions, **columns) -> list[float]``
        (the protocol of :mod:`~moe_align.train.rewards`; columns are ignored), named ``name``
        so that ``RewardMix([(fn, c_1), ("exact_answer", c_2)])`` weighs it by ``c_1`` (eq. 36).

        ``sigmoid=True`` returns ``sigma(r)`` in (0, 1) instead of ``r``: for a point-wise binary
        model, the estimated probability that the completion is labelled 1 (e.g. correct).
        """
        tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty string, got {name!r}")

        def reward_model(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
            rewards = self.score_texts(tokenizer, prompts, completions, batch_tokens=batch_tokens)
            return [1.0 / (1.0 + math.exp(-r)) for r in rewards] if sigmoid else rewards

        reward_model.__name__ = reward_model.__qualname__ = name
        return reward_model

    # ---- files -----------------------------------------------------------------------------------

    def save(self, directory: str, tokenizer: str | None = None) -> str:
        """Write ``config.json`` (with the tokenizer name, default :attr:`tokenizer_name`) and
        ``model.safetensors`` (``model.*`` and ``score.weight``) into ``directory``."""
        ckpt.save_model(self, directory, tokenizer or self.tokenizer_name)
        return directory

    @classmethod
    def load(cls, directory: str, device: torch.device | str = "cpu") -> RewardModel:
        """A reward model from a directory written by :meth:`save` or the ``rm`` trainer (strict:
        every tensor must be there and nothing else). Sets :attr:`tokenizer_name`."""
        if not ckpt.is_model_dir(directory):
            raise FileNotFoundError(f"{directory!r} is not a model directory (needs {ckpt.CONFIG_NAME} and "
                                    f"{ckpt.WEIGHTS_NAME})")
        if not is_reward_model_dir(directory):
            raise ValueError(f"{directory!r} holds a causal LM, not a reward model (no {HEAD_KEY!r}); start a reward "
                             f"model from it with RewardModel(load_causal_lm(directory)) or `moe-align rm --model`")
        model, tokenizer = ckpt.load_model(directory, device, model_class=cls)
        model.tokenizer_name = tokenizer
        return model


def load_causal_lm(directory: str, device: torch.device | str = "cpu") -> DeepseekForCausalLM:
    """The causal LM of a model directory (e.g. an SFT checkpoint), to start a reward model from."""
    return ckpt.load_model(directory, device)[0]


def is_reward_model_dir(path: str) -> bool:
    """Whether ``path`` is a model directory whose weights include the reward head."""
    if not ckpt.is_model_dir(path):
        return False
    from safetensors import safe_open

    with safe_open(os.path.join(path, ckpt.WEIGHTS_NAME), framework="pt") as f:
        return HEAD_KEY in f.keys()


def load_reward_function(directory: str, name: str = "reward_model", device: torch.device | str = "cpu", *,
                         batch_tokens: int = 8192, sigmoid: bool = False) -> Callable[..., list[float]]:
    """The reward model in ``directory`` with the tokenizer it was trained with, as a reward
    function (:meth:`RewardModel.as_reward_function`)."""
    model = RewardModel.load(directory, device)
    return model.as_reward_function(model.tokenizer_name, name, batch_tokens=batch_tokens, sigmoid=sigmoid)


def register_reward_model(name: str, directory: str, device: torch.device | str = "cpu", *, sigmoid: bool = False,
                          override: bool = False, batch_tokens: int = 8192) -> Callable[..., list[float]]:
    """Load the reward model in ``directory`` and register it as the reward function ``name``
    (:func:`~moe_align.train.rewards.register_reward`), so that a GRPO reward mix can name it:
    ``{"helpful": 0.5, "exact_answer": 1.0}``. Returns the function."""
    from moe_align.train.rewards import register_reward

    fn = load_reward_function(directory, name, device, batch_tokens=batch_tokens, sigmoid=sigmoid)
    return register_reward(name, fn, override=override)


# ---- losses ---------------------------------------------------------------------------------------


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Bradley-Terry loss ``-log sigma(r_c - r_r)`` per pair (computed as
    ``softplus(r_r - r_c)``, finite for any margin). ``chosen``, ``rejected``: float ``[B]``;
    ``reduction``: "mean" (0 for B = 0), "sum" or "none" (``[B]``)."""
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(f"chosen and rejected must be 1-D of the same shape, got {tuple(chosen.shape)} and "
                         f"{tuple(rejected.shape)}")
    return _reduce(F.softplus(rejected.float() - chosen.float()), reduction)


def pointwise_loss(rewards: torch.Tensor, labels: torch.Tensor, target: str = "binary",
                   reduction: str = "mean") -> torch.Tensor:
    """Point-wise loss per example: ``target="binary"``, binary cross-entropy with ``rewards`` as
    logits and ``labels`` in [0, 1]; ``"regression"``, squared error ``(r - y)^2``. ``rewards``,
    ``labels``: float ``[B]``; ``reduction``: "mean" (0 for B = 0), "sum" or "none"."""
    if rewards.shape != labels.shape or rewards.dim() != 1:
        raise ValueError(f"rewards and labels must be 1-D of the same shape, got {tuple(rewards.shape)} and "
                         f"{tuple(labels.shape)}")
    r, y = rewards.float(), labels.to(device=rewards.device, dtype=torch.float32)
    if target == "binary":
        losses = F.binary_cross_entropy_with_logits(r, y, reduction="none")
    elif target == "regression":
        losses = (r - y).square()
    else:
        raise ValueError(f"target={target!r} must be one of {POINTWISE_TARGETS}")
    return _reduce(losses, reduction)


def _reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.sum() / max(losses.numel(), 1)
    raise ValueError(f"reduction={reduction!r} must be 'mean', 'sum' or 'none'")


# ---- data -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class LabeledExample:
    """A point-wise example: an encoded ``prompt + response`` and its float ``label``."""

    example: Example
    label: float

    def __len__(self) -> int:
        return len(self.example)


def encode_pointwise_record(record: dict[str, Any], tokenizer: Tokenizer, index: int = 0,
                            target: str = "binary") -> LabeledExample:
    """A ``{"prompt", "response", "label"}`` record -> :class:`LabeledExample`. The label is a
    finite number (``true``/``false`` read as 1/0), in [0, 1] for ``target="binary"``; anything
    else is a :class:`DatasetError` naming the record's file and line."""
    source = record.get("_source", f"record {index}")
    for key in ("prompt", "response", "label"):
        if key not in record:
            raise DatasetError(f"{source}: a point-wise record needs 'prompt', 'response' and 'label'")
    for key in ("prompt", "response"):
        if not isinstance(record[key], str):
            raise DatasetError(f"{source}: field {key!r} must be a string, got {type(record[key]).__name__}")
    label = record["label"]
    if not isinstance(label, numbers.Real) or not math.isfinite(float(label)):
        raise DatasetError(f"{source}: 'label' must be a finite number, got {label!r}")
    label = float(label)
    if target == "binary" and not 0.0 <= label <= 1.0:
        raise DatasetError(f"{source}: 'label' {label} is outside [0, 1], which the binary point-wise loss needs "
                           f"(use --pointwise-target regression for other scores)")
    return LabeledExample(encode_prompt_response(tokenizer, record["prompt"], record["response"], source), label)


def load_pointwise_dataset(path: str | os.PathLike, tokenizer: Tokenizer, max_seq_len: int,
                           target: str = "binary") -> list[LabeledExample]:
    examples = [encode_pointwise_record(r, tokenizer, i, target) for i, r in enumerate(read_jsonl(path))]
    check_lengths([e.example for e in examples], max_seq_len)
    return examples


def corrupt_answer(response: str, rng: random.Random) -> str:
    """``response`` with one digit of its final answer (after the last ``A:``) replaced by
    another digit, keeping the answer canonical (no leading zero) and its length, so that
    only the arithmetic tells the two apart."""
    from moe_align.train.tasks import ANSWER_MARKER

    at = response.rfind(ANSWER_MARKER)
    if at < 0:
        raise ValueError(f"response {response!r} has no {ANSWER_MARKER!r} marker")
    head, answer = response[:at + len(ANSWER_MARKER)], response[at + len(ANSWER_MARKER):]
    sign = "-" if answer.startswith("-") else ""
    digits = list(answer[len(sign):])
    if not digits or not all(c.isdigit() for c in digits):
        raise ValueError(f"response {response!r} has no integer answer")
    i = rng.randrange(len(digits))
    lowest = 1 if i == 0 and len(digits) > 1 else 0
    digits[i] = str(rng.choice([d for d in range(lowest, 10) if str(d) != digits[i]]))
    if digits == ["0"] and sign:  # "-0" is not canonical
        digits = ["1"]
    return head + sign + "".join(digits)


def builtin_preference_records(n: int = 2000, seed: int = 0, split: str = "train") -> list[dict[str, str]]:
    """Arithmetic problems (:class:`~moe_align.train.tasks.ArithmeticTask`) as preference
    pairs: ``chosen`` the correct step-by-step response, ``rejected`` the same with a wrong
    final answer (:func:`corrupt_answer`). ``split`` "train" or "test" (disjoint problems)."""
    from moe_align.train.tasks import ArithmeticTask

    rng = random.Random(f"rm-pairs:{split}:{seed}")
    return [{"prompt": r["prompt"], "chosen": r["response"], "rejected": corrupt_answer(r["response"], rng)}
            for r in ArithmeticTask().dataset(n, seed=seed, split=split)]


def builtin_pointwise_records(n: int = 2000, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """The same ``n`` problems as :func:`builtin_preference_records`, each twice: the correct
    response with ``label`` 1.0 and the corrupted one with ``label`` 0.0."""
    out: list[dict[str, Any]] = []
    for r in builtin_preference_records(n, seed, split):
        out.append({"prompt": r["prompt"], "response": r["chosen"], "label": 1.0})
        out.append({"prompt": r["prompt"], "response": r["rejected"], "label": 0.0})
    return out


# ---- the trainer ----------------------------------------------------------------------------------


@dataclasses.dataclass
class RMConfig(TrainConfig):
    """Reward-model options (see :class:`TrainConfig`).

    ``model``: a preset, a causal-LM directory (e.g. the SFT checkpoint, as the seed does: its
    decoder with a new head) or a reward-model directory (continue training it). ``data``: JSONL
    of ``{"prompt", "chosen", "rejected"}`` (``loss="pairwise"``) or ``{"prompt", "response",
    "label"}`` (``loss="pointwise"``); empty = built-in arithmetic pairs (correct vs wrong answer).
    """

    model: str = "small"
    loss: str = "pairwise"  # pairwise | pointwise
    pointwise_target: str = "binary"  # binary (BCE, labels in [0, 1]) | regression (MSE)
    builtin_size: int = 2000  # problems in the built-in dataset


class RewardModelTrainer(Trainer):
    """Trains a :class:`RewardModel` (``moe-align rm``).

    A micro-batch is a bin of pairs (pair-wise: the chosen and the rejected sequences of every
    pair of the bin in one packed batch) or of labelled examples (point-wise). The loss is the
    mean over all pairs / examples of the global batch. Metrics: ``loss``, ``accuracy``
    (pair-wise: ``r_c > r_r``; point-wise binary: ``(r > 0) == (y >= 0.5)``), pair-wise
    ``margin`` and ``reward_chosen`` / ``reward_rejected``, point-wise ``reward``, and
    ``num_tokens``, ``num_pairs`` / ``num_examples``.
    """

    name = "rm"
    config_class = RMConfig

    def __init__(self, config: RMConfig, model: RewardModel | DeepseekForCausalLM | None = None,
                 tokenizer: Tokenizer | None = None) -> None:
        if config.loss not in LOSSES:
            raise ValueError(f"loss={config.loss!r} must be one of {LOSSES}")
        if config.pointwise_target not in POINTWISE_TARGETS:
            raise ValueError(f"pointwise_target={config.pointwise_target!r} must be one of {POINTWISE_TARGETS}")
        if model is None and os.path.isdir(config.model):
            is_rm = is_reward_model_dir(config.model)
            model = RewardModel.load(config.model) if is_rm else load_causal_lm(config.model)
        super().__init__(config, model, tokenizer)

    # ---- model -----------------------------------------------------------------------------------

    def setup_model(self) -> None:
        if not isinstance(self.model, RewardModel):
            self.model = RewardModel(self.model)  # the decoder of the causal LM and a fresh head
        self.model.to(self.device)
        self.model.tokenizer_name = self.config.tokenizer
        if self.tokenizer.vocab_size > self.model.config.vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} tokens, the model only "
                             f"{self.model.config.vocab_size}")

    def build_objective(self) -> nn.Module:
        return self.model  # the reward model's own forward carries the gradient

    def rewards(self, batch: PackedBatch) -> torch.Tensor:
        """``[N]`` float32 rewards of a packed batch through the (possibly wrapped) model."""
        with self.autocast():
            return self.objective(batch.input_ids, batch.cu_seqlens, batch.max_seqlen)

    # ---- data ------------------------------------------------------------------------------------

    def build_loader(self) -> PackedLoader:
        config = self.config
        if config.loss == "pairwise":
            if config.data:
                items: list = load_preference_dataset(config.data, self.tokenizer, config.max_seq_len)
            else:
                records = builtin_preference_records(config.builtin_size, config.seed)
                items = [encode_preference_record(r, self.tokenizer, i) for i, r in enumerate(records)]
                check_lengths([e for p in items for e in (p.chosen, p.rejected)], config.max_seq_len)
        else:
            if config.data:
                items = load_pointwise_dataset(config.data, self.tokenizer, config.max_seq_len,
                                               config.pointwise_target)
            else:
                records = builtin_pointwise_records(config.builtin_size, config.seed)
                items = [encode_pointwise_record(r, self.tokenizer, i) for i, r in enumerate(records)]
                check_lengths([e.example for e in items], config.max_seq_len)
        return PackedLoader(items, config.batch_tokens, grad_accum=config.grad_accum,
                            world_size=self.dist.world_size, rank=self.dist.rank, seed=config.seed)

    # ---- loss ------------------------------------------------------------------------------------

    def count_units(self, micro_batch: Sequence[Any]) -> int:
        return len(micro_batch)  # pairs, or point-wise examples

    def compute_loss(self, micro_batch: Sequence[Any], denominator: float) -> tuple[torch.Tensor, dict]:
        n = len(micro_batch)
        if self.config.loss == "pairwise":
            batch = PackedBatch.from_examples([p.chosen for p in micro_batch] + [p.rejected for p in micro_batch])
            rewards = self.rewards(batch.to(self.device))
            chosen, rejected = rewards[:n], rewards[n:]
            losses = pairwise_loss(chosen, rejected, reduction="none")
            margin = (chosen - rejected).detach()
            metrics = {"accuracy": (margin > 0).sum(), "margin": margin.sum(),
                       "reward_chosen": chosen.detach().sum(), "reward_rejected": rejected.detach().sum(),
                       "num_pairs": n}
        else:
            batch = PackedBatch.from_examples([e.example for e in micro_batch])
            rewards = self.rewards(batch.to(self.device))
            labels = torch.tensor([e.label for e in micro_batch], dtype=torch.float32, device=rewards.device)
            losses = pointwise_loss(rewards, labels, self.config.pointwise_target, reduction="none")
            metrics = {"reward": rewards.detach().sum(), "num_examples": n}
            if self.config.pointwise_target == "binary":
                metrics["accuracy"] = ((rewards.detach() > 0) == (labels >= 0.5)).sum()
        loss = losses.sum()
        metrics.update(loss=loss.detach(), _count=n, num_tokens=batch.input_ids.numel())
        return loss / denominator, metrics


@torch.no_grad()
def pairwise_accuracy(model: RewardModel, tokenizer: Tokenizer, records: Sequence[dict[str, str]],
                      batch_tokens: int = 8192) -> float:
    """Share of ``{"prompt", "chosen", "rejected"}`` records with ``r(chosen) > r(rejected)``."""
    records = list(records)
    if not records:
        raise ValueError("records is empty")
    prompts = [r["prompt"] for r in records]
    chosen = model.score_texts(tokenizer, prompts, [r["chosen"] for r in records], batch_tokens)
    rejected = model.score_texts(tokenizer, prompts, [r["rejected"] for r in records], batch_tokens)
    return sum(c > r for c, r in zip(chosen, rejected)) / len(records)


__all__ = ["RewardModel", "RewardModelTrainer", "RMConfig", "LabeledExample", "pairwise_loss", "pointwise_loss",
           "pairwise_accuracy", "is_reward_model_dir", "load_reward_function", "register_reward_model",
           "load_causal_lm", "load_pointwise_dataset", "encode_pointwise_record", "corrupt_answer",
           "builtin_preference_records", "builtin_pointwise_records"]
