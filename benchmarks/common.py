"""Shared helpers of the benchmarks: timing, peak memory, run metadata, tables (text, markdown, CSV).

Timing: on CUDA the median of ``triton.testing.do_bench`` (it warms up, flushes L2 between runs
and times with CUDA events); on the CPU a wall-clock timer that warms up, then repeats until a
time budget or a repeat count is spent and reports the median; :func:`time_interleaved` times
several providers round-robin so that load from other processes does not favour one of them.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cpu(fn: Callable[[], Any], warmup: int = 1, min_reps: int = 3, max_reps: int = 50,
             budget_s: float = 1.0) -> float:
    """Median wall time of ``fn()`` in ms: ``warmup`` calls, then at least ``min_reps`` and at most
    ``max_reps`` timed calls, stopping once ``budget_s`` seconds of timed calls have passed."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    spent = 0.0
    while len(times) < max_reps and (len(times) < min_reps or spent < budget_s):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        times.append(elapsed * 1e3)
        spent += elapsed
    return statistics.median(times)


def time_fn(fn: Callable[[], Any], device: torch.device, *, grad_to_none: Sequence[torch.Tensor] | None = None,
            quick: bool = False) -> float:
    """Median time of ``fn()`` in ms on ``device`` (see the module docstring)."""
    if device.type == "cuda":
        import triton.testing

        warmup, rep = (5, 20) if quick else (25, 100)
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                             return_mode="median"))

    def call():
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        fn()

    if quick:
        return time_cpu(call, warmup=1, min_reps=1, max_reps=3, budget_s=0.05)
    return time_cpu(call)


def time_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, *,
                     grad_to_none: Sequence[torch.Tensor] | None = None,
                     quick: bool = False) -> tuple[dict[str, float], dict[str, BaseException]]:
    """Median time in ms of each of ``fns`` by name, and the errors of those that raised.

    On the CPU the providers are timed round-robin (one warm-up call each, then rounds of one
    timed call per provider, at least 3 rounds and until 0.25 s per provider has passed or 1000
    rounds): load from other processes then slows all of them alike instead of whichever ran
    while it lasted. On CUDA each is timed with :func:`time_fn` in turn. A provider that raises
    (out of memory, an op this device lacks) is left out and its error returned.
    """
    times: dict[str, float] = {}
    errors: dict[str, BaseException] = {}
    if device.type == "cuda":
        for name, fn in fns.items():
            try:
                times[name] = time_fn(fn, device, grad_to_none=grad_to_none, quick=quick)
            except (RuntimeError, NotImplementedError, ValueError, TypeError) as err:
                errors[name] = err
            finally:
                if grad_to_none:
                    for t in grad_to_none:
                        t.grad = None
        return times, errors

    def call(fn) -> float:
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    working = {}
    for name, fn in fns.items():
        try:
            call(fn)
            working[name] = fn
        except (RuntimeError, NotImplementedError, ValueError, TypeError) as err:
            errors[name] = err
    min_rounds, max_rounds, budget_ms = (1, 3, 50.0) if quick else (3, 1000, 250.0)
    samples: dict[str, list[float]] = {name: [] for name in working}
    while working:
        for name, fn in working.items():
            samples[name].append(call(fn))
        rounds = len(samples[next(iter(working))])
        if rounds >= max_rounds or (rounds >= min_rounds and all(sum(t) >= budget_ms for t in samples.values())):
            break
    if grad_to_none:
        for t in grad_to_none:
            t.grad = None
    times.update({name: statistics.median(t) for name, t in samples.items()})
    return times, errors


def peak_memory_mib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak allocated device memory of one ``fn()`` call in MiB, above what was allocated before
    (CUDA only; None on the CPU, where the benchmarks do not measure memory)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int | None = None) -> float:
    """Dense ``n x n x n`` matmul TFLOP/s on ``device``: the ceiling the TFLOP/s columns compare to."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_fn(lambda: a @ b, device)
    return 2 * n**3 / (ms * 1e-3) / 1e12


@contextlib.contextmanager
def forced_backend(name: str | None) -> Iterator[None]:
    """Set ``MOE_ALIGN_BACKEND`` for the duration of the block (None: leave it as it is)."""
    if name is None:
        yield
        return
    old = os.environ.get("MOE_ALIGN_BACKEND")
    os.environ["MOE_ALIGN_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["MOE_ALIGN_BACKEND"]
        else:
            os.environ["MOE_ALIGN_BACKEND"] = old


# --------------------------------------------------------------------------- run metadata


def git_sha() -> str:
    """The checkout's commit (``-dirty`` with uncommitted changes); ``MOE_ALIGN_GIT_SHA`` names it
    for a copy of the tree without its git directory (a lent GPU machine)."""
    if os.environ.get("MOE_ALIGN_GIT_SHA"):
        return os.environ["MOE_ALIGN_GIT_SHA"]
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} threads"


def run_metadata(device: torch.device) -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "device": device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "git": git_sha(),
    }


# --------------------------------------------------------------------------- tables


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if value >= 100:
            return f"{value:.0f}"
        if value >= 10:
            return f"{value:.1f}"
        if value >= 0.01:
            return f"{value:.2f}"
        return f"{value:.2g}"
    return str(value)


def text_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [all(_is_number(row.get(c)) for row in rows) for c in columns]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric))

    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _is_number(value: Any) -> bool:
    return value is None or isinstance(value, (int, float))


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    numeric = [all(_is_number(row.get(c)) for row in rows) for c in columns]
    out = ["| " + " | ".join(columns) + " |",
           "|" + "|".join("---:" if num else "---" for num in numeric) + "|"]
    out += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(out)


def metadata_line(meta: dict[str, str]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in meta.items())


def write_markdown(path: str | Path, title: str, meta: dict[str, str], notes: Sequence[str],
                   rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    lines = [f"# {title}", "", metadata_line(meta), ""]
    lines += [f"- {note}" for note in notes]
    lines += ["", markdown_table(rows, columns), ""]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines))


def write_csv(path: str | Path, meta: dict[str, str], rows: Sequence[dict[str, Any]],
              columns: Sequence[str]) -> None:
    """One row per measurement; the run metadata repeated on every row as extra columns."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(columns) + list(meta))
        for row in rows:
            writer.writerow([_csv_value(row.get(c)) for c in columns] + list(meta.values()))


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def bench_device(name: str | None) -> torch.device:
    """The device a benchmark runs on: ``--device`` if given, else CUDA when available."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return device


def report(title: str, meta: dict[str, str], notes: Sequence[str], rows: Sequence[dict[str, Any]],
           columns: Sequence[str], verdicts: Sequence[str], markdown: str | None = None,
           csv: str | None = None) -> None:
    """Print the run's metadata, notes, table and target lines; write markdown / CSV when asked."""
    print()
    print(metadata_line(meta))
    for note in notes:
        print(f"  {note}")
    print(text_table(rows, columns))
    print("\nTargets:")
    for line in verdicts:
        print("  " + line)
    if markdown:
        write_markdown(markdown, title, meta, [*notes, *(f"target: {line}" for line in verdicts)], rows, columns)
    if csv:
        write_csv(csv, meta, rows, columns)


# --------------------------------------------------------------------------- arguments


def argument_parser(doc: str, quick_help: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """A benchmark's parser: its docstring's first paragraph, ``--device`` and ``--quick``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help=quick_help)
    return p


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    """``--markdown`` and ``--csv``: where :func:`report` writes the table; ``--time-limit``."""
    p.add_argument("--markdown", metavar="PATH", help="write the table as markdown")
    p.add_argument("--csv", metavar="PATH", help="write the rows as CSV")
    p.add_argument("--time-limit", type=float, default=0.0, metavar="SECONDS",
                   help="start no new case after this many seconds, and report what ran (0: no limit)")


class Deadline:
    """``--time-limit``: once it has passed, the remaining cases are skipped and counted, so the
    table of those that ran is still printed and written (a run killed from outside writes none)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds if seconds > 0 else None
        self.skipped = 0

    def skip(self) -> bool:
        """Whether to skip the next case (counting it)."""
        if self.end is not None and time.monotonic() > self.end:
            self.skipped += 1
            return True
        return False

    def notes(self) -> list[str]:
        return [f"--time-limit {self.seconds:g} s passed: {self.skipped} case(s) not run"] if self.skipped else []


def add_step_arguments(p: argparse.ArgumentParser, budget: float) -> None:
    """Timing and process options of the whole-step benchmarks (bench_train, bench_grpo)."""
    p.add_argument("--budget", type=float, default=budget,
                   help=f"stop timing after this many seconds of steps (at least one step; default {budget:g})")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 with --quick)")
    p.add_argument("--interleave-gib", type=float, default=4.0,
                   help="time the providers of a shape round-robin when their weights, gradients and AdamW "
                        "moments together fit in this many GiB (default 4), else one after the other")
    p.add_argument("--isolate", choices=["auto", "all", "none"], default="auto",
                   help="run a (shape, provider) in a fresh process: auto (default) for the shapes too large to "
                        "interleave, all, or none (each model freed in this process before the next is built)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per fresh process")
    add_output_arguments(p)
    p.add_argument("--worker", help=argparse.SUPPRESS)
