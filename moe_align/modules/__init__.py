"""Drop-in nn.Modules built on the moe_align ops."""

from moe_align.modules.losses import FusedLinearDPOLoss, FusedLinearGRPOLoss, FusedLinearSFTLoss
from moe_align.modules.mla import MLACache, MLAConfig, MLADecodeStep, MLAttention
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
    "FusedLinearDPOLoss",
    "FusedLinearGRPOLoss",
    "FusedLinearSFTLoss",
    "MLACache",
    "MLAConfig",
    "MLADecodeStep",
    "MLAttention",
    "MoEConfig",
    "MoEGate",
    "MoERouting",
    "RoutedExperts",
    "SwiGLUMLP",
    "update_correction_biases_",
]
