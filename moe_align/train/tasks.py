"""A built-in arithmetic task for the demo: multi-digit addition and subtraction with a short,
character-level-friendly, step-by-step answer.

Format (one example per problem; the trainer appends the tokenizer's eos, it is not in the text)::

    prompt:   Q:457+68=
    response: 7+8+0=15,5+6+1=12,4+0+1=05;A:525

    prompt:   Q:402-57=
    response: 2-7-0=15,0-5-1=14,4-0-1=03;A:345

The working goes column by column from the ones digit up. Every step has the same 8-character
shape ``x?y?c=kd``: the column's digits ``x`` and ``y`` (``y`` is 0 past the shorter operand),
the carry (``+``) or borrow (``-``) coming in, ``c``, then two characters: the carry or borrow
going out, ``k``, and the column's result digit, ``d``. So ``x+y+c = 10k + d`` and
``x-y-c = d - 10k``. Steps are joined by ``,``; ``;A:`` introduces the final answer, a canonical
integer (no leading zeros, ``-`` for a negative one). For subtraction with a negative result
(only when ``allow_negative``) the working subtracts the smaller operand from the larger and the
answer carries the sign: ``Q:68-457=`` -> ``7-8-0=19,5-6-1=18,4-0-1=03;A:-389``.

A response is ``10 d + 3`` characters at most for ``d = max_digits`` (33 for 3 digits), a prompt
``2 d + 4`` (10).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

ANSWER_MARKER = "A:"
"""The marker that introduces the final answer; :meth:`ArithmeticTask.extract_answer` reads the
text after the last one."""

_STEP = r"\d([+-])\d\1[01]=[01]\d"
_RESPONSE_RE = re.compile(rf"{_STEP}(?:,\d\1\d\1[01]=[01]\d)*;{ANSWER_MARKER}(?:0|-?[1-9]\d*)")


@dataclass(frozen=True)
class ArithmeticTask:
    """Random ``a + b`` and ``a - b`` problems with a step-by-step response (format in the module
    docstring).

    Args:
        min_digits, max_digits: each operand has a number of digits drawn uniformly from
            ``[min_digits, max_digits]``, then a value uniformly among the numbers with that many
            digits (0..9 for one digit; no leading zeros otherwise). Defaults 1..3.
        ops: the operators to draw from, uniformly; a subset of ``("+", "-")``.
        allow_negative: if False (the default), a subtraction's operands are ordered so that the
            result is >= 0; if True, they stay as drawn and a negative result is written with ``-``.
        test_fraction: the share of all possible problems that belongs to the ``"test"`` split.
            Which split a problem belongs to is a fixed hash of its prompt, so the train and test
            problem sets are disjoint whatever the seeds.
    """

    min_digits: int = 1
    max_digits: int = 3
    ops: tuple[str, ...] = ("+", "-")
    allow_negative: bool = False
    test_fraction: float = 0.1

    def __post_init__(self) -> None:
        for name in ("min_digits", "max_digits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if self.max_digits < self.min_digits:
            raise ValueError(f"max_digits={self.max_digits} must be >= min_digits={self.min_digits}")
        ops = tuple(self.ops)
        if not ops or any(op not in ("+", "-") for op in ops):
            raise ValueError(f"ops={self.ops!r} must be a non-empty subset of ('+', '-')")
        object.__setattr__(self, "ops", ops)
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction={self.test_fraction!r} must be in (0, 1)")

    # ---- sizes -----------------------------------------------------------------------------------

    @property
    def max_prompt_chars(self) -> int:
        """The longest prompt this task produces, in characters (``2 * max_digits + 4``)."""
        return 2 * self.max_digits + 4

    @property
    def max_response_chars(self) -> int:
        """The longest response this task produces, in characters, without eos
        (``10 * max_digits + 3``): ``d`` steps of 8, ``d - 1`` commas, ``;A:`` and an answer of
        at most ``d + 1`` characters."""
        return 10 * self.max_digits + 3

    # ---- problems --------------------------------------------------------------------------------

    def sample(self, rng: random.Random) -> dict[str, str]:
        """One random problem: ``{"prompt": "Q:457+68=", "response": "7+8+0=15,...;A:525",
        "answer": "525"}``. Draws only from ``rng``."""
        op = rng.choice(self.ops)
        a, b = self._operand(rng), self._operand(rng)
        if op == "-" and not self.allow_negative and a < b:
            a, b = b, a
        return self.example(a, op, b)

    def example(self, a: int, op: str, b: int) -> dict[str, str]:
        """The example for the problem ``a op b`` (non-negative integers, ``op`` in ``"+-"``)."""
        if isinstance(a, bool) or not isinstance(a, int) or a < 0:
            raise ValueError(f"a={a!r} must be a non-negative integer")
        if isinstance(b, bool) or not isinstance(b, int) or b < 0:
            raise ValueError(f"b={b!r} must be a non-negative integer")
        if op not in ("+", "-"):
            raise ValueError(f"op={op!r} must be '+' or '-'")
        result = a + b if op == "+" else a - b
        top, bottom = (a, b) if op == "+" else (max(a, b), min(a, b))
        width = max(len(str(top)), len(str(bottom)))
        steps, carry = [], 0
        for i in range(width):
            x, y = (top // 10**i) % 10, (bottom // 10**i) % 10
            if op == "+":
                s = x + y + carry
                out, digit = divmod(s, 10)
            else:
                s = x - y - carry
                out, digit = int(s < 0), s % 10
            steps.append(f"{x}{op}{y}{op}{carry}={out}{digit}")
            carry = out
        answer = str(result)
        response = ",".join(steps) + ";" + ANSWER_MARKER + answer
        return {"prompt": f"Q:{a}{op}{b}=", "response": response, "answer": answer}

    def split_of(self, prompt: str) -> str:
        """``"test"`` or ``"train"``: a fixed hash of the prompt against ``test_fraction``."""
        digest = hashlib.blake2b(prompt.encode(), digest_size=8).digest()
        return "test" if int.from_bytes(digest, "big") < self.test_fraction * 2.0**64 else "train"

    def dataset(self, n: int, seed: int = 0, split: str = "train") -> list[dict[str, str]]:
        """``n`` problems of one split, the same list for the same ``(task, n, seed, split)``.

        Problems are drawn with :meth:`sample` and kept when :meth:`split_of` their prompt is
        ``split``, so no test problem ever appears in a train set. A split may repeat a problem
        when ``n`` is large against the number of possible problems.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n={n!r} must be a non-negative integer")
        if split not in ("train", "test"):
            raise ValueError(f"split={split!r} must be 'train' or 'test'")
        rng = random.Random(f"arithmetic:{split}:{seed}")
        out: list[dict[str, str]] = []
        attempts, budget = 0, 1000 * n + 10_000
        while len(out) < n:
            attempts += 1
            if attempts > budget:
                raise ValueError(
                    f"could not draw {n} {split!r} problems from {self}; widen the digits or test_fraction"
                )
            ex = self.sample(rng)
            if self.split_of(ex["prompt"]) == split:
                out.append(ex)
        return out

    @staticmethod
    def write_jsonl(path: str | os.PathLike, examples: Iterable[dict]) -> Path:
        """Write one JSON object per line (``{"prompt", "response", "answer"}``) to ``path``,
        creating its folder; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            for ex in examples:
                f.write(json.dumps(ex, ensure_ascii=False) + "\n")
        return path

    # ---- grading ---------------------------------------------------------------------------------

    @staticmethod
    def extract_answer(completion: str) -> str | None:
        """The text after the last ``A:`` marker up to the end or the next newline, stripped;
        None if the completion has no marker."""
        at = completion.rfind(ANSWER_MARKER)
        if at < 0:
            return None
        return completion[at + len(ANSWER_MARKER) :].split("\n", 1)[0].strip()

    @staticmethod
    def format_ok(completion: str) -> bool:
        """Whether the completion, without surrounding whitespace, is exactly in the response
        format: steps ``x?y?c=kd`` with one operator throughout, joined by ``,``, then ``;A:`` and
        a canonical integer. It checks the shape only, not the arithmetic."""
        return _RESPONSE_RE.fullmatch(completion.strip()) is not None

    @classmethod
    def is_correct(cls, completion: str, answer: str | int) -> bool:
        """Exact match: the extracted answer equals ``str(answer).strip()`` as a string."""
        got = cls.extract_answer(completion)
        return got is not None and got == str(answer).strip()

    def _operand(self, rng: random.Random) -> int:
        digits = rng.randint(self.min_digits, self.max_digits)
        low = 0 if digits == 1 else 10 ** (digits - 1)
        return rng.randrange(low, 10**digits)
