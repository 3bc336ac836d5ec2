"""Helpers shared by the Triton ops' custom-op kernels."""

from __future__ import annotations

import contextlib

import torch


def launch_device(device: torch.device) -> contextlib.AbstractContextManager:
    """The context to launch Triton kernels in for tensors on ``device``: Triton launches on the *current* CUDA
    device, so tensors on another GPU need theirs made current (nothing to do on the CPU, the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
