"""Autocast for the modules' custom ops.

``torch.autocast`` casts only the aten ops on its lists; our ``torch.ops.moe_align.*`` ops see
whatever dtypes reach them (bf16 activations from autocast's linears next to fp32 parameters).
The modules therefore cast the inputs of each custom op to the autocast dtype themselves, as
autocast would for a matmul (the casts are differentiable, so gradients reach the fp32 weights),
and run the op with autocast off, so that its PyTorch path computes in the dtype it was given.
"""

from __future__ import annotations

import torch

from moe_align.ops.logprobs import linear_logprobs


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype in force for ``device``'s type, or None outside autocast."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def cast_for_custom_op(device: torch.device, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` cast to the autocast dtype when autocast is on for ``device``, else unchanged."""
    dtype = autocast_dtype(device)
    return tensors if dtype is None else tuple(t.to(dtype) for t in tensors)


def autocast_off(device: torch.device) -> torch.autocast:
    """Context that turns autocast off for ``device`` around a custom op call."""
    return torch.autocast(device.type, enabled=False)


def autocast_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, **kwargs):
    """:func:`~moe_align.ops.logprobs.linear_logprobs` (``kwargs`` passed on) with ``hidden`` and
    ``weight`` in the autocast dtype when autocast is on, as autocast would run an LM-head linear."""
    hidden, weight = cast_for_custom_op(hidden.device, hidden, weight)
    with autocast_off(hidden.device):
        return linear_logprobs(hidden, weight, targets, **kwargs)
