"""pemoe: fused kernels for extremely parameter-efficient mixture-of-experts adapters (MoV, MoLoRA)."""

from pemoe import adapters, models, ops, reference, router_health
from pemoe.adapters import (
    IA3Config,
    LoRAConfig,
    MoLoRAConfig,
    MoVConfig,
    export_peft,
    from_pretrained,
    import_peft,
    inject,
    is_merged,
    load_adapter,
    merge,
    save_adapter,
    save_pretrained,
    sentence_routing,
    unmerge,
)
from pemoe.banks import adapter_batch, add_adapter, bank_names, load_adapters, remove_adapter
from pemoe.ops import molora_adapter, molora_linear, mov, mov_ffn, mov_linear
from pemoe.router_health import RouterMonitor, plot_routing, routing_by_task

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
    "save_pretrained",
    "from_pretrained",
    "export_peft",
    "import_peft",
    "merge",
    "unmerge",
    "is_merged",
    "sentence_routing",
    "router_health",
    "RouterMonitor",
    "routing_by_task",
    "plot_routing",
    "hf",
    "load_adapters",
    "add_adapter",
    "remove_adapter",
    "bank_names",
    "adapter_batch",
    "__version__",
]


def __getattr__(name: str):
    # pemoe.hf (Trainer / TRL integration) imports transformers: loaded on first use only
    if name == "hf":
        import importlib

        return importlib.import_module("pemoe.hf")
    raise AttributeError(f"module 'pemoe' has no attribute {name!r}")
