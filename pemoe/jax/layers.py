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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pemoe.jax import ops
from pemoe.jax._checks import check_finite_number, check_routing

__all__ = ["AdapterParam", "MoV", "IA3", "MoVLinear", "MoLoRALinear", "LoRALinear", "num_adapter_parameters"]

ROUTER_INIT_STD = 0.02
LORA_A_INIT_STD = 0.02


class AdapterParam(nnx.Param):
    """A trainable adapter parameter (float32). Filter on it to train only the adapters."""


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float) -> AdapterParam:
    return AdapterParam(std * jax.random.normal(rngs.params(), shape, dtype=jnp.float32))


def _router(rngs: nnx.Rngs, in_features: int, num_experts: int) -> AdapterParam | None:
    if num_experts == 1:  # softmax over one expert is 1: (IA)3 / LoRA have no router
        return None
    return _normal(rngs, (in_features, num_experts), ROUTER_INIT_STD)


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
        rngs: nnx.Rngs,
    ) -> None:
        for name, v in (("num_groups", num_groups), ("dim", dim), ("num_experts", num_experts)):
            _check_positive(name, v)
        if router_input_features is not None:
            _check_positive("router_input_features", router_input_features)
        check_routing(top_k, renormalize, num_experts)
        self.num_groups, self.dim, self.num_experts = num_groups, dim, num_experts
        self.top_k, self.renormalize, self.implementation = top_k, renormalize, implementation
        self.router_input_features = router_input_features
        self.mov_scaling = AdapterParam(jnp.ones((num_groups, num_experts, dim), dtype=jnp.float32))
        self.router = _router(rngs, router_input_features or dim, num_experts)

    def __call__(self, h: jax.Array, router_input: jax.Array | None = None) -> jax.Array:
        return ops.mov(
            h,
            _value(self.router),
            self.mov_scaling[...],
            top_k=self.top_k,
            renormalize=self.renormalize,
            router_input=self._router_input(router_input),
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
        dim = base.out_features // num_groups
        self.num_groups, self.dim, self.num_experts = num_groups, dim, num_experts
        self.top_k, self.renormalize, self.implementation = top_k, renormalize, implementation
        self.router_input_features = router_input_features
        self.mov_scaling = AdapterParam(jnp.ones((num_groups, num_experts, dim), dtype=jnp.float32))
        self.router = _router(rngs, router_input_features or dim, num_experts)

    def __call__(self, x: jax.Array, router_input: jax.Array | None = None) -> jax.Array:
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
        rngs: nnx.Rngs,
    ) -> None:
        self.base = _check_base(base)
        _check_positive("num_experts", num_experts)
        _check_positive("rank", rank)
        if router_input_features is not None:
            _check_positive("router_input_features", router_input_features)
        check_routing(top_k, renormalize, num_experts)
        self.num_experts, self.rank = num_experts, rank
        self.alpha = check_finite_number("alpha", alpha, "scale = alpha / rank")
        self.top_k, self.renormalize, self.implementation = top_k, renormalize, implementation
        self.router_input_features = router_input_features
        k, n = base.in_features, base.out_features
        self.lora_A = _normal(rngs, (num_experts, k, rank), LORA_A_INIT_STD)
        self.lora_B = AdapterParam(jnp.zeros((num_experts, rank, n), dtype=jnp.float32))
        self.router = _router(rngs, router_input_features or k, num_experts)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def __call__(self, x: jax.Array, router_input: jax.Array | None = None) -> jax.Array:
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
            implementation=self.implementation,
        )


class LoRALinear(MoLoRALinear):
    """LoRA: y = base(x) + (alpha / r)·(x A) B — MoLoRA with one expert and no router."""

    def __init__(self, base: nnx.Linear, rank: int = 4, **kwargs) -> None:
        super().__init__(base, 1, rank, **kwargs)


def num_adapter_parameters(module: nnx.Module) -> int:
    """Number of trainable adapter parameters (the :class:`AdapterParam` variables) in ``module``."""
    return sum(v.size for v in jax.tree_util.tree_leaves(nnx.state(module, AdapterParam)))
