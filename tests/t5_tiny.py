"""Tiny random-weight T5 models (transformers' and pemoe's), built offline, shared by the T5 tests."""

from __future__ import annotations

import copy

import torch
from torch import nn

# Both FFN kinds: v1.1 (gated-GELU, untied head) and v1.0 (ReLU, tied head, rescaled output).
KINDS = {
    "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "v1.0": dict(feed_forward_proj="relu", tie_word_embeddings=True),
}
DIMS = dict(
    vocab_size=64,
    d_model=32,
    d_kv=8,
    d_ff=40,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
)


def hf_t5(kind: str, seed: int = 0, **overrides) -> nn.Module:
    """transformers' T5ForConditionalGeneration in eval mode, eager attention, no dropout.

    Layer-norm weights are randomised too, and a v1.1 model gets its own lm_head (transformers ≥ 5
    ties it when built from a config; real v1.1 checkpoints untie it on loading).
    """
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        **{**DIMS, **KINDS[kind], **overrides},
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        attn_implementation="eager",
    )
    model = T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.normal_(1.0, 0.2)
    if not KINDS[kind]["tie_word_embeddings"]:
        model.lm_head.weight = nn.Parameter(torch.randn_like(model.shared.weight) * 0.2)
    return model


def pemoe_t5(kind: str, seed: int = 0, **overrides) -> nn.Module:
    """pemoe's T5 with the weights of ``hf_t5(kind, seed)``."""
    from pemoe.models import T5

    return T5.from_hf(hf_t5(kind, seed, **overrides)).eval()


def batch(seed: int = 1, batch_size: int = 3, src: int = 11, tgt: int = 7):
    """input_ids with padding in one row, its attention mask, decoder inputs and labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, DIMS["vocab_size"], (batch_size, src), generator=g)
    mask = torch.ones(batch_size, src, dtype=torch.long)
    mask[1, src - 4 :] = 0
    ids[1, src - 4 :] = 0
    labels = torch.randint(2, DIMS["vocab_size"], (batch_size, tgt), generator=g)
    dec = torch.cat([torch.zeros(batch_size, 1, dtype=torch.long), labels[:, :-1]], dim=1)
    return ids, mask, dec, labels


def twin(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
