"""pemoe: fused kernels for extremely parameter-efficient mixture-of-experts adapters (MoV, MoLoRA)."""

from pemoe import adapters, models, ops, reference
from pemoe.adapters import (
    IA3Config,
    LoRAConfig,
    MoLoRAConfig,
    MoVConfig,
    inject,
    load_adapter,
    save_adapter,
    sentence_routing,
)
from pemoe.ops import molora_adapter, molora_linear, mov, mov_ffn, mov_linear

__version__ = "0.1.0"

__all__ = [
    "ops",
    "reference",
    "adapters",
    "models",
    "mov",
    "mov_linear",
    "mov_ffn",
    "molora_linear",
    "molora_adapter",
    "inject",
    "MoVConfig",
    "IA3Config",
    "MoLoRAConfig",
    "LoRAConfig",
    "save_adapter",
    "load_adapter",
    "sentence_routing",
    "__version__",
]
