"""GPT-2: transformers' ``Conv1D`` layers (y = x·W + b, W [in, out]) and q, k, v packed in one ``c_attn``.

Attention: a module holding linears ``c_attn`` and ``c_proj`` with integer ``num_heads`` and ``embed_dim``.
``c_attn``'s output packs P = out / embed_dim blocks, q | k | v (P = 3; cross-attention: k | v). MoV sites
``k``, ``v``: MoV per head (G = num_heads, D = head_dim) on the k and v blocks alone (a
:class:`~pemoe.placements.PackedMoV` wraps ``c_attn``; q is not scaled, as in the paper). MoLoRA sites
``qkv`` (``c_attn``, all three blocks, as PEFT's LoRA on ``c_attn``) and ``o`` (``c_proj``).

MLP: a module holding linears ``c_fc``, ``c_proj`` and an ``act`` module, computing c_proj(act(c_fc·x)).
MoV site ``ffn``: MoV (G = 1, D = F) on act's output, which is PEFT's (IA)3 scaling of ``c_proj``'s input at
E = 1. MoLoRA sites ``fc`` (``c_fc``) and ``proj`` (``c_proj``).

The linears are adapted through :class:`~pemoe.placements.Conv1DLinear`, a transposed view of the Conv1D's
own weight (no copy).
"""

from __future__ import annotations

from torch import nn

from pemoe.placements._common import ModuleKind, Site, has_linears, join, out_features

_ATTENTION = {"qkv": "c_attn", "o": "c_proj"}
_MLP = {"fc": "c_fc", "proj": "c_proj"}
_PARTS = {3: ("q", "k", "v"), 2: ("k", "v")}


def _attention_site(model: nn.Module, path: str, attn: nn.Module, site: str) -> Site:
    c_attn = join(path, "c_attn")
    width = out_features(attn.c_attn)
    parts = _PARTS.get(width // attn.embed_dim) if width % attn.embed_dim == 0 else None
    if parts is None:
        raise TypeError(
            f"pemoe.inject: {c_attn} has {width} outputs, not q|k|v or k|v blocks of embed_dim {attn.embed_dim}: "
            "cannot find its k and v blocks"
        )
    return Site(join(c_attn, site), attn, "c_attn", "mov_packed", groups=attn.num_heads, part=site, parts=parts)


def _mlp_site(model: nn.Module, path: str, mlp: nn.Module, site: str) -> Site:
    return Site(join(path, "mov"), mlp, "act", "mov_ffn", width=out_features(mlp.c_fc))


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


ATTENTION = ModuleKind(
    name="c_attn/c_proj attention",
    matches=lambda m: (
        has_linears(m, _ATTENTION.values())
        and _is_int(getattr(m, "num_heads", None))
        and _is_int(getattr(m, "embed_dim", None))
    ),
    lora_sites=_ATTENTION,
    mov_sites=("k", "v"),
    mov_site=_attention_site,
)
MLP = ModuleKind(
    name="c_fc/act/c_proj MLP",
    matches=lambda m: has_linears(m, _MLP.values()) and isinstance(getattr(m, "act", None), nn.Module),
    lora_sites=_MLP,
    mov_sites=("ffn",),
    mov_site=_mlp_site,
    activation="act",
    ffn_width=lambda m: out_features(m.c_fc),
)
KINDS = (ATTENTION, MLP)
