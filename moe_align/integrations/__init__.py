"""Bridges from other libraries' models to moe_align's modules and ops.

- :mod:`moe_align.integrations.hf`: :func:`~moe_align.integrations.hf.patch_model` swaps
  :class:`~moe_align.modules.MLAttention`, :class:`~moe_align.modules.DeepseekMoE` and the fused
  log-prob loss into a transformers DeepseekV2/V3 model in place, sharing its parameters.

transformers is imported only when a model is patched.
"""

from moe_align.integrations.hf import HFMLAttention, causal_lm_loss, patch_model

__all__ = ["HFMLAttention", "causal_lm_loss", "patch_model"]
