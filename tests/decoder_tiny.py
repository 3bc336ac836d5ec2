"""Tiny random-weight decoder-only transformers models (one per family pemoe.inject places), built offline.

Every family has 2 layers and grouped-query attention where the family has it (4 query heads, 2 key/value
heads); Qwen3 and Gemma2/3 use head_dim 24 ≠ hidden / heads = 16 (as the real models do, head_dim is not
hidden / heads there); Qwen2 has q/k/v biases; GPT-2 packs q, k, v in one Conv1D. Dropout is off and the
attention is eager (float64 runs for the tolerance rule's truth). Norm weights are randomised so that
every block's scale matters.
"""

from __future__ import annotations

import torch
from torch import nn

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 96, 2, 4, 2, 128
GPT2 = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64)


def _llama_like(config_cls, model_cls, **extra):
    def make() -> nn.Module:
        config = config_cls(
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            vocab_size=VOCAB,
            attn_implementation="eager",
            tie_word_embeddings=False,
            **extra,
        )
        return model_cls(config)

    return make


def _builders() -> dict:
    import transformers as t

    return {
        "llama": _llama_like(t.LlamaConfig, t.LlamaForCausalLM),
        "mistral": _llama_like(t.MistralConfig, t.MistralForCausalLM),
        "qwen2": _llama_like(t.Qwen2Config, t.Qwen2ForCausalLM),
        "qwen3": _llama_like(t.Qwen3Config, t.Qwen3ForCausalLM, head_dim=24),
        "gemma2": _llama_like(t.Gemma2Config, t.Gemma2ForCausalLM, head_dim=24),
        "gemma3": _llama_like(t.Gemma3TextConfig, t.Gemma3ForCausalLM, head_dim=24),
        "gpt2": lambda: t.GPT2LMHeadModel(
            t.GPT2Config(
                **GPT2,
                attn_pdrop=0.0,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                bos_token_id=0,
                eos_token_id=1,
                attn_implementation="eager",
            )
        ),
    }


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gpt2")


def decoder(family: str, seed: int = 0) -> nn.Module:
    """The tiny ``family`` model in eval mode, float32, weights from ``seed``."""
    torch.manual_seed(seed)
    model = _builders()[family]().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.normal_(0.0 if "gemma" in family else 1.0, 0.2)  # Gemma norms scale by 1 + weight
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif p.dim() == 2:
                p.normal_(0.0, 0.1)  # larger than the 0.02 init: logits and gradients well above rounding
    return model


def dims(model: nn.Module) -> dict[str, int]:
    """hidden, head_dim, kv_heads, intermediate, layers of a tiny model (from its config)."""
    c = model.config
    if c.model_type == "gpt2":
        return dict(hidden=c.n_embd, head_dim=c.n_embd // c.n_head, kv_heads=c.n_head, intermediate=4 * c.n_embd,
                    layers=c.n_layer, heads=c.n_head)  # fmt: skip
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return dict(hidden=c.hidden_size, head_dim=head_dim, kv_heads=c.num_key_value_heads,
                intermediate=c.intermediate_size, layers=c.num_hidden_layers, heads=c.num_attention_heads)  # fmt: skip


def ids(model: nn.Module, seed: int = 1, batch: int = 2, length: int = 9) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, model.config.vocab_size, (batch, length), generator=g)
