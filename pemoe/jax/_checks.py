"""Argument validation for the JAX ops, at trace time (shapes and dtypes are static in JAX).

Same contract as :mod:`pemoe._checks` on the PyTorch side: every check runs before any
computation, so a bad call fails the same way whichever ``implementation=`` was asked for —
a ``TypeError`` for non-arrays or wrong dtypes, a ``ValueError`` for wrong shapes or
hyper-parameters — and each message names the argument and the expected shape. Values
(non-finite entries) are not inspected: under ``jax.jit`` they are not known at trace time.
Devices are not checked: JAX places and moves arrays itself. An empty batch (zero tokens) is
legal and gives an empty output, as on the PyTorch side.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


def _shape(t: Any) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_float_array(name: str, t: object, *, ndim: int | None = None, min_ndim: int | None = None) -> None:
    if not isinstance(t, (jax.Array, np.ndarray)):
        raise TypeError(f"{name} must be a jax.Array (or numpy array), got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating array (float16, bfloat16, float32 or float64), got {t.dtype}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {_shape(t)}")
    if min_ndim is not None and t.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {_shape(t)}")


def check_top_k(top_k: int | None, num_experts: int) -> None:
    if top_k is None:
        return
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int or None, got {type(top_k).__name__}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")


def check_router(
    router: Any,
    *,
    in_features: int,
    num_experts: int,
    router_input: Any,
    tokens_shape: tuple[int, ...],
    in_name: str,
) -> None:
    """Router [in, E]; ``router_input`` (sentence routing) broadcastable to tokens_shape + (in,)."""
    if router is None:
        if num_experts != 1:
            raise ValueError(f"router is required when num_experts > 1 (num_experts={num_experts})")
        if router_input is not None:
            raise ValueError("router_input was given but router is None")
        return
    check_float_array("router", router, ndim=2)
    if router_input is not None:
        check_float_array("router_input", router_input, min_ndim=1)
        in_features = router_input.shape[-1]
        lead = tuple(router_input.shape[:-1])
        if len(lead) > len(tokens_shape):
            raise ValueError(
                f"router_input has shape {_shape(router_input)}; expected its leading dims to broadcast "
                f"to the token dims {list(tokens_shape)}"
            )
        if len(lead) == 1 and len(tokens_shape) > 1:  # [B, R] for tokens [B, S, ...]
            lead = lead + (1,) * (len(tokens_shape) - 1)
        padded = (1,) * (len(tokens_shape) - len(lead)) + lead
        for a, b in zip(padded, tokens_shape, strict=True):
            if a not in (1, b):
                raise ValueError(
                    f"router_input has shape {_shape(router_input)}; expected [B, R] for inputs of shape "
                    f"[B, S, ...] or a shape broadcastable to {list(tokens_shape)} + [R]"
                )
        in_name = "router_input"
    if tuple(router.shape) != (in_features, num_experts):
        raise ValueError(
            f"router must have shape [{in_features}, {num_experts}] ([{in_name} width, num_experts]), "
            f"got {_shape(router)}"
        )


def check_mov(
    h: Any,
    router: Any,
    experts: Any,
    *,
    top_k: int | None,
    router_input: Any,
    h_name: str = "h",
    width: int | None = None,
) -> tuple[int, int, int]:
    """Validate a MoV call; returns (G, E, D). ``width`` overrides h.shape[-1] (fused linear)."""
    check_float_array(h_name if width is None else "x", h, min_ndim=1)
    check_float_array("experts", experts, ndim=3)
    groups, num_experts, dim = experts.shape
    if num_experts == 0:
        raise ValueError(
            "experts must have at least one expert: got shape with E = 0 ([G, E, D] = " + _shape(experts) + ")"
        )
    if groups == 0 or dim == 0:
        raise ValueError(f"experts must have shape [G, E, D] with G, D >= 1, got {_shape(experts)}")
    n = h.shape[-1] if width is None else width
    if groups * dim != n:
        raise ValueError(
            f"experts has shape {_shape(experts)} ([G, E, D]), so the {h_name} width must be G*D = "
            f"{groups * dim}, got {n}"
        )
    check_router(
        router,
        in_features=dim,
        num_experts=num_experts,
        router_input=router_input,
        tokens_shape=tuple(h.shape[:-1]),
        in_name="D",
    )
    check_top_k(top_k, num_experts)
    return groups, num_experts, dim


def check_linear(x: Any, weight: Any, bias: Any, *, weight_name: str = "weight") -> None:
    """x [..., K], weight [N, K] (torch Linear layout), bias [N]; x and weight share a dtype."""
    check_float_array("x", x, min_ndim=1)
    check_float_array(weight_name, weight, ndim=2)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"{weight_name} must have shape [N, K] with K = x.shape[-1] = {x.shape[-1]}, got {_shape(weight)}"
        )
    if weight.dtype != x.dtype:
        raise TypeError(
            f"x and {weight_name} must share one dtype (the frozen base runs in the activation dtype), "
            f"got x {x.dtype} and {weight_name} {weight.dtype}"
        )
    if bias is not None:
        check_float_array("bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape [{weight.shape[0]}] ([N]), got {_shape(bias)}")


def check_molora(
    x: Any,
    weight: Any,
    bias: Any,
    lora_a: Any,
    lora_b: Any,
    router: Any,
    *,
    scale: float,
    top_k: int | None,
    router_input: Any,
) -> tuple[int, int]:
    """Validate a MoLoRA call; returns (E, r)."""
    check_linear(x, weight, bias)
    n, k = weight.shape
    check_float_array("lora_a", lora_a, ndim=3)
    check_float_array("lora_b", lora_b, ndim=3)
    num_experts, k_a, rank = lora_a.shape
    if num_experts == 0:
        raise ValueError(f"lora_a must have at least one expert: shape [E, K, r] with E >= 1, got {_shape(lora_a)}")
    if rank == 0:
        raise ValueError(f"LoRA rank must be >= 1: lora_a has shape [E, K, r] = {_shape(lora_a)} with r = 0")
    if k_a != k:
        raise ValueError(
            f"lora_a must have shape [E, K, r] = [{num_experts}, {k}, {rank}] (K = x width), got {_shape(lora_a)}"
        )
    if tuple(lora_b.shape) != (num_experts, rank, n):
        raise ValueError(
            f"lora_b must have shape [E, r, N] = [{num_experts}, {rank}, {n}] (E, r from lora_a, N from weight), "
            f"got {_shape(lora_b)}"
        )
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float (alpha / r), got {type(scale).__name__}")
    check_router(
        router,
        in_features=k,
        num_experts=num_experts,
        router_input=router_input,
        tokens_shape=tuple(x.shape[:-1]),
        in_name="K",
    )
    check_top_k(top_k, num_experts)
    return num_experts, rank
