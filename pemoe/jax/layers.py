"""Flax (NNX) layers for the adapter sites of SPEC §2, mirroring :mod:`pemoe.layers` (PyTorch).

* :class:`MoV` — a MoV site on an activation h [..., G·D] (T5 FFN: G = 1, D = d_ff);
  :class:`IA3` is its E = 1 form.
* :class:`MoVLinear` — a frozen ``nnx.Linear`` followed by MoV, run as the fused ``mov_linear``
  (T5 attention k and v: G = heads, D = d_kv).
* :class:`MoLoRALinear` — a frozen ``nnx.Linear`` plus a soft mixture of LoRA adapters;
  :class:`LoRALinear` is its E = 1 form (no router).

Parameter names are the paper's (issue 5): ``mov_scaling`` (the experts, [G, E, D], init ones),
``router`` ([in, E], init normal(0.02), absent when E = 1), ``lora_A`` ([E, K, r], init
normal(0.02)) and ``lora_B`` ([E, r, N], init zeros) — the layouts of :mod:`pemoe.jax.ops`, so
the same arrays serve the PyTorch layers (``experts``, ``router``, ``lora_a``, ``lora_b``).

Adapter parameters are :class:`AdapterParam` variables (a subclass of ``nnx.Param``), always
float32 whatever the activation or base dtype. The wrapped base layer is frozen: its kernel and
bias enter the op through ``jax.lax.stop_gradient``, so their gradients are zero, and an
optimiser built with ``nnx.Optimizer(model, tx, wrt=AdapterParam)`` updates the adapters only.
The base is computed in its ``dtype`` when it has one (as ``nnx.Linear`` does), else in the
promoted dtype of x and its kernel.

Sentence routing: built with ``router_input_features=R``, a layer's router is [R, E] and reads
the ``router_input`` argument of ``__call__`` ([B, R] for inputs [B, S, ·]); calling such a layer
without it raises ValueError.

Adapter banks (the torch layers' semantics, :mod:`pemoe.banks`): built with ``num_adapters=A``, a layer
holds A adapters stacked along a leading axis (mov_scaling [A, G, E, D], router [A, D, E]; lora_A
[A, E, K, r], lora_B [A, E, r, N], router [A, K, E]; each adapter initialised as a single layer is) and
``__call__`` takes ``adapter_ids`` [B], one adapter index per sequence for inputs [B, ..., width] (batch
dimension first): every token of sequence b runs adapter ``adapter_ids[b]``, -1 runs the frozen base alone
(MoV: h unchanged). The layer broadcasts the ids over each sequence's tokens and calls :mod:`pemoe.jax.ops`
with ``adapter_ids`` (per-token ids: call the ops directly). A banked layer called without ids, a single
layer called with them, ids that are not an integer array, or ids whose length is not the batch size raise
ValueError / TypeError naming ``adapter_ids``; an id outside [-1, A) raises ValueError when the ids are
concrete, and gives NaN rows under tracing (see :func:`pemoe.jax._checks.check_adapter_ids`).
:func:`stack_adapters` builds a bank from single layers, :func:`adapter_from_bank` takes one adapter out.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pemoe.jax import ops
from pemoe.jax._checks import check_finite_number, check_routing

__all__ = [
    "AdapterParam",
    "MoV",
    "IA3",
    "MoVLinear",
    "MoLoRALinear",
    "LoRALinear",
    "num_adapter_parameters",
    "stack_adapters",
    "adapter_from_bank",
]

ROUTER_INIT_STD = 0.02
LORA_A_INIT_STD = 0.02


class AdapterParam(nnx.Param):
    """A trainable adapter parameter (float32). Filter on it to train only the adapters."""


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float) -> AdapterParam:
    return AdapterParam(std * jax.random.normal(rngs.params(), shape, dtype=jnp.float32))


def _router(rngs: nnx.Rngs, in_features: int, num_experts: int, lead: tuple[int, ...] = ()) -> AdapterParam | None:
    if num_experts == 1:  # softmax over one expert is 1: (IA)3 / LoRA have no router
        return None
    return _normal(rngs, lead + (in_features, num_experts), ROUTER_INIT_STD)


def _bank_lead(num_adapters: int | None) -> tuple[int, ...]:
    """The leading adapter axis of the adapter parameters: () for one adapter, (A,) for a bank of A."""
    if num_adapters is None:
        return ()
    _check_positive("num_adapters", num_adapters)
    return (num_adapters,)


def _value(v: AdapterParam | None) -> jax.Array | None:
    return None if v is None else v[...]


def _check_base(base: object) -> nnx.Linear:
    if not isinstance(base, nnx.Linear):
        raise TypeError(f"base must be a flax.nnx.Linear, got {type(base).__name__}")
    return base


def _frozen_base(base: nnx.Linear, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(x, weight [N, K] torch layout, bias [N]) in the base's compute dtype, cut from autodiff."""
    kernel = jax.lax.stop_gradient(base.kernel[...])  # flax layout [K, N]
    bias = None if base.bias is None else jax.lax.stop_gradient(base.bias[...])
    dtype = base.dtype or jnp.result_type(x.dtype, kernel.dtype)
    return x.astype(dtype), kernel.T.astype(dtype), None if bias is None else bias.astype(dtype)


class _Routed(nnx.Module):
    router_input_features: int | None
    router: AdapterParam | None
    #: A for a layer holding a bank of A adapters (parameters stacked along a leading axis), None for one.
    num_adapters: int | None = None

    def _adapter_ids(self, x: jax.Array, adapter_ids: object) -> jax.Array | None:
        """Per-token adapter indices (the leading shape of x) from one index per sequence, ``adapter_ids`` [B]
        for x [B, ..., width]; None for a layer holding one adapter. The range is the op's to check."""
        name = type(self).__name__
        if self.num_adapters is None:
            if adapter_ids is not None:
                raise ValueError(
                    f"{name} holds one adapter: adapter_ids is for a layer holding an adapter bank (built with "
                    "num_adapters=A, or pemoe.jax.layers.stack_adapters)"
                )
            return None
        if adapter_ids is None:
            raise ValueError(
                f"{name} holds an adapter bank (num_adapters={self.num_adapters}): pass adapter_ids [B], one "
                "adapter index per sequence (-1: the base alone)"
            )
        if not isinstance(adapter_ids, (jax.Array, np.ndarray)):
            raise TypeError(
                f"adapter_ids must be an integer jax.Array (or numpy array) [B], got {type(adapter_ids).__name__}"
            )
        if not jnp.issubdtype(adapter_ids.dtype, jnp.integer):
            raise TypeError(
                f"adapter_ids must be an integer array (one adapter index per sequence, e.g. int32), got "
                f"{adapter_ids.dtype}"
            )
        lead = tuple(x.shape[:-1])
        if adapter_ids.ndim != 1 or not lead or lead[0] != adapter_ids.shape[0]:
            raise ValueError(
                f"adapter_ids must have shape [B], one adapter index per sequence of the input (batch dimension "
                f"first), got shape {list(adapter_ids.shape)} for {name} input of shape {list(x.shape)}"
            )
        ids = jnp.asarray(adapter_ids).reshape((-1,) + (1,) * (len(lead) - 1))
        return jnp.broadcast_to(ids, lead)

    def _router_input(self, router_input: jax.Array | None) -> jax.Array | None:
        if router_input is not None or self.router is None or self.router_input_features is None:
            return router_input  # explicit (validated by the op), nothing to route, or token routing
        raise ValueError(
            f"{type(self).__name__} routes by sentence (router_input_features={self.router_input_features}): "
            f"pass router_input [B, {self.router_input_features}]"
        )


class MoV(_Routed):
    """MoV site: y = h * einsum('tge,ged->tgd', softmax(h32 @ router), mov_scaling).

    mov_scaling [G, E, D] float32, init ones (so the site starts as the identity);
    router [D, E] (or [R, E] for sentence routing) float32, init normal(0.02), None when E = 1.
    """

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
        num_adapters: int | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        for name, v in (("num_groups", num_groups), ("dim", dim), ("num_experts", num_experts)):
            _check_positive(name, v)
        if router_input_features is not None:
            _check_positive("router_input_features", router_input_features)
        check_routing(top_k, renormalize, num_experts)
        lead = _bank_lead(num_adapters)
        self.num_groups, self.dim, self.num_experts = num_groups, dim, num_experts
        self.top_k, self.renormalize, self.implementation = top_k, renormalize, implementation
        self.router_input_features, self.num_adapters = router_input_features, num_adapters
        self.mov_scaling = AdapterParam(jnp.ones(lead + (num_groups, num_experts, dim), dtype=jnp.float32))
        self.router = _router(rngs, router_input_features or dim, num_experts, lead)

    def __call__(
        self, h: jax.Array, router_input: jax.Array | None = None, adapter_ids: jax.Array | None = None
    ) -> jax.Array:
        return ops.mov(
            h,
            _value(self.router),
            self.mov_scaling[...],
            top_k=self.top_k,
            renormalize=self.renormalize,
            router_input=self._router_input(router_input),
            adapter_ids=self._adapter_ids(h, adapter_ids),
            implementation=self.implementation,
        )


class IA3(MoV):
    """(IA)3: a learned scaling vector per group, y = h * l (MoV with one expert, no router)."""

    def __init__(self, num_groups: int, dim: int, **kwargs) -> None:
        super().__init__(num_groups, dim, 1, **kwargs)


class MoVLinear(_Routed):
    """A frozen ``nnx.Linear`` (K -> N = G·D) followed by a MoV site, run as the fused ``mov_linear``.

    Parameters as :class:`MoV`: mov_scaling [G, E, D] (ones), router [D, E] (normal(0.02)).
    """

    def __init__(
        self,
        base: nnx.Linear,
        num_groups: int,
        num_experts: int = 1,
        *,
        top_k: int | None = None,
        renormalize: bool = False,
        implementation: str = "auto",
        router_input_features: int | None = None,
        num_adapters: int | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        self.base = _check_base(base)
        _check_positive("num_groups", num_groups)
        _check_positive("num_experts", num_experts)
        if router_input_features is not None:
            _check_positive("router_input_features", router_input_features)
        if base.out_features % num_groups:
            raise ValueError(f"num_groups={num_groups} must divide base.out_features={base.out_features}")
        check_routing(top_k, renormalize, num_experts)
        lead = _bank_lead(num_adapters)
        dim = base.out_features // num_groups
        self.num_groups, self.dim, self.num_experts = num_groups, dim, num_experts
        self.top_k, self.renormalize, self.implementation = top_k, renormalize, implementation
        self.router_input_features, self.num_adapters = router_input_features, num_adapters
        self.mov_scaling = AdapterParam(jnp.ones(lead + (num_groups, num_experts, dim), dtype=jnp.float32))
        self.router = _router(rngs, router_input_features or dim, num_experts, lead)

    def __call__(
        self, x: jax.Array, router_input: jax.Array | None = None, adapter_ids: jax.Array | None = None
    ) -> jax.Array:
        ids = self._adapter_ids(x, adapter_ids)
        x, weight, bias = _frozen_base(self.base, x)
        return ops.mov_linear(
            x,
            weight,
            _value(self.router),
            self.mov_scaling[...],
            bias=bias,
            top_k=self.top_k,
            renormalize=self.renormalize,
            router_input=self._router_input(router_input),
            adapter_ids=ids,
            implementation=self.implementation,
        )


class MoLoRALinear(_Routed):
    """A frozen ``nnx.Linear`` (K -> N) plus a soft mixture of E LoRA adapters of rank r (SPEC §1).

    lora_A [E, K, r] init normal(0.02); lora_B [E, r, N] init zeros (so the layer starts as its base);
    router [K, E] init normal(0.02), None when E = 1 (LoRA); scale = alpha / r.
    """

    def __init__(
        self,
        base: nnx.Linear,
        num_experts: int = 1,
        rank: int = 4,
        *,
        alpha: float = 16.0,
        top_k: int | None = None,
        renormalize: bool = False,
        implementation: str = "auto",
        router_input_features: int | None = None,
        num_adapters: int | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        self.base = _check_base(base)
        _check_positive("num_experts", num_experts)
        _check_positive("rank", rank)
        if router_input_features is not None:
            _check_positive("router_input_features", router_input_features)
        check_routing(top_k, renormalize, num_experts)
        lead = _bank_lead(num_adapters)
        self.num_experts, self.rank = num_experts, rank
        self.alpha = check_finite_number("alpha", alpha, "scale = alpha / rank")
        self.top_k, self.renormalize, self.implementation = top_k, renormalize, implementation
        self.router_input_features, self.num_adapters = router_input_features, num_adapters
        k, n = base.in_features, base.out_features
        self.lora_A = _normal(rngs, lead + (num_experts, k, rank), LORA_A_INIT_STD)
        self.lora_B = AdapterParam(jnp.zeros(lead + (num_experts, rank, n), dtype=jnp.float32))
        self.router = _router(rngs, router_input_features or k, num_experts, lead)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def __call__(
        self, x: jax.Array, router_input: jax.Array | None = None, adapter_ids: jax.Array | None = None
    ) -> jax.Array:
        ids = self._adapter_ids(x, adapter_ids)
        x, weight, bias = _frozen_base(self.base, x)
        return ops.molora_linear(
            x,
            weight,
            self.lora_A[...],
            self.lora_B[...],
            _value(self.router),
            scale=self.scale,
            bias=bias,
            top_k=self.top_k,
            renormalize=self.renormalize,
            router_input=self._router_input(router_input),
            adapter_ids=ids,
            implementation=self.implementation,
        )


class LoRALinear(MoLoRALinear):
    """LoRA: y = base(x) + (alpha / r)·(x A) B — MoLoRA with one expert and no router."""

    def __init__(self, base: nnx.Linear, rank: int = 4, **kwargs) -> None:
        super().__init__(base, 1, rank, **kwargs)


def num_adapter_parameters(module: nnx.Module) -> int:
    """Number of trainable adapter parameters (the :class:`AdapterParam` variables) in ``module``."""
    return sum(v.size for v in jax.tree_util.tree_leaves(nnx.state(module, AdapterParam)))


# ------------------------------------------------------------------------------------------
# adapter banks from single layers and back
# ------------------------------------------------------------------------------------------

_ADAPTER_PARAMS = ("mov_scaling", "router", "lora_A", "lora_B")
#: What adapters of one bank share (``implementation`` aside: a run-time choice, the first layer's is kept).
_STRUCTURE = ("num_groups", "dim", "num_experts", "rank", "alpha", "top_k", "renormalize", "router_input_features")


def _same_base(a: nnx.Linear, b: nnx.Linear) -> bool:
    if a is b:
        return True
    pairs = [(a.kernel, b.kernel), (a.bias, b.bias)]
    if any((x is None) != (y is None) for x, y in pairs) or a.dtype != b.dtype:
        return False
    return all(x is None or np.array_equal(np.asarray(x[...]), np.asarray(y[...])) for x, y in pairs)


def stack_adapters(layers: Sequence[_Routed]) -> _Routed:
    """A bank (``num_adapters = len(layers)``) of single-adapter layers of one type and structure: adapter a
    is ``layers[a]``'s parameters, stacked along a new leading axis. The bank shares ``layers[0]``'s frozen
    base (the others' must hold the same values) and keeps its ``implementation``.

    TypeError for layers of different types (or not pemoe layers); ValueError naming the layer and field for
    an empty list, a layer that is a bank itself, another structure (expert count, rank, alpha, groups,
    routing) or another base."""
    layers = list(layers)
    if not layers:
        raise ValueError("stack_adapters needs at least one layer")
    first = layers[0]
    if not isinstance(first, _Routed):
        raise TypeError(f"stack_adapters takes pemoe.jax.layers layers, got {type(first).__name__}")
    for i, layer in enumerate(layers):
        if type(layer) is not type(first):
            raise TypeError(
                f"stack_adapters: layers[{i}] is a {type(layer).__name__}, layers[0] a {type(first).__name__}"
            )
        if layer.num_adapters is not None:
            raise ValueError(f"stack_adapters: layers[{i}] already holds a bank of {layer.num_adapters} adapters")
        diff = [f for f in _STRUCTURE if getattr(layer, f, None) != getattr(first, f, None)]
        if diff:
            f = diff[0]
            raise ValueError(
                f"stack_adapters: layers[{i}] has {f}={getattr(layer, f)!r}, layers[0] {getattr(first, f)!r} (the "
                "adapters of a bank share their structure)"
            )
        if hasattr(first, "base") and not _same_base(layer.base, first.base):
            raise ValueError(f"stack_adapters: layers[{i}] wraps another base layer than layers[0] (other weights)")
    bank = nnx.clone(first)
    if hasattr(first, "base"):
        bank.base = first.base
    for name in _ADAPTER_PARAMS:
        if getattr(first, name, None) is not None:
            setattr(bank, name, AdapterParam(jnp.stack([getattr(layer, name)[...] for layer in layers])))
    bank.num_adapters = len(layers)
    return bank


def adapter_from_bank(bank: _Routed, index: int) -> _Routed:
    """The single-adapter layer of adapter ``index`` of a bank (its slice of every stacked parameter, copied),
    sharing the bank's frozen base; ValueError for a layer that holds no bank or an index outside [0, A)."""
    if not isinstance(bank, _Routed):
        raise TypeError(f"adapter_from_bank takes a pemoe.jax.layers layer, got {type(bank).__name__}")
    if bank.num_adapters is None:
        raise ValueError(f"adapter_from_bank: the {type(bank).__name__} holds one adapter, not a bank")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < bank.num_adapters:
        raise ValueError(f"index must be an int in [0, {bank.num_adapters}) (the bank's adapters), got {index!r}")
    layer = nnx.clone(bank)
    if hasattr(bank, "base"):
        layer.base = bank.base
    for name in _ADAPTER_PARAMS:
        if getattr(bank, name, None) is not None:
            setattr(layer, name, AdapterParam(jnp.array(getattr(bank, name)[...][index])))
    layer.num_adapters = None
    return layer
