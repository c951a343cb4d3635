"""Smoke test of an installed wheel, run from outside the source tree (TRITON_INTERPRET=1).

Fails when a file is missing from the wheel: the native extension, a Triton kernel module.
"""

import os
import pathlib

import torch

import moe_align
from moe_align.modules import DeepseekMoE, MoEConfig
from moe_align.ops import fused_experts, grouped_topk, moe_align_block_size

root = pathlib.Path(moe_align.__file__).parent
assert "site-packages" in str(root), f"moe_align imported from {root}, not from the installed wheel"
# The Triton kernels ship in the wheel.
import moe_align.kernels.fused_moe  # noqa: E402,F401
import moe_align.kernels.linear_logprobs  # noqa: E402,F401
import moe_align.kernels.mla_attention  # noqa: E402,F401
import moe_align.kernels.mla_decode  # noqa: E402,F401
import moe_align.models  # noqa: E402,F401
# The trainer layer and its command line ship too.
import moe_align.integrations.hf  # noqa: E402,F401
from moe_align.train.cli import TRAINERS, _trainer_class  # noqa: E402

for command in TRAINERS:
    _trainer_class(command)
import moe_align.train.demo  # noqa: E402,F401

torch.manual_seed(0)
tokens, hidden, inter, experts, top_k = 5, 32, 16, 4, 2
logits = torch.randn(tokens, experts)
weights, ids = grouped_topk(logits, top_k, renormalize=True)
sorted_ids, expert_ids, total = moe_align_block_size(ids, experts, 16)
assert int(total) % 16 == 0 and sorted_ids.numel() >= int(total)

x = torch.randn(tokens, hidden)
gate_up = torch.randn(experts, 2 * inter, hidden) / hidden**0.5
down = torch.randn(experts, hidden, inter) / inter**0.5
os.environ["MOE_ALIGN_BACKEND"] = "torch"
reference = fused_experts(x, gate_up, down, weights, ids)
os.environ["MOE_ALIGN_BACKEND"] = "triton"
triton_out = fused_experts(x, gate_up, down, weights, ids)
torch.testing.assert_close(triton_out, reference, rtol=1e-5, atol=1e-5)
del os.environ["MOE_ALIGN_BACKEND"]

config = MoEConfig(hidden_size=hidden, moe_intermediate_size=inter, n_routed_experts=experts,
                   num_experts_per_tok=top_k, n_shared_experts=1)
moe = DeepseekMoE(config)
out = moe(torch.randn(2, 3, hidden, requires_grad=True))
out.sum().backward()
print(f"smoke ok: moe_align {moe_align.__version__} from {root}")
