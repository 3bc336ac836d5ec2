"""Triton kernels (``pemoe.kernels.triton``): one module per fused op.

Each op module reads top-down — ``@triton.jit`` kernels, launchers (validate, flatten,
allocate, grid, launch), the ``torch.autograd.Function`` — and ends with ``aot_cases()``, the
launches autotuning may choose, for the ahead-of-time compile checks in :mod:`.aot`.

Under ``TRITON_INTERPRET=1`` (the CPU here) importing this package patches the interpreter's
broken bfloat16 handling and makes its float32 dots emulate TF32 (see :mod:`.interpreter`), and logs
that it did.
"""

from pemoe.kernels.triton.interpreter import INTERPRET, patch_interpreter

if INTERPRET:
    patch_interpreter()

__all__ = ["INTERPRET"]
