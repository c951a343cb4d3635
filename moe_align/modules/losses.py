"""Fused LM-head losses: GRPO, SFT and DPO straight from the last hidden states.

Each module holds only hyper-parameters and calls :func:`~moe_align.ops.logprobs.linear_logprobs`
(the head and log-softmax without [tokens, vocab] logits) followed by the loss op of
:mod:`moe_align.ops.grpo`. Gradients reach the hidden states and the ``lm_head`` weight exactly
as through ``log_softmax(hidden @ weight.T / T).gather(...)`` and the same loss.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_align.ops.grpo import LOSS_AGGREGATIONS, dpo_loss, grpo_loss, sft_loss
from moe_align.ops.logprobs import linear_logprobs

__all__ = ["FusedLinearDPOLoss", "FusedLinearGRPOLoss", "FusedLinearSFTLoss"]

# Target of the tokens outside the completion: skipped by linear_logprobs (zero cost).
_SKIP = -100


def _check_tokens(name: str, ids: torch.Tensor, hidden: torch.Tensor) -> None:
    if not isinstance(ids, torch.Tensor) or tuple(ids.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"{name} must have shape {tuple(hidden.shape[:-1])} (hidden without its last dim), "
            f"got {tuple(getattr(ids, 'shape', ()))}"
        )


class FusedLinearGRPOLoss(nn.Module):
    """GRPO loss (DeepSeek-V2 eq. 32-33) from the policy's last hidden states and ``lm_head``.

    ``logp = linear_logprobs(hidden, weight, completion_ids)`` over the completion tokens only,
    then :func:`~moe_align.ops.grpo.grpo_loss`; see there for the hyper-parameters and the
    ``loss_type`` table (TRL's / verl's names).
    """

    def __init__(
        self,
        *,
        eps_low: float = 0.2,
        eps_high: float | None = None,
        beta: float = 0.04,
        loss_type: str = "sequence-mean",
        temperature: float = 1.0,
        max_len: int | None = None,
        tis_cap: float = 2.0,
        unbiased_kl: bool = False,
        compute_entropy: bool = False,
        fp32_head: bool = False,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if loss_type not in LOSS_AGGREGATIONS:
            raise ValueError(f"loss_type={loss_type!r} must be one of {LOSS_AGGREGATIONS}")
        self.eps_low, self.eps_high, self.beta, self.unbiased_kl = eps_low, eps_high, beta, unbiased_kl
        self.loss_type, self.temperature, self.max_len, self.tis_cap = loss_type, temperature, max_len, tis_cap
        self.compute_entropy, self.fp32_head, self.chunk_size = compute_entropy, fp32_head, chunk_size

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        advantages: torch.Tensor,
        old_logp: torch.Tensor | None = None,
        ref_logp: torch.Tensor | None = None,
        *,
        sampler_logp: torch.Tensor | None = None,
        num_global_tokens: int | float | torch.Tensor | None = None,
        world_size: int = 1,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """
        Args:
            hidden: ``[B, T, H]`` the hidden states that predict ``completion_ids`` (already
                shifted: ``hidden[:, t]`` predicts ``completion_ids[:, t]``).
            weight: ``[V, H]`` the ``lm_head`` weight.
            completion_ids: ``[B, T]`` int64/int32 sampled tokens.
            completion_mask: ``[B, T]`` 1 on completion tokens; the others cost nothing.
            advantages: ``[B]``; old_logp, ref_logp, sampler_logp: ``[B, T]`` or None
                (old None = on-policy).
            num_global_tokens, world_size: for ``loss_type="global-token-mean"``.

        Returns:
            ``(loss, metrics)`` as :func:`~moe_align.ops.grpo.grpo_loss`.
        """
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            raise ValueError(f"hidden must be a [B, T, H] tensor, got {tuple(getattr(hidden, 'shape', ()))}")
        _check_tokens("completion_ids", completion_ids, hidden)
        _check_tokens("completion_mask", completion_mask, hidden)
        targets = completion_ids.masked_fill(completion_mask == 0, _SKIP)
        out = linear_logprobs(hidden, weight, targets, temperature=self.temperature, ignore_index=_SKIP,
                              return_entropy=self.compute_entropy, fp32_head=self.fp32_head,
                              chunk_size=self.chunk_size)
        logp, entropy = out if self.compute_entropy else (out, None)
        return grpo_loss(
            logp, advantages, completion_mask, old_logp, ref_logp, eps_low=self.eps_low,
            eps_high=self.eps_high, beta=self.beta, loss_type=self.loss_type,
            num_global_tokens=num_global_tokens, world_size=world_size, max_len=self.max_len,
            sampler_logp=sampler_logp, tis_cap=self.tis_cap, entropy=entropy, unbiased_kl=self.unbiased_kl,
        )


class FusedLinearSFTLoss(nn.Module):
    """Cross-entropy over the response tokens (targets of prompt and padding = ``ignore_index``),
    through the fused head: :func:`~moe_align.ops.grpo.sft_loss`."""

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        temperature: float = 1.0,
        fp32_head: bool = False,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction={reduction!r} must be 'mean' or 'sum'")
        self.ignore_index, self.reduction, self.temperature = ignore_index, reduction, temperature
        self.fp32_head, self.chunk_size = fp32_head, chunk_size

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        num_tokens: int | float | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``hidden [..., H]``, ``weight [V, H]``, ``targets [...]`` (shifted labels);
        ``num_tokens`` optionally overrides the mean's denominator (e.g. the count over all
        ranks). Returns ``(loss, {"num_tokens": response tokens in this batch})``."""
        loss = sft_loss(hidden, weight, targets, ignore_index=self.ignore_index, num_tokens=num_tokens,
                        reduction=self.reduction, temperature=self.temperature,
                        fp32_head=self.fp32_head, chunk_size=self.chunk_size)
        return loss, {"num_tokens": (targets != self.ignore_index).sum().detach()}


class FusedLinearDPOLoss(nn.Module):
    """Sigmoid DPO loss (:func:`~moe_align.ops.grpo.dpo_loss`) from the policy's hidden states.

    The batch stacks the ``B`` chosen sequences, then the ``B`` rejected ones (TRL's concatenated
    layout); a sequence's log-prob is the sum over its response tokens (targets other than
    ``ignore_index``).
    """

    def __init__(
        self,
        *,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        temperature: float = 1.0,
        fp32_head: bool = False,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.beta, self.label_smoothing = beta, label_smoothing
        self.ignore_index, self.temperature = ignore_index, temperature
        self.fp32_head, self.chunk_size = fp32_head, chunk_size

    def sequence_logps(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``[2B]`` sums of the response tokens' log-probs."""
        logp = linear_logprobs(hidden, weight, targets, temperature=self.temperature,
                               ignore_index=self.ignore_index, fp32_head=self.fp32_head,
                               chunk_size=self.chunk_size)
        return logp.sum(-1)

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
        *,
        ref_hidden: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """
        Args:
            hidden: ``[2B, T, H]`` policy hidden states (chosen rows first), shifted as targets.
            weight: ``[V, H]`` the policy's ``lm_head`` weight.
            targets: ``[2B, T]`` response token ids, ``ignore_index`` elsewhere.
            ref_chosen_logps, ref_rejected_logps: ``[B]`` reference sequence log-probs; or None
                and ``ref_hidden`` ``[2B, T, H]`` / ``ref_weight`` ``[V, H]`` of the reference
                model, from which they are computed without gradient.

        Returns:
            ``(loss, metrics)``: :func:`~moe_align.ops.grpo.dpo_loss`'s metrics plus
            ``"logps/chosen"`` and ``"logps/rejected"`` (means of the policy's sums).
        """
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[0] % 2:
            raise ValueError(
                f"hidden must be [2B, T, H], 2B sequences (chosen, then rejected), got {tuple(getattr(hidden, 'shape', ()))}"
            )
        _check_tokens("targets", targets, hidden)
        half = hidden.shape[0] // 2
        logps = self.sequence_logps(hidden, weight, targets)
        if ref_chosen_logps is None or ref_rejected_logps is None:
            if ref_hidden is None or ref_weight is None:
                raise ValueError("give ref_chosen_logps and ref_rejected_logps, or ref_hidden and ref_weight")
            if tuple(ref_hidden.shape) != tuple(hidden.shape):
                raise ValueError(f"ref_hidden must have shape {tuple(hidden.shape)}, got {tuple(ref_hidden.shape)}")
            with torch.no_grad():
                ref = self.sequence_logps(ref_hidden, ref_weight, targets)
            ref_chosen_logps, ref_rejected_logps = ref[:half], ref[half:]
        loss, metrics = dpo_loss(logps[:half], logps[half:], ref_chosen_logps, ref_rejected_logps,
                                 beta=self.beta, label_smoothing=self.label_smoothing)
        metrics["logps/chosen"] = logps[:half].detach().mean()
        metrics["logps/rejected"] = logps[half:].detach().mean()
        return loss, metrics
