"""Argument validation for the JAX ops, at trace time (shapes and dtypes are static in JAX).

Same contract as :mod:`pemoe._checks` on the PyTorch side, with the same structural rules
(:mod:`pemoe._shape_checks`, which imports no framework, so neither does this module): every check runs before any
computation, so a bad call fails the same way whichever ``implementation=`` was asked for —
a ``TypeError`` for non-arrays or wrong dtypes, a ``ValueError`` for wrong shapes or
hyper-parameters — and each message names the argument and the expected shape. Values
(non-finite entries) are not inspected: under ``jax.jit`` they are not known at trace time. The one
exception is ``adapter_ids``, whose range is checked when the ids are concrete (see
:func:`check_adapter_ids` for what happens under tracing).
Devices are not checked: JAX places and moves arrays itself. An empty batch (zero tokens) is
legal and gives an empty output, as on the PyTorch side.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pemoe import _shape_checks

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


#: The structural checks (shapes, E, r, top_k, routing) are pemoe._shape_checks' (the torch ops' too), run with the
#: array check above: one set of rules and messages for both frameworks.
check_routing = _shape_checks.check_routing
check_finite_number = _shape_checks.check_finite_number
check_router = functools.partial(_shape_checks.check_router, check_array=check_float_array)
check_mov = functools.partial(_shape_checks.check_mov, check_array=check_float_array)
check_linear = functools.partial(_shape_checks.check_linear, check_array=check_float_array)
check_ffn_weights = functools.partial(_shape_checks.check_ffn_weights, check_array=check_float_array)
check_molora = functools.partial(_shape_checks.check_molora, check_array=check_float_array)


# ---------------------------------------------------------------------------------------------
# adapter banks: parameters stacked along a leading axis A, one adapter index per token (the messages
# are pemoe._checks')

check_bank_size = _shape_checks.check_bank_size


def unstack(name: str, t: Any, ndim: int, layout: str) -> int | None:
    """A (the number of adapters) of a stacked parameter ``name`` that must have ``ndim`` dims (``layout``);
    None for an absent (None) parameter."""
    if t is None:
        return None
    check_float_array(name, t)
    if t.ndim != ndim:
        raise ValueError(
            f"with adapter_ids, {name} must be stacked per adapter as {layout} (a leading adapter axis A), "
            f"got shape {_shape(t)}"
        )
    if t.shape[0] == 0:
        raise ValueError(f"with adapter_ids, {name} must hold at least one adapter ({layout} with A >= 1), got A = 0")
    return t.shape[0]


def one_adapter(t: Any) -> np.ndarray | None:
    """A stand-in with the shape and dtype of one adapter of stacked parameter ``t`` (``t[0]`` without reading
    or slicing ``t``): what the single-adapter checks validate."""
    return None if t is None else np.broadcast_to(np.zeros((), t.dtype), t.shape[1:])


def check_adapter_ids(adapter_ids: object, tokens_shape: tuple[int, ...], num_adapters: int) -> jax.Array:
    """``adapter_ids``: an integer array of shape [T] (T = the number of tokens) or ``tokens_shape``, each id in
    [-1, A) (-1: no adapter, the base alone). Returns it flattened to [T] as int32.

    The range is checked when the ids are concrete (an eager call: one device-to-host read): an id outside
    [-1, A) is refused, never wrapped or clamped. Under tracing (``jax.jit``, ``jax.grad`` of a jitted
    function, ``jax.vmap``) the values are unknown at trace time and cannot be refused: every implementation
    then gives NaN for such a token (its output row, and through the backward the gradients it reaches), so
    a bad id is never silently read as another adapter or as the base."""
    if not isinstance(adapter_ids, (jax.Array, np.ndarray)):
        raise TypeError(f"adapter_ids must be an integer jax.Array (or numpy array), got {type(adapter_ids).__name__}")
    if not jnp.issubdtype(adapter_ids.dtype, jnp.integer):
        raise TypeError(
            f"adapter_ids must be an integer array (one adapter index per token, e.g. int32), got {adapter_ids.dtype}"
        )
    tokens = math.prod(tokens_shape)
    if tuple(adapter_ids.shape) not in (tuple(tokens_shape), (tokens,)):
        raise ValueError(
            f"adapter_ids must have shape [T] = [{tokens}] or the activations' leading shape "
            f"{list(tokens_shape)} (one adapter index per token), got {_shape(adapter_ids)}"
        )
    if tokens and not isinstance(adapter_ids, jax.core.Tracer):
        values = np.asarray(adapter_ids).astype(np.int64)
        lo, hi = int(values.min()), int(values.max())
        if lo < -1 or hi >= num_adapters:
            raise ValueError(
                f"adapter_ids holds the index {lo if lo < -1 else hi}, outside [-1, {num_adapters}) (the bank holds "
                f"{num_adapters} adapter(s); -1 means no adapter)"
            )
    return jnp.asarray(adapter_ids).reshape(tokens).astype(jnp.int32)
