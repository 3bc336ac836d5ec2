"""Running pemoe's Triton kernels under the Triton interpreter (``TRITON_INTERPRET=1``).

There is no GPU on the development machines, so the kernels are proven on the CPU by the
interpreter. Four things about it matter here, and each is handled explicitly:

1. **bfloat16 is broken upstream** (triton 3.9): the interpreter stores bfloat16 as raw
   ``uint16`` and (a) ``tl.dot`` on bfloat16 operands multiplies those integers, (b) the
   float32 → bfloat16 cast truncates instead of rounding to nearest even, and (c) arithmetic on
   bfloat16 values is integer arithmetic. :func:`patch_interpreter` fixes (a) and (b) — exact
   bf16 → fp32 operands for ``tl.dot`` (a GPU multiplies bf16 exactly and accumulates in
   float32) and round-to-nearest-even casts — and turns (c) into a loud ``TypeError``: our
   kernels do all arithmetic in float32, so a bfloat16 operand of an element-wise op is a
   kernel bug that would be silently wrong in the interpreter. ``tests/test_triton_interpreter.py``
   shows each upstream defect on an unpatched builder and the patched results.
2. **TF32 is not emulated upstream**: the interpreter multiplies float32 operands exactly whatever
   ``input_precision`` a ``tl.dot`` asks for, while a GPU's ``tf32`` dot keeps 10 mantissa bits of
   each operand (the PTX Triton emits feeds float32 registers to ``mma.*.tf32`` without a rounding
   ``cvt``: the hardware truncates) and ``tf32x3`` sums three such products of the operands' high and
   low parts. :func:`patch_interpreter` emulates both, so tolerance tests see what a GPU computes.
3. **Autotuning**: ``triton.autotune`` benchmarks each configuration with ``do_bench``, which
   needs a GPU. :func:`do_bench` is the stand-in our kernels pass to ``triton.autotune``: on a
   GPU it is ``triton.testing.do_bench``; in the interpreter it does not time anything and
   reports equal costs, so the first configuration that survives pruning (the default) runs.
   Inside :class:`autotune_every_config` it does what a GPU does instead: every candidate runs once
   on the same buffers, in order, and then the winner (the first or the last) runs again, so a
   kernel whose buffers need ``reset_to_zero`` / ``restore_value`` between runs shows it.
4. **Traffic**: :class:`count_traffic` counts the bytes every load and store of the interpreted
   kernels moves (masked-off lanes excluded), which the HBM-traffic models are checked against.

This module never imports the rest of pemoe.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

logger = logging.getLogger("pemoe")

#: True when kernels run in the Triton interpreter (read once, as triton.jit does, at import).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_patched = False
#: The interpreter builder's own methods, kept so tests can show the upstream defects.
_UNPATCHED: dict[str, object] = {}
_PATCHED_NAMES = ("cast_impl", "create_fp_ext", "create_fp_trunc", "create_fp_to_fp", "create_dot", "binary_op")


#: State of :class:`autotune_every_config`: the winner rule ("first" / "last") while active, and the
#: number of candidate runs so far (their order gives the stand-in costs).
_tuning: dict = {"winner": None, "runs": 0}


def do_bench(kernel_call, quantiles=None, **kwargs):
    """``do_bench`` for ``triton.autotune``: the real one on a GPU; in the interpreter equal costs (nothing
    runs), or inside :class:`autotune_every_config` one run of the candidate and a cost by its position."""
    if INTERPRET:
        if _tuning["winner"] is None:
            return [0.0, 0.0, 0.0] if quantiles is not None else 0.0
        kernel_call()
        _tuning["runs"] += 1
        cost = float(_tuning["runs"] if _tuning["winner"] == "first" else -_tuning["runs"])
        return [cost, cost, cost] if quantiles is not None else cost
    import triton.testing

    return triton.testing.do_bench(kernel_call, quantiles=quantiles, **kwargs)


def autotuners(*modules) -> list:
    """The ``triton.autotune`` kernels defined in ``modules`` (for :class:`autotune_every_config`)."""
    from triton.runtime.autotuner import Autotuner

    return [v for m in modules for v in vars(m).values() if isinstance(v, Autotuner)]


class autotune_every_config:
    """Context manager: under ``TRITON_INTERPRET=1``, autotune as a GPU does.

    Every configuration that survives pruning runs once, in order, on the same buffers as the real launch,
    then the winner runs: ``winner="first"`` (the first candidate, the default configuration, runs after
    all the others) or ``"last"``. The ``kernels``' tuning caches are emptied on entry and on exit, so
    each launch inside tunes afresh and later launches return to the default configuration.

    with autotune_every_config(autotuners(mov_linear), winner="last"):
        y = run_the_op()
    """

    def __init__(self, kernels, winner: str = "first") -> None:
        if not INTERPRET:
            raise RuntimeError("autotune_every_config needs TRITON_INTERPRET=1 (a GPU runs the real autotuner)")
        if winner not in ("first", "last"):
            raise ValueError(f"winner must be 'first' or 'last', got {winner!r}")
        self.kernels, self.winner = list(kernels), winner

    def __enter__(self) -> autotune_every_config:
        for k in self.kernels:
            k.cache.clear()
        _tuning["winner"] = self.winner
        return self

    def __exit__(self, *exc) -> None:
        _tuning["winner"] = None
        for k in self.kernels:
            k.cache.clear()


def _bf16_to_f32(u16):
    import numpy as np

    return (u16.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(f32):
    import numpy as np
    import torch

    # torch's conversion rounds to nearest even and keeps NaN/inf, as the GPU's cvt.rn.bf16.f32.
    t = torch.from_numpy(np.ascontiguousarray(f32, dtype=np.float32)).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16)


def _tf32(a):
    """float32 ``a`` with the 13 low mantissa bits cleared: the operand a GPU's tf32 dot multiplies."""
    import numpy as np

    return (np.ascontiguousarray(a, dtype=np.float32).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


def tf32_matmul(a, b, precision: str):
    """a·b (float32 operands, float32 result) as a GPU's ``tl.dot`` computes it for ``precision`` "tf32"
    (truncated operands), "tf32x3" (hi·hi + hi·lo + lo·hi of the truncated high and low parts) or "ieee"."""
    import numpy as np

    a, b = a.astype(np.float32), b.astype(np.float32)
    if precision == "ieee":
        return np.matmul(a, b, dtype=np.float32)
    a_hi, b_hi = _tf32(a), _tf32(b)
    if precision == "tf32":
        return np.matmul(a_hi, b_hi, dtype=np.float32)
    a_lo, b_lo = _tf32(a - a_hi), _tf32(b - b_hi)
    return (
        np.matmul(a_hi, b_lo, dtype=np.float32)
        + np.matmul(a_lo, b_hi, dtype=np.float32)
        + np.matmul(a_hi, b_hi, dtype=np.float32)
    )


def patch_interpreter() -> None:
    """Make the interpreter's bfloat16 handling and float32 dot precision match the GPU's (see the module
    docstring).

    Idempotent; applied automatically when :mod:`pemoe.kernels.triton` is imported with
    ``TRITON_INTERPRET=1``, and logged on the ``pemoe`` logger.
    """
    global _patched
    if _patched:
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as ti

    builder = ti.InterpreterBuilder
    _UNPATCHED.update({name: getattr(builder, name) for name in _PATCHED_NAMES})
    original_cast = builder.cast_impl
    original_fp_to_fp = builder.create_fp_to_fp
    original_dot = builder.create_dot
    original_binary = builder.binary_op

    def cast_impl(self, src, dst_type):
        s, d = src.dtype.scalar, dst_type.scalar
        if s == tl.bfloat16 and d != tl.bfloat16:
            f32 = ti.TensorHandle(_bf16_to_f32(src.data), tl.float32)
            return f32 if d == tl.float32 else original_cast(self, f32, dst_type)
        if d == tl.bfloat16 and s != tl.bfloat16:
            if s != tl.float32:
                src = original_cast(self, src, tl.float32)
            return ti.TensorHandle(_f32_to_bf16(src.data), tl.bfloat16)
        return original_cast(self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if tl.bfloat16 in (src.dtype.scalar, dst_type.scalar):
            return cast_impl(self, src, dst_type)
        return original_fp_to_fp(self, src, dst_type, rounding_mode)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.float32 and b.dtype.scalar == tl.float32 and d.dtype.scalar == tl.float32:
            precision = {"TF32": "tf32", "TF32x3": "tf32x3"}.get(getattr(input_precision, "name", ""), "ieee")
            out = tf32_matmul(a.data, b.data, precision) + d.data
            return ti.TensorHandle(out.astype(np.float32), tl.float32)
        if tl.bfloat16 in (a.dtype.scalar, b.dtype.scalar):
            a_data = _bf16_to_f32(a.data) if a.dtype.scalar == tl.bfloat16 else a.data.astype(np.float32)
            b_data = _bf16_to_f32(b.data) if b.dtype.scalar == tl.bfloat16 else b.data.astype(np.float32)
            out = np.matmul(a_data, b_data, dtype=np.float32).astype(d.data.dtype) + d.data
            return ti.TensorHandle(out, d.dtype.scalar)
        return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def binary_op(self, lhs, rhs, op):
        if tl.bfloat16 in (lhs.dtype.scalar, rhs.dtype.scalar) and op is not np.equal:
            raise TypeError(
                "bfloat16 arithmetic in an interpreted Triton kernel: the interpreter would compute it on "
                "raw uint16 bits; cast the operands to float32 first (pemoe kernels compute in float32)"
            )
        return original_binary(self, lhs, rhs, op)

    builder.cast_impl = cast_impl
    builder.create_fp_ext = cast_impl
    builder.create_fp_trunc = cast_impl
    builder.create_fp_to_fp = create_fp_to_fp
    builder.create_dot = create_dot
    builder.binary_op = binary_op
    _patched = True
    logger.info(
        "pemoe.kernels.triton: patched the Triton interpreter's bfloat16 dot and casts, and made its float32 dots "
        "emulate tf32 / tf32x3 (see interpreter.py)"
    )


class unpatched_interpreter:
    """Context manager restoring the interpreter's own bfloat16 handling and exact float32 dots (to show their
    defects in tests)."""

    def __enter__(self):
        from triton.runtime import interpreter as ti

        self._saved = {name: getattr(ti.InterpreterBuilder, name) for name in _UNPATCHED}
        for name, fn in _UNPATCHED.items():
            setattr(ti.InterpreterBuilder, name, fn)

    def __exit__(self, *exc):
        from triton.runtime import interpreter as ti

        for name, fn in self._saved.items():
            setattr(ti.InterpreterBuilder, name, fn)


@dataclass
class Traffic:
    """Bytes moved by interpreted loads and stores, per pointer dtype (masked-off lanes excluded)."""

    loaded: int = 0
    stored: int = 0
    loads: dict[str, int] = field(default_factory=dict)
    stores: dict[str, int] = field(default_factory=dict)


class count_traffic:
    """Context manager counting the interpreter's global-memory traffic.

    with count_traffic() as traffic:
        run_kernels()
    traffic.loaded, traffic.stored  # bytes
    """

    def __enter__(self) -> Traffic:
        if not INTERPRET:
            raise RuntimeError("count_traffic needs TRITON_INTERPRET=1 set before pemoe.kernels.triton is imported")
        from triton.runtime import interpreter as ti

        self._builder = ti.InterpreterBuilder
        self._load = self._builder.create_masked_load
        self._store = self._builder.create_masked_store
        traffic = self.traffic = Traffic()
        load, store = self._load, self._store

        def nbytes(ptrs, mask):
            itemsize = ti._get_np_dtype(ptrs.get_element_ty()).itemsize
            return int(mask.data.sum()) * itemsize, str(ptrs.get_element_ty())

        def counted_load(b, ptrs, mask, other, cache_policy, is_volatile):
            n, dt = nbytes(ptrs, mask)
            traffic.loaded += n
            traffic.loads[dt] = traffic.loads.get(dt, 0) + n
            return load(b, ptrs, mask, other, cache_policy, is_volatile)

        def counted_store(b, ptrs, value, mask, cache_policy):
            n, dt = nbytes(ptrs, mask)
            traffic.stored += n
            traffic.stores[dt] = traffic.stores.get(dt, 0) + n
            return store(b, ptrs, value, mask, cache_policy)

        self._builder.create_masked_load = counted_load
        self._builder.create_masked_store = counted_store
        return traffic

    def __exit__(self, *exc) -> None:
        self._builder.create_masked_load = self._load
        self._builder.create_masked_store = self._store
