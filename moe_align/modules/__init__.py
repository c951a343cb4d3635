"""Drop-in nn.Modules built on the moe_align ops."""

from moe_align.modules.moe import (
    DeepseekMoE,
    MoEConfig,
    MoEGate,
    MoERouting,
    RoutedExperts,
    SwiGLUMLP,
    update_correction_biases_,
)

__all__ = [
    "DeepseekMoE",
    "MoEConfig",
    "MoEGate",
    "MoERouting",
    "RoutedExperts",
    "SwiGLUMLP",
    "update_correction_biases_",
]
