"""Helpers shared by the Triton ops' custom-op kernels: the launch device, the empty output slot."""

from __future__ import annotations

import contextlib

import torch


def launch_device(device: torch.device) -> contextlib.AbstractContextManager:
    """The context to launch Triton kernels in for tensors on ``device``: Triton launches on the *current* CUDA
    device, so tensors on another GPU need theirs made current (nothing to do on the CPU, the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def absent(like: torch.Tensor) -> torch.Tensor:
    """A custom op's output slot for a tensor that is not computed: an empty float32 tensor on ``like``'s device
    (custom ops have fixed output schemas, so "no tensor" is an empty one)."""
    return like.new_empty((0,), dtype=torch.float32)
