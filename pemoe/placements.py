"""Where :func:`pemoe.inject` puts adapters: the sites of each model family, found from the model's structure.

A *site* is one place that gets its own adapter (its own experts and router). Every placement returns a list
of :class:`Site` (where to put the adapter, and what kind it is); :mod:`pemoe.adapters` builds the modules
and swaps them in all-or-nothing. Four placements:

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
torch Linear layout they expect.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from pemoe.layers import MoV

__all__ = ["Site", "MoVActivation", "Conv1DLinear", "PackedMoV", "is_linear", "as_linear", "find_sites"]

# sites of each module kind: role -> attribute of the module (MoLoRA) or the MoV site it is
_PROJ_ATTENTION_LORA = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
_GATED_MLP_LORA = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
_PACKED_ATTENTION_LORA = {"qkv": "c_attn", "o": "c_proj"}
_PLAIN_MLP_LORA = {"fc": "c_fc", "proj": "c_proj"}
_HEAD_DIM_ATTRS = ("head_dim", "key_value_proj_dim", "d_kv")

BUILT_IN = (
    "transformers' T5ForConditionalGeneration and pemoe.models.T5; decoder models whose attention has "
    "q_proj/k_proj/v_proj/o_proj and whose MLP has gate_proj/up_proj/down_proj/act_fn (Llama, Mistral, Qwen2, "
    "Qwen3, Gemma); GPT-2 (c_attn/c_proj, c_fc/act/c_proj)"
)


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is optional
        return None
    return Conv1D


def is_linear(module: object) -> bool:
    """An ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2's linear with weight [in, out])."""
    conv = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv is not None and isinstance(module, conv))


def _out_features(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.weight.shape[1]


class Conv1DLinear(nn.Linear):
    """transformers' ``Conv1D`` (y = x·W + b, W [in, out]) seen as an ``nn.Linear`` (weight [out, in]).

    ``weight`` is ``conv.weight.t()``, a view of the Conv1D's own parameter recomputed at each access: no
    copy is kept, and ``.half()`` / ``.to(device)`` of the model move the one parameter. The Conv1D stays a
    child (``conv``), so its tensors keep their layout in the state dict (under ``<site>.base.conv``).
    """

    def __init__(self, conv: nn.Module) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a second weight
        self.conv = conv
        self.in_features, self.out_features = conv.weight.shape

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.conv.weight.t()

    @property
    def bias(self) -> torch.Tensor | None:  # type: ignore[override]
        return self.conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def as_linear(module: nn.Module) -> nn.Linear:
    """``module`` itself if it is an ``nn.Linear``; a :class:`Conv1DLinear` view of a ``Conv1D``."""
    return module if isinstance(module, nn.Linear) else Conv1DLinear(module)


class MoVActivation(nn.Module):
    """``site(act(h))``: an FFN MoV site on the output of an MLP's activation module (wraps ``act``)."""

    def __init__(self, act: nn.Module, site: MoV) -> None:
        super().__init__()
        self.act, self.site = act, site

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.site(self.act(h))


class PackedMoV(nn.Module):
    """MoV on some column blocks of a layer whose output packs P equal parts (GPT-2's ``c_attn``: q | k | v).

    y = base(x) split into P blocks of width W = out / P along the last axis; block ``name`` becomes
    ``getattr(self, name)(block)`` (a :class:`~pemoe.layers.MoV` site, G heads of D = W / G) for each
    scaled part, the others pass through; the blocks are concatenated back. The base (frozen) runs its own
    forward; the MoV sites run ``ops.mov`` on their blocks.
    """

    def __init__(self, base: nn.Module, parts: tuple[str, ...], sites: dict[str, MoV]) -> None:
        super().__init__()
        width = _out_features(base)
        if width % len(parts):
            raise ValueError(f"PackedMoV: {len(parts)} parts {parts} do not divide the output width {width}")
        unknown = sorted(set(sites) - set(parts))
        if unknown:
            raise ValueError(f"PackedMoV: sites {unknown} are not parts {parts}")
        self.base, self.parts, self.width = base, tuple(parts), width // len(parts)
        for p in base.parameters():
            p.requires_grad_(False)
        for name, site in sites.items():
            setattr(self, name, site)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = list(self.base(x).split(self.width, dim=-1))
        for i, name in enumerate(self.parts):
            site = self._modules.get(name)
            if site is not None:
                blocks[i] = site(blocks[i])
        return torch.cat(blocks, dim=-1)


@dataclass
class Site:
    """One adapter site: ``getattr(parent, attr)`` is replaced (or, for ``mov_packed``, shared).

    kind: ``mov_linear`` (MoV on the output of a linear, ``groups`` groups), ``mov_ffn`` (MoV of width
    ``width`` on an activation: the ``act`` module is wrapped, or pemoe T5's FFN ``mov`` slot is set),
    ``mov_packed`` (MoV on the block ``part`` of ``parts`` packed in the linear's output, ``groups`` heads),
    ``molora`` (MoLoRA / LoRA on a linear).
    """

    key: str  # adapter names are key + "." + param
    parent: nn.Module
    attr: str
    kind: str
    groups: int = 1
    width: int = 0
    part: str = ""
    parts: tuple[str, ...] = field(default_factory=tuple)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# ---------------------------------------------------------------------------------------------
# T5


def is_pemoe_t5(model: nn.Module) -> bool:
    from pemoe.models.t5 import T5

    return isinstance(model, T5)


def is_hf_t5(model: nn.Module) -> bool:
    try:
        from transformers import T5ForConditionalGeneration
    except ImportError:  # pragma: no cover - transformers is optional
        return False
    return isinstance(model, T5ForConditionalGeneration)


def _t5_sites(model: nn.Module, lora: bool, sites: tuple[str, ...] | None, owner: str) -> tuple[tuple, list[Site]]:
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


# ---------------------------------------------------------------------------------------------
# decoder families, found by structure


def _has_linears(module: nn.Module, names) -> bool:
    return all(is_linear(getattr(module, n, None)) for n in names)


def _module_kind(module: nn.Module) -> str | None:
    if _has_linears(module, _PROJ_ATTENTION_LORA.values()):
        return "proj_attention"
    if _has_linears(module, _GATED_MLP_LORA.values()) and isinstance(getattr(module, "act_fn", None), nn.Module):
        return "gated_mlp"
    if (
        _has_linears(module, _PACKED_ATTENTION_LORA.values())
        and isinstance(getattr(module, "num_heads", None), int)
        and isinstance(getattr(module, "embed_dim", None), int)
    ):
        return "packed_attention"
    if _has_linears(module, _PLAIN_MLP_LORA.values()) and isinstance(getattr(module, "act", None), nn.Module):
        return "plain_mlp"
    return None


_LORA_ROLES = {
    "proj_attention": _PROJ_ATTENTION_LORA,
    "gated_mlp": _GATED_MLP_LORA,
    "packed_attention": _PACKED_ATTENTION_LORA,
    "plain_mlp": _PLAIN_MLP_LORA,
}
_MOV_ROLES = {
    "proj_attention": ("k", "v"),
    "gated_mlp": ("ffn",),
    "packed_attention": ("k", "v"),
    "plain_mlp": ("ffn",),
}


def _head_dim(module: nn.Module) -> int | None:
    for name in _HEAD_DIM_ATTRS:
        v = getattr(module, name, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _kv_heads(path: str, attn: nn.Module, linear: nn.Module, model: nn.Module) -> int:
    """G of a k/v projection: its width over the head width (num_key_value_heads with GQA)."""
    width = _out_features(linear)
    head_dim = _head_dim(attn)
    if head_dim is None:  # fall back to the model config's head width
        config = getattr(model, "config", None)
        head_dim = getattr(config, "head_dim", None) or None
    if head_dim is None or width % head_dim:
        raise TypeError(
            f"pemoe.inject: cannot tell the heads of {path} ({type(linear).__name__}, {width} outputs): its "
            f"attention module {type(attn).__name__} has no head_dim dividing it; name the sites with "
            "target_modules and num_groups"
        )
    return width // head_dim


def _decoder_modules(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    found = []
    for path, module in model.named_modules():
        kind = _module_kind(module)
        if kind is not None:
            found.append((path, module, kind))
    return found


def _decoder_sites(
    model: nn.Module, modules: list[tuple[str, nn.Module, str]], lora: bool, sites: tuple[str, ...] | None, owner: str
) -> tuple[tuple[str, ...], list[Site]]:
    kinds = list(dict.fromkeys(kind for _, _, kind in modules))
    if lora:
        valid = tuple(dict.fromkeys(role for kind in kinds for role in _LORA_ROLES[kind]))
    else:
        valid = tuple(dict.fromkeys(role for kind in kinds for role in _MOV_ROLES[kind]))
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
            if lora and site in _LORA_ROLES[kind]:
                attr = _LORA_ROLES[kind][site]
                found.append(Site(_join(path, attr), module, attr, "molora"))
            elif not lora and site in _MOV_ROLES[kind]:
                found.append(_mov_site(model, path, module, kind, site))
    return sites, found


def _mov_site(model: nn.Module, path: str, module: nn.Module, kind: str, site: str) -> Site:
    if kind == "proj_attention":
        attr = f"{site}_proj"
        groups = _kv_heads(_join(path, attr), module, getattr(module, attr), model)
        return Site(_join(path, attr), module, attr, "mov_linear", groups=groups)
    if kind == "packed_attention":
        width = _out_features(module.c_attn)
        if width % module.embed_dim:
            raise TypeError(
                f"pemoe.inject: {_join(path, 'c_attn')} has {width} outputs, not a multiple of embed_dim "
                f"{module.embed_dim}: cannot find its k and v blocks"
            )
        parts = {3: ("q", "k", "v"), 2: ("k", "v")}.get(width // module.embed_dim)
        if parts is None:
            raise TypeError(f"pemoe.inject: {_join(path, 'c_attn')} packs {width // module.embed_dim} parts, not q|k|v")
        return Site(
            _join(_join(path, "c_attn"), site), module, "c_attn", "mov_packed", groups=module.num_heads, part=site,
            parts=parts,
        )  # fmt: skip
    if kind == "gated_mlp":
        return Site(_join(path, "mov"), module, "act_fn", "mov_ffn", width=_out_features(module.gate_proj))
    return Site(_join(path, "mov"), module, "act", "mov_ffn", width=_out_features(module.c_fc))


# ---------------------------------------------------------------------------------------------
# target_modules


def _show(target: str | tuple[str, ...]) -> str:
    """target_modules as the user wrote it (a list shows as a list)."""
    return repr(target) if isinstance(target, str) else repr(list(target))


def _matches(target: str | tuple[str, ...], path: str) -> bool:
    if isinstance(target, str):
        return re.fullmatch(target, path) is not None
    return any(path == t or path.endswith("." + t) for t in target)


def _output_embedding(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    if get is not None:
        try:
            return get()
        except (NotImplementedError, AttributeError):
            return None
    return getattr(model, "lm_head", None)


def _activation_site(model: nn.Module, path: str) -> Site | None:
    """The MoV FFN site of an MLP activation module at ``path`` (``act_fn`` / ``act`` of a known MLP)."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    kind = _module_kind(parent)
    if kind == "gated_mlp" and attr == "act_fn":
        return Site(_join(parent_path, "mov"), parent, attr, "mov_ffn", width=_out_features(parent.gate_proj))
    if kind == "plain_mlp" and attr == "act":
        return Site(_join(parent_path, "mov"), parent, attr, "mov_ffn", width=_out_features(parent.c_fc))
    if attr == "act" and is_hf_t5(model) and hasattr(parent, "wo"):  # transformers' T5 DenseReluDense
        return Site(_join(parent_path, "mov"), parent, attr, "mov_ffn", width=parent.wo.in_features)
    return None


def _target_sites(
    model: nn.Module, lora: bool, target: str | tuple[str, ...], num_groups: int | None, owner: str
) -> list[Site]:
    head = _output_embedding(model)
    if target == "all-linear":
        matched = [(p, m) for p, m in model.named_modules() if p and is_linear(m) and m is not head]
    else:
        matched = [(p, m) for p, m in model.named_modules() if p and _matches(target, p)]
    if not matched:
        raise ValueError(f"{owner}.target_modules={_show(target)} matches no module of {type(model).__name__}")
    found: list[Site] = []
    for path, module in matched:
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if is_linear(module):
            if lora:
                found.append(Site(path, parent, attr, "molora"))
                continue
            groups = num_groups
            if groups is None:
                head_dim = _head_dim(parent)
                width = _out_features(module)
                groups = width // head_dim if head_dim is not None and width % head_dim == 0 else 1
            found.append(Site(path, parent, attr, "mov_linear", groups=groups))
            continue
        site = None if lora else _activation_site(model, path)
        if site is None:
            what = "an nn.Linear or Conv1D" if lora else "an nn.Linear or Conv1D, or an MLP's activation (act_fn, act)"
            raise TypeError(
                f"pemoe.inject: target_modules={_show(target)} matches {path} ({type(module).__module__}."
                f"{type(module).__name__}), which is not {what}"
            )
        found.append(site)
    return found


# ---------------------------------------------------------------------------------------------
# entry point


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
    (None: its defaults). Raises TypeError for a model with no built-in placement and no target_modules,
    ValueError for site names the model lacks or a target_modules that matches nothing.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"pemoe.inject: model must be a torch.nn.Module, got {type(model).__name__}")
    pemoe_t5, hf_t5 = is_pemoe_t5(model), is_hf_t5(model)
    kind = "pemoe" if pemoe_t5 else "transformers" if type(model).__module__.startswith("transformers.") else "torch"
    if target_modules is not None:
        return kind, None, _target_sites(model, lora, target_modules, num_groups, owner)
    if pemoe_t5 or hf_t5:
        resolved, found = _t5_sites(model, lora, sites, owner)
        return kind, resolved, found
    modules = _decoder_modules(model)
    if not modules:
        raise TypeError(
            f"pemoe.inject supports {BUILT_IN}; got {type(model).__module__}.{type(model).__name__}, which has "
            "no built-in placement. Name the sites with target_modules, e.g. "
            "MoLoRAConfig(target_modules='all-linear') or MoVConfig(target_modules=['k_proj', 'v_proj'])"
        )
    resolved, found = _decoder_sites(model, modules, lora, sites, owner)
    return kind, resolved, found
