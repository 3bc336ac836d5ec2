"""pemoe: fused kernels for extremely parameter-efficient mixture-of-experts adapters (MoV, MoLoRA).

The public names below load on first use (PEP 562 ``__getattr__``): ``import pemoe`` itself imports no
framework, so ``import pemoe.jax`` runs in a process without torch, while ``pemoe.ops``, ``pemoe.mov_linear``,
``from pemoe import load_adapters`` and ``from pemoe import *`` import the PyTorch side as they are reached.
Any submodule (``pemoe.banks``, ``pemoe.layers``, ...) is likewise an attribute of the package.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

__version__ = "0.1.0"

#: Public submodules (``pemoe.hf``, the Trainer / TRL integration, imports transformers).
_SUBMODULES = ("ops", "reference", "adapters", "models", "router_health", "hf")
#: Public functions and classes: name -> the module that defines it.
_ATTRIBUTES = {
    **dict.fromkeys(("mov", "mov_linear", "mov_ffn", "molora_linear", "molora_adapter"), "pemoe.ops"),
    **dict.fromkeys(
        (
            "inject", "MoVConfig", "IA3Config", "MoLoRAConfig", "LoRAConfig", "save_adapter", "load_adapter",
            "save_pretrained", "from_pretrained", "export_peft", "import_peft", "merge", "unmerge", "is_merged",
            "sentence_routing",
        ),
        "pemoe.adapters",
    ),
    **dict.fromkeys(("RouterMonitor", "routing_by_task", "plot_routing"), "pemoe.router_health"),
    **dict.fromkeys(("load_adapters", "add_adapter", "remove_adapter", "bank_names", "adapter_batch"), "pemoe.banks"),
}  # fmt: skip

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


def __getattr__(name: str) -> Any:
    if name in _ATTRIBUTES:
        value = getattr(importlib.import_module(_ATTRIBUTES[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    if name in _SUBMODULES or (not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}")):
        return importlib.import_module(f"{__name__}.{name}")  # the import binds it as an attribute
    raise AttributeError(f"module 'pemoe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
