"""``implementation="pallas"``: Pallas kernels (``pemoe.kernels.pallas``) wrapped for autodiff.

``mov_linear``: the forward is the fused Pallas kernel (one GEMM with the MoV epilogue; it writes
only y). The backward is explicit XLA: it recomputes h = x Wᵀ + b (one GEMM) and runs the
``"xla"`` MoV backward of :mod:`pemoe.jax.xla` (which recomputes p from h). Saved for the
backward: the op's inputs only — no [T, N] tensor and no probabilities, at the price of that
recomputed GEMM. (A Pallas backward kernel does not exist yet.)
"""

from __future__ import annotations

from functools import partial

import jax

from pemoe.jax import reference, xla

__all__ = ["mov_linear"]


def _xla_mov_linear(x, weight, bias, router, experts):
    return xla.mov_site(reference.linear(x, weight, bias), router, experts)


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def _mov_linear(x, weight, bias, router, experts, interpret):
    from pemoe.kernels.pallas import mov_linear as kernel

    return kernel.mov_linear(x, weight, bias, router, experts, interpret=interpret)


def _mov_linear_fwd(x, weight, bias, router, experts, interpret):
    return _mov_linear(x, weight, bias, router, experts, interpret), (x, weight, bias, router, experts)


def _mov_linear_bwd(interpret, res, dy):
    _, vjp = jax.vjp(_xla_mov_linear, *res)
    return vjp(dy)


_mov_linear.defvjp(_mov_linear_fwd, _mov_linear_bwd)


def mov_linear(
    x: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None,
    router: jax.Array | None,
    experts: jax.Array,
    *,
    top_k: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """mov(x Wᵀ + b) on flattened x [T, K] with the Pallas forward; top-k raises NotImplementedError."""
    if top_k is not None:
        raise NotImplementedError("mov_linear: implementation='pallas' does not support top-k routing yet")
    return _mov_linear(x, weight, bias, router, experts, interpret)
