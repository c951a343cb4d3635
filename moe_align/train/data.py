"""Datasets of the trainers: JSONL reading, encoding with loss masks, and dense packing.

Records (one JSON object per line):

* SFT: ``{"prompt": str, "response": str}`` or ``{"messages": [{"role": ..., "content": ...}, ...]}``
* preference (DPO, pair-wise reward model): ``{"prompt": str, "chosen": str, "rejected": str}``
* prompts (GRPO): ``{"prompt": str, ...}``; the other fields (e.g. ``"answer"``) reach the
  reward functions as columns.

An encoded example is one token sequence ``[bos] + prompt + response + [eos]`` with labels equal
to the tokens on the response (and its eos) and :data:`IGNORE_INDEX` elsewhere: the loss is
taken on the response only. Examples are packed into micro-batches of at most ``batch_tokens``
tokens, each a packed variable-length batch (``cu_seqlens``) in which no token attends across
an example boundary.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from typing import Any, Iterable, Iterator, Sequence

import torch

from moe_align.train.tokenizer import Tokenizer

IGNORE_INDEX = -100


class DatasetError(ValueError):
    """A malformed dataset; the message names the file and line."""


# ---- reading --------------------------------------------------------------------------------------


def read_jsonl(path: str | os.PathLike, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The records of a JSONL file, each tagged with its ``"_source"`` (``"file:line"``).

    Blank lines are skipped. Raises :class:`DatasetError` naming the file and line for a line
    that is not a JSON object or lacks one of ``required``, and for a file without records.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset {path!r} does not exist")
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            source = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{source}: not valid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(record, dict):
                raise DatasetError(f"{source}: expected a JSON object, got {type(record).__name__}")
            missing = [key for key in required if key not in record]
            if missing:
                raise DatasetError(f"{source}: missing field(s) {missing}")
            record["_source"] = source
            records.append(record)
    if not records:
        raise DatasetError(f"{path}: the dataset is empty")
    return records


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Write records as JSONL (fields starting with ``_`` are left out)."""
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps({k: v for k, v in record.items() if not k.startswith("_")}) + "\n")


def _source(record: dict[str, Any], index: int) -> str:
    return record.get("_source", f"record {index}")


def _text(record: dict[str, Any], key: str, index: int) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise DatasetError(f"{_source(record, index)}: field {key!r} must be a string, got {type(value).__name__}")
    return value


# ---- encoding -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Example:
    """One encoded sequence: ``input_ids`` and ``labels`` (``IGNORE_INDEX`` off the loss), both ``[L]``."""

    input_ids: list[int]
    labels: list[int]
    source: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        """Labels kept as next-token targets (the first token has no previous one to predict it)."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


def render_messages(messages: list[dict[str, Any]], tokenizer: Tokenizer, source: str) -> list[tuple[str, bool]]:
    """Chat messages -> text segments, each flagged as trained on (the assistant's replies).

    The built-in template is ``"<role>: <content>\\n"`` per message; a transformers tokenizer's
    own chat template is not used here because it does not say which characters are the reply.
    """
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"{source}: 'messages' must be a non-empty list")
    segments = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) \
                or message.get("role") not in ("system", "user", "assistant"):
            raise DatasetError(f"{source}: messages[{i}] must be {{'role': system|user|assistant, 'content': str}}")
        if message["role"] == "assistant":
            segments.append(("assistant: ", False))
            segments.append((message["content"] + "\n", True))
        else:
            segments.append((f"{message['role']}: {message['content']}\n", False))
    if not any(trained for _, trained in segments):
        raise DatasetError(f"{source}: messages have no assistant reply to train on")
    return segments


def encode_prompt_response(tokenizer: Tokenizer, prompt: str, response: str, source: str = "") -> Example:
    """``[bos] + prompt + response + [eos]``, labels on the response and eos."""
    prompt_ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    response_ids = tokenizer.encode(response) + [tokenizer.eos_id]
    return Example(prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids, source)


def encode_sft_record(record: dict[str, Any], tokenizer: Tokenizer, index: int = 0) -> Example:
    """An SFT record (prompt/response or messages) -> :class:`Example`."""
    source = _source(record, index)
    if "messages" in record:
        ids, labels = [tokenizer.bos_id], [IGNORE_INDEX]
        for text, trained in render_messages(record["messages"], tokenizer, source):
            piece = tokenizer.encode(text)
            ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
        ids.append(tokenizer.eos_id)
        labels.append(tokenizer.eos_id)
        return Example(ids, labels, source)
    if "prompt" in record and "response" in record:
        return encode_prompt_response(tokenizer, _text(record, "prompt", index), _text(record, "response", index),
                                      source)
    raise DatasetError(f"{source}: an SFT record needs 'prompt' and 'response', or 'messages'")


def check_lengths(examples: Sequence[Example], max_seq_len: int) -> None:
    """Raise :class:`DatasetError` naming the source of the first example over ``max_seq_len``."""
    for example in examples:
        if len(example) > max_seq_len:
            raise DatasetError(f"{example.source}: the example has {len(example)} tokens, more than "
                               f"max_seq_len={max_seq_len}")


def load_sft_dataset(path: str | os.PathLike, tokenizer: Tokenizer, max_seq_len: int) -> list[Example]:
    """Read and encode an SFT JSONL file; every example must fit ``max_seq_len``."""
    examples = [encode_sft_record(r, tokenizer, i) for i, r in enumerate(read_jsonl(path))]
    check_lengths(examples, max_seq_len)
    return examples


@dataclasses.dataclass
class PreferencePair:
    """Chosen and rejected continuations of one prompt, each an :class:`Example`."""

    chosen: Example
    rejected: Example

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


def encode_preference_record(record: dict[str, Any], tokenizer: Tokenizer, index: int = 0) -> PreferencePair:
    source = _source(record, index)
    for key in ("prompt", "chosen", "rejected"):
        if key not in record:
            raise DatasetError(f"{source}: a preference record needs 'prompt', 'chosen' and 'rejected'")
    prompt = _text(record, "prompt", index)
    return PreferencePair(encode_prompt_response(tokenizer, prompt, _text(record, "chosen", index), source),
                          encode_prompt_response(tokenizer, prompt, _text(record, "rejected", index), source))


def load_preference_dataset(path: str | os.PathLike, tokenizer: Tokenizer, max_seq_len: int) -> list[PreferencePair]:
    pairs = [encode_preference_record(r, tokenizer, i) for i, r in enumerate(read_jsonl(path))]
    check_lengths([e for p in pairs for e in (p.chosen, p.rejected)], max_seq_len)
    return pairs


def load_prompt_dataset(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Prompt records for GRPO (each needs a string ``"prompt"``)."""
    records = read_jsonl(path, required=("prompt",))
    for i, r in enumerate(records):
        _text(r, "prompt", i)
    return records


# ---- packing --------------------------------------------------------------------------------------


def pack_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins of total length ``<= capacity``: first-fit decreasing.

    Stable: among equal lengths the input order is kept, so a shuffled input gives shuffled
    bins. Raises ValueError for an item longer than ``capacity``.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        if lengths[i] > capacity:
            raise ValueError(f"item {i} has length {lengths[i]} > capacity {capacity}")
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


@dataclasses.dataclass
class PackedBatch:
    """A packed variable-length micro-batch.

    ``input_ids`` / ``labels`` int64 ``[T]``, ``cu_seqlens`` int32 ``[N + 1]``, ``max_seqlen`` the
    longest sequence; ``num_targets`` = tokens whose next token is trained on.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int

    @classmethod
    def from_examples(cls, examples: Sequence[Example]) -> PackedBatch:
        lengths = [len(e) for e in examples]
        ids = torch.tensor([t for e in examples for t in e.input_ids], dtype=torch.int64)
        labels = torch.tensor([t for e in examples for t in e.labels], dtype=torch.int64)
        cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
        return cls(ids, labels, cu, max(lengths, default=0))

    @property
    def num_targets(self) -> int:
        """Labels kept as next-token targets (the first token of each sequence has none)."""
        keep = self.labels != IGNORE_INDEX
        starts = self.cu_seqlens[:-1].long()
        starts = starts[starts < self.labels.numel()].unique()  # empty sequences share the next start
        return int(keep.sum()) - int(keep[starts].sum())

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(self.input_ids.to(device), self.labels.to(device), self.cu_seqlens.to(device),
                           self.max_seqlen)


class ResumableLoader:
    """Epochs of optimizer steps with a resumable position ``(epoch, step_in_epoch)``.

    A subclass lists each epoch's global steps (:meth:`epoch_steps`, a pure function of the seed
    and the epoch); rank ``r`` of ``world_size`` takes units ``r, r + world_size, ...`` of each
    step, so the global batch of a step does not depend on the number of processes.
    """

    def __init__(self, *, world_size: int = 1, rank: int = 0, seed: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.epoch = 0
        self.step_in_epoch = 0

    def epoch_steps(self, epoch: int) -> list[list[Any]]:
        """The global steps of ``epoch``, each a list of units (a multiple of ``world_size``)."""
        raise NotImplementedError

    def take(self, units: list[Any]) -> Any:
        """This rank's units of a step -> what the trainer receives."""
        return units

    def steps_per_epoch(self) -> int:
        return len(self.epoch_steps(0))

    def __iter__(self) -> Iterator[Any]:
        while True:
            steps = self.epoch_steps(self.epoch)
            while self.step_in_epoch < len(steps):
                units = steps[self.step_in_epoch]
                self.step_in_epoch += 1
                yield self.take(units[self.rank::self.world_size])
            self.epoch += 1
            self.step_in_epoch = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])


class PackedLoader(ResumableLoader):
    """Epochs of packed micro-batches, sharded over data-parallel ranks (:class:`ResumableLoader`).

    Each epoch shuffles the items with ``seed + epoch``, packs them (:func:`pack_bins`) into bins of
    at most ``batch_tokens`` tokens and shuffles the bins. An optimizer step consumes
    ``grad_accum * world_size`` bins, rank ``r`` the bins ``r, r + world_size, ...`` of them. An
    epoch's bins beyond a whole number of steps are dropped.

    ``items`` are :class:`Example` s or :class:`PreferencePair` s (anything with ``len``);
    iterating yields, per step, this rank's list of ``grad_accum`` bins, each a list of items.
    """

    def __init__(self, items: Sequence[Any], batch_tokens: int, *, grad_accum: int = 1, world_size: int = 1,
                 rank: int = 0, seed: int = 0) -> None:
        super().__init__(world_size=world_size, rank=rank, seed=seed)
        if not items:
            raise DatasetError("the dataset is empty")
        if batch_tokens < max(len(item) for item in items):
            raise ValueError(f"batch_tokens={batch_tokens} is smaller than the longest item "
                             f"({max(len(item) for item in items)} tokens)")
        self.items = items
        self.batch_tokens = batch_tokens
        self.grad_accum = grad_accum
        if self.steps_per_epoch() == 0:
            raise DatasetError(f"the dataset packs into {len(self._bins(0))} micro-batches of {batch_tokens} tokens, "
                               f"fewer than one step needs (grad_accum * world_size = {grad_accum * world_size})")

    def _bins(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.items)))
        rng.shuffle(order)
        bins = [[order[i] for i in b] for b in pack_bins([len(self.items[i]) for i in order], self.batch_tokens)]
        rng.shuffle(bins)
        return bins

    def epoch_steps(self, epoch: int) -> list[list[list[int]]]:
        bins = self._bins(epoch)
        per_step = self.grad_accum * self.world_size
        return [bins[i * per_step:(i + 1) * per_step] for i in range(len(bins) // per_step)]

    def take(self, bins: list[list[int]]) -> list[list[Any]]:
        return [[self.items[i] for i in b] for b in bins]
