"""How the ops behave under ``torch.autocast``.

``torch.autocast`` casts the inputs of the aten ops on its lists; it knows nothing of our ops.
Two rules make them behave as autocast's own matmuls do:

* The public functions cast their matmul operands (hidden states, weights, queries and keys) to
  the autocast dtype of their device when autocast is on there, before checking dtypes, as
  autocast would cast the inputs of a linear (:func:`autocast_inputs`). The casts are ordinary
  differentiable ops, so gradients reach fp32 parameters in fp32. Inputs that the ops take in
  float32 on purpose (router logits, log-probabilities) are left alone.
* Every ``torch.ops.moe_align`` op, its backward included, runs with autocast off
  (:func:`run_without_autocast`): its PyTorch path computes in the dtypes it was given, as the
  Triton and CUDA kernels do, instead of having its fp32 accumulations cast down by autocast.
"""

from __future__ import annotations

import torch
from torch._library.custom_ops import CustomOpDef

_LIBRARY = torch.library.Library("moe_align", "IMPL")
_DEVICE_TYPES = ("cpu", "cuda")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype in force for ``device``'s type, or None outside autocast."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def autocast_inputs(*tensors: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """``tensors`` cast to the autocast dtype of the first one's device (or to ``dtype`` when
    given) if autocast is on for that device; unchanged outside autocast. Non-tensors and
    non-floating tensors pass through, so the callers' own checks still report them."""
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if first is None:
        return tensors
    target = autocast_dtype(first.device)
    if target is None:
        return tensors
    target = dtype or target
    return tuple(t.to(target) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def run_without_autocast(*ops: CustomOpDef) -> None:
    """Register, for CPU and CUDA autocast, a kernel that runs each op with autocast off."""
    for op in ops:
        for device_type in _DEVICE_TYPES:
            key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
            _LIBRARY.impl(op._name, _without(op._opoverload, getattr(torch._C.DispatchKey, key)), key,
                          with_keyset=True)


def _without(overload: torch._ops.OpOverload, autocast_key: torch._C.DispatchKey):
    excluded = torch._C.DispatchKeySet(autocast_key)

    def kernel(_keyset, *args):
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return overload(*args)

    return kernel
