"""Injection: :func:`inject` builds each site's adapter module and swaps all of them in, all-or-nothing
(where the sites are: :mod:`pemoe.placements`); :func:`sentence_routing`, and what an injected model holds
(:func:`adapter_config`, :func:`adapter_state_dict`)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn

from pemoe.config import AdapterConfig, MoLoRAConfig, MoVConfig
from pemoe.layers import MoLoRALinear, MoV, MoVLinear, ParameterCount, count_parameters
from pemoe.placements import (
    FusedGatedMLP,
    MoVActivation,
    PackedMoV,
    Site,
    as_linear,
    find_sites,
    is_linear,
)
from pemoe.placements._common import out_features

logger = logging.getLogger("pemoe")


# ---------------------------------------------------------------------------------------------
# injection (the sites themselves: pemoe.placements)


def _adapter_module(model: nn.Module, site: Site) -> nn.Module:
    """The module holding a site's adapter parameters (experts/router or lora_a/lora_b/router)."""
    m = getattr(site.parent, site.attr)
    if isinstance(m, MoVActivation):
        return m.site
    if isinstance(m, FusedGatedMLP):
        return m.mov
    if isinstance(m, PackedMoV):
        return getattr(m, site.part)
    return m


def _site_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n in module._adapter_param_names if (p := getattr(module, n)) is not None}


def _model_width(model: nn.Module) -> int:
    """d_model (T5) or hidden_size (decoder models): the width of the hidden states a sentence vector matches."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    width = getattr(config, "d_model", None) or getattr(config, "hidden_size", None)
    if not isinstance(width, int):
        raise ValueError(
            f"sentence routing: cannot read the model width (config.d_model / config.hidden_size) of "
            f"{type(model).__name__}; give router_input_dim"
        )
    return width


def _router_input_features(model: nn.Module, config: AdapterConfig) -> int | None:
    if config.router_input != "sentence":
        return None
    return config.router_input_dim or _model_width(model)


def _device(module: nn.Module) -> torch.device | None:
    p = next(module.parameters(), None)
    return None if p is None else p.device


def _build(model: nn.Module, config: AdapterConfig, group: list[Site]) -> nn.Module:
    """The replacement of ``getattr(parent, attr)`` shared by the sites in ``group``; does not touch the model."""
    site = group[0]
    common = dict(
        top_k=config.top_k,
        renormalize=config.renormalize,
        implementation=config.implementation,
        router_input_features=_router_input_features(model, config),
    )
    current = getattr(site.parent, site.attr, None)
    if site.kind == "mov_ffn":
        mov = MoV(1, site.width, config.num_experts, device=_device(site.parent), **common)
        return mov if site.attr == "mov" else MoVActivation(current, mov)
    if site.kind == "mov_gated_mlp":
        mov = MoV(1, site.width, config.num_experts, device=_device(current), **common)
        return FusedGatedMLP(current, mov, site.activation)
    if not is_linear(current):
        raise TypeError(
            f"pemoe.inject: {site.key} must be a torch.nn.Linear (or transformers' Conv1D), "
            f"got {type(current).__name__}"
        )
    if site.kind == "mov_packed":
        dim = out_features(current) // len(site.parts) // site.groups
        sites = {s.part: MoV(s.groups, dim, config.num_experts, device=current.weight.device, **common) for s in group}
        return PackedMoV(current, site.parts, sites)
    base = as_linear(current)
    if site.kind == "mov_linear":
        if base.out_features % site.groups:
            raise ValueError(
                f"pemoe.inject: {site.key} has {base.out_features} outputs, which num_groups={site.groups} "
                "does not divide"
            )
        return MoVLinear(base, site.groups, config.num_experts, **common)
    return MoLoRALinear(base, config.num_experts, config.rank, alpha=config.alpha, **common)


def _injected(model: nn.Module) -> bool:
    return getattr(model, "_pemoe_adapter", None) is not None or any(
        isinstance(m, (MoV, MoVLinear, MoLoRALinear, MoVActivation, PackedMoV, FusedGatedMLP)) for m in model.modules()
    )


def _apply(model: nn.Module, config: AdapterConfig) -> Callable[[], None]:
    """Inject; returns an undo function restoring the model exactly. Fails without changing anything."""
    if not isinstance(config, (MoVConfig, MoLoRAConfig)):
        raise TypeError(
            f"config must be a MoVConfig, IA3Config, MoLoRAConfig or LoRAConfig, got {type(config).__name__}"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"pemoe.inject: model must be a torch.nn.Module, got {type(model).__name__}")
    if _injected(model):
        have = getattr(model, "_pemoe_adapter", None)
        raise ValueError(
            f"pemoe.inject: the model already has pemoe adapters ({have['config'] if have else 'unknown config'}); "
            "inject once per model (build or load a fresh backbone to change adapters)"
        )
    kind, sites, found = find_sites(
        model,
        lora=isinstance(config, MoLoRAConfig),
        sites=config.sites,
        target_modules=config.target_modules,
        num_groups=getattr(config, "num_groups", None),
        owner=type(config).__name__,
    )
    # sites sharing one replaced module (GPT-2's packed k and v) are built together
    groups: dict[tuple[int, str], list[Site]] = {}
    for s in found:
        groups.setdefault((id(s.parent), s.attr), []).append(s)
    # Freezing happens inside the layer constructors: remember every flag first.
    grad_flags = {id(p): (p, p.requires_grad) for p in model.parameters()}
    replaced: list[tuple[nn.Module, str, object]] = []

    def undo() -> None:
        for parent, attr, old in reversed(replaced):
            setattr(parent, attr, old)
        for p, flag in grad_flags.values():
            p.requires_grad_(flag)
        model.__dict__.pop("_pemoe_adapter", None)

    try:
        new = [(group[0], _build(model, config, group)) for group in groups.values()]
        for s, module in new:
            replaced.append((s.parent, s.attr, getattr(s.parent, s.attr, None)))
            setattr(s.parent, s.attr, module)
        adapter_ids = set()
        for s in found:
            adapter_ids |= {id(p) for p in _site_parameters(_adapter_module(model, s)).values()}
        for p in model.parameters():
            p.requires_grad_(id(p) in adapter_ids)
        resolved = dataclasses.replace(config, sites=sites, router_input_dim=_router_input_features(model, config))
        model._pemoe_adapter = {"config": resolved, "sites": {s.key: s for s in found}, "model": kind}
    except BaseException:
        undo()
        raise
    return undo


def inject(model: nn.Module, config: AdapterConfig) -> ParameterCount:
    """Replace the sites of ``model`` (its built-in placement or ``config.target_modules``, see
    :mod:`pemoe.placements`) with pemoe adapters, in place.

    Everything but the adapter parameters is frozen. Returns (and logs on the ``pemoe`` logger) the
    trainable parameter count and its share of all parameters. Raises TypeError for a model that is not an
    ``nn.Module`` or a targeted module that is not a linear (naming its path and type), ValueError for a
    model with no built-in placement and no ``target_modules`` (saying how to name them), a model that
    already has adapters, sites it lacks, ``target_modules`` matching nothing or ``num_groups`` not dividing
    a target's width; on any error the model is left unchanged.
    """
    _apply(model, config)
    count = count_parameters(model)
    logger.info("pemoe.inject %s: %s", type(config).__name__, count)
    return count


@contextlib.contextmanager
def sentence_routing(model: nn.Module, router_input: torch.Tensor) -> Iterator[None]:
    """Run a sentence-routed model: every router reads ``router_input`` [B, R] (one vector per sequence,
    e.g. a pooled instruction embedding; R = ``config.router_input_dim``, by default d_model (T5) or
    hidden_size (decoder-only models)) instead of the token's activation, broadcast over that sequence's
    tokens (in T5's encoder and decoder; in a decoder-only model at every generation step, cached or not).

        with pemoe.adapters.sentence_routing(model, pooled):  # pooled [B, R]
            loss = model(**batch).loss
    """
    config = require_unmerged(model, "sentence_routing", bank_ok=True)["config"]
    if config.router_input != "sentence":
        raise ValueError(f"the model's adapters route by {config.router_input!r}, not by sentence")
    dim = config.router_input_dim
    if not isinstance(router_input, torch.Tensor) or router_input.dim() != 2 or router_input.shape[1] != dim:
        shape = list(router_input.shape) if isinstance(router_input, torch.Tensor) else type(router_input).__name__
        raise ValueError(f"router_input must have shape [B, R] = [batch, {dim}], got {shape}")
    if not router_input.is_floating_point():
        raise TypeError(f"router_input must be a floating tensor, got {router_input.dtype}")
    modules = [_adapter_module(model, s) for s in _require_injected(model)["sites"].values()]
    for m in modules:
        m.set_router_input(router_input)
    try:
        yield
    finally:
        for m in modules:
            m.set_router_input(None)


def adapter_config(model: nn.Module) -> AdapterConfig | None:
    """The (site-resolved) config injected into ``model``, or None."""
    state = getattr(model, "_pemoe_adapter", None)
    return None if state is None else state["config"]


def _require_injected(model: nn.Module) -> dict:
    state = getattr(model, "_pemoe_adapter", None)
    if state is None:
        raise ValueError("the model has no pemoe adapters: call pemoe.inject(model, config) first")
    return state


def require_unmerged(model: nn.Module, what: str, *, bank_ok: bool = False) -> dict:
    """The model's adapter state; ValueError when its adapters are folded into the weights
    (:func:`pemoe.merge`): the adapter modules are out of the model until :func:`pemoe.unmerge`; and, unless
    ``bank_ok``, when the model holds an adapter bank (:mod:`pemoe.banks`): its parameters are stacked over
    several adapters, which single-adapter operations (saving, merging, exporting) cannot take."""
    state = _require_injected(model)
    bank = state.get("bank")
    if bank is not None and not bank_ok:
        raise ValueError(
            f"{what}: the model holds an adapter bank ({len(bank['names'])} adapters: {bank['names'][:8]}), "
            "not one adapter; this works on a model with one adapter (load it on its own backbone)"
        )
    if state.get("merged") is not None:
        raise ValueError(
            f"{what}: the model's adapters are merged into its weights (pemoe.merge); call pemoe.unmerge(model) first"
        )
    return state


def adapter_state_dict(model: nn.Module) -> dict[str, nn.Parameter]:
    """Adapter parameters by model-independent name (``<site>.<param>``), in site order."""
    state = require_unmerged(model, "adapter_state_dict")
    out: dict[str, nn.Parameter] = {}
    for key, site in state["sites"].items():
        for name, p in _site_parameters(_adapter_module(model, site)).items():
            out[f"{key}.{name}"] = p
    return out
