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
