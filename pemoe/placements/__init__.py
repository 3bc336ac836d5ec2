"""Where :func:`pemoe.inject` puts adapters: the sites of each model family, found from the model's structure.

A *site* is one place that gets its own adapter (its own experts and router). Every placement returns a list
of :class:`Site` (where to put the adapter, and what kind it is); :mod:`pemoe.adapters` builds the modules
and swaps them in all-or-nothing. One module per placement (:mod:`~pemoe.placements.t5`,
:mod:`~pemoe.placements.llama`, :mod:`~pemoe.placements.gpt2`, :mod:`~pemoe.placements.targets`); a decoder
family is a tuple of :class:`ModuleKind` (its attention and MLP modules, recognised by structure), so adding
one means adding its module, listing its ``KINDS`` in :data:`MODULE_KINDS` and adding its peer test. Four
placements:

* **T5** (transformers' ``T5ForConditionalGeneration`` and :class:`pemoe.models.T5`): SPEC §2, sites
  ``k v ffn`` (MoV) and ``q k v o wi_0 wi_1 wi wo`` (MoLoRA).
* **Projection attention + gated MLP** (Llama, Mistral, Qwen2, Qwen3, Gemma 1–3, and any model whose
  attention modules hold ``q_proj k_proj v_proj o_proj`` and whose MLPs hold ``gate_proj up_proj down_proj
  act_fn``): MoV sites ``k``, ``v`` (per head, after the projection; with grouped-query attention
  G = number of key/value heads = ``k_proj.out_features // attention.head_dim``, D = ``head_dim``) and
  ``ffn`` (act(gate_proj·x), before ``* up_proj·x``); MoLoRA sites ``q k v o gate up down``.
* **GPT-2** (attention ``c_attn`` packing q, k, v in one layer, ``c_proj``; MLP ``c_fc``, ``act``,
  ``c_proj``; the layers are transformers' ``Conv1D``, weight [in, out]): MoV sites ``k``, ``v`` (the k and
  v column blocks of ``c_attn``'s output, per head — q is not scaled, as in the paper) and ``ffn``
  (act(c_fc·x)); MoLoRA sites ``qkv`` (``c_attn``), ``o`` (attention ``c_proj``), ``fc`` (``c_fc``),
  ``proj`` (MLP ``c_proj``).
* **target_modules** (any model): the modules whose names match, as PEFT matches them — a list of names
  matches a module whose dotted path equals a name or ends with ``"." + name``; a string is a regular
  expression that must match the whole path; ``"all-linear"`` is every ``nn.Linear`` / ``Conv1D`` but the
  output embedding (LM head). MoLoRA/LoRA go on each matched linear; MoV goes on a matched linear's output
  (G groups: ``num_groups`` if given, else ``out_features // head_dim`` when the linear's parent module has
  an integer ``head_dim`` (or T5's ``key_value_proj_dim`` / ``d_kv``) dividing it, else 1 — the whole output
  one vector) or on a matched MLP activation (``act_fn`` / ``act`` of an MLP above: MoV on its output).

The embeddings and the LM head are never a built-in site. Adapter names (the keys of
:func:`pemoe.adapters.adapter_state_dict`) are ``<path of the replaced module>.<param>``; for an FFN
activation site ``<path of the MLP>.mov.<param>``; for GPT-2's packed k/v ``<path of c_attn>.{k,v}.<param>``.

GPT-2's ``Conv1D`` computes x·W + b with W [in, out]. MoLoRA and MoV-on-output wrap it in a
:class:`Conv1DLinear`, an ``nn.Linear`` whose ``weight`` is the transposed view Wᵀ [out, in] of the very
same parameter (no copy; dtype and device moves of the Conv1D show through), so the fused ops see the
torch Linear layout they expect. The model's state dict keeps the Conv1D's tensors and layout, under
``<site>.base.conv.{weight,bias}`` (an adapted ``nn.Linear``'s under ``<site>.base.{weight,bias}``, as in T5).
"""

from __future__ import annotations

from torch import nn

from pemoe.placements import gpt2, llama
from pemoe.placements._common import (
    Conv1DLinear,
    FusedGatedMLP,
    ModuleKind,
    MoVActivation,
    PackedMoV,
    Site,
    as_linear,
    is_linear,
    join,
)
from pemoe.placements.t5 import is_hf_t5, is_pemoe_t5, t5_sites
from pemoe.placements.targets import target_sites

__all__ = [
    "Site",
    "ModuleKind",
    "MODULE_KINDS",
    "MoVActivation",
    "FusedGatedMLP",
    "Conv1DLinear",
    "PackedMoV",
    "is_linear",
    "as_linear",
    "find_sites",
]

#: The decoder families' attention and MLP module kinds; the first that matches a module decides its sites.
MODULE_KINDS: tuple[ModuleKind, ...] = (*llama.KINDS, *gpt2.KINDS)

BUILT_IN = (
    "transformers' T5ForConditionalGeneration and pemoe.models.T5; decoder models whose attention has "
    "q_proj/k_proj/v_proj/o_proj and whose MLP has gate_proj/up_proj/down_proj/act_fn (Llama, Mistral, Qwen2, "
    "Qwen3, Gemma); GPT-2 (c_attn/c_proj, c_fc/act/c_proj)"
)


def _decoder_modules(model: nn.Module) -> list[tuple[str, nn.Module, ModuleKind]]:
    found = []
    for path, module in model.named_modules():
        kind = next((k for k in MODULE_KINDS if k.matches(module)), None)
        if kind is not None:
            found.append((path, module, kind))
    return found


def _decoder_sites(
    model: nn.Module,
    modules: list[tuple[str, nn.Module, ModuleKind]],
    lora: bool,
    sites: tuple[str, ...] | None,
    owner: str,
) -> tuple[tuple[str, ...], list[Site]]:
    kinds = list(dict.fromkeys(kind for _, _, kind in modules))
    names = [kind.lora_sites if lora else kind.mov_sites for kind in kinds]
    valid = tuple(dict.fromkeys(name for group in names for name in group))
    sites = valid if sites is None else tuple(sites)
    wrong = [s for s in sites if s not in valid]
    if wrong:
        raise ValueError(
            f"{owner}.sites: {wrong} not in this model's sites ({', '.join(valid)}); "
            "or name modules with target_modules"
        )
    found: list[Site] = []
    for path, module, kind in modules:
        for site in sites:
            if lora and site in kind.lora_sites:
                attr = kind.lora_sites[site]
                found.append(Site(join(path, attr), module, attr, "molora"))
            elif not lora and site in kind.mov_sites:
                found.append(kind.mov_site(model, path, module, site))
    return sites, found


def find_sites(
    model: nn.Module,
    *,
    lora: bool,
    sites: tuple[str, ...] | None,
    target_modules: str | tuple[str, ...] | None = None,
    num_groups: int | None = None,
    owner: str = "config",
) -> tuple[str, tuple[str, ...] | None, list[Site]]:
    """(model kind: ``"pemoe"`` / ``"transformers"`` / ``"torch"``, resolved site names or None for
    target_modules, sites) of ``model``; changes nothing.

    ``lora``: MoLoRA/LoRA sites, else MoV/(IA)3 sites. ``sites``: site names of the built-in placement
    (None: its defaults). Raises TypeError for a model that is not an nn.Module; ValueError for a model with no
    built-in placement and no target_modules (saying how to name targets), site names the model lacks or a
    target_modules that matches nothing.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"pemoe.inject: model must be a torch.nn.Module, got {type(model).__name__}")
    pemoe_t5, hf_t5 = is_pemoe_t5(model), is_hf_t5(model)
    kind = "pemoe" if pemoe_t5 else "transformers" if type(model).__module__.startswith("transformers.") else "torch"
    if target_modules is not None:
        return kind, None, target_sites(model, lora, target_modules, num_groups, owner, MODULE_KINDS)
    if pemoe_t5 or hf_t5:
        resolved, found = t5_sites(model, lora, sites, owner)
        return kind, resolved, found
    modules = _decoder_modules(model)
    if not modules:  # a module of the wrong kind for this call: a value error, as PEFT's get_peft_model raises
        raise ValueError(
            f"pemoe.inject supports {BUILT_IN}; got {type(model).__module__}.{type(model).__name__}, which has "
            "no built-in placement. Name the sites with target_modules, e.g. "
            "MoLoRAConfig(target_modules='all-linear') or MoVConfig(target_modules=['k_proj', 'v_proj'])"
        )
    resolved, found = _decoder_sites(model, modules, lora, sites, owner)
    return kind, resolved, found
