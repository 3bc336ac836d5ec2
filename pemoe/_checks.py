"""Argument validation shared by every implementation of every op.

All checks run before any computation, so a bad call fails the same way whichever
``implementation=`` was asked for: a ``TypeError`` for wrong dtypes or non-tensors, a
``ValueError`` for wrong shapes, devices or hyper-parameters. Messages name the argument
and the expected shape.
"""

from __future__ import annotations

import functools
import math

import torch

from pemoe import _shape_checks

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_float_tensor(name: str, t: object, *, ndim: int | None = None, min_ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {_shape(t)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {_shape(t)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


#: The structural rules (shapes, E, r, top_k, routing) live in the framework-free :mod:`pemoe._shape_checks`,
#: shared with pemoe.jax; here they run with the torch tensor check above.
check_routing = _shape_checks.check_routing
check_finite_number = _shape_checks.check_finite_number
check_bank_size = _shape_checks.check_bank_size
check_router = functools.partial(_shape_checks.check_router, check_array=check_float_tensor)
check_mov = functools.partial(_shape_checks.check_mov, check_array=check_float_tensor)
check_linear = functools.partial(_shape_checks.check_linear, check_array=check_float_tensor)
check_ffn_weights = functools.partial(_shape_checks.check_ffn_weights, check_array=check_float_tensor)
check_molora = functools.partial(_shape_checks.check_molora, check_array=check_float_tensor)
check_molora_adapter = functools.partial(_shape_checks.check_molora_adapter, check_array=check_float_tensor)


# ---------------------------------------------------------------------------------------------
# signatures that passed: a model calls each op at many sites with the same few argument signatures

#: Signatures (:func:`signature`) of calls whose checks passed; bounded, emptied when full.
_PASSED: dict[tuple, None] = {}
PASSED_MAX = 1024
_SCALARS = (type(None), bool, int, float, str)


def signature(*values: object) -> tuple | None:
    """Everything an op's checks read of its arguments, hashable: per tensor its type, dtype, shape, device and
    requires_grad, per scalar (None, bool, int, float, str) its type and value, and whether autograd records
    (:func:`check_frozen` reads it). The checks in this module and :mod:`pemoe._shape_checks` read nothing else
    (never values: ids are checked apart, :func:`check_adapter_ids`), so a call whose signature passed before
    passes again, and an op skips its checks for it (:func:`passed`): a model calls every op at many sites with
    a few signatures per batch, and the checks cost as much as a small op's arithmetic (about 10-20 us per
    call on the CPU). None, so nothing is remembered, for any other argument and while torch.compile traces
    (its guards, not this table, say when a graph still fits)."""
    if torch.compiler.is_compiling():
        return None
    parts: list[tuple] = [(torch.is_grad_enabled(),)]
    for v in values:
        if isinstance(v, torch.Tensor):
            parts.append((type(v), v.dtype, v.shape, v.device, v.requires_grad))
        elif type(v) in _SCALARS:
            parts.append((type(v), v))
        else:
            return None
    return tuple(parts)


def passed(key: tuple | None) -> bool:
    """Whether a call with this :func:`signature` passed its checks before."""
    return key is not None and key in _PASSED


def remember(key: tuple | None) -> None:
    """Record that a call with this :func:`signature` passed its checks (call only after every check ran)."""
    if key is None:
        return
    if len(_PASSED) >= PASSED_MAX:
        _PASSED.clear()
    _PASSED[key] = None


def check_frozen(**weights: torch.Tensor | None) -> None:
    """The frozen base weights must not require grad while autograd records (SPEC §3: no implementation
    computes a weight gradient). Under ``torch.no_grad()`` nothing is recorded, so anything goes."""
    if not torch.is_grad_enabled():
        return
    for name, w in weights.items():
        if w is not None and w.requires_grad:
            raise ValueError(
                f"{name} requires grad, but it is a frozen base weight: pemoe's ops compute no gradient for it "
                f"(SPEC §3). Freeze it ({name}.requires_grad_(False)), pass {name}.detach(), or call the op "
                "under torch.no_grad()"
            )


# ---------------------------------------------------------------------------------------------
# adapter banks: parameters stacked along a leading axis A, one adapter index per token

_ID_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def unstack(name: str, t: torch.Tensor | None, ndim: int, layout: str) -> int | None:
    """A (the number of adapters) of a stacked parameter ``name`` that must have ``ndim`` dims (``layout``);
    None for an absent (None) parameter."""
    if t is None:
        return None
    check_float_tensor(name, t)
    if t.dim() != ndim:
        raise ValueError(
            f"with adapter_ids, {name} must be stacked per adapter as {layout} (a leading adapter axis A), "
            f"got shape {_shape(t)}"
        )
    if t.shape[0] == 0:
        raise ValueError(f"with adapter_ids, {name} must hold at least one adapter ({layout} with A >= 1), got A = 0")
    return t.shape[0]


def check_adapter_ids(adapter_ids: object, tokens_shape: tuple[int, ...], num_adapters: int) -> torch.Tensor:
    """``adapter_ids``: an integer tensor of shape [T] (T = the number of tokens) or ``tokens_shape``, each id in
    [-1, A) (-1: no adapter, the base alone). Returns it flattened to [T] as int64.

    Reading the ids' range costs one device-to-host sync; an id outside it is refused rather than wrapped
    (a negative index would otherwise silently pick an adapter from the end of the bank)."""
    if not isinstance(adapter_ids, torch.Tensor):
        raise TypeError(f"adapter_ids must be an integer torch.Tensor, got {type(adapter_ids).__name__}")
    if adapter_ids.dtype not in _ID_DTYPES:
        raise TypeError(
            f"adapter_ids must be an integer tensor (one adapter index per token, e.g. torch.long), "
            f"got {adapter_ids.dtype}"
        )
    tokens = math.prod(tokens_shape)
    if tuple(adapter_ids.shape) not in (tuple(tokens_shape), (tokens,)):
        raise ValueError(
            f"adapter_ids must have shape [T] = [{tokens}] or the activations' leading shape "
            f"{list(tokens_shape)} (one adapter index per token), got {_shape(adapter_ids)}"
        )
    ids = adapter_ids.reshape(-1).long()
    if ids.numel():
        lo, hi = (int(v) for v in torch.aminmax(ids))
        bad = lo if lo < -1 else hi
        if lo < -1 or hi >= num_adapters:
            raise ValueError(
                f"adapter_ids holds the index {bad}, outside [-1, {num_adapters}) (the bank holds {num_adapters} "
                "adapter(s); -1 means no adapter)"
            )
    return ids
