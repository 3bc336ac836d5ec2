"""Accelerator kernels (installed as ``pemoe.kernels``).

Triton (``pemoe.kernels.triton``) and Pallas (``pemoe.kernels.pallas``) kernels live here.
This package never imports the rest of pemoe or transformers: the functional API in
:mod:`pemoe.ops` imports kernels, not the other way round.
"""
