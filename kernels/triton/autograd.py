"""Helpers shared by the Triton ops' ``torch.autograd.Function`` classes."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def zero_grads(inputs: Sequence[torch.Tensor | None], needs: Sequence[bool]) -> list[torch.Tensor | None]:
    """The gradients of an op called on an empty batch (no tokens, no kernel launched): zeros shaped like each
    input that needs one (an empty tensor for the activations), None for the others."""
    return [torch.zeros_like(t) if t is not None and need else None for t, need in zip(inputs, needs, strict=False)]
