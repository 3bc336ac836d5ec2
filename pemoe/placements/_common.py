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


class FusedGatedMLP(nn.Module):
    """A gated MLP, y = down_proj(act(gate_proj·x) ⊙ up_proj·x), with the FFN MoV site on act(gate_proj·x),
    run as one fused ``ops.mov_ffn`` (wi_0 = gate_proj, wi_1 = up_proj, wo = down_proj): the Triton kernels'
    dual GEMM with the activation, gate product and router logits in its epilogue, then the down GEMM with
    the expert merge as its prologue.

    It takes the MLP's place and holds the MLP's own linears and activation under their names, so the
    model's state-dict keys do not change (the site adds ``mov.*``). Built only for an MLP that
    :func:`fusible_gated_mlp` checked to compute exactly that formula.
    """

    def __init__(self, mlp: nn.Module, mov: MoV, activation: str) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn
        self.mov, self.activation = mov, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from pemoe import ops

        m = self.mov
        return ops.mov_ffn(
            x,
            self.gate_proj.weight,
            self.down_proj.weight,
            m.router,
            m.experts,
            wi_1=self.up_proj.weight,
            activation=self.activation,
            top_k=m.top_k,
            renormalize=m.renormalize,
            router_input=m._resolve_router_input(None),
            adapter_ids=m._adapter_ids(x),
            implementation=m.implementation,
        )


def _activation_name(act: nn.Module, like: torch.Tensor) -> str | None:
    """The name in pemoe.reference.ACTIVATIONS of the function ``act`` computes (on a probe of 97 points in
    [-6, 6]), or None: found by what it computes, not by its class."""
    from pemoe.reference import ACTIVATIONS

    t = torch.linspace(-6.0, 6.0, 97, dtype=torch.float32, device=like.device)
    with torch.no_grad():
        got = act(t)
        for name, fn in ACTIVATIONS.items():
            if torch.allclose(got, fn(t), rtol=1e-6, atol=1e-6):
                return name
    return None


def fusible_gated_mlp(mlp: nn.Module) -> str | None:
    """The activation name when ``mlp`` can run as :class:`FusedGatedMLP`, else None (it then keeps its own
    forward, with the MoV site wrapping its activation: :class:`MoVActivation`).

    Fusible: gate_proj, up_proj, down_proj plain bias-free ``nn.Linear`` of one floating dtype whose weights
    the fused op can read (not quantized: :func:`pemoe.layers.runs_own_forward`), no dropout, an activation
    pemoe has, and a forward that computes down_proj(act_fn(gate_proj·x) ⊙ up_proj·x) — checked on a probe
    input, so a family whose MLP looks the same but computes otherwise keeps its own forward."""
    from pemoe.layers import runs_own_forward

    linears = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(type(lin) is nn.Linear and lin.bias is None and not runs_own_forward(lin) for lin in linears):
        return None
    gate, up, down = linears
    w = gate.weight
    if w.device.type == "meta" or not w.dtype.is_floating_point or {up.weight.dtype, down.weight.dtype} != {w.dtype}:
        return None
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in mlp.modules()):
        return None
    activation = _activation_name(mlp.act_fn, w)
    if activation is None:
        return None
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, gate.in_features, generator=g).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        want = down(mlp.act_fn(gate(x)) * up(x))
        if not torch.equal(mlp(x), want):
            return None
    return activation


@dataclass
class Site:
    """One adapter site: ``getattr(parent, attr)`` is replaced (or, for ``mov_packed``, shared).

    kind: ``mov_linear`` (MoV on the output of a linear, ``groups`` groups), ``mov_ffn`` (MoV of width
    ``width`` on an activation: the ``act`` module is wrapped, or pemoe T5's FFN ``mov`` slot is set),
    ``mov_packed`` (MoV on the block ``part`` of ``parts`` packed in the linear's output, ``groups`` heads),
    ``mov_gated_mlp`` (a gated MLP replaced by :class:`FusedGatedMLP`, MoV of width ``width`` on its
    ``activation``), ``molora`` (MoLoRA / LoRA on a linear).
    """

    key: str  # adapter names are key + "." + param
    parent: nn.Module
    attr: str
    kind: str
    groups: int = 1
    width: int = 0
    part: str = ""
    parts: tuple[str, ...] = field(default_factory=tuple)
    activation: str = ""  # mov_gated_mlp: the activation name (pemoe.reference.ACTIVATIONS)


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
