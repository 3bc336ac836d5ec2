"""Drop-in PyTorch layers for the adapter sites of SPEC §2.

* :class:`MoV` — a MoV site on an activation h [..., G·D] (T5 FFN: G = 1, D = d_ff);
  :class:`IA3` is its E = 1 form.
* :class:`MoVLinear` — a frozen ``nn.Linear`` followed by MoV, run as the fused
  ``mov_linear`` (T5 attention k and v: G = heads, D = d_kv).
* :class:`MoLoRALinear` — a frozen ``nn.Linear`` plus a soft mixture of LoRA adapters;
  :class:`LoRALinear` is its E = 1 form (no router).

A frozen base whose weight the fused ops cannot read as a plain [N, K] matrix — a quantized linear
(bitsandbytes' ``Linear4bit`` / ``Linear8bitLt``, a torchao-quantized ``nn.Linear``) or any ``nn.Linear``
subclass with a forward of its own — runs its own forward, and the adapter runs on its output:
``MoLoRALinear`` as ``ops.molora_adapter`` (router, shrink, mix and expand in one pass, added to the base
output), ``MoVLinear`` as ``ops.mov`` on it. :func:`runs_own_forward` says which path a base takes; it is
checked at every call, so a base quantized after wrapping takes the right one.

Adapter parameters (experts, routers, lora_a, lora_b) are kept float32 whatever dtype the
module is moved to (``.half()``, ``.to(torch.bfloat16)``): the ops cast them to the
activation dtype where the math allows, and run the router in float32. (A float64 move keeps
them float64, for precision checks.) The wrapped base layer is frozen at construction.

Sentence routing: built with ``router_input_features=R``, a layer's router is [R, E] and reads one
vector per sequence ([B, R] for inputs [B, S, ·]) instead of the token's own activation. The vector is
the ``router_input`` argument of ``forward`` or, when that is None, the one set with
:meth:`_AdapterModule.set_router_input` (how :func:`pemoe.adapters.sentence_routing` reaches layers
called by model code); calling a sentence-routed layer without either raises ValueError.

Adapter banks (:mod:`pemoe.banks`): a layer whose adapter parameters are stacked along a leading adapter
axis A (``banked``) passes the ops one adapter index per token, its sequence's index set by
``pemoe.banks.adapter_batch`` (inputs [B, ..., width], batch dimension first); called outside a batch it
raises ValueError. The per-token indices go to the ops as a :class:`pemoe.ops.AdapterGroups` built once per
batch and input leading shape (:class:`BankBatch`) and shared by every site: the sites of one forward read
nothing back from the device to find their segments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pemoe import ops
from pemoe._checks import check_finite_number, check_routing

__all__ = [
    "MoV",
    "IA3",
    "MoVLinear",
    "MoLoRALinear",
    "LoRALinear",
    "ParameterCount",
    "count_parameters",
    "runs_own_forward",
]

ROUTER_INIT_STD = 0.02
LORA_A_INIT_STD = 0.02


class BankBatch:
    """The adapter of each sequence of a running batch (set on every banked site by
    ``pemoe.banks.adapter_batch``): ``sequence_ids`` (host ints, -1: the base alone) over a bank of
    ``num_adapters``, and ``ids`` [B] on ``device``. :meth:`groups` gives the ops' per-token
    :class:`pemoe.ops.AdapterGroups` for an input leading shape, built on first use and then shared by every
    site (a few shapes per batch: prefill, decoding, an encoder's and a decoder's lengths)."""

    #: at most this many leading shapes are kept per batch (the oldest is dropped beyond it)
    MAX_SHAPES = 8

    def __init__(self, sequence_ids: list[int], num_adapters: int, device: torch.device) -> None:
        self.device = device
        self.rebind(sequence_ids, num_adapters)

    def rebind(self, sequence_ids: list[int], num_adapters: int) -> None:
        """New indices for the same sequences' adapters (the bank gained or lost an adapter): the cached
        groupings are dropped."""
        self.sequence_ids, self.num_adapters = tuple(sequence_ids), num_adapters
        self.ids = torch.tensor(self.sequence_ids, dtype=torch.long, device=self.device)
        self._groups: dict[tuple[int, ...], ops.AdapterGroups] = {}

    def groups(self, lead: tuple[int, ...]) -> ops.AdapterGroups:
        g = self._groups.get(lead)
        if g is None:
            if len(self._groups) >= self.MAX_SHAPES:
                self._groups.pop(next(iter(self._groups)))
            g = ops.AdapterGroups.from_sequences(self.sequence_ids, lead, self.num_adapters, self.device)
            self._groups[lead] = g
        return g


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class _AdapterModule(nn.Module):
    """Keeps adapter parameters at float32 (or wider) across dtype moves."""

    _adapter_param_names: tuple[str, ...] = ()
    router_input_features: int | None = None  # R for sentence routing; None: the router reads the activation
    _router_input: torch.Tensor | None = None
    #: Adapter bank (see :mod:`pemoe.banks`): True when the adapter parameters are stacked along a leading
    #: adapter axis A; ``_bank_ids`` then holds one adapter index per sequence of the running batch
    #: (-1: the base alone, :class:`BankBatch`), set by ``pemoe.banks.adapter_batch``.
    banked: bool = False
    _bank_ids: BankBatch | None = None

    def _adapter_ids(self, x: torch.Tensor) -> ops.AdapterGroups | None:
        """The per-token adapter indices for input x [B, ..., width] of a banked layer (the sequence's index
        broadcast over its tokens, as the batch's shared :class:`pemoe.ops.AdapterGroups`); None for a layer
        holding one adapter."""
        if not self.banked:
            return None
        ids = self._bank_ids
        if ids is None:
            raise ValueError(
                f"{type(self).__name__} holds an adapter bank: name one adapter per sequence, "
                "model(..., adapter_names=[...]) or inside pemoe.adapter_batch(model, names)"
            )
        lead = tuple(x.shape[:-1])
        batch = len(ids.sequence_ids)
        if not lead or lead[0] != batch:
            raise ValueError(
                f"the adapter batch names {batch} sequence(s), but {type(self).__name__} got input of shape "
                f"{list(x.shape)}: one adapter name per sequence (batch dimension first) is needed"
            )
        return ids.groups(lead)

    def set_router_input(self, router_input: torch.Tensor | None) -> None:
        """The per-sequence router input used when ``forward`` gets none (sentence routing)."""
        self._router_input = router_input

    def _resolve_router_input(self, router_input: torch.Tensor | None) -> torch.Tensor | None:
        if router_input is not None:
            return router_input  # explicit: the op validates it against the router
        if getattr(self, "router", None) is None or self.router_input_features is None:
            return None  # one expert (nothing to route) or token routing
        if self._router_input is None:
            raise ValueError(
                f"{type(self).__name__} routes by sentence (router_input_features={self.router_input_features}): "
                f"pass router_input [B, {self.router_input_features}] or run the model inside "
                "pemoe.adapters.sentence_routing(model, router_input)"
            )
        return self._router_input

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for name in self._adapter_param_names if (p := getattr(self, name)) is not None]

    def num_adapter_parameters(self) -> int:
        return sum(p.numel() for p in self.adapter_parameters())

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for p in self.adapter_parameters():
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
                if p.grad is not None:
                    p.grad = p.grad.float()
        return self


def _normal(w: torch.Tensor, std: float) -> torch.Tensor:
    """normal(0, std) in place; meta tensors hold no data, so they skip the (slow, decomposed) init."""
    return w if w.device.type == "meta" else nn.init.normal_(w, std=std)


def _router(in_features: int, num_experts: int, device) -> nn.Parameter | None:
    if num_experts == 1:  # softmax over one expert is 1: (IA)3 / LoRA have no router
        return None
    w = torch.empty(in_features, num_experts, dtype=torch.float32, device=device)
    return nn.Parameter(_normal(w, ROUTER_INIT_STD))


def runs_own_forward(base: nn.Linear) -> bool:
    """Whether the fused ops must leave ``base`` to its own forward: its forward is not ``nn.Linear``'s
    (bitsandbytes' quantized linears), or its weight is not a plain floating [out_features, in_features]
    tensor (torchao's quantized tensor subclasses, packed 4-bit storage)."""
    if type(base).forward is not nn.Linear.forward:
        return True
    w = base.weight
    plain = type(w.data) is torch.Tensor and w.dtype.is_floating_point
    return not plain or tuple(w.shape) != (base.out_features, base.in_features)


def _base_output(base: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The base layer's own output, which must come in x's dtype (or the autocast dtype under autocast), as
    nn.Linear's does: another dtype would silently change the adapter's precision, so it is refused."""
    y = base(x)
    expected = {x.dtype}
    if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
        expected.add(torch.get_autocast_dtype(x.device.type))
    if not isinstance(y, torch.Tensor) or y.dtype not in expected:
        got = y.dtype if isinstance(y, torch.Tensor) else type(y).__name__
        raise TypeError(
            f"the frozen base {type(base).__name__} returned {got} for {x.dtype} input; pemoe's adapter on top of "
            f"it expects {' or '.join(sorted(str(d) for d in expected))} (as nn.Linear returns): set the base's "
            "compute/output dtype to the activations' dtype"
        )
    return y


def _freeze(base: nn.Linear) -> nn.Linear:
    if not isinstance(base, nn.Linear):
        raise TypeError(f"base must be a torch.nn.Linear, got {type(base).__name__}")
    for p in base.parameters():
        p.requires_grad_(False)
    return base


class MoV(_AdapterModule):
    """MoV site: y = h * einsum('tge,ged->tgd', softmax(h32 @ router), experts).

    experts [G, E, D] float32, init ones (so the site starts as the identity);
    router [D, E] float32, init normal(0.02), shared by the G groups (None when E = 1).
    """

    _adapter_param_names = ("experts", "router")

    def __init__(
        self,
        num_groups: int,
        dim: int,
        num_experts: int = 1,
        *,
        top_k: int | None = None,
        renormalize: bool = False,
        implementation: str = "auto",
        router_input_features: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("num_groups", num_groups), ("dim", dim), ("num_experts", num_experts)):
            _check_positive(name, v)
        if router_input_features is not None:
            _check_positive("router_input_features", router_input_features)
        check_routing(top_k, renormalize, num_experts)
        self.num_groups, self.dim, self.num_experts = num_groups, dim, num_experts
        self.top_k, self.renormalize, self.implementation = top_k, renormalize, implementation
        self.router_input_features = router_input_features
        self.experts = nn.Parameter(torch.ones(num_groups, num_experts, dim, dtype=torch.float32, device=device))
        self.router = _router(router_input_features or dim, num_experts, device)

    def forward(self, h: torch.Tensor, router_input: torch.Tensor | None = None) -> torch.Tensor:
        return ops.mov(
            h,
            self.router,
            self.experts,
            top_k=self.top_k,
            renormalize=self.renormalize,
            router_input=self._resolve_router_input(router_input),
            adapter_ids=self._adapter_ids(h),
            implementation=self.implementation,
        )

    def extra_repr(self) -> str:
        return (
            f"num_groups={self.num_groups}, dim={self.dim}, num_experts={self.num_experts}, "
            f"top_k={self.top_k}, implementation={self.implementation!r}"
        )


class IA3(MoV):
    """(IA)3: a learned scaling vector per group, y = h * l (MoV with one expert, no router)."""

    def __init__(self, num_groups: int, dim: int, **kwargs) -> None:
        super().__init__(num_groups, dim, 1, **kwargs)


class MoVLinear(_AdapterModule):
    """A frozen ``nn.Linear`` [N = G·D, K] followed by a MoV site, run as the fused ``mov_linear``."""

    _adapter_param_names = ("experts", "router")

    def __init__(
        self,
        base: nn.Linear,
        num_groups: int,
        num_experts: int = 1,
        *,
        top_k: int | None = None,
        renormalize: bool = False,
        implementation: str = "auto",
        router_input_features: int | None = None,
    ) -> None:
        super().__init__()
        self.base = _freeze(base)
        _check_positive("num_groups", num_groups)
        if base.out_features % num_groups:
            raise ValueError(f"num_groups={num_groups} must divide base.out_features={base.out_features}")
        self.site = MoV(
            num_groups,
            base.out_features // num_groups,
            num_experts,
            top_k=top_k,
            renormalize=renormalize,
            implementation=implementation,
            router_input_features=router_input_features,
            device=base.weight.device,
        )
        self.router_input_features = router_input_features

    def set_router_input(self, router_input: torch.Tensor | None) -> None:
        self._router_input = router_input
        self.site.set_router_input(router_input)

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight [N, K] (so code reading ``layer.weight`` keeps working)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def experts(self) -> nn.Parameter:
        return self.site.experts

    @property
    def router(self) -> nn.Parameter | None:
        return self.site.router

    def forward(self, x: torch.Tensor, router_input: torch.Tensor | None = None) -> torch.Tensor:
        s = self.site
        if runs_own_forward(self.base):
            if s.implementation == "triton":
                raise NotImplementedError(
                    f"MoVLinear over {type(self.base).__name__} (a base that runs its own forward, e.g. a quantized "
                    "linear) applies MoV to the base output with ops.mov, which has no Triton kernel; use "
                    "implementation='auto' or 'torch'"
                )
            return s(_base_output(self.base, x), router_input=router_input)
        return ops.mov_linear(
            x,
            self.base.weight,
            s.router,
            s.experts,
            bias=self.base.bias,
            top_k=s.top_k,
            renormalize=s.renormalize,
            router_input=self._resolve_router_input(router_input),
            adapter_ids=s._adapter_ids(x),
            implementation=s.implementation,
        )


class MoLoRALinear(_AdapterModule):
    """A frozen ``nn.Linear`` (or quantized linear: see the module docstring) plus a soft mixture of E LoRA
    adapters of rank r (SPEC §1).

    lora_a [E, K, r] init normal(0.02); lora_b [E, r, N] init zeros (so the layer starts as its
    base); router [K, E] init normal(0.02), None when E = 1 (LoRA); scale = alpha / r.
    """

    _adapter_param_names = ("lora_a", "lora_b", "router")

    def __init__(
        self,
        base: nn.Linear,
        num_experts: int = 1,
        rank: int = 4,
        *,
        alpha: float = 16.0,
        top_k: int | None = None,
        renormalize: bool = False,
        implementation: str = "auto",
        router_input_features: int | None = None,
    ) -> None:
        super().__init__()
        self.base = _freeze(base)
        _check_positive("num_experts", num_experts)
        _check_positive("rank", rank)
        if router_input_features is not None:
            _check_positive("router_input_features", router_input_features)
        check_routing(top_k, renormalize, num_experts)
        self.router_input_features = router_input_features
        self.num_experts, self.rank = num_experts, rank
        self.alpha = check_finite_number("alpha", alpha, "scale = alpha / rank")
        self.top_k, self.renormalize, self.implementation = top_k, renormalize, implementation
        k, n, dev = base.in_features, base.out_features, base.weight.device
        self.lora_a = nn.Parameter(
            _normal(torch.empty(num_experts, k, rank, dtype=torch.float32, device=dev), LORA_A_INIT_STD)
        )
        self.lora_b = nn.Parameter(torch.zeros(num_experts, rank, n, dtype=torch.float32, device=dev))
        self.router = _router(router_input_features or k, num_experts, dev)

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight [N, K] (so code reading ``layer.weight`` keeps working)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor, router_input: torch.Tensor | None = None) -> torch.Tensor:
        if runs_own_forward(self.base):
            return ops.molora_adapter(
                x,
                self.lora_a,
                self.lora_b,
                self.router,
                scale=self.scale,
                base=_base_output(self.base, x),
                top_k=self.top_k,
                renormalize=self.renormalize,
                router_input=self._resolve_router_input(router_input),
                adapter_ids=self._adapter_ids(x),
                implementation=self.implementation,
            )
        return ops.molora_linear(
            x,
            self.base.weight,
            self.lora_a,
            self.lora_b,
            self.router,
            scale=self.scale,
            bias=self.base.bias,
            top_k=self.top_k,
            renormalize=self.renormalize,
            router_input=self._resolve_router_input(router_input),
            adapter_ids=self._adapter_ids(x),
            implementation=self.implementation,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.base.in_features}, out_features={self.base.out_features}, "
            f"num_experts={self.num_experts}, rank={self.rank}, alpha={self.alpha:g}, top_k={self.top_k}, "
            f"implementation={self.implementation!r}"
        )


class LoRALinear(MoLoRALinear):
    """LoRA: y = base(x) + (alpha / r)·(x A) B — MoLoRA with one expert and no router."""

    def __init__(self, base: nn.Linear, rank: int = 4, **kwargs) -> None:
        super().__init__(base, 1, rank, **kwargs)


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable {self.trainable:,} of {self.total:,} ({self.percent:.4f}%)"


def count_parameters(module: nn.Module) -> ParameterCount:
    """Trainable and total parameter counts (shared parameters counted once)."""
    params = {id(p): p for p in module.parameters()}.values()
    return ParameterCount(
        trainable=sum(p.numel() for p in params if p.requires_grad), total=sum(p.numel() for p in params)
    )
