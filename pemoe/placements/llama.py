"""Llama-like decoders (Llama, Mistral, Qwen2, Qwen3, Gemma 1–3, …): found by structure, not by class name.

Attention: a module holding linears ``q_proj k_proj v_proj o_proj``. MoV sites ``k``, ``v``: MoV per head on
the projection's output, G = ``k_proj.out_features // attention.head_dim`` — the key/value heads under
grouped-query attention — and D = ``head_dim`` (which need not be hidden / heads: Gemma, Qwen3). MoLoRA
sites ``q k v o``.

MLP: a module holding linears ``gate_proj up_proj down_proj`` and an ``act_fn`` module, computing
down_proj(act_fn(gate_proj·x) * up_proj·x). MoV site ``ffn``: MoV (G = 1, D = F) on act_fn's output, before
the gate product; since (h·l)·u = (h·u)·l, at E = 1 this is PEFT's (IA)3 scaling of down_proj's input. Where
:func:`~pemoe.placements._common.fusible_gated_mlp` finds that the MLP computes exactly that formula with
plain bias-free linears and an activation pemoe has (silu, gelu tanh, gelu, relu), the MLP is replaced by a
:class:`~pemoe.placements._common.FusedGatedMLP` running the fused ``ops.mov_ffn``; otherwise (quantized
linears, say) ``act_fn`` is wrapped and the MLP keeps its own forward. MoLoRA sites ``gate up down``.
"""

from __future__ import annotations

from torch import nn

from pemoe.placements._common import (
    ModuleKind,
    Site,
    fusible_gated_mlp,
    has_linears,
    head_dim_of,
    join,
    out_features,
)

_ATTENTION = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
_MLP = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def kv_heads(path: str, attn: nn.Module, linear: nn.Module, model: nn.Module) -> int:
    """G of a k/v projection: its width over the head width (num_key_value_heads with GQA)."""
    width = out_features(linear)
    head_dim = head_dim_of(attn)
    if head_dim is None:  # fall back to the model config's head width
        head_dim = getattr(getattr(model, "config", None), "head_dim", None) or None
    if head_dim is None or width % head_dim:
        raise TypeError(
            f"pemoe.inject: cannot tell the heads of {path} ({type(linear).__name__}, {width} outputs): its "
            f"attention module {type(attn).__name__} has no head_dim dividing it; name the sites with "
            "target_modules and num_groups"
        )
    return width // head_dim


def _attention_site(model: nn.Module, path: str, attn: nn.Module, site: str) -> Site:
    attr = _ATTENTION[site]
    groups = kv_heads(join(path, attr), attn, getattr(attn, attr), model)
    return Site(join(path, attr), attn, attr, "mov_linear", groups=groups)


def _mlp_site(model: nn.Module, path: str, mlp: nn.Module, site: str) -> Site:
    width = out_features(mlp.gate_proj)
    activation = fusible_gated_mlp(mlp)
    if activation is None:  # quantized or biased linears, dropout, another formula: the MLP's own forward
        return Site(join(path, "mov"), mlp, "act_fn", "mov_ffn", width=width)
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    return Site(join(path, "mov"), parent, attr, "mov_gated_mlp", width=width, activation=activation)


ATTENTION = ModuleKind(
    name="q_proj/k_proj/v_proj/o_proj attention",
    matches=lambda m: has_linears(m, _ATTENTION.values()),
    lora_sites=_ATTENTION,
    mov_sites=("k", "v"),
    mov_site=_attention_site,
)
MLP = ModuleKind(
    name="gate_proj/up_proj/down_proj/act_fn MLP",
    matches=lambda m: has_linears(m, _MLP.values()) and isinstance(getattr(m, "act_fn", None), nn.Module),
    lora_sites=_MLP,
    mov_sites=("ffn",),
    mov_site=_mlp_site,
    activation="act_fn",
    ffn_width=lambda m: out_features(m.gate_proj),
)
KINDS = (ATTENTION, MLP)
