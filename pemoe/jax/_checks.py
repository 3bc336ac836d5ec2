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

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pemoe import _checks

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


#: The structural checks (shapes, E, r, top_k, routing) are pemoe._checks' own, run with the array
#: check above: one set of rules and messages for both frameworks.
check_routing = _checks.check_routing
check_finite_number = _checks.check_finite_number
check_router = functools.partial(_checks.check_router, check_array=check_float_array)
check_mov = functools.partial(_checks.check_mov, check_array=check_float_array)
check_linear = functools.partial(_checks.check_linear, check_array=check_float_array)
check_molora = functools.partial(_checks.check_molora, check_array=check_float_array)
