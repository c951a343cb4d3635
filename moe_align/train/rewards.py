"""Reward functions for GRPO: a registry, the rule-based rewards shipped, and their weighted sum.

A reward function follows TRL's protocol::

    fn(prompts: list[str], completions: list[str], **columns) -> Sequence[float | None]

``columns`` are the dataset's other fields, each a list aligned with ``prompts`` (e.g.
``answer=[...]``). A function receives every column if it takes ``**kwargs``, else only the
columns it names; a column it requires (a parameter without a default) that the batch lacks is a
configuration error. It returns one number per sample; ``None`` means "not applicable" and counts
as 0.0 (as TRL's ``nansum`` would), without an error.

:class:`RewardMix` calls each function once per batch and combines them with DeepSeek-V2
eq. 36, ``r_i = sum_k c_k RM_k(o_i)``, through :func:`moe_align.ops.grpo.combine_rewards`. A
function that raises, or returns NaN or inf for a sample, is handled by ``on_error``:

- ``"raise"``: a :class:`RewardError` naming the function, the sample's index, its prompt and its
  completion, chained to the original exception;
- ``"zero"``: that function's reward for that sample is 0.0; a :class:`RewardWarning` says so and
  the message goes to :attr:`RewardResult.errors`;
- ``"skip"``: the sample is marked invalid (``RewardResult.valid`` False, its rewards 0.0) so that
  the trainer drops it; warned and recorded as for ``"zero"``.

When a batch call raises, the function is called again one sample at a time to find the samples
that fail (reward functions are expected to be pure); if none fails alone, the policy applies to
the whole batch. A wrong-length or non-numeric return is a bug in the function and always raises.

Shipped (registered by name): ``"exact_answer"``, ``"format"`` and ``"length_penalty"``; the
factories :func:`exact_answer_reward`, :func:`format_reward` and :func:`length_penalty` make
variants. Register your own with :func:`register_reward`.
"""

from __future__ import annotations

import inspect
import math
import numbers
import re
import warnings
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Mapping, Sequence

import torch

from moe_align.ops.grpo import combine_rewards
from moe_align.train.tasks import ArithmeticTask

RewardFn = Callable[..., Sequence["float | None"]]
"""``fn(prompts, completions, **columns) -> Sequence[float | None]``, one value per sample."""

ON_ERROR = ("raise", "zero", "skip")
_SHOW_CHARS = 200
_FLOAT32_MAX = torch.finfo(torch.float32).max


class RewardError(RuntimeError):
    """A reward function failed, or returned something that is not one number per sample.

    Attributes: ``name`` (the reward function), ``index`` (the sample, or None for the whole
    batch), ``prompt`` and ``completion`` (None for the whole batch).
    """

    def __init__(self, message: str, name: str, index: int | None = None, prompt: str | None = None,
                 completion: str | None = None) -> None:
        super().__init__(message)
        self.name, self.index, self.prompt, self.completion = name, index, prompt, completion


class RewardWarning(UserWarning):
    """A reward function failed on some samples and ``on_error`` let the run go on."""


# ---- registry -----------------------------------------------------------------------------------

_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str, fn: RewardFn | None = None, *, override: bool = False):
    """Register a reward function under ``name``, as a decorator or a plain call::

        @register_reward("brevity")
        def brevity(prompts, completions, **kwargs): ...

        register_reward("brevity", brevity)

    Raises ValueError if ``name`` is taken by another function (unless ``override=True``);
    registering the same function again is a no-op. Returns ``fn`` (the
    decorator returns the function unchanged).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty string, got {name!r}")

    def add(f: RewardFn) -> RewardFn:
        if not callable(f):
            raise TypeError(f"reward {name!r} must be callable, got {type(f).__name__}")
        if name in _REGISTRY and not override and _REGISTRY[name] is not f:
            raise ValueError(f"a reward named {name!r} is already registered; pass override=True to replace it")
        _REGISTRY[name] = f
        return f

    return add if fn is None else add(fn)


def get_reward(name_or_fn: str | RewardFn) -> RewardFn:
    """The registered function called ``name_or_fn``, or ``name_or_fn`` itself if it is callable.
    ``"rm:<directory>"`` loads (once) the reward model trained by ``moe-align rm`` in that
    directory. Raises ValueError for an unknown name, listing the known ones."""
    if callable(name_or_fn):
        return name_or_fn
    if not isinstance(name_or_fn, str):
        raise TypeError(f"a reward is a registered name or a callable, got {type(name_or_fn).__name__}")
    if name_or_fn.startswith("rm:") and name_or_fn not in _REGISTRY:
        # a learned reward model by its directory, e.g. {"rm:runs/rm/checkpoint-500": 0.5}
        from moe_align.train.rm import register_reward_model

        return register_reward_model(name_or_fn, name_or_fn[3:])
    try:
        return _REGISTRY[name_or_fn]
    except KeyError:
        raise ValueError(f"unknown reward {name_or_fn!r}; known: {', '.join(available_rewards())}") from None


def available_rewards() -> list[str]:
    """The registered reward names, sorted."""
    return sorted(_REGISTRY)


# ---- shipped rewards ----------------------------------------------------------------------------

_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")


def normalize_answer(text: Any) -> str:
    """``str(text)`` stripped, with thousands separators removed from a number (``"1,234"`` ->
    ``"1234"``); other text is only stripped."""
    text = str(text).strip()
    return text.replace(",", "") if _THOUSANDS.fullmatch(text) else text


def answers_match(predicted: Any, reference: Any) -> bool:
    """Whether two answers agree after :func:`normalize_answer`: as numbers when both parse as
    finite decimals (``"3.50"`` matches ``"3.5"``, ``"007"`` matches ``"7"``), else as strings."""
    p, r = normalize_answer(predicted), normalize_answer(reference)
    try:
        pn, rn = Decimal(p), Decimal(r)
    except InvalidOperation:
        return p == r
    if pn.is_finite() and rn.is_finite():
        return pn == rn
    return p == r


def exact_answer_reward(extractor: Callable[[str], str | None] = ArithmeticTask.extract_answer) -> RewardFn:
    """A reward of 1.0 when ``extractor(completion)`` matches the sample's ``answer`` column
    (:func:`answers_match`), 0.0 when it does not or extracts nothing, None (not applicable) when
    the reference answer is None. The function is named ``exact_answer``."""

    def exact_answer(prompts: list[str], completions: list[str], answer: Sequence[Any], **kwargs: Any):
        out: list[float | None] = []
        for completion, ref in zip(completions, answer):
            if ref is None:
                out.append(None)
                continue
            got = extractor(completion)
            out.append(1.0 if got is not None and answers_match(got, ref) else 0.0)
        return out

    return exact_answer


def format_reward(pattern: str | re.Pattern | None = None) -> RewardFn:
    """A reward of 1.0 when the completion, stripped of surrounding whitespace, fully matches
    ``pattern`` (a regex), else 0.0; the default checks :meth:`ArithmeticTask.format_ok`. The
    function is named ``format``."""
    if pattern is None:
        check = ArithmeticTask.format_ok
    else:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        if not isinstance(regex, re.Pattern):
            raise TypeError(f"pattern must be a regex string or re.Pattern, got {type(pattern).__name__}")

        def check(completion: str) -> bool:
            return regex.fullmatch(completion.strip()) is not None

    def format_(prompts: list[str], completions: list[str], **kwargs: Any):
        return [1.0 if check(c) else 0.0 for c in completions]

    format_.__name__ = format_.__qualname__ = "format"
    return format_


def length_penalty(max_chars: int, soft_chars: int | None = None) -> RewardFn:
    """A penalty on long completions (in characters, ``L = len(completion)``)::

        r = 0                                             if L <= soft_chars
        r = -(L - soft_chars) / (max_chars - soft_chars)  if soft_chars < L < max_chars
        r = -1                                            if L >= max_chars

    i.e. 0 up to the soft limit, then linear down to -1 at ``max_chars`` and -1 beyond.
    ``soft_chars`` defaults to ``max_chars * 3 // 4``; ``soft_chars == max_chars`` gives a step
    (-1 only past ``max_chars``). The function is named ``length_penalty``.
    """
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
        raise ValueError(f"max_chars={max_chars!r} must be an integer >= 1")
    soft = max_chars * 3 // 4 if soft_chars is None else soft_chars
    if isinstance(soft, bool) or not isinstance(soft, int) or not 0 <= soft <= max_chars:
        raise ValueError(f"soft_chars={soft_chars!r} must be an integer in [0, max_chars={max_chars}]")

    def length_penalty(prompts: list[str], completions: list[str], **kwargs: Any):
        out = []
        for c in completions:
            over = len(c) - soft
            if over <= 0:
                out.append(0.0)
            elif soft == max_chars:
                out.append(-1.0)
            else:
                out.append(-min(1.0, over / (max_chars - soft)))
        return out

    return length_penalty


register_reward("exact_answer", exact_answer_reward())
register_reward("format", format_reward())
# Sized for the arithmetic task (responses of at most 33 characters for 3 digits).
register_reward("length_penalty", length_penalty(64, 48))


# ---- the mix ------------------------------------------------------------------------------------


@dataclass
class RewardResult:
    """The rewards of one batch of ``B`` samples.

    Attributes:
        total: float32 ``[B]``, eq. 36 ``sum_k c_k RM_k``.
        per_function: name -> float32 ``[B]``, each function's rewards as summed (None, failed
            and skipped samples hold 0.0).
        valid: bool ``[B]``, False for the samples ``on_error="skip"`` marked.
        errors: a human-readable message per failure (empty when all went well).
    """

    total: torch.Tensor
    per_function: dict[str, torch.Tensor]
    valid: torch.Tensor
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Entry:
    name: str
    fn: RewardFn
    coefficient: float
    takes_all: bool  # has **kwargs
    accepted: frozenset[str]
    required: frozenset[str]


def _signature(fn: RewardFn) -> tuple[bool, frozenset[str], frozenset[str]]:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins and the like: pass every column
        return True, frozenset(), frozenset()
    takes_all = any(p.kind is p.VAR_KEYWORD for p in params)
    named = [p for p in params[2:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return (takes_all, frozenset(p.name for p in named),
            frozenset(p.name for p in named if p.default is p.empty))


def _show(text: str) -> str:
    return repr(text if len(text) <= _SHOW_CHARS else text[:_SHOW_CHARS] + "...")


class RewardMix:
    """Several reward functions and their coefficients, combined with eq. 36.

    Args:
        rewards: ``[(name_or_fn, coefficient), ...]`` or ``{name_or_fn: coefficient}``; a name is
            looked up with :func:`get_reward`, a callable is named by its ``__name__`` (register a
            lambda under a name to use it). Names must be distinct.
        on_error: ``"raise"``, ``"zero"`` or ``"skip"`` (module docstring).

    Call it as ``mix(prompts, completions, **columns) -> RewardResult``.
    """

    def __init__(self, rewards: Sequence[tuple[str | RewardFn, float]] | Mapping[str | RewardFn, float],
                 on_error: str = "raise") -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r} must be one of {ON_ERROR}")
        self.on_error = on_error
        items = list(rewards.items()) if isinstance(rewards, Mapping) else list(rewards)
        if not items:
            raise ValueError("rewards is empty")
        self._entries: list[_Entry] = []
        for i, item in enumerate(items):
            if not isinstance(item, tuple) or len(item) != 2:
                raise TypeError(f"rewards[{i}] must be a (name_or_callable, coefficient) pair, got {item!r}")
            ref, coefficient = item
            fn = get_reward(ref)
            name = ref if isinstance(ref, str) else getattr(fn, "__name__", type(fn).__name__)
            if isinstance(coefficient, bool) or not isinstance(coefficient, numbers.Real):
                raise TypeError(f"coefficient of reward {name!r} must be a number, got {type(coefficient).__name__}")
            if not math.isfinite(coefficient):
                raise ValueError(f"coefficient of reward {name!r} must be finite, got {coefficient}")
            if any(e.name == name for e in self._entries):
                raise ValueError(f"two rewards are named {name!r}; register one under another name")
            self._entries.append(_Entry(name, fn, float(coefficient), *_signature(fn)))

    @property
    def names(self) -> list[str]:
        """The reward functions' names, in order."""
        return [e.name for e in self._entries]

    @property
    def coefficients(self) -> dict[str, float]:
        """name -> coefficient ``c_k``."""
        return {e.name: e.coefficient for e in self._entries}

    def __repr__(self) -> str:
        return f"RewardMix({self.coefficients}, on_error={self.on_error!r})"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Sequence[Any]) -> RewardResult:
        """Score a batch: ``prompts`` and ``completions`` are ``B`` strings, each column ``B``
        values. Returns a :class:`RewardResult`."""
        prompts, completions = list(prompts), list(completions)
        if len(prompts) != len(completions):
            raise ValueError(f"prompts has {len(prompts)} items but completions has {len(completions)}")
        batch = len(prompts)
        cols = {}
        for key, col in columns.items():
            col = list(col)
            if len(col) != batch:
                raise ValueError(f"column {key!r} has {len(col)} items, expected {batch} (one per prompt)")
            cols[key] = col
        valid = [True] * batch
        errors: list[str] = []
        per_function: dict[str, torch.Tensor] = {}
        for entry in self._entries:
            values = self._evaluate(entry, prompts, completions, cols, valid, errors) if batch else []
            per_function[entry.name] = torch.tensor(values, dtype=torch.float32)
        valid_mask = torch.tensor(valid, dtype=torch.bool)
        for rewards in per_function.values():  # a skipped sample scores 0.0 everywhere
            rewards[~valid_mask] = 0.0
        total = combine_rewards(per_function, self.coefficients)
        return RewardResult(total, per_function, valid_mask, errors)

    # ---- one function on one batch -----------------------------------------------------------------

    def _evaluate(self, entry: _Entry, prompts: list[str], completions: list[str], cols: dict[str, list],
                  valid: list[bool], errors: list[str]) -> list[float]:
        missing = entry.required - set(cols)
        if missing:
            raise RewardError(f"reward function {entry.name!r} needs the column(s) {sorted(missing)}; "
                              f"the batch has {sorted(cols)}", entry.name)
        kwargs = cols if entry.takes_all else {k: v for k, v in cols.items() if k in entry.accepted}
        batch = len(prompts)
        failures: list[tuple[int, str, BaseException | None]] = []
        try:
            returned = entry.fn(prompts, completions, **kwargs)
        except Exception as batch_error:
            values: list = [0.0] * batch
            for i in range(batch):
                one = {k: [v[i]] for k, v in kwargs.items()}
                try:
                    returned = entry.fn([prompts[i]], [completions[i]], **one)
                except Exception as e:
                    failures.append((i, f"raised {type(e).__name__}: {e}", e))
                    if self.on_error == "raise":
                        break
                else:
                    values[i] = self._check_return(entry, returned, 1)[0]
            if not failures:
                self._whole_batch_failed(entry, batch_error, batch, valid, errors)
                return [0.0] * batch
        else:
            values = self._check_return(entry, returned, batch)
        out = []
        failed = {i for i, _, _ in failures}
        for i, v in enumerate(values):
            v = 0.0 if v is None or i in failed else float(v)
            if not (math.isfinite(v) and abs(v) <= _FLOAT32_MAX):
                failures.append((i, f"returned {v}", None))
                v = 0.0
            out.append(v)
        failures.sort(key=lambda f: f[0])
        self._apply_policy(entry, failures, prompts, completions, valid, errors)
        return out

    @staticmethod
    def _check_return(entry: _Entry, values: Any, batch: int) -> list[float | None]:
        kind = type(values).__name__
        if hasattr(values, "tolist"):  # a torch tensor or numpy array
            values = values.tolist()
        try:
            if isinstance(values, (str, bytes, Mapping)):
                raise TypeError
            values = list(values)
        except TypeError:
            raise RewardError(f"reward function {entry.name!r} must return a sequence of {batch} numbers, "
                              f"got {kind}", entry.name) from None
        if len(values) != batch:
            raise RewardError(f"reward function {entry.name!r} returned {len(values)} values for {batch} samples",
                              entry.name)
        for i, v in enumerate(values):
            if v is not None and not isinstance(v, numbers.Real):
                raise RewardError(f"reward function {entry.name!r} returned {type(v).__name__} {v!r} for sample "
                                  f"{i}; expected a number or None", entry.name, i)
        return values

    def _apply_policy(self, entry: _Entry, failures: list, prompts: list[str], completions: list[str],
                      valid: list[bool], errors: list[str]) -> None:
        if not failures:
            return
        messages = []
        for i, reason, cause in failures:
            message = (f"reward function {entry.name!r} {reason} on sample {i}\n"
                       f"  prompt: {_show(prompts[i])}\n  completion: {_show(completions[i])}")
            if self.on_error == "raise":
                raise RewardError(message, entry.name, i, prompts[i], completions[i]) from cause
            if self.on_error == "skip":
                valid[i] = False
            messages.append(message)
        errors.extend(messages)
        action = "counted as 0.0" if self.on_error == "zero" else "marked invalid (skipped)"
        more = f" (and {len(messages) - 1} more sample(s))" if len(messages) > 1 else ""
        warnings.warn(f"{messages[0]}\n  -> {action}{more}", RewardWarning, stacklevel=4)

    def _whole_batch_failed(self, entry: _Entry, error: Exception, batch: int, valid: list[bool],
                            errors: list[str]) -> None:
        message = (f"reward function {entry.name!r} raised {type(error).__name__}: {error} on the batch of "
                   f"{batch} samples (no single sample raised alone)")
        if self.on_error == "raise":
            raise RewardError(message, entry.name) from error
        if self.on_error == "skip":
            valid[:] = [False] * batch
        errors.append(message)
        action = "all counted as 0.0" if self.on_error == "zero" else "all marked invalid (skipped)"
        warnings.warn(f"{message}\n  -> {action}", RewardWarning, stacklevel=4)
