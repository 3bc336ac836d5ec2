"""Drop-in adapters: ``inject(model, config)``, adapter-only save/load, the authors' (T5) names.

``pemoe.inject(model, config)`` is :func:`inject` from this module (re-exported by ``pemoe``). Where the
adapters go is :mod:`pemoe.placements`: built-in placements for T5 (below), for decoder-only models with
``q_proj k_proj v_proj o_proj`` attention and ``gate_proj up_proj down_proj act_fn`` MLPs (Llama, Mistral,
Qwen2, Qwen3, Gemma: MoV sites ``k v ffn`` with G = key/value heads under grouped-query attention;
MoLoRA sites ``q k v o gate up down``) and for GPT-2 (MoV ``k v`` on c_attn's k and v blocks and ``ffn``;
MoLoRA ``qkv o fc proj``), and ``target_modules=`` (names, a regex or ``"all-linear"``, as PEFT matches
them) for any model. This module holds the configs, builds the modules and swaps them in all-or-nothing.

T5 (transformers' ``T5ForConditionalGeneration`` and :class:`pemoe.models.T5`, same module paths):
``inject`` replaces exactly the sites of SPEC §2 in every encoder and decoder block (self- and
cross-attention) and freezes everything else:

* :class:`MoVConfig` / :class:`IA3Config`, sites ``k``, ``v``, ``ffn``: attention ``k`` and ``v``
  become :class:`~pemoe.layers.MoVLinear` (MoV per head, after the projection); ``ffn`` is MoV on
  act(x·wi_0) before ``* (x·wi_1)`` (v1.1) or on act(x·wi) before ``wo`` (v1.0).
* :class:`MoLoRAConfig` / :class:`LoRAConfig`, sites ``q k v o wi_0 wo`` (v1.1) or ``q k v o wi wo``
  (v1.0) by default (``wi_1`` on request): each becomes a :class:`~pemoe.layers.MoLoRALinear`.

The FFN MoV site: in transformers' T5 the FFN's ``act`` module is wrapped (:class:`MoVActivation`,
``ops.mov`` on its output); in pemoe's T5 the site goes into the FFN's ``mov`` slot and the FFN runs
as the fused ``ops.mov_ffn``. Attention k/v sites run the fused ``ops.mov_linear`` and MoLoRA sites
``ops.molora_linear`` in both models; ``config.implementation`` is passed to every op.

Config fields shared by all four: ``num_experts`` (1 for IA3Config / LoRAConfig), ``sites`` (None:
the SPEC §2 defaults above), ``top_k`` / ``renormalize`` (routing ablations), ``router_input``
(``"token"``: each router reads its site's activation; ``"sentence"``: every router reads one vector
per sequence, [B, router_input_dim] with router_input_dim = d_model by default, given at run time with
``with sentence_routing(model, vectors): ...``) and ``implementation`` (passed to every op).
MoLoRAConfig / LoRAConfig add ``rank`` and ``alpha`` (scale = alpha / rank). ``target_modules`` (None:
the built-in placement) replaces ``sites``; with it MoVConfig's ``num_groups`` sets G for every targeted
linear (None: inferred, see :mod:`pemoe.placements`). Sentence routing on a decoder-only model reads
[B, hidden_size] by default.

Gradient checkpointing: transformers' ``gradient_checkpointing_enable`` (either ``use_reentrant``) itself
makes the input embeddings' output require grad for models fed ``input_ids``, which reentrant checkpointing
of frozen layers needs for the adapters' gradients; ``inject`` adds nothing (for other models call
``model.enable_input_require_grads()`` as with PEFT).

Adapter names (the keys of :func:`adapter_state_dict` and of saved files) are model-independent:
``<path of the replaced Linear>.<param>`` (``encoder.block.0.layer.0.SelfAttention.k.experts``) and,
for the FFN MoV site, ``<path of DenseReluDense>.mov.<param>``; params are ``experts`` [G, E, D] and
``router`` [D, E] (MoV), ``lora_a`` [E, K, r], ``lora_b`` [E, r, N] and ``router`` [K, E] (MoLoRA); no
``router`` when E = 1. A file saved from one model type loads into the other.

Authors' names (for-ai/parameter-efficient-moe: T5X/Flaxformer parameter tree under ``target/``;
:func:`authors_name`, :func:`to_authors_state`, :func:`from_authors_state`). Scopes:
``encoder.block.{i}.layer.0.SelfAttention`` → ``encoder/layers_{i}/attention``;
``decoder.block.{i}.layer.0.SelfAttention`` → ``decoder/layers_{i}/self_attention``;
``decoder.block.{i}.layer.1.EncDecAttention`` → ``decoder/layers_{i}/encoder_decoder_attention``;
``….DenseReluDense`` → ``…/layers_{i}/mlp``. Within a scope:

| pemoe | authors | layout |
|---|---|---|
| ``{k,v}.experts`` | ``{k,v}_conv/mov_scaling`` | [heads, E, d_kv] as is |
| ``{k,v}.experts``, E = 1 | ``{k,v}_conv/ia3_scaling`` | [heads, 1, d_kv] → [heads, d_kv] |
| ``mov.experts`` | ``intermediate_conv/mov_scaling`` | [1, E, F] → [E, F] |
| ``mov.experts``, E = 1 | ``intermediate_conv/ia3_scaling`` | [1, 1, F] → [F] |
| ``{k,v}.router`` | ``{k,v}_conv/router/router_weights/v/kernel`` | [d_kv, E] as is |
| ``mov.router`` | ``intermediate_conv/router/router_weights/v/kernel`` | [F, E] as is |
| ``{q,k,v,o}.lora_a`` | ``lora_{q,k,v,output}_conv/lora_A`` | [E, K, r] as is; E = 1: [K, r] |
| ``{q,k,v,o}.lora_b`` | ``lora_{q,k,v,output}_conv/lora_B`` | [E, r, N] as is; E = 1: [r, N] |
| ``{wi_0 or wi, wo}.lora_{a,b}`` | ``lora_intermediate_conv``, ``lora_output_conv`` + ``/lora_{A,B}`` | as above |
| ``<site>.router`` (MoLoRA) | ``<conv>/router/router_weights/v/kernel`` | [K, E] as is |
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import pathlib
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pemoe.layers import MoLoRALinear, MoV, MoVLinear, ParameterCount, count_parameters
from pemoe.ops._dispatch import AVAILABLE
from pemoe.placements import MoVActivation, PackedMoV, Site, as_linear, find_sites, is_linear
from pemoe.placements._common import out_features

__all__ = [
    "MoVConfig",
    "IA3Config",
    "MoLoRAConfig",
    "LoRAConfig",
    "AdapterConfig",
    "MoVActivation",
    "inject",
    "sentence_routing",
    "adapter_config",
    "adapter_state_dict",
    "save_adapter",
    "load_adapter",
    "load_adapter_state_dict",
    "config_from_dict",
    "authors_name",
    "to_authors_state",
    "from_authors_state",
]

logger = logging.getLogger("pemoe")

FORMAT_VERSION = "1"
ROUTER_INPUTS = ("token", "sentence")
IMPLEMENTATIONS = ("auto",) + tuple(sorted({impl for impls in AVAILABLE.values() for impl in impls}))


# ---------------------------------------------------------------------------------------------
# configs


def _positive_int(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}.{name} must be an int >= 1, got {value!r}")


@dataclass(frozen=True)
class _Config:
    method: ClassVar[str] = ""
    valid_sites: ClassVar[tuple[str, ...]] = ()

    num_experts: int = 1
    sites: tuple[str, ...] | None = None
    top_k: int | None = None
    renormalize: bool = False
    router_input: str = "token"
    router_input_dim: int | None = None
    implementation: str = "auto"
    target_modules: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        _positive_int(name, "num_experts", self.num_experts)
        self._check_target_modules()
        if self.top_k is not None:
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
                raise TypeError(f"{name}.top_k must be an int or None, got {self.top_k!r}")
            if not 1 <= self.top_k <= self.num_experts:
                raise ValueError(f"{name}.top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if not isinstance(self.renormalize, bool):
            raise TypeError(f"{name}.renormalize must be a bool, got {self.renormalize!r}")
        if self.sites is not None:
            if isinstance(self.sites, str):
                object.__setattr__(self, "sites", (self.sites,))
            object.__setattr__(self, "sites", tuple(self.sites))
            if not self.sites:
                raise ValueError(f"{name}.sites must name at least one site (valid: {', '.join(self.valid_sites)})")
            unknown = [s for s in self.sites if s not in self.valid_sites]
            if unknown:
                raise ValueError(f"{name}.sites: unknown site(s) {unknown}; valid sites: {', '.join(self.valid_sites)}")
            if len(set(self.sites)) != len(self.sites):
                raise ValueError(f"{name}.sites lists a site twice: {list(self.sites)}")
        if self.router_input not in ROUTER_INPUTS:
            raise ValueError(f"{name}.router_input must be one of {list(ROUTER_INPUTS)}, got {self.router_input!r}")
        if self.router_input == "sentence" and self.num_experts == 1:
            raise ValueError(f"{name}: sentence routing needs num_experts > 1 (one expert has no router)")
        if self.router_input_dim is not None:
            _positive_int(name, "router_input_dim", self.router_input_dim)
            if self.router_input != "sentence":
                raise ValueError(f"{name}.router_input_dim is for router_input='sentence' only")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"{name}.implementation must be one of {list(IMPLEMENTATIONS)}, got {self.implementation!r}"
            )

    def _check_target_modules(self) -> None:
        name, target = type(self).__name__, self.target_modules
        if target is None:
            return
        if isinstance(target, str):
            try:
                re.compile(target)
            except re.error as e:
                raise ValueError(f"{name}.target_modules={target!r} is not a valid regular expression: {e}") from e
        else:
            if not isinstance(target, (list, tuple)) or not all(isinstance(t, str) and t for t in target):
                raise TypeError(
                    f"{name}.target_modules must be a regex string, 'all-linear' or a list of module names, "
                    f"got {target!r}"
                )
            if not target:
                raise ValueError(f"{name}.target_modules must name at least one module")
            object.__setattr__(self, "target_modules", tuple(target))
        default = next(f.default for f in dataclasses.fields(self) if f.name == "sites")
        if self.sites is not None and tuple(self.sites) != default:
            raise ValueError(f"{name}: give sites (a built-in placement) or target_modules, not both")
        object.__setattr__(self, "sites", None)  # the targets decide the sites

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sites"] = None if self.sites is None else list(self.sites)
        if isinstance(self.target_modules, tuple):
            d["target_modules"] = list(self.target_modules)
        return {"method": self.method, **d}


@dataclass(frozen=True)
class MoVConfig(_Config):
    """MoV: soft mixture of (IA)3 vectors at k, v (per head) and on the FFN activation (site ``ffn``).

    ``num_groups`` (with ``target_modules`` only): G for MoV on every targeted linear's output [..., G·D]
    (None: inferred per module, see :mod:`pemoe.placements`).
    """

    method: ClassVar[str] = "mov"
    valid_sites: ClassVar[tuple[str, ...]] = ("k", "v", "ffn")
    num_experts: int = 10
    sites: tuple[str, ...] | None = ("k", "v", "ffn")
    num_groups: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_groups is not None:
            _positive_int(type(self).__name__, "num_groups", self.num_groups)
            if self.target_modules is None:
                raise ValueError(
                    f"{type(self).__name__}.num_groups is for target_modules; built-in placements use the "
                    "model's own heads"
                )


@dataclass(frozen=True)
class IA3Config(MoVConfig):
    """(IA)3: MoV with one expert and no router."""

    method: ClassVar[str] = "ia3"
    num_experts: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_experts != 1:
            raise ValueError(f"IA3Config.num_experts must be 1 (use MoVConfig for more), got {self.num_experts}")


@dataclass(frozen=True)
class MoLoRAConfig(_Config):
    """MoLoRA: soft mixture of LoRA adapters of rank ``rank`` (scale = alpha / rank).

    ``sites=None``: T5: q, k, v, o and wi_0, wo (v1.1) or wi, wo (v1.0); Llama-like models: q, k, v, o, gate,
    up, down; GPT-2: qkv (c_attn), o (attention c_proj), fc (c_fc), proj (MLP c_proj).
    """

    method: ClassVar[str] = "molora"
    valid_sites: ClassVar[tuple[str, ...]] = (
        *("q", "k", "v", "o", "wi_0", "wi_1", "wi", "wo"),  # T5
        *("gate", "up", "down"),  # gated MLPs (Llama, Mistral, Qwen, Gemma)
        *("qkv", "fc", "proj"),  # GPT-2
    )
    num_experts: int = 10
    rank: int = 4
    alpha: float = 16.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int(type(self).__name__, "rank", self.rank)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise TypeError(f"{type(self).__name__}.alpha must be a number, got {self.alpha!r}")
        if not math.isfinite(self.alpha):
            raise ValueError(f"{type(self).__name__}.alpha must be finite (scale = alpha / rank), got {self.alpha}")
        object.__setattr__(self, "alpha", float(self.alpha))


@dataclass(frozen=True)
class LoRAConfig(MoLoRAConfig):
    """LoRA: MoLoRA with one expert and no router."""

    method: ClassVar[str] = "lora"
    num_experts: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_experts != 1:
            raise ValueError(f"LoRAConfig.num_experts must be 1 (use MoLoRAConfig for more), got {self.num_experts}")


AdapterConfig = MoVConfig | MoLoRAConfig
_CONFIGS = {c.method: c for c in (MoVConfig, IA3Config, MoLoRAConfig, LoRAConfig)}


def config_from_dict(d: dict) -> AdapterConfig:
    """Inverse of ``config.to_dict()``."""
    d = dict(d)
    method = d.pop("method", None)
    if method not in _CONFIGS:
        raise ValueError(f"unknown adapter method {method!r}; known: {sorted(_CONFIGS)}")
    cls = _CONFIGS[method]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}")
    if d.get("sites") is not None:
        d["sites"] = tuple(d["sites"])
    if isinstance(d.get("target_modules"), list):
        d["target_modules"] = tuple(d["target_modules"])
    return cls(**d)


# ---------------------------------------------------------------------------------------------
# injection (the sites themselves: pemoe.placements)


def _adapter_module(model: nn.Module, site: Site) -> nn.Module:
    """The module holding a site's adapter parameters (experts/router or lora_a/lora_b/router)."""
    m = getattr(site.parent, site.attr)
    if isinstance(m, MoVActivation):
        return m.site
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
        isinstance(m, (MoV, MoVLinear, MoLoRALinear, MoVActivation, PackedMoV)) for m in model.modules()
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
    trainable parameter count and its share of all parameters. Raises TypeError for a model with no
    built-in placement and no ``target_modules`` or a targeted module that is not a linear (naming its
    path and type), ValueError for a model that already has adapters, sites it lacks, ``target_modules``
    matching nothing or ``num_groups`` not dividing a target's width; on any error the model is left
    unchanged.
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
    config = _require_injected(model)["config"]
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


def adapter_state_dict(model: nn.Module) -> dict[str, nn.Parameter]:
    """Adapter parameters by model-independent name (``<site>.<param>``), in site order."""
    state = _require_injected(model)
    out: dict[str, nn.Parameter] = {}
    for key, site in state["sites"].items():
        for name, p in _site_parameters(_adapter_module(model, site)).items():
            out[f"{key}.{name}"] = p
    return out


def _config_for_compare(config: AdapterConfig) -> dict:
    d = config.to_dict()
    d.pop("implementation")  # a run-time choice, not part of the adapter's identity
    return d


def save_adapter(model: nn.Module, path: str | pathlib.Path) -> None:
    """Save the adapter parameters alone (safetensors, float32 as trained), config in the metadata.

    The file is written whole or not at all: to a temporary file beside ``path``, then renamed over it, so a
    failed save never leaves a half-written file (nor damages one already at ``path``). ``path`` must name a
    file in an existing folder: a missing folder raises ``FileNotFoundError``, a folder ``IsADirectoryError``.
    """
    from safetensors.torch import save_file

    path = pathlib.Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"save_adapter: {path} is a directory; give the path of a file to write")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"save_adapter: the folder {path.parent} of {path} does not exist")
    state = _require_injected(model)
    tensors = {k: p.detach().to("cpu").contiguous() for k, p in adapter_state_dict(model).items()}
    metadata = {
        "format": "pt",
        "pemoe_format": FORMAT_VERSION,
        "pemoe_config": json.dumps(state["config"].to_dict()),
        "pemoe_saved_from": state["model"],
    }
    # a unique name beside the target: the same file system, so the rename is atomic
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_adapter_file(path: str | pathlib.Path) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """The config and tensors of a :func:`save_adapter` file; ``ValueError`` naming the file if it is not one."""
    from safetensors import SafetensorError, safe_open

    path = pathlib.Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not an adapter file (give the path of a .safetensors file)")
    if not path.exists():
        raise FileNotFoundError(f"adapter file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "pemoe_config" not in meta:
                raise ValueError(f"{path} is not a pemoe adapter file (no 'pemoe_config' in its safetensors metadata)")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or damaged?): {e}") from e
    try:
        config = config_from_dict(json.loads(meta["pemoe_config"]))
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: its 'pemoe_config' metadata is not a valid adapter config: {e}") from e
    return config, tensors


def _check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], what: str) -> dict[str, nn.Parameter]:
    params = adapter_state_dict(model)
    missing, unexpected = [k for k in params if k not in tensors], [k for k in tensors if k not in params]
    if missing or unexpected:
        raise ValueError(
            f"{what} does not fit this model: {len(missing)} missing key(s) {missing[:4]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:4]}"
        )
    for k, p in params.items():
        if tuple(tensors[k].shape) != tuple(p.shape):
            raise ValueError(f"{what}: {k} has shape {list(tensors[k].shape)}, the model's is {list(p.shape)}")
    return params


def load_adapter(model: nn.Module, path: str | pathlib.Path) -> AdapterConfig:
    """Load adapters saved by :func:`save_adapter` into ``model`` (bit-exact copy); returns their config.

    A model without adapters is injected with the file's config first. A model with adapters must
    have the file's config (``implementation`` aside): mismatching fields, keys or shapes raise
    ValueError naming them, and the model is left unchanged.
    """
    saved, tensors = _read_adapter_file(path)
    undo = None
    current = adapter_config(model)
    if current is None:
        undo = _apply(model, dataclasses.replace(saved))
        current = adapter_config(model)
    try:
        a, b = _config_for_compare(saved), _config_for_compare(current)
        diff = [
            f"{k}: file {a.get(k)!r} vs model {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
        ]
        if diff:
            raise ValueError(f"adapter file {path} was saved for another adapter config: " + "; ".join(diff))
        params = _check_tensors(model, tensors, f"adapter file {path}")
    except BaseException:
        if undo is not None:
            undo()
        raise
    _copy(params, tensors)
    return current


def _copy(params: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k].to(device=p.device))


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (pemoe adapter keys, e.g. from :func:`from_authors_state`) into an injected model.

    Every adapter key must be present with the model's shape (ValueError naming the key otherwise;
    nothing is copied then)."""
    _copy(_check_tensors(model, state, "adapter state"), state)


# ---------------------------------------------------------------------------------------------
# the authors' (for-ai/parameter-efficient-moe, T5X/Flaxformer) parameter names

_STACK_RE = re.compile(
    r"^(?P<stack>encoder|decoder)\.block\.(?P<i>\d+)\.layer\.(?P<layer>\d+)\."
    r"(?P<module>SelfAttention|EncDecAttention|DenseReluDense)\.(?P<site>\w+)\.(?P<param>\w+)$"
)
_ATTN_MODULE = {"SelfAttention": "attention", "EncDecAttention": "encoder_decoder_attention"}
_LORA_CONV = {"q": "lora_q_conv", "k": "lora_k_conv", "v": "lora_v_conv", "o": "lora_output_conv"}
_LORA_MLP_CONV = {"wi_0": "lora_intermediate_conv", "wi": "lora_intermediate_conv", "wo": "lora_output_conv"}
_ROUTER = "router/router_weights/v/kernel"


def authors_name(key: str, config: AdapterConfig) -> str:
    """The authors' T5X parameter path of a pemoe adapter key (see the module docstring table)."""
    m = _STACK_RE.match(key)
    if m is None:
        raise ValueError(f"not a pemoe T5 adapter key: {key!r}")
    stack, i, module, site, param = m["stack"], m["i"], m["module"], m["site"], m["param"]
    if module == "DenseReluDense":
        scope = "mlp"
    elif stack == "decoder" and module == "SelfAttention":
        scope = "self_attention"
    else:
        scope = _ATTN_MODULE[module]
    base = f"target/{stack}/layers_{i}/{scope}"
    single = config.num_experts == 1
    if site in ("k", "v") and param in ("experts", "router") and isinstance(config, MoVConfig):
        conv = f"{base}/{site}_conv"
    elif site == "mov":
        conv = f"{base}/intermediate_conv"
    elif module == "DenseReluDense" and site in _LORA_MLP_CONV:
        conv = f"{base}/{_LORA_MLP_CONV[site]}"
    elif site in _LORA_CONV:
        conv = f"{base}/{_LORA_CONV[site]}"
    else:
        raise ValueError(f"no authors' name for {key!r} (site {site!r} is not one of the paper's sites)")
    if param == "router":
        return f"{conv}/{_ROUTER}"
    if param == "experts":
        return f"{conv}/{'ia3_scaling' if single else 'mov_scaling'}"
    return f"{conv}/{'lora_A' if param == 'lora_a' else 'lora_B'}"


def _authors_layout(key: str, t: torch.Tensor, config: AdapterConfig) -> torch.Tensor:
    """pemoe layout -> authors' layout (a view)."""
    single = config.num_experts == 1
    if key.endswith(".mov.experts"):  # [1, E, F] -> [E, F] (IA3: [F])
        return t[0, 0] if single else t[0]
    if key.endswith(".experts") and single:  # [G, 1, D] -> [G, D]
        return t[:, 0]
    if key.endswith((".lora_a", ".lora_b")) and single:  # LoRA has no expert axis
        return t[0]
    return t


def to_authors_state(state: dict[str, torch.Tensor], config: AdapterConfig) -> dict[str, torch.Tensor]:
    """pemoe adapter state (``adapter_state_dict`` / a saved file) -> the authors' names and layouts."""
    return {authors_name(k, config): _authors_layout(k, t, config) for k, t in state.items()}


def from_authors_state(
    authors: dict[str, torch.Tensor], model: nn.Module, *, strict: bool = True
) -> dict[str, torch.Tensor]:
    """The authors' parameters -> pemoe keys and layouts for ``model`` (already injected), as float32.

    Load the result with :func:`load_adapter_state_dict`. With
    ``strict``, every adapter of the model must be found and no authors' key may be left over.
    """
    config = adapter_config(model)
    if config is None:
        raise ValueError("from_authors_state needs an injected model (its config and shapes decide the mapping)")
    out: dict[str, torch.Tensor] = {}
    used = set()
    for key, p in adapter_state_dict(model).items():
        name = authors_name(key, config)
        if name not in authors:
            if strict:
                raise ValueError(f"authors' parameters lack {name!r} (for {key})")
            continue
        used.add(name)
        t = torch.as_tensor(authors[name]).to(torch.float32)
        want_view = _authors_layout(key, p.detach(), config)
        if tuple(t.shape) != tuple(want_view.shape):
            raise ValueError(f"authors' {name} has shape {list(t.shape)}, expected {list(want_view.shape)} for {key}")
        out[key] = t.reshape(p.shape)
    if strict and (left := sorted(set(authors) - used)):
        raise ValueError(f"authors' parameters not used by this model's adapters: {left[:4]} ({len(left)} in all)")
    return out
