"""Expert-specialised fine-tuning (ESFT, Wang et al. 2024): tune only the experts a task uses.

1. Relevance: run the task's data through the starting model and count, per MoE layer, the
   share of routed (token, k) choices each expert receives (the token-selection ratio).
2. Selection: per layer, the fewest experts whose shares, taken from the largest, add up to at
   least ``threshold``.
3. Training: SFT with every other parameter frozen — the unselected experts' slices of the fused
   ``gate_up_proj`` / ``down_proj`` get zero gradients (masked once a step's gradients are
   complete, so also in this rank's shard under FSDP), and everything outside the routed experts
   (attention, shared experts, router, embeddings) is frozen unless named in ``unfreeze``.

With zero gradients from the first step AdamW's moments stay 0 for the frozen experts, so their
weights stay bit-identical (weight decay, which would move them anyway, must be 0).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os

import torch

from moe_align.modules.moe import DeepseekMoE
from moe_align.train.data import PackedBatch, pack_bins
from moe_align.train.sft import SFTConfig, SFTTrainer


@dataclasses.dataclass
class ESFTConfig(SFTConfig):
    """ESFT options (see :class:`SFTConfig`)."""

    threshold: float = 0.2  # cumulative token share of the experts to train, per layer
    unfreeze: list = dataclasses.field(default_factory=list)  # extra parameter-name patterns to train
    relevance_tokens: int = 0  # tokens of data to measure relevance on (0: the whole dataset)


@torch.no_grad()
def expert_token_shares(model, batches) -> dict[str, torch.Tensor]:
    """Per MoE layer (by module name), each expert's share of the routed (token, k) choices
    over ``batches`` (packed batches): float64 ``[E]`` summing to 1."""
    moe_layers = {name: m for name, m in model.named_modules() if isinstance(m, DeepseekMoE)}
    if not moe_layers:
        raise ValueError("the model has no DeepseekMoE layer to select experts from")
    was_training = model.training
    model.train()  # the routers count their tokens in training mode (no dropout in the model)
    for layer in moe_layers.values():
        layer.pop_tokens_per_expert()
    for batch in batches:
        model(batch.input_ids, batch.cu_seqlens, batch.max_seqlen)
    shares = {}
    for name, layer in moe_layers.items():
        counts = layer.pop_tokens_per_expert().double()
        shares[name] = counts / counts.sum().clamp(min=1)
    model.train(was_training)
    return shares


def select_experts(shares: torch.Tensor, threshold: float) -> list[int]:
    """The fewest experts whose shares (largest first) add up to at least ``threshold``."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    order = torch.argsort(shares, descending=True, stable=True).tolist()
    chosen, total = [], 0.0
    for e in order:
        if total >= threshold - 1e-12:
            break
        chosen.append(e)
        total += float(shares[e])
    return sorted(chosen)


class ESFTTrainer(SFTTrainer):
    """SFT of the task-relevant routed experts only (plus ``unfreeze`` patterns)."""

    name = "esft"
    config_class = ESFTConfig

    def setup_model(self) -> None:
        config = self.config
        if config.weight_decay:
            raise ValueError("ESFT needs weight_decay=0: AdamW's decay would move the frozen experts")
        examples = self.examples()
        if config.relevance_tokens:
            kept, total = [], 0
            for e in examples:
                if total + len(e) > config.relevance_tokens:
                    break
                kept.append(e)
                total += len(e)
            examples = kept or examples[:1]
        bins = pack_bins([len(e) for e in examples], config.batch_tokens)
        batches = [PackedBatch.from_examples([examples[i] for i in b]).to(self.device) for b in bins]
        self.shares = expert_token_shares(self.model, batches)
        self.selected = {name: select_experts(s, config.threshold) for name, s in self.shares.items()}

        for name, param in self.model.named_parameters():
            param.requires_grad_(any(fnmatch.fnmatchcase(name, pattern) for pattern in config.unfreeze))
        # Masks by parameter name: FSDP replaces the parameters (by sharded ones) after this, so
        # the masks are applied to whatever `p.grad` is once the step's gradients are complete.
        self.expert_masks: dict[str, torch.Tensor] = {}
        for name, layer in self.model.named_modules():
            if name not in self.selected:
                continue
            mask = torch.zeros(layer.experts.gate_up_proj.shape[0], dtype=torch.bool, device=self.device)
            mask[self.selected[name]] = True
            for param_name in ("gate_up_proj", "down_proj"):
                getattr(layer.experts, param_name).requires_grad_(True)
                self.expert_masks[f"{name}.experts.{param_name}"] = mask
        if self.dist.is_main:
            os.makedirs(self.output_dir, exist_ok=True)
            with open(os.path.join(self.output_dir, "esft_experts.json"), "w") as f:
                json.dump({name: {"selected": sel, "shares": [round(float(x), 6) for x in self.shares[name]]}
                           for name, sel in self.selected.items()}, f, indent=2)

    @torch.no_grad()
    def process_gradients(self) -> None:
        """Zero the gradient rows of the unselected experts (in this rank's shard under FSDP)."""
        for name, param in self.model.named_parameters():
            mask = self.expert_masks.get(name)
            if mask is None or param.grad is None:
                continue
            grad, first_row = local_rows(param.grad)
            keep = mask[first_row:first_row + grad.shape[0]]
            grad.mul_(keep.view(-1, *([1] * (grad.dim() - 1))).to(grad.dtype))


def local_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's rows of ``tensor`` and the global index of the first: the tensor itself and 0,
    or for a DTensor sharded on dim 0 (FSDP2), its local shard, cut as ``torch.chunk`` cuts."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(tensor, DTensor):
        return tensor, 0
    if tuple(tensor.placements) != (Shard(0),):
        raise ValueError(f"expected a DTensor sharded on dim 0 over one mesh dimension, got {tensor.placements}")
    rows, mesh = tensor.shape[0], tensor.device_mesh
    chunk = -(-rows // mesh.size())
    first = min(mesh.get_local_rank() * chunk, rows)
    local = tensor.to_local()
    if local.shape[0] != min(chunk, rows - first):
        raise RuntimeError(f"a shard of {local.shape[0]} rows does not match torch.chunk's cut at row {first}")
    return local, first
