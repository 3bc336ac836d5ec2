"""Trainable-parameter table of the adapters on T5 v1.1 and decoder-only LLMs (``pemoe params``).

Every model is built on the meta device (no weights, no downloads) with public dimensions — pemoe's T5 for
T5 v1.1, transformers' ``LlamaForCausalLM`` / ``Qwen3ForCausalLM`` / ``MistralForCausalLM`` for the decoder
models — injected with each adapter config by :func:`pemoe.adapters.inject` (the built-in placements of
SPEC §2); the counts are read off the injected modules. The base-model size is counted as transformers
counts it: shared parameters once (T5's shared embedding), plus the untied ``lm_head``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pemoe.adapters import IA3Config, LoRAConfig, MoLoRAConfig, MoVConfig, inject
from pemoe.layers import count_parameters
from pemoe.models.t5 import T5, T5Config

__all__ = ["T5_V1_1", "DECODERS", "MODELS", "METHODS", "Row", "t5_v1_1_config", "parameter_table", "format_table"]

# Public google/t5-v1_1-* configs (vocab 32128, gated-GELU FFN, untied head, 32 buckets / 128 distance).
T5_V1_1: dict[str, dict[str, int]] = {
    "small": dict(d_model=512, d_kv=64, d_ff=1024, num_heads=6, num_layers=8),
    "base": dict(d_model=768, d_kv=64, d_ff=2048, num_heads=12, num_layers=12),
    "large": dict(d_model=1024, d_kv=64, d_ff=2816, num_heads=16, num_layers=24),
    "xl": dict(d_model=2048, d_kv=64, d_ff=5120, num_heads=32, num_layers=24),
    "xxl": dict(d_model=4096, d_kv=64, d_ff=10240, num_heads=64, num_layers=24),
}

# Decoder-only models, from their published config.json (all untied heads): family (the transformers class),
# hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, intermediate_size, vocab.
DECODERS: dict[str, dict] = {
    "llama-3-8b": dict(
        family="llama", label="Llama-3-8B", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, intermediate_size=14336, vocab_size=128256,
    ),
    "qwen3-8b": dict(
        family="qwen3", label="Qwen3-8B", hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, intermediate_size=12288, vocab_size=151936,
    ),
    "mistral-7b": dict(
        family="mistral", label="Mistral-7B", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, intermediate_size=14336, vocab_size=32000,
    ),
}  # fmt: skip
MODELS = [*T5_V1_1, *DECODERS]

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


def _decoder(name: str):
    """transformers' model of ``DECODERS[name]`` on the meta device."""
    import transformers

    dims = {k: v for k, v in DECODERS[name].items() if k not in ("family", "label")}
    family = DECODERS[name]["family"]
    prefix = {"llama": "Llama", "qwen3": "Qwen3", "mistral": "Mistral"}[family]
    config = getattr(transformers, f"{prefix}Config")(**dims, tie_word_embeddings=False)
    with torch.device("meta"):
        return getattr(transformers, f"{prefix}ForCausalLM")(config)


def _model(name: str):
    if name in DECODERS:
        return _decoder(name)
    config = t5_v1_1_config(name)
    with torch.device("meta"):
        return T5(config)


def _label(name: str) -> str:
    return DECODERS[name]["label"] if name in DECODERS else f"T5 v1.1 {name}"


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
    """One row per (model, method), built on the meta device; ``sizes`` are T5 v1.1 sizes and decoder
    model names (:data:`MODELS`; default: all)."""
    rows = []
    for size in sizes or MODELS:
        if size not in T5_V1_1 and size not in DECODERS:
            raise ValueError(f"unknown model size {size!r}; known: {', '.join(MODELS)}")
        base_total = count_parameters(_model(size)).total
        for name in methods or list(METHODS):
            if name not in METHODS:
                raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
            rows.append(Row(size, name, inject(_model(size), METHODS[name]).trainable, base_total))
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
        "| method | " + " | ".join(f"{_label(s)} ({_short(totals[s])})" for s in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for m in methods:
        cells = [f"{cell[s, m].trainable:,} ({cell[s, m].percent:.4f}%)" for s in sizes]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
