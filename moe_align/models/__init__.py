"""A DeepSeek-style causal LM built only from moe_align modules."""

from moe_align.models.deepseek import (
    PRESETS,
    DeepseekConfig,
    DeepseekDecoderLayer,
    DeepseekForCausalLM,
    DeepseekModel,
)

__all__ = ["PRESETS", "DeepseekConfig", "DeepseekDecoderLayer", "DeepseekForCausalLM", "DeepseekModel"]
