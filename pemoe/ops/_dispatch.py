"""Choosing an implementation: explicit, logged, never a silent fallback."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("pemoe")

#: Implementations that exist today, per op. "auto" resolves to one of them.
AVAILABLE: dict[str, tuple[str, ...]] = {
    "mov": ("reference", "torch"),
    "mov_linear": ("reference", "torch"),
    "mov_ffn": ("reference", "torch"),
    "molora_linear": ("reference", "torch"),
}
#: Implementations announced but not built yet: asking for one raises NotImplementedError.
PLANNED = ("triton",)

_announced: set[tuple[str, str, str]] = set()


def resolve_implementation(op: str, implementation: str, device: torch.device) -> str:
    """Return the implementation that will run ``op`` on ``device``.

    ``"auto"`` picks the fastest one available for the device (today: ``"torch"`` on every
    device; the Triton kernels will take CUDA once they land) and logs the choice once per
    (op, device type) on the ``pemoe`` logger.
    """
    available = AVAILABLE[op]
    if implementation == "auto":
        chosen = "torch"
        key = (op, device.type, chosen)
        if key not in _announced:
            _announced.add(key)
            logger.info("pemoe.ops.%s: implementation='auto' chose %r on %s", op, chosen, device.type)
        return chosen
    if implementation in available:
        return implementation
    if implementation in PLANNED:
        raise NotImplementedError(
            f"{op}: implementation={implementation!r} is not available in this version of pemoe; "
            f"available: {', '.join(('auto',) + available)}"
        )
    raise ValueError(f"{op}: unknown implementation {implementation!r}; expected one of {('auto',) + available}")
