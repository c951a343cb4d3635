import math
import warnings

import pytest
import torch

from moe_align.train import rewards as R
from moe_align.train.rewards import (
    RewardError,
    RewardMix,
    RewardWarning,
    available_rewards,
    exact_answer_reward,
    format_reward,
    get_reward,
    length_penalty,
    register_reward,
)

GOOD = "7+8+0=15,5+6+1=12,4+0+1=05;A:525"
WRONG = "7+8+0=15,5+6+1=12,4+0+1=05;A:524"
PROMPTS = ["Q:457+68=", "Q:457+68=", "Q:1+1=", "Q:9-3="]
COMPLETIONS = [GOOD, WRONG, "the answer is 2", "9-3-0=06;A:6 and more"]
ANSWERS = ["525", "525", "2", "6"]


@pytest.fixture
def registry():
    """Restore the registry after a test that registers functions."""
    saved = dict(R._REGISTRY)
    yield
    R._REGISTRY.clear()
    R._REGISTRY.update(saved)


def test_shipped_are_registered():
    assert {"exact_answer", "format", "length_penalty"} <= set(available_rewards())
    assert available_rewards() == sorted(available_rewards())


def test_exact_answer():
    fn = get_reward("exact_answer")
    assert fn(PROMPTS, COMPLETIONS, answer=ANSWERS) == [1.0, 0.0, 0.0, 0.0]
    # normalisation: whitespace, thousands separators, numeric compare; None = not applicable
    completions = ["A: 1,234 ", "A:1234", "A:007", "A:3.50", "A:abc", "A:abc", "no marker", "A:1"]
    answers = ["1234", "1,234", "7", "3.5", "abc", "abd", "1", None]
    assert fn([""] * 8, completions, answer=answers) == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, None]
    assert fn(["", ""], ["A:5", "A:5"], answer=[5, -5]) == [1.0, 0.0]  # non-string references
    # "1,23" is not a thousands-separated number, so it stays a string
    assert fn([""], ["A:1,23"], answer=["123"]) == [0.0]
    # a pluggable extractor
    boxed = exact_answer_reward(lambda c: c.split("boxed:")[-1] if "boxed:" in c else None)
    assert boxed.__name__ == "exact_answer"
    assert boxed(["", ""], ["x boxed:42", "42"], answer=["42", "42"]) == [1.0, 0.0]


def test_format():
    fn = get_reward("format")
    assert fn.__name__ == "format"
    assert fn(PROMPTS, COMPLETIONS) == [1.0, 1.0, 0.0, 0.0]
    custom = format_reward(r"<think>.*</think>\d+")
    assert custom(["", "", ""], ["<think>hm</think>12", " <think></think>3\n", "12"]) == [1.0, 1.0, 0.0]


def test_length_penalty():
    fn = length_penalty(20, 10)
    completions = ["", "x" * 10, "x" * 11, "x" * 15, "x" * 20, "x" * 50]
    assert fn([""] * 6, completions) == [0.0, 0.0, -0.1, -0.5, -1.0, -1.0]
    step = length_penalty(5, 5)
    assert step(["", ""], ["x" * 5, "x" * 6]) == [0.0, -1.0]
    default = get_reward("length_penalty")
    assert default([""], [GOOD]) == [0.0]
    assert default([""], ["x" * 56]) == [-0.5]
    assert length_penalty(8)([""], ["x" * 7]) == [-0.5]  # soft limit 6 by default
    for bad in [dict(max_chars=0), dict(max_chars=10, soft_chars=11), dict(max_chars=10, soft_chars=-1)]:
        with pytest.raises(ValueError):
            length_penalty(**bad)


def test_mix_is_eq36_weighted_sum():
    mix = RewardMix({"exact_answer": 1.0, "format": 0.25, "length_penalty": -2.0})
    long = GOOD + "x" * 32  # 64 chars: length penalty -1; format fails; answer "525x..." wrong
    result = mix(PROMPTS + ["Q:457+68="], COMPLETIONS + [long], answer=ANSWERS + ["525"])
    exact = [1, 0, 0, 0, 0]
    fmt = [1, 1, 0, 0, 0]
    length = [0, 0, 0, 0, -1]
    expected = [1.0 * e + 0.25 * f - 2.0 * l for e, f, l in zip(exact, fmt, length)]
    assert result.total.dtype == torch.float32 and result.total.shape == (5,)
    assert result.total.tolist() == expected
    assert result.per_function["format"].tolist() == fmt
    assert list(result.per_function) == ["exact_answer", "format", "length_penalty"]
    assert result.valid.dtype == torch.bool and result.valid.all()
    assert result.errors == []
    assert mix.coefficients == {"exact_answer": 1.0, "format": 0.25, "length_penalty": -2.0}


def test_mix_sequence_form_and_callables():
    def half(prompts, completions):  # takes no columns: gets none
        return [0.5] * len(prompts)

    def by_answer(prompts, completions, answer, **kwargs):
        assert kwargs == {"extra": [7, 8]}
        return [float(a) for a in answer]

    mix = RewardMix([(half, 2.0), (by_answer, 0.5)])
    assert mix.names == ["half", "by_answer"]
    result = mix(["a", "b"], ["c", "d"], answer=["1", "3"], extra=[7, 8])
    assert result.total.tolist() == [1.0 + 0.5, 1.0 + 1.5]


def test_none_is_not_applicable():
    mix = RewardMix([("exact_answer", 2.0)])
    result = mix(["", ""], ["A:1", "A:1"], answer=["1", None])
    assert result.total.tolist() == [2.0, 0.0]
    assert result.valid.tolist() == [True, True] and result.errors == []


def test_empty_batch():
    result = RewardMix({"format": 1.0})([], [])
    assert result.total.shape == (0,) and result.valid.shape == (0,)


def test_register_user_callable(registry):
    @register_reward("shouting")
    def shouting(prompts, completions, **kwargs):
        return [1.0 if c.isupper() else 0.0 for c in completions]

    assert get_reward("shouting") is shouting
    assert "shouting" in available_rewards()
    register_reward("quiet", lambda prompts, completions, **kw: [0.0] * len(prompts))
    mix = RewardMix({"shouting": 1.0, "quiet": 3.0})
    assert mix(["", ""], ["HI", "hi"]).total.tolist() == [1.0, 0.0]
    # the same callable directly, by its __name__
    assert RewardMix([(shouting, 1.0)]).names == ["shouting"]
    assert get_reward(shouting) is shouting


def test_registry_errors(registry):
    def f(prompts, completions, **kwargs):
        return [0.0] * len(prompts)

    register_reward("f", f)
    register_reward("f", f)  # the same function again: fine
    with pytest.raises(ValueError, match="already registered"):
        register_reward("f", lambda p, c, **k: [1.0] * len(p))
    g = register_reward("f", lambda p, c, **k: [1.0] * len(p), override=True)
    assert get_reward("f") is g
    with pytest.raises(ValueError, match=r"unknown reward 'nope'.*exact_answer.*format"):
        get_reward("nope")
    with pytest.raises(ValueError, match="unknown reward"):
        RewardMix({"nope": 1.0})
    with pytest.raises(TypeError):
        register_reward("bad", 3)
    with pytest.raises(TypeError):
        get_reward(3)


def test_mix_config_errors():
    def format(prompts, completions, **kwargs):  # clashes with the registered "format"
        return [0.0] * len(prompts)

    with pytest.raises(ValueError, match="two rewards are named 'format'"):
        RewardMix([("format", 1.0), (format, 1.0)])
    with pytest.raises(ValueError, match="on_error"):
        RewardMix({"format": 1.0}, on_error="ignore")
    with pytest.raises(ValueError, match="finite"):
        RewardMix({"format": math.nan})
    with pytest.raises(TypeError, match="coefficient"):
        RewardMix({"format": "1"})
    with pytest.raises(ValueError, match="empty"):
        RewardMix({})
    mix = RewardMix({"exact_answer": 1.0})
    with pytest.raises(RewardError, match=r"'exact_answer' needs the column\(s\) \['answer'\]"):
        mix(["p"], ["c"])
    with pytest.raises(ValueError, match="column 'answer'"):
        mix(["p"], ["c"], answer=["1", "2"])
    with pytest.raises(ValueError, match="completions"):
        mix(["p"], ["c", "d"], answer=["1"])


# ---- error policies -------------------------------------------------------------------------------

BAD = "this completion breaks the reward"


def fragile(prompts, completions, **kwargs):
    """Raises for the whole call when it sees the bad sample."""
    for c in completions:
        if c == BAD:
            raise ZeroDivisionError("cannot score this")
    return [1.0] * len(completions)


def nan_on_bad(prompts, completions, **kwargs):
    return [math.nan if c == BAD else 1.0 for c in completions]


def inf_on_bad(prompts, completions, **kwargs):
    return [-math.inf if c == BAD else 1.0 for c in completions]


BATCH_P = ["Q:1+1=", "Q:2+2=", "Q:3+3=", "Q:4+4="]
BATCH_C = ["A:2", "A:4", BAD, "A:8"]


@pytest.mark.parametrize("fn", [fragile, nan_on_bad, inf_on_bad])
def test_policy_raise(fn):
    mix = RewardMix([(fn, 1.0), ("format", 1.0)], on_error="raise")
    with pytest.raises(RewardError) as info:
        mix(BATCH_P, BATCH_C)
    message = str(info.value)
    assert repr(fn.__name__) in message and "sample 2" in message
    assert BAD in message and "Q:3+3=" in message
    assert info.value.name == fn.__name__ and info.value.index == 2 and info.value.completion == BAD
    if fn is fragile:
        assert isinstance(info.value.__cause__, ZeroDivisionError) and "ZeroDivisionError" in message
    else:
        assert "returned" in message


@pytest.mark.parametrize("fn", [fragile, nan_on_bad])
def test_policy_zero(fn):
    mix = RewardMix([(fn, 2.0), ("exact_answer", 1.0)], on_error="zero")
    with pytest.warns(RewardWarning, match=rf"'{fn.__name__}'.*sample 2"):
        result = mix(BATCH_P, BATCH_C, answer=["2", "4", "6", "9"])
    assert result.per_function[fn.__name__].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert result.total.tolist() == [3.0, 3.0, 0.0, 2.0]
    assert result.valid.all()
    assert len(result.errors) == 1 and "sample 2" in result.errors[0] and BAD in result.errors[0]


@pytest.mark.parametrize("fn", [fragile, nan_on_bad])
def test_policy_skip(fn):
    mix = RewardMix([(fn, 1.0), ("format", 1.0)], on_error="skip")
    with pytest.warns(RewardWarning, match="skipped"):
        result = mix(BATCH_P, BATCH_C)
    assert result.valid.tolist() == [True, True, False, True]
    assert result.total.tolist() == [1.0, 1.0, 0.0, 1.0]
    assert torch.isfinite(result.total).all()
    assert len(result.errors) == 1 and BAD in result.errors[0]


def test_skip_zeroes_every_reward_of_a_skipped_sample():
    def one(prompts, completions, **kwargs):
        return [1.0] * len(completions)

    mix = RewardMix([(nan_on_bad, 1.0), (one, 0.5)], on_error="skip")
    with pytest.warns(RewardWarning, match="skipped"):
        result = mix(BATCH_P, BATCH_C)
    assert result.valid.tolist() == [True, True, False, True]
    assert result.per_function["one"].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert result.total.tolist() == [1.5, 1.5, 0.0, 1.5]


def test_a_reward_beyond_float32_is_an_error():
    def huge(prompts, completions, **kwargs):
        return [1e39 if c == BAD else 1.0 for c in completions]

    with pytest.warns(RewardWarning, match="'huge' returned 1e\\+39 on sample 2"):
        result = RewardMix([(huge, 1.0)], on_error="zero")(BATCH_P, BATCH_C)
    assert result.total.tolist() == [1.0, 1.0, 0.0, 1.0]
    with pytest.raises(RewardError, match="sample 2"):
        RewardMix([(huge, 1.0)], on_error="raise")(BATCH_P, BATCH_C)


def test_whole_batch_failure():
    calls = []

    def batch_only(prompts, completions, **kwargs):
        calls.append(len(prompts))
        if len(prompts) > 1:
            raise RuntimeError("batch too big")
        return [1.0]

    def broken(prompts, completions, **kwargs):
        raise RuntimeError("model offline")

    # a batch failure that no single sample reproduces: the policy covers the whole batch
    with pytest.warns(RewardWarning, match="'batch_only'.*no single sample"):
        result = RewardMix([(batch_only, 1.0)], on_error="zero")(["a", "b"], ["c", "d"])
    assert calls == [2, 1, 1]  # the batch, then each sample alone
    assert result.total.tolist() == [0.0, 0.0] and len(result.errors) == 1
    with pytest.warns(RewardWarning, match="'broken'.*model offline"):
        result = RewardMix([(broken, 1.0), ("format", 1.0)], on_error="zero")(["a", "b"], ["c", "d"])
    assert result.per_function["broken"].tolist() == [0.0, 0.0] and len(result.errors) == 2
    with pytest.warns(RewardWarning):
        result = RewardMix([(broken, 1.0)], on_error="skip")(["a", "b"], ["c", "d"])
    assert not result.valid.any()
    with pytest.warns(RewardWarning, match="all marked invalid"):
        result = RewardMix([(batch_only, 1.0)], on_error="skip")(["a", "b"], ["c", "d"])
    assert not result.valid.any() and result.total.tolist() == [0.0, 0.0]
    with pytest.raises(RewardError, match="'broken'.*model offline") as info:
        RewardMix([(broken, 1.0)], on_error="raise")(["a"], ["c"])
    assert isinstance(info.value.__cause__, RuntimeError)

    def flaky_all(prompts, completions, **kwargs):
        raise RuntimeError("always")

    with pytest.warns(RewardWarning) as record:
        RewardMix([(flaky_all, 1.0)], on_error="zero")(["a", "b", "c"], ["d", "e", "f"])
    assert len(record) == 1  # one warning per function and batch


@pytest.mark.parametrize("on_error", ["raise", "zero", "skip"])
def test_bad_returns_always_raise(on_error):
    def short(prompts, completions, **kwargs):
        return [1.0] * (len(prompts) - 1)

    def text(prompts, completions, **kwargs):
        return ["1.0"] * len(prompts)

    def scalar(prompts, completions, **kwargs):
        return 1.0

    with pytest.raises(RewardError, match=r"'short' returned 2 values for 3 samples"):
        RewardMix([(short, 1.0)], on_error=on_error)(["a", "b", "c"], ["d", "e", "f"])
    with pytest.raises(RewardError, match="'text'.*str"):
        RewardMix([(text, 1.0)], on_error=on_error)(["a"], ["b"])
    def scalar_tensor(prompts, completions, **kwargs):
        return torch.tensor(1.0)

    with pytest.raises(RewardError, match="'scalar'.*sequence"):
        RewardMix([(scalar, 1.0)], on_error=on_error)(["a"], ["b"])
    with pytest.raises(RewardError, match="'scalar_tensor'.*sequence.*Tensor"):
        RewardMix([(scalar_tensor, 1.0)], on_error=on_error)(["a"], ["b"])

    # a wrong return from a per-sample retry raises too
    def raise_then_short(prompts, completions, **kwargs):
        if len(prompts) > 1:
            raise RuntimeError("batch")
        return []

    with pytest.raises(RewardError, match="'raise_then_short' returned 0 values for 1 samples"):
        RewardMix([(raise_then_short, 1.0)], on_error=on_error)(["a", "b"], ["c", "d"])


def test_tensor_and_numpy_returns():
    import numpy as np

    def as_tensor(prompts, completions, **kwargs):
        return torch.tensor([1.0, 2.0])

    def as_numpy(prompts, completions, **kwargs):
        return np.array([3.0, 4.0])

    result = RewardMix([(as_tensor, 1.0), (as_numpy, 1.0)])(["a", "b"], ["c", "d"])
    assert result.total.tolist() == [4.0, 6.0]


def test_long_completion_is_truncated_in_message():
    long_bad = BAD + "y" * 1000

    def nan_long(prompts, completions, **kwargs):
        return [math.nan for _ in completions]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RewardWarning)
        result = RewardMix([(nan_long, 1.0)], on_error="zero")(["p"], [long_bad])
    assert len(result.errors[0]) < 400 and result.errors[0].count("y") < 250
