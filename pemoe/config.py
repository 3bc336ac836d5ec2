"""Adapter configs: :class:`MoVConfig`, :class:`IA3Config`, :class:`MoLoRAConfig`, :class:`LoRAConfig` (frozen
dataclasses that validate themselves) and :func:`config_from_dict`, their JSON form's inverse. What each field
means: :mod:`pemoe.adapters`."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import ClassVar

from pemoe.ops._dispatch import AVAILABLE

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
