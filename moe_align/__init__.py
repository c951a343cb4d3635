"""moe_align: fast kernels for DeepSeek-style models (MLA, DeepSeekMoE routing, fused GRPO)."""

__version__ = "0.1.0"
