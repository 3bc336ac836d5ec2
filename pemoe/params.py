"""Trainable-parameter table of the adapters on T5 v1.1 (``pemoe params``).

Every model is pemoe's T5 built on the meta device (no weights, no downloads) with the public
T5 v1.1 dimensions below, injected with each adapter config by :func:`pemoe.adapters.inject`; the counts
are read off the injected modules. The base-model size is counted as transformers counts it: the
shared embedding once, plus the untied v1.1 ``lm_head``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pemoe.adapters import IA3Config, LoRAConfig, MoLoRAConfig, MoVConfig, inject
from pemoe.layers import count_parameters
from pemoe.models.t5 import T5, T5Config

__all__ = ["T5_V1_1", "METHODS", "Row", "t5_v1_1_config", "parameter_table", "format_table"]

# Public google/t5-v1_1-* configs (vocab 32128, gated-GELU FFN, untied head, 32 buckets / 128 distance).
T5_V1_1: dict[str, dict[str, int]] = {
    "small": dict(d_model=512, d_kv=64, d_ff=1024, num_heads=6, num_layers=8),
    "base": dict(d_model=768, d_kv=64, d_ff=2048, num_heads=12, num_layers=12),
    "large": dict(d_model=1024, d_kv=64, d_ff=2816, num_heads=16, num_layers=24),
    "xl": dict(d_model=2048, d_kv=64, d_ff=5120, num_heads=32, num_layers=24),
    "xxl": dict(d_model=4096, d_kv=64, d_ff=10240, num_heads=64, num_layers=24),
}

# The paper's adapter configurations (LoRA / MoLoRA rank 4, alpha 16).
METHODS = {
    "(IA)3": IA3Config(),
    "MoV-10": MoVConfig(num_experts=10),
    "MoV-30": MoVConfig(num_experts=30),
    "MoV-60": MoVConfig(num_experts=60),
    "LoRA r=4": LoRAConfig(rank=4),
    "MoLoRA-2": MoLoRAConfig(num_experts=2, rank=4),
    "MoLoRA-10": MoLoRAConfig(num_experts=10, rank=4),
    "MoLoRA-15": MoLoRAConfig(num_experts=15, rank=4),
}


def t5_v1_1_config(size: str) -> T5Config:
    if size not in T5_V1_1:
        raise ValueError(f"unknown T5 v1.1 size {size!r}; known: {', '.join(T5_V1_1)}")
    return T5Config(vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False, **T5_V1_1[size])


@dataclass(frozen=True)
class Row:
    size: str
    method: str
    trainable: int
    base_total: int

    @property
    def percent(self) -> float:
        """Trainable parameters as a percentage of the base model's."""
        return 100.0 * self.trainable / self.base_total


def parameter_table(sizes: list[str] | None = None, methods: list[str] | None = None) -> list[Row]:
    """One row per (size, method), built on the meta device."""
    rows = []
    for size in sizes or list(T5_V1_1):
        config = t5_v1_1_config(size)
        with torch.device("meta"):
            base_total = count_parameters(T5(config)).total
        for name in methods or list(METHODS):
            if name not in METHODS:
                raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
            with torch.device("meta"):
                model = T5(config)
            rows.append(Row(size, name, inject(model, METHODS[name]).trainable, base_total))
    return rows


def _short(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def format_table(rows: list[Row]) -> str:
    """Markdown: one line per method, one column per size, 'count (percent%)'."""
    sizes = list(dict.fromkeys(r.size for r in rows))
    methods = list(dict.fromkeys(r.method for r in rows))
    cell = {(r.size, r.method): r for r in rows}
    totals = {r.size: r.base_total for r in rows}
    lines = [
        "| method | " + " | ".join(f"T5 v1.1 {s} ({_short(totals[s])})" for s in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for m in methods:
        cells = [f"{cell[s, m].trainable:,} ({cell[s, m].percent:.4f}%)" for s in sizes]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
