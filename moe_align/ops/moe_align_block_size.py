"""Expert-sorted layout of routed (token, k) pairs, padded per expert to a block size.

The layout grouped-GEMM kernels consume (vLLM's ``moe_align_block_size``, made deterministic):
every block of ``block_size`` consecutive slots belongs to one expert, so a kernel program can
load one expert's weights and multiply them by a block of gathered token rows.
"""

from __future__ import annotations

import torch

from moe_align.ops._backend import backend_for
from moe_align.ops._native import load_native

__all__ = ["moe_align_block_size", "max_num_tokens_padded"]

# Limit of the CUDA kernel (kMoeAlignMaxExperts in csrc/moe/moe_kernels.cuh); above it the
# PyTorch path runs. The C++ CPU kernel has none.
CUDA_MAX_EXPERTS = 1024


def max_num_tokens_padded(numel: int, num_experts: int, block_size: int) -> int:
    """Slots the layout needs at most: each non-empty expert pads by at most ``block_size - 1``."""
    return numel + min(num_experts, numel) * (block_size - 1)


def _layout_sizes(topk_ids: torch.Tensor, num_experts: int, block_size: int) -> tuple[int, int]:
    max_padded = max_num_tokens_padded(topk_ids.numel(), num_experts, block_size)
    return max_padded, -(-max_padded // block_size)


def moe_align_block_size_torch(
    topk_ids: torch.Tensor, num_experts: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch path of :func:`moe_align_block_size`: a stable sort by expert, static shapes."""
    numel = topk_ids.numel()
    max_padded, num_blocks = _layout_sizes(topk_ids, num_experts, block_size)
    device = topk_ids.device
    flat = topk_ids.reshape(-1).long()

    counts = torch.bincount(flat, minlength=num_experts)
    padded_counts = (counts + block_size - 1) // block_size * block_size
    padded_ends = torch.cumsum(padded_counts, 0)
    starts = torch.cumsum(counts, 0) - counts

    # A stable sort keeps ascending flat index within each expert: the determinism contract.
    order = torch.sort(flat, stable=True).indices
    experts_in_order = flat[order]
    rank_in_expert = torch.arange(numel, device=device) - starts[experts_in_order]
    slot = padded_ends[experts_in_order] - padded_counts[experts_in_order] + rank_in_expert

    sorted_token_ids = torch.full((max_padded,), numel, dtype=torch.int32, device=device)
    sorted_token_ids[slot] = order.to(torch.int32)

    total = padded_ends[-1:] if num_experts > 0 else counts.new_zeros(1)
    block_starts = torch.arange(num_blocks, device=device) * block_size
    expert_ids = torch.searchsorted(padded_ends, block_starts, right=True)
    expert_ids = torch.where(block_starts < total, expert_ids, -1).to(torch.int32)
    return sorted_token_ids, expert_ids, total.to(torch.int32)


def _check(topk_ids: torch.Tensor, num_experts: int, block_size: int) -> None:
    if not isinstance(topk_ids, torch.Tensor):
        raise TypeError(f"topk_ids must be a tensor, got {type(topk_ids).__name__}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be 2-D [tokens, top_k], got shape {tuple(topk_ids.shape)}")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if topk_ids.numel() >= 2**31 - max_num_tokens_padded(0, num_experts, block_size) - 1:
        raise ValueError(f"topk_ids has {topk_ids.numel()} entries; the int32 layout holds < 2**31")


def _check_range(topk_ids: torch.Tensor, num_experts: int) -> None:
    """One pass over the ids on the host (skipped under torch.compile)."""
    if topk_ids.numel() > 0 and not torch.compiler.is_compiling():
        lo, hi = (int(x) for x in torch.aminmax(topk_ids))
        if lo < 0 or hi >= num_experts:
            raise ValueError(
                f"topk_ids holds expert ids in [{lo}, {hi}], outside [0, num_experts={num_experts})"
            )


def moe_align_block_size(
    topk_ids: torch.Tensor, num_experts: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort routed (token, k) pairs by expert and pad each expert's run to ``block_size`` slots.

    Args:
        topk_ids: int32 or int64 ``[T, K]``, the experts each token is routed to, in
            ``[0, num_experts)``. Any strides.
        num_experts: ``E``, the number of routed experts.
        block_size: ``B``, the row-block size of the grouped GEMM that consumes the layout.

    Returns:
        ``(sorted_token_ids, expert_ids, num_tokens_post_padded)``, all int32, with
        ``N = T*K`` and ``max_padded = N + min(E, N) * (B - 1)``:

        - ``sorted_token_ids [max_padded]``: for each expert in ascending order, the flat
          indices ``i = t*K + k`` with ``topk_ids[t, k] == e`` in ascending order of ``i``,
          then the sentinel ``N`` up to a multiple of ``B``. Slots from
          ``num_tokens_post_padded`` on also hold ``N``.
        - ``expert_ids [ceil(max_padded / B)]``: the expert of each block of ``B`` slots;
          ``-1`` for blocks past ``num_tokens_post_padded``.
        - ``num_tokens_post_padded [1]``: ``sum_e ceil(count_e / B) * B``.

        The result is a function of ``topk_ids`` alone: every backend returns the same bits,
        so training runs repeat exactly.

    Backends: CUDA kernel on CUDA tensors (up to 1024 experts), C++ kernel on CPU tensors,
    PyTorch path otherwise or with ``MOE_ALIGN_BACKEND=torch``.
    """
    _check(topk_ids, num_experts, block_size)
    device = topk_ids.device
    if device.type == "cuda":
        available = ("cuda", "torch") if num_experts <= CUDA_MAX_EXPERTS else ("torch",)
    else:
        available = ("cpp", "torch")
    backend = backend_for("moe_align_block_size", device, available, default=available[0])
    # The C++ kernel checks int32 ids in its counting pass (a ValueError naming the entry); int64
    # ids are checked here, before their cast to int32 could wrap an id into range.
    if not (backend == "cpp" and topk_ids.dtype == torch.int32):
        _check_range(topk_ids, num_experts)
    if backend == "torch":
        return moe_align_block_size_torch(topk_ids, num_experts, block_size)
    ids = topk_ids.to(torch.int32).contiguous()
    return torch.ops.moe_align.moe_align_block_size(ids, num_experts, block_size)


load_native()


@torch.library.register_fake("moe_align::moe_align_block_size")
def _moe_align_block_size_fake(topk_ids, num_experts, block_size):
    max_padded, num_blocks = _layout_sizes(topk_ids, num_experts, block_size)
    return tuple(topk_ids.new_empty((n,), dtype=torch.int32) for n in (max_padded, num_blocks, 1))
