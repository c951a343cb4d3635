"""Backend choice shared by every op.

Each op has a PyTorch path (the CPU implementation and the reference) and, where written, a
Triton kernel, a CUDA kernel and a C++ CPU kernel. By default an op takes the fastest
implementation it has for the device of its inputs. ``MOE_ALIGN_BACKEND=torch|triton|cuda|cpp``
forces one for tests and benchmarks; an op that lacks the forced backend for that device keeps
its default, so one setting can be applied to a whole model.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("torch", "triton", "cuda", "cpp")
_ENV = "MOE_ALIGN_BACKEND"


def forced_backend() -> str | None:
    """The backend named by ``MOE_ALIGN_BACKEND``, or None when unset."""
    name = os.environ.get(_ENV, "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"{_ENV}={name!r} is not one of {', '.join(BACKENDS)}")
    return name


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and triton_interpreted()


def backend_for(op: str, device: torch.device, available: tuple[str, ...], default: str) -> str:
    """The backend ``op`` runs on ``device``.

    ``available`` lists the backends ``op`` has for this device; ``default`` is the one it
    takes unless ``MOE_ALIGN_BACKEND`` names another of ``available``.
    """
    if default not in available:
        raise AssertionError(f"{op}: default backend {default!r} not in {available}")
    forced = forced_backend()
    if forced is not None and forced in available:
        return forced
    return default


def plain_eager_cpu(*tensors: torch.Tensor | None) -> bool:
    """Whether an op's PyTorch path may be called directly rather than through its
    ``torch.ops.moe_align`` op: plain CPU tensors in eager mode, with nothing that needs the op
    itself (torch.compile or jit tracing, tensor subclasses, functorch transforms, dispatch or
    function modes, autograd recording, the profiler, autocast: the op runs with it off). The op
    runs the same function after torch.library's Python dispatch, 50-80 us a call: most of a
    small model's decode step on a CPU. ``None`` entries (optional arguments) are skipped."""
    tensors = tuple(t for t in tensors if t is not None)
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._autograd._profiler_enabled() or torch.is_autocast_enabled("cpu"):
        return False
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*tensors):
        return False
    return all(type(t) is torch.Tensor and t.device.type == "cpu"
               and not torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)
