"""T5 (transformers' ``T5ForConditionalGeneration`` and :class:`pemoe.models.T5`): SPEC §2.

Every encoder and decoder block (self- and cross-attention). MoV sites: ``k``, ``v`` (per head, G = heads,
D = d_kv) and ``ffn`` (act(x·wi_0) before ``* (x·wi_1)`` in v1.1, act(x·wi) before ``wo`` in v1.0); MoLoRA
sites: ``q k v o`` and ``wi_0 wo`` (v1.1) or ``wi wo`` (v1.0) by default, ``wi_1`` on request. In
transformers' T5 the FFN site wraps the FFN's ``act``; in pemoe's it fills the FFN's ``mov`` slot (the FFN
then runs the fused ``mov_ffn``). Adapter names: ``<attention>.<q|k|v|o>.<param>``,
``<DenseReluDense>.<wi_0|wi_1|wi|wo>.<param>`` and ``<DenseReluDense>.mov.<param>``.
"""

from __future__ import annotations

from torch import nn

from pemoe.placements._common import Site


def is_pemoe_t5(model: nn.Module) -> bool:
    from pemoe.models.t5 import T5

    return isinstance(model, T5)


def is_hf_t5(model: nn.Module) -> bool:
    try:
        from transformers import T5ForConditionalGeneration
    except ImportError:  # pragma: no cover - transformers is optional
        return False
    return isinstance(model, T5ForConditionalGeneration)


def t5_sites(model: nn.Module, lora: bool, sites: tuple[str, ...] | None, owner: str) -> tuple[tuple, list[Site]]:
    blocks = [("encoder", i, b) for i, b in enumerate(model.encoder.block)]
    blocks += [("decoder", i, b) for i, b in enumerate(model.decoder.block)]
    gated = hasattr(blocks[0][2].layer[-1].DenseReluDense, "wi_0")
    ffn_names = ("wi_0", "wi_1", "wo") if gated else ("wi", "wo")
    if sites is None:
        sites = ("q", "k", "v", "o") + (("wi_0", "wo") if gated else ("wi", "wo")) if lora else ("k", "v", "ffn")
    valid = ("q", "k", "v", "o", *ffn_names) if lora else ("k", "v", "ffn")
    wrong = [s for s in sites if s not in valid]
    if wrong:
        kind = "T5 v1.1 gated FFN (wi_0, wi_1, wo)" if gated else "T5 v1.0 FFN (wi, wo)"
        if any(s not in ("wi_0", "wi_1", "wi") for s in wrong):
            kind = f"T5 sites ({', '.join(valid)})"
        raise ValueError(f"{owner}.sites: {wrong} not in this model's {kind}")
    heads = model.config.num_heads
    found: list[Site] = []
    for stack, i, block in blocks:
        prefix = f"{stack}.block.{i}"
        attentions = [(f"{prefix}.layer.0.SelfAttention", block.layer[0].SelfAttention)]
        if stack == "decoder":
            attentions.append((f"{prefix}.layer.1.EncDecAttention", block.layer[1].EncDecAttention))
        ffn_path = f"{prefix}.layer.{len(block.layer) - 1}.DenseReluDense"
        ffn = block.layer[-1].DenseReluDense
        for site in sites:
            if site in ("q", "k", "v", "o"):
                kind = "molora" if lora else "mov_linear"
                found += [Site(f"{path}.{site}", attn, site, kind, groups=heads) for path, attn in attentions]
            elif site == "ffn":
                attr = "mov" if is_pemoe_t5(model) else "act"
                found.append(Site(f"{ffn_path}.mov", ffn, attr, "mov_ffn", width=ffn.wo.in_features))
            else:
                found.append(Site(f"{ffn_path}.{site}", ffn, site, "molora"))
    return tuple(sites), found
