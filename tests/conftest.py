import os

# numpy's BLAS inside Triton's interpreter slows down by an order of magnitude when its threads
# contend with torch's on a small machine; one thread is plenty for the interpreter's tiny tiles.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter. This must be set
# before any kernel is decorated, i.e. before moe_align's Triton modules are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Test shapes are tiny: one intra-op thread avoids OpenMP contention on small shared CI machines
# (decoding loops ran 10x slower with two threads on a loaded 2-core machine).
torch.set_num_threads(1)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cpu_subprocess_env() -> dict[str, str]:
    """The environment of a test's child processes (torchrun, the CLI): one thread, and no GPU,
    so that trainer tests check their fp32 / gloo semantics on a GPU machine too (a child does
    not load this conftest)."""
    return dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")


# Appended to the scripts that the 2-process tests run under torchrun. Each rank leaves the process
# group, then exits without interpreter finalization: there gloo's worker threads can still hold
# tensors whose release needs the GIL, and about one finished 2-process CPU run in eight aborted
# (SIGABRT, "terminate called without an active exception"; see pytorch/pytorch#179291).
# Trainer.close, which the command line calls, is the package's fix (tested on its own in
# test_train_sft); these scripts stop mid-run or keep several trainers, so they exit this way.
TORCHRUN_EPILOGUE = """
import os as _os, sys as _sys, torch.distributed as _dist
_sys.stdout.flush(); _sys.stderr.flush()
if _dist.is_initialized():
    _dist.barrier()
    _dist.destroy_process_group()
_os._exit(0)
"""


@pytest.fixture(autouse=True)
def trainers_on_cpu(request, monkeypatch):
    """On a GPU machine a trainer's ``device="auto"`` would pick cuda:0 and bf16 autocast; the
    trainer tests check fp32 semantics against hand computations, so "auto" means the CPU here.
    Tests marked ``trainer_gpu`` keep the real choice."""
    if not torch.cuda.is_available() or request.node.get_closest_marker("trainer_gpu") is not None:
        return
    import moe_align.train.trainer as trainer_module

    resolve = trainer_module.resolve_device
    monkeypatch.setattr(trainer_module, "resolve_device",
                        lambda name, local_rank=0: resolve("cpu" if name == "auto" else name, local_rank))


def interrupt_during_step(trainer, step: int) -> None:
    """Make ``trainer.train()`` raise KeyboardInterrupt when it starts step ``step`` (1-based), as
    if the process were killed then; the steps before it run as usual."""
    real_step, calls = trainer.train_step, []

    def interrupted(step_batches):
        if len(calls) == step - 1:
            raise KeyboardInterrupt
        calls.append(1)
        return real_step(step_batches)

    trainer.train_step = interrupted


@pytest.fixture
def backend(monkeypatch):
    """Force a backend for the duration of a test: ``backend("torch")``."""

    def force(name: str) -> None:
        monkeypatch.setenv("MOE_ALIGN_BACKEND", name)

    return force
