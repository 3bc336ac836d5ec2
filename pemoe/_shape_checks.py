"""The structural argument rules every op checks, in either framework: shapes, E, r, top_k, routing flags and
numbers, with the messages both share (SPEC §1: a bad call fails the same way in every implementation).

No framework import: the array rule (is it an array of a floating dtype, with so many dimensions) is passed in
as ``check_array`` — :func:`pemoe._checks.check_float_tensor` for the torch ops, :func:`pemoe.jax._checks.
check_float_array` for pemoe.jax — so that ``pemoe.jax`` validates its calls in a process without torch.
Beyond that rule, arrays are read only through ``.shape`` and ``.dtype``, which torch tensors, jax and numpy
arrays all have.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

#: Validates one array argument: (name, value, ndim=..., min_ndim=...) -> None, raising TypeError / ValueError.
ArrayCheck = Callable[..., None]


def _shape(t: Any) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_routing(top_k: int | None, renormalize: bool, num_experts: int) -> None:
    """``top_k`` None or an int in [1, E]; ``renormalize`` a bool (a string such as "no" is not taken as True)."""
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize must be a bool, got {type(renormalize).__name__} {renormalize!r}")
    if top_k is None:
        return
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int or None, got {type(top_k).__name__}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")


def check_finite_number(name: str, value: object, what: str) -> float:
    """A finite Python int or float (``what`` says what it is); returns it as a float."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a Python float ({what}), got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite ({what}), got {value}")
    return float(value)


def check_router(
    router: Any,
    *,
    in_features: int,
    num_experts: int,
    router_input: Any,
    tokens_shape: tuple[int, ...],
    in_name: str,
    experts_source: str = "",
    check_array: ArrayCheck,
) -> None:
    """Router [in, E]; ``router_input`` (sentence routing) broadcastable to tokens_shape + (in,)."""
    if router is None:
        if num_experts != 1:
            raise ValueError(f"router is required when num_experts > 1 (num_experts={num_experts})")
        if router_input is not None:
            raise ValueError("router_input was given but router is None")
        return
    check_array("router", router, ndim=2)
    if router_input is not None:
        check_array("router_input", router_input, min_ndim=1)
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
            f"router must have shape [{in_features}, {num_experts}] ([{in_name} width, num_experts]"
            + (f"; num_experts = {num_experts} from {experts_source}" if experts_source else "")
            + "), "
            f"got {_shape(router)}"
        )


def check_mov(
    h: Any,
    router: Any,
    experts: Any,
    *,
    top_k: int | None,
    router_input: Any,
    renormalize: bool = False,
    h_name: str = "h",
    width: int | None = None,
    check_array: ArrayCheck,
) -> tuple[int, int, int]:
    """Validate a MoV call; returns (G, E, D). ``width`` overrides h.shape[-1] (fused linear)."""
    check_array(h_name, h, min_ndim=1)
    check_array("experts", experts, ndim=3)
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
    tokens_shape = tuple(h.shape[:-1])
    check_router(
        router,
        in_features=dim,
        num_experts=num_experts,
        router_input=router_input,
        tokens_shape=tokens_shape,
        in_name="D",
        experts_source=f"experts {_shape(experts)}",
        check_array=check_array,
    )
    check_routing(top_k, renormalize, num_experts)
    return groups, num_experts, dim


def check_linear(
    x: Any,
    weight: Any,
    bias: Any,
    *,
    weight_name: str = "weight",
    check_array: ArrayCheck,
) -> None:
    """x [..., K], weight [N, K] (torch Linear layout), bias [N]; x and weight share a dtype."""
    check_array("x", x, min_ndim=1)
    check_array(weight_name, weight, ndim=2)
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
        check_array("bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape [{weight.shape[0]}] ([N]), got {_shape(bias)}")
        if bias.dtype != x.dtype:
            raise TypeError(
                f"x and bias must share one dtype (the frozen base runs in the activation dtype), "
                f"got x {x.dtype} and bias {bias.dtype}"
            )


def check_ffn_weights(
    x: Any,
    wi_0: Any,
    wi_1: Any,
    wo: Any,
    *,
    activation: str,
    activations: Any,
    check_array: ArrayCheck,
) -> None:
    """The T5 FFN's activation (one of ``activations``) and frozen weights: wi_0 (and wi_1) [F, M], wo [M, F],
    each in x's dtype."""
    if activation not in activations:
        raise ValueError(f"activation must be one of {sorted(activations)}, got {activation!r}")
    check_linear(x, wi_0, None, weight_name="wi_0", check_array=check_array)
    if wi_1 is not None:
        check_linear(x, wi_1, None, weight_name="wi_1", check_array=check_array)
        if tuple(wi_1.shape) != tuple(wi_0.shape):
            raise ValueError(f"wi_1 must have wi_0's shape {list(wi_0.shape)} ([F, M]), got {list(wi_1.shape)}")
    check_array("wo", wo, ndim=2)
    if tuple(wo.shape) != (x.shape[-1], wi_0.shape[0]):
        raise ValueError(f"wo must have shape [M, F] = [{x.shape[-1]}, {wi_0.shape[0]}], got {list(wo.shape)}")
    if wo.dtype != x.dtype:
        raise TypeError(f"x and wo must share one dtype, got x {x.dtype} and wo {wo.dtype}")


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
    renormalize: bool = False,
    check_array: ArrayCheck,
) -> tuple[int, int]:
    """Validate a MoLoRA call; returns (E, r)."""
    check_linear(x, weight, bias, check_array=check_array)
    n, k = weight.shape
    return _check_lora_experts(
        x, k, n, "weight", lora_a, lora_b, router, scale, top_k, router_input, renormalize, check_array
    )


def check_molora_adapter(
    x: Any,
    base: Any,
    lora_a: Any,
    lora_b: Any,
    router: Any,
    *,
    scale: float,
    top_k: int | None,
    router_input: Any,
    renormalize: bool = False,
    check_array: ArrayCheck,
) -> tuple[int, int]:
    """Validate an adapter-only MoLoRA call (no frozen weight; N from lora_b, ``base`` [..., N] in x's dtype);
    returns (E, r)."""
    check_array("x", x, min_ndim=1)
    check_array("lora_b", lora_b, ndim=3)
    n = lora_b.shape[2]
    if n == 0:
        raise ValueError(f"lora_b must have shape [E, r, N] with N >= 1 output features, got {_shape(lora_b)}")
    if base is not None:
        check_array("base", base, min_ndim=1)
        want = list(x.shape[:-1]) + [n]
        if list(base.shape) != want:
            raise ValueError(
                f"base must have shape [..., N] = {want} (x's leading dims, N from lora_b), got {_shape(base)}"
            )
        if base.dtype != x.dtype:
            raise TypeError(f"x and base must share one dtype, got x {x.dtype} and base {base.dtype}")
    return _check_lora_experts(
        x, x.shape[-1], n, "lora_b", lora_a, lora_b, router, scale, top_k, router_input, renormalize, check_array
    )


def _check_lora_experts(
    x, k, n, n_source, lora_a, lora_b, router, scale, top_k, router_input, renormalize, check_array
) -> tuple[int, int]:
    """lora_a [E, K, r], lora_b [E, r, N] (N from ``n_source``), scale, router and routing; returns (E, r)."""
    check_array("lora_a", lora_a, ndim=3)
    check_array("lora_b", lora_b, ndim=3)
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
            f"lora_b must have shape [E, r, N] = [{num_experts}, {rank}, {n}] (E, r from lora_a, N from {n_source}), "
            f"got {_shape(lora_b)}"
        )
    check_finite_number("scale", scale, "alpha / r")
    check_router(
        router,
        in_features=k,
        num_experts=num_experts,
        router_input=router_input,
        tokens_shape=tuple(x.shape[:-1]),
        in_name="K",
        experts_source=f"lora_a {_shape(lora_a)}",
        check_array=check_array,
    )
    check_routing(top_k, renormalize, num_experts)
    return num_experts, rank


def check_bank_size(**sizes: int | None) -> int:
    """The common A of the stacked parameters (None entries skipped); ValueError naming them if they differ."""
    present = {k: v for k, v in sizes.items() if v is not None}
    if len(set(present.values())) > 1:
        listing = ", ".join(f"{k} A = {v}" for k, v in present.items())
        raise ValueError(f"the stacked adapter parameters hold different numbers of adapters: {listing}")
    return next(iter(present.values()))
