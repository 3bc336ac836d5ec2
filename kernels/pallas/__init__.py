"""Pallas kernels (installed as ``pemoe.kernels.pallas``): TPU (Mosaic) and, later, GPU (Triton lowering).

Every kernel runs anywhere with ``interpret=True`` (the Pallas interpreter), which is how the tests
check it on the CPU; ``jax.export(..., platforms=["tpu"])`` checks that it lowers for TPU.
Modules: ``mov_linear`` (fused MoV linear, forward).
``molora_linear`` (fused MoLoRA linear, forward and dgrad backward: base GEMM, shrink + router, expand as extra K; TPU)
and ``molora_linear_gpu`` (its twin for Pallas' Triton lowering).
``mov_ffn`` (fused MoV T5 FFN, forward: dual GEMM with router logits + softmax in its epilogue, wo GEMM
with the expert merge as its prologue; TPU kernels and, with ``backend="gpu"``, their Triton-lowering twins).
This package never imports the rest of pemoe.
"""
