"""The torch ops of moe_align: argument checks, backend choice and the PyTorch paths.

Importing this package loads the native extension ``moe_align._C`` (which registers
``torch.ops.moe_align.*``); a failure to load it is an error, never a silent fallback.
"""

from moe_align.ops._native import load_native

load_native()

from moe_align.ops.fused_moe import fused_experts  # noqa: E402
from moe_align.ops.gate import grouped_topk  # noqa: E402
from moe_align.ops.grpo import combine_rewards, dpo_loss, group_advantages, grpo_loss, sft_loss  # noqa: E402
from moe_align.ops.load_balance import (  # noqa: E402
    expert_balance_loss,
    expert_token_counts,
    sequence_balance_loss,
    update_correction_bias_,
)
from moe_align.ops.logprobs import linear_logprobs  # noqa: E402
from moe_align.ops.mla import (  # noqa: E402
    MLADecodePlan,
    mla_cache_append,
    mla_decode,
    mla_decode_plan,
    mla_varlen_attention,
)
from moe_align.ops.moe_align_block_size import moe_align_block_size  # noqa: E402

__all__ = [
    "MLADecodePlan",
    "combine_rewards",
    "dpo_loss",
    "expert_balance_loss",
    "expert_token_counts",
    "fused_experts",
    "group_advantages",
    "grouped_topk",
    "grpo_loss",
    "linear_logprobs",
    "mla_cache_append",
    "mla_decode",
    "mla_decode_plan",
    "mla_varlen_attention",
    "moe_align_block_size",
    "sequence_balance_loss",
    "sft_loss",
    "update_correction_bias_",
]
