"""Choosing an implementation: explicit, logged, never a silent fallback."""

from __future__ import annotations

import importlib.util
import logging

import torch

logger = logging.getLogger("pemoe")

#: Implementations that exist today, per op. "auto" resolves to one of them.
AVAILABLE: dict[str, tuple[str, ...]] = {
    "mov": ("reference", "torch"),
    "mov_linear": ("reference", "torch", "triton"),
    "mov_ffn": ("reference", "torch", "triton"),
    "molora_linear": ("reference", "torch", "triton"),
    "molora_adapter": ("reference", "torch", "triton"),
}

_announced: set[tuple[str, str, str]] = set()


def triton_runs_on(device: torch.device) -> str | None:
    """None if pemoe's Triton kernels can run on ``device``, else the reason they cannot.

    They run on CUDA tensors, and on CPU tensors when the Triton interpreter is on
    (``TRITON_INTERPRET=1`` set before pemoe's kernels are imported).
    """
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'pemoe[triton]')"
    from pemoe.kernels.triton.interpreter import INTERPRET

    if device.type == "cuda" and not INTERPRET:
        return None
    if device.type == "cpu" and INTERPRET:
        return None
    if INTERPRET:
        return f"TRITON_INTERPRET=1 is set, so the kernels run on CPU tensors only, got {device.type} tensors"
    return f"the Triton kernels run on CUDA tensors (or on the CPU under TRITON_INTERPRET=1), got {device.type} tensors"


def resolve_implementation(op: str, implementation: str, device: torch.device) -> str:
    """Return the implementation that will run ``op`` on ``device``.

    ``"auto"`` picks the fastest one available for the device — ``"triton"`` on CUDA where the op
    has Triton kernels and triton is installed, ``"torch"`` otherwise — and logs the choice once
    per (op, device type) on the ``pemoe`` logger. An explicit implementation that cannot run on
    the device raises ``NotImplementedError``; nothing falls back silently.
    """
    available = AVAILABLE[op]
    if implementation == "auto":
        chosen = "torch"
        if device.type == "cuda" and "triton" in available and triton_runs_on(device) is None:
            chosen = "triton"
        key = (op, device.type, chosen)
        if key not in _announced:
            _announced.add(key)
            logger.info("pemoe.ops.%s: implementation='auto' chose %r on %s", op, chosen, device.type)
        return chosen
    if implementation not in available:
        if implementation == "triton":
            raise NotImplementedError(
                f"{op}: implementation='triton' does not exist for this op; available: {('auto',) + available}"
            )
        raise ValueError(f"{op}: unknown implementation {implementation!r}; expected one of {('auto',) + available}")
    if implementation == "triton":
        why = triton_runs_on(device)
        if why is not None:
            raise NotImplementedError(f"{op}: implementation='triton' cannot run here: {why}")
    return implementation
