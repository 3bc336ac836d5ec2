"""pemoe for JAX: the functional API of :mod:`pemoe.ops` on jax arrays, and Flax (NNX) layers.

    from pemoe import jax as pj
    y = pj.mov_linear(x, weight, router, experts)                # implementation="auto" -> "xla"
    y = pj.molora_linear(x, weight, lora_a, lora_b, router, scale=16 / r)

Same semantics, argument names and weight layouts as the PyTorch side (SPEC §1), so one set of
weights serves both frameworks. Implementations: "reference", "xla" (the default), and "pallas"
for ``mov_linear`` (see :mod:`pemoe.jax.ops`). Layers: :mod:`pemoe.jax.layers` (Flax NNX; imported
on demand). Mixed-adapter batches: every op takes ``adapter_ids=`` with stacked adapter parameters
(see :mod:`pemoe.jax.ops`). Scale-out (device mesh, sharded frozen backbone, the data-parallel train step):
:mod:`pemoe.jax.parallel` (imported on demand).
"""

from __future__ import annotations

from pemoe.jax.ops import AVAILABLE, PLANNED, molora_linear, mov, mov_ffn, mov_linear, resolve_implementation

__all__ = ["AVAILABLE", "PLANNED", "mov", "mov_linear", "mov_ffn", "molora_linear", "resolve_implementation"]
