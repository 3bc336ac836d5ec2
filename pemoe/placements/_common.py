"""What every placement shares: :class:`Site`, the linear views and wrappers the sites need, and
:class:`ModuleKind` (how a family's attention or MLP module is recognised and where its sites are)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from pemoe.layers import MoV

HEAD_DIM_ATTRS = ("head_dim", "key_value_proj_dim", "d_kv")


def conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is optional
        return None
    return Conv1D


def is_linear(module: object) -> bool:
    """An ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2's linear with weight [in, out])."""
    conv = conv1d_type()
    return isinstance(module, nn.Linear) or (conv is not None and isinstance(module, conv))


def out_features(module: nn.Module) -> int:
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
        width = out_features(base)
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


def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def head_dim_of(module: nn.Module) -> int | None:
    """The head width a module declares (``head_dim``; T5's ``key_value_proj_dim`` / ``d_kv``), or None."""
    for name in HEAD_DIM_ATTRS:
        v = getattr(module, name, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def has_linears(module: nn.Module, names) -> bool:
    return all(is_linear(getattr(module, n, None)) for n in names)


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one object per kind
class ModuleKind:
    """One kind of attention or MLP module of a model family, recognised by its structure.

    ``matches(module)``: whether a module is of this kind. ``lora_sites``: MoLoRA site name -> attribute
    holding the linear. ``mov_sites``: its MoV site names; ``mov_site(model, path, module, name)`` builds
    the :class:`Site` of one. ``activation`` / ``ffn_width`` (MLP kinds): the attribute of the activation
    module whose output is the FFN MoV site, and that output's width F (a ``target_modules`` naming the
    activation puts MoV there too).
    """

    name: str
    matches: Callable[[nn.Module], bool]
    lora_sites: dict[str, str]
    mov_sites: tuple[str, ...]
    mov_site: Callable[[nn.Module, str, nn.Module, str], Site]
    activation: str | None = None
    ffn_width: Callable[[nn.Module], int] | None = None
