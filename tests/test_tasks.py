import json
import random
import re

import pytest

from moe_align.train.tasks import ArithmeticTask

PROMPT = re.compile(r"Q:(\d+)([+-])(\d+)=")


def working_oracle(a: int, op: str, b: int) -> str:
    """The step-by-step working re-derived on digit strings, schoolbook style."""
    top, bottom = (a, b) if op == "+" else (max(a, b), min(a, b))
    width = max(len(str(top)), len(str(bottom)))
    xs, ys = str(top).zfill(width)[::-1], str(bottom).zfill(width)[::-1]
    steps, carry = [], 0
    for x, y in zip(xs, ys):
        x, y = int(x), int(y)
        if op == "+":
            total = x + y + carry
            new_carry, digit = (1, total - 10) if total >= 10 else (0, total)
        else:
            total = x - y - carry
            new_carry, digit = (1, total + 10) if total < 0 else (0, total)
        steps.append(f"{x}{op}{y}{op}{carry}={new_carry}{digit}")
        carry = new_carry
    return ",".join(steps)


def answer_from_working(working: str, op: str) -> int:
    """Read the result back from the steps: result digits right to left plus the last carry."""
    steps = working.split(",")
    digits = "".join(s[-1] for s in reversed(steps))
    if op == "+" and steps[-1][-2] == "1":
        digits = "1" + digits
    return int(digits)


def check_example(ex: dict, allow_negative: bool = True) -> None:
    m = PROMPT.fullmatch(ex["prompt"])
    assert m, ex
    a, op, b = int(m[1]), m[2], int(m[3])
    expected = eval(f"{a}{op}{b}")
    assert ex["answer"] == str(expected)
    if not allow_negative:
        assert expected >= 0
    working, answer = ex["response"].split(";A:")
    assert answer == str(expected)
    assert working == working_oracle(a, op, b)
    assert answer_from_working(working, op) == abs(expected)
    assert ArithmeticTask.format_ok(ex["response"])
    assert ArithmeticTask.is_correct(ex["response"], ex["answer"])


def test_hand_derived_cases():
    task = ArithmeticTask()
    assert task.example(457, "+", 68) == {
        "prompt": "Q:457+68=",
        "response": "7+8+0=15,5+6+1=12,4+0+1=05;A:525",
        "answer": "525",
    }
    # 2-7: borrow, 12-7=5; 0-5-1: borrow, 10-6=4; 4-0-1=3.
    assert task.example(402, "-", 57) == {
        "prompt": "Q:402-57=",
        "response": "2-7-0=15,0-5-1=14,4-0-1=03;A:345",
        "answer": "345",
    }
    assert ArithmeticTask(allow_negative=True).example(68, "-", 457)["response"] == "7-8-0=19,5-6-1=18,4-0-1=03;A:-389"


@pytest.mark.parametrize(
    "a, op, b, response",
    [
        (3, "+", 4, "3+4+0=07;A:7"),
        (0, "+", 0, "0+0+0=00;A:0"),
        (5, "-", 5, "5-5-0=00;A:0"),
        (9, "+", 9, "9+9+0=18;A:18"),
        (1000, "-", 1, "0-1-0=19,0-0-1=19,0-0-1=19,1-0-1=00;A:999"),
        (999, "+", 1, "9+1+0=10,9+0+1=10,9+0+1=10;A:1000"),
        (100, "-", 100, "0-0-0=00,0-0-0=00,1-1-0=00;A:0"),
    ],
)
def test_edge_cases(a, op, b, response):
    ex = ArithmeticTask().example(a, op, b)
    assert ex["response"] == response
    check_example(ex)


@pytest.mark.parametrize("allow_negative", [False, True])
def test_random_samples_are_correct(allow_negative):
    task = ArithmeticTask(min_digits=1, max_digits=3, allow_negative=allow_negative)
    rng = random.Random(123)
    samples = [task.sample(rng) for _ in range(2000)]
    for ex in samples:
        check_example(ex, allow_negative)
        assert len(ex["prompt"]) <= task.max_prompt_chars
        assert len(ex["response"]) <= task.max_response_chars
    assert max(len(ex["response"]) for ex in samples) == task.max_response_chars == 33
    assert {ex["prompt"][PROMPT.fullmatch(ex["prompt"]).end(1)] for ex in samples} == {"+", "-"}
    if allow_negative:
        assert any(ex["answer"].startswith("-") for ex in samples)
    # every digit count of the operands shows up
    lengths = {len(PROMPT.fullmatch(ex["prompt"])[1]) for ex in samples}
    assert lengths == {1, 2, 3}


def test_one_digit_operands_range_over_0_to_9():
    task = ArithmeticTask(min_digits=1, max_digits=1, ops=("+",))
    rng = random.Random(7)
    operands = set()
    for _ in range(300):
        a, _, b = PROMPT.fullmatch(task.sample(rng)["prompt"]).groups()
        operands |= {int(a), int(b)}
    assert operands == set(range(10))


def test_config_options():
    task = ArithmeticTask(min_digits=4, max_digits=4, ops=["-"])
    assert task.ops == ("-",)
    rng = random.Random(0)
    for _ in range(200):
        ex = task.sample(rng)
        a, op, b = PROMPT.fullmatch(ex["prompt"]).groups()
        assert op == "-" and len(a) == 4 and len(b) == 4 and int(a) >= int(b)
        check_example(ex, allow_negative=False)
    for bad in [dict(min_digits=0), dict(min_digits=3, max_digits=2), dict(ops=("*",)), dict(ops=()),
                dict(test_fraction=0.0)]:
        with pytest.raises(ValueError):
            ArithmeticTask(**bad)


def test_splits_disjoint_and_deterministic():
    task = ArithmeticTask()
    train = task.dataset(3000, seed=0, split="train")
    test = task.dataset(300, seed=0, split="test")
    assert len(train) == 3000 and len(test) == 300
    assert not {ex["prompt"] for ex in train} & {ex["prompt"] for ex in test}
    # other seeds draw other problems, still on the right side of the split
    train_other = task.dataset(3000, seed=1, split="train")
    assert train_other != train
    assert not {ex["prompt"] for ex in train_other} & {ex["prompt"] for ex in test}
    assert task.dataset(3000, seed=0, split="train") == train
    assert task.dataset(300, seed=0, split="test") == test
    assert all(task.split_of(ex["prompt"]) == "test" for ex in test)
    for ex in test[:50]:
        check_example(ex, allow_negative=False)
    with pytest.raises(ValueError, match="split"):
        task.dataset(1, split="valid")


def test_split_of_whole_space():
    """With one-digit operands all 200 problems exist; the test split holds about test_fraction."""
    task = ArithmeticTask(min_digits=1, max_digits=1, test_fraction=0.25)
    prompts = [task.example(a, op, b)["prompt"] for a in range(10) for b in range(10) for op in "+-"]
    n_test = sum(task.split_of(p) == "test" for p in prompts)
    assert 25 <= n_test <= 75
    test = task.dataset(100, seed=3, split="test")
    assert {ex["prompt"] for ex in test} <= {p for p in prompts if task.split_of(p) == "test"}


def test_write_jsonl(tmp_path):
    task = ArithmeticTask()
    examples = task.dataset(5, seed=0)
    path = task.write_jsonl(tmp_path / "sub" / "train.jsonl", examples)
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == examples


@pytest.mark.parametrize(
    "completion, extracted, correct, format_ok",
    [
        ("7+8+0=15,5+6+1=12,4+0+1=05;A:525", "525", True, True),
        ("7+8+0=15,5+6+1=12,4+0+1=05;A:525\n", "525", True, True),  # surrounding whitespace ok
        ("7+8+0=15,5+6+1=12,4+0+1=05;A:524", "524", False, True),  # wrong answer, format fine
        ("7+8+0=15,5+6+1=12,4+0+1=05;525", None, False, False),  # missing marker
        ("", None, False, False),
        ("7+8+0=15,5+6+1=12,4+0+1=05;A:525xyz", "525xyz", False, False),  # trailing junk
        ("7+8+0=15;A:525\nmore text", "525", True, False),  # junk on the next line
        ("7+8+0=15;A:12;A:525", "525", True, False),  # two markers: the last one counts
        ("A: 525 ", "525", True, False),
        ("7+8+0=15,5-6-1=12;A:525", "525", True, False),  # mixed operators
        ("7+8+0=15,5+6+1=12,4+0+1=05;A:0525", "0525", False, False),  # not canonical
        ("7+8+0=15,5+6+1=12,4+0+1=05,;A:525", "525", True, False),
        ("7+8+0=25;A:525", "525", True, False),  # carry out must be 0/1
        ("2-7-0=15,0-5-1=14,4-0-1=03;A:-345", "-345", False, True),
        ("2-7-0=15;A:-0", "-0", False, False),
    ],
)
def test_extract_format_correct(completion, extracted, correct, format_ok):
    assert ArithmeticTask.extract_answer(completion) == extracted
    assert ArithmeticTask.is_correct(completion, "525") is correct
    assert ArithmeticTask.format_ok(completion) is format_ok


def test_is_correct_int_answer():
    assert ArithmeticTask.is_correct("A:-12", -12)
    assert not ArithmeticTask.is_correct("A:12", -12)
