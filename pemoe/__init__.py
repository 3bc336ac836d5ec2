"""pemoe: fused kernels for extremely parameter-efficient mixture-of-experts adapters (MoV, MoLoRA)."""

from pemoe import ops, reference
from pemoe.ops import molora_linear, mov, mov_ffn, mov_linear

__version__ = "0.1.0"

__all__ = ["ops", "reference", "mov", "mov_linear", "mov_ffn", "molora_linear", "__version__"]
