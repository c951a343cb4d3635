"""Rollout engines: sample G completions per prompt for GRPO.

:class:`RolloutEngine` is the interface the GRPO trainer talks to, so that generation can move to
another engine (e.g. vLLM, as DeepSeek-V2 section 4.2 does) without touching the trainer::

    engine.generate(prompt_token_lists, n=G, max_new_tokens=..., temperature=..., top_p=...,
                    stop_token_ids=[eos], stop_strings=[...], generator=g) -> list[Rollout]
    engine.update_weights(model)        # after each policy update

The built-in :class:`PolicyRolloutEngine` samples with the policy's own weights through the
model's paged-cache :meth:`~moe_align.models.deepseek.DeepseekForCausalLM.generate` (the "hybrid
engine" of the seed: one copy of the weights serves both training and inference), so its
``update_weights`` has nothing to do.

Stop strings are applied to the decoded completion, as vLLM does: the text ends just before the
first stop string (the string itself is left out of the text), and the tokens end with the token
that completed it (the policy is trained to produce the stop string). The built-in engine
generates up to ``max_new_tokens`` (or a stop token) and truncates afterwards.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence, runtime_checkable

import torch

from moe_align.train.tokenizer import Tokenizer

FINISH_STOP = "stop"  # a stop token or a stop string ended the completion
FINISH_LENGTH = "length"  # max_new_tokens ended it


@dataclasses.dataclass
class Rollout:
    """One sampled completion.

    Attributes:
        prompt_ids: the prompt's tokens.
        completion_ids: the completion's tokens, after stop-string truncation (a final stop token
            such as eos is kept).
        text: the decoded completion, cut before the first stop string.
        finish_reason: ``"stop"`` (stop token or stop string) or ``"length"``.
        num_generated: tokens the engine generated (before truncation), for throughput.
        logprobs: the sampler's log-prob of each completion token, if the engine reports them
            (vLLM does); the trainer then weights the policy term by the truncated importance
            ratio ``pi_old / pi_sampler``. None for the built-in engine (its sampler is the policy).
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    finish_reason: str
    num_generated: int = 0
    logprobs: list[float] | None = None


@runtime_checkable
class RolloutEngine(Protocol):
    """Anything that samples completions for the GRPO trainer."""

    def generate(self, prompts: Sequence[Sequence[int]], *, n: int, max_new_tokens: int, temperature: float,
                 top_p: float, stop_token_ids: Sequence[int], stop_strings: Sequence[str],
                 generator: torch.Generator | None) -> list[Rollout]:
        """``n`` completions of each prompt: ``len(prompts) * n`` rollouts, the ``n`` of a prompt
        consecutive (``rollouts[i * n + j]`` is the ``j``-th of prompt ``i``)."""
        ...

    def update_weights(self, model: torch.nn.Module) -> None:
        """Load the policy's current weights (after an optimizer step)."""
        ...


def find_stop(text: str, stop_strings: Sequence[str]) -> tuple[int, str] | None:
    """``(index, stop string)`` of the earliest stop string in ``text`` (the longest one at a tie),
    or None."""
    best = None
    for s in stop_strings:
        at = text.find(s)
        if at >= 0 and (best is None or at < best[0] or (at == best[0] and len(s) > len(best[1]))):
            best = (at, s)
    return best


def truncate_at_stop(tokens: Sequence[int], tokenizer: Tokenizer, stop_strings: Sequence[str]
                     ) -> tuple[list[int], str, bool]:
    """``(tokens, text, stopped)``: the completion cut at its first stop string.

    The text ends before the stop string; the tokens are the shortest prefix whose decoding
    contains a stop string (binary search: a longer prefix decodes to a longer text).
    """
    tokens = list(tokens)
    stop_strings = [s for s in stop_strings if s]
    text = tokenizer.decode(tokens)
    found = find_stop(text, stop_strings)
    if found is None:
        return tokens, text, False
    low, high = 1, len(tokens)  # find_stop(decode(tokens[:high])) holds
    while low < high:
        mid = (low + high) // 2
        if find_stop(tokenizer.decode(tokens[:mid]), stop_strings) is not None:
            high = mid
        else:
            low = mid + 1
    return tokens[:high], text[: found[0]], True


def check_generation_args(n: int, max_new_tokens: int, temperature: float, top_p: float) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


class PolicyRolloutEngine:
    """Samples with the policy model itself (no second copy of the weights).

    Args:
        model: a :class:`~moe_align.models.deepseek.DeepseekForCausalLM` (the unwrapped policy).
        tokenizer: decodes completions for the stop strings and the rewards.

    Generation runs in eval mode and without gradients (the MoE routers do not count the
    rollout's tokens for the V3 bias update); the model's mode is restored afterwards.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer

    def update_weights(self, model: torch.nn.Module) -> None:
        """Nothing to do: the engine samples with the policy's own parameters."""
        if model is not self.model:
            raise ValueError("PolicyRolloutEngine samples with the model it was built on; got another model")

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], *, n: int = 1, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, stop_token_ids: Sequence[int] = (), stop_strings: Sequence[str] = (),
                 generator: torch.Generator | None = None) -> list[Rollout]:
        """See :meth:`RolloutEngine.generate`; ``temperature=0`` is greedy."""
        check_generation_args(n, max_new_tokens, temperature, top_p)
        expanded = [list(p) for p in prompts for _ in range(n)]
        if not expanded:
            return []
        was_training = self.model.training
        self.model.eval()
        try:
            outputs = self.model.generate(expanded, max_new_tokens, temperature=temperature, top_p=top_p,
                                          stop_tokens=tuple(stop_token_ids), generator=generator)
        finally:
            self.model.train(was_training)
        stop_ids = set(stop_token_ids)
        rollouts = []
        for prompt, tokens in zip(expanded, outputs):
            kept, text, stopped = truncate_at_stop(tokens, self.tokenizer, stop_strings)
            if not stopped:
                stopped = bool(kept) and kept[-1] in stop_ids
            rollouts.append(Rollout(prompt, kept, text, FINISH_STOP if stopped else FINISH_LENGTH, len(tokens)))
        return rollouts


__all__ = ["Rollout", "RolloutEngine", "PolicyRolloutEngine", "find_stop", "truncate_at_stop",
           "FINISH_STOP", "FINISH_LENGTH"]
