"""Triton kernels (``pemoe.kernels.triton``): one module per fused op.

Each op module reads top-down — ``@triton.jit`` kernels, then the framework-neutral launch plan
(:mod:`.plan`: grids, buffer shapes and dtypes, runtime scalars, constexprs and tiles from shapes, dtype names
and strides, no tensors), which the PyTorch launcher and ``pemoe.jax.triton`` (jax-triton) both run. The
PyTorch launcher and autograd (the forward and backward as ``torch.library`` custom ops ``pemoe::triton_<op>``,
``pemoe::triton_<op>_backward``, with fake kernels and a registered autograd formula, so
``torch.compile(fullgraph=True)`` traces them without a graph break) live in ``<op>_torch.py``, which the op
module loads when torch is installed and whose names it serves as its own attributes; without torch the op
module (and so the JAX path) imports the kernels and the plan alone. Its analysis lives
beside it, off the runtime path: ``<op>_analysis`` holds the HBM-traffic model and ``aot_cases()``,
the launches autotuning may choose, for the ahead-of-time compile checks in :mod:`.aot` (``molora_linear``
still holds its own, which its schedule choice uses at run time). Shared pieces: :mod:`.routing` (router
math), :mod:`.split_dot` (float32-grade products on 16-bit tensor cores), :mod:`.tiles`, :mod:`.autograd`
(the launch device).

Under ``TRITON_INTERPRET=1`` (the CPU here) importing this package patches the interpreter's
broken bfloat16 handling and makes its float32 dots emulate TF32 (see :mod:`.interpreter`), and logs
that it did.
"""

from pemoe.kernels.triton.interpreter import INTERPRET, patch_interpreter

if INTERPRET:
    patch_interpreter()

__all__ = ["INTERPRET"]
