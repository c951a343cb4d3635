"""Large CPU buffers backed by transparent huge pages.

A fresh CPU tensor of gigabytes (the weight gradient of all experts of a layer, of an LM head)
is new anonymous memory: its first write page-faults once per 4 KiB page, and on a CPU those
faults cost several times the write itself (1.5 GB: ~0.65 s of faults vs ~0.07 s to fill the
same buffer once mapped, on the 2-core CI machine). Since optimizers free gradients every step
(``zero_grad(set_to_none=True)``), that cost recurs every step. Advising the kernel to back the
buffer with 2 MiB pages before it is touched (``madvise(MADV_HUGEPAGE)``, what PyTorch's own
``THP_MEM_ALLOC_ENABLE=1`` does for every allocation) cuts the faults 512-fold.

Linux only, and only where transparent huge pages are in ``madvise`` or ``always`` mode; elsewhere
the buffers are ordinary ``new_empty`` tensors. The values are never affected.
"""

from __future__ import annotations

import ctypes
import functools
import sys

import torch

HUGE_PAGE_BYTES = 2 << 20
# Below this a buffer has at most a few huge pages; not worth a system call.
MIN_ADVISED_BYTES = 16 * HUGE_PAGE_BYTES
_MADV_HUGEPAGE = 14  # <sys/mman.h>, Linux


@functools.cache
def _madvise():
    """libc's madvise, or None where huge pages cannot be requested."""
    if sys.platform != "linux":
        return None
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                return None
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def new_empty_huge_pages(like: torch.Tensor, shape, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``like.new_empty(shape, dtype=dtype)``, backed by huge pages when it is a large CPU buffer.

    Call it only for a buffer that is written right away: the advice must come before the first
    touch of its pages, and an uninitialised buffer is returned as ``new_empty`` would.
    """
    out = like.new_empty(shape, dtype=dtype)
    nbytes = out.numel() * out.element_size()
    madvise = _madvise() if out.device.type == "cpu" and nbytes >= MIN_ADVISED_BYTES else None
    if madvise is not None:
        start = out.data_ptr()
        first = -(-start // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
        last = (start + nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
        if last > first:
            madvise(first, last - first, _MADV_HUGEPAGE)  # advice only: a failure changes nothing
    return out
