"""Helpers shared by the Triton ops' ``torch.autograd.Function`` classes."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import torch


def zero_grads(inputs: Sequence[torch.Tensor | None], needs: Sequence[bool]) -> list[torch.Tensor | None]:
    """The gradients of an op called on an empty batch (no tokens, no kernel launched): zeros shaped like each
    input that needs one (an empty tensor for the activations), None for the others."""
    return [torch.zeros_like(t) if t is not None and need else None for t, need in zip(inputs, needs, strict=False)]


def launch_device(device: torch.device) -> contextlib.AbstractContextManager:
    """The context to launch Triton kernels in for tensors on ``device``: Triton launches on the *current* CUDA
    device, so tensors on another GPU need theirs made current (nothing to do on the CPU, the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def on_first_tensors_device(method):
    """Decorator for an autograd Function's ``forward(ctx, x, ...)`` / ``backward(ctx, dy, ...)``: the body
    runs under :func:`launch_device` of that first tensor's device."""

    @functools.wraps(method)
    def run(ctx, first, *rest):
        with launch_device(first.device):
            return method(ctx, first, *rest)

    return run
