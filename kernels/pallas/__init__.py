"""Pallas kernels (installed as ``pemoe.kernels.pallas``): TPU (Mosaic) and, later, GPU (Triton lowering).

Every kernel runs anywhere with ``interpret=True`` (the Pallas interpreter), which is how the tests
check it on the CPU; ``jax.export(..., platforms=["tpu"])`` checks that it lowers for TPU.
Modules: ``mov_linear`` (fused MoV linear, forward).
This package never imports the rest of pemoe.
"""
