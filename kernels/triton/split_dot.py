"""Float32-grade products on 16-bit tensor cores: float32 tiles split into a 16-bit high and low part.

A tensor-core ``tl.dot`` on float32 operands is a TF32 product (10-bit operands; the PTX Triton emits feeds
float32 registers to ``mma.tf32``, which truncates them) unless it asks for ``"tf32x3"`` (three TF32 products)
or ``"ieee"`` (no tensor cores). The kernels' router and expert-merge products must be float32-grade (SPEC §5)
with 16-bit activations, at a lower register cost than ``tf32x3``'s two float32 copies of each operand:

    v32 = hi + lo,   hi = v32.to(DT),   lo = (v32 - hi).to(DT)        (DT: the activation dtype)
    a · b32         ≈ a · b_hi + a · b_lo                               (a exact in DT: two 16-bit dots)
    a32 · b32       ≈ a_hi · b_hi + a_hi · b_lo + a_lo · b_hi           (three 16-bit dots)

hi + lo carries 16 mantissa bits in bfloat16 and 22 in float16. float16 has 5 exponent bits: parts below its
smallest normal (6e-5) lose their low bits and values above 65504 overflow, so in float16 the split operand
is first scaled per row (or column) by a power of two that brings its largest magnitude into [2^13, 2^14),
and the float32 accumulator alike; both scalings are exact and undone after the dots. With float32
activations every helper is one ``tl.dot`` in ``PRECISION`` ("ieee").
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def pow2_scale(v32, AXIS: tl.constexpr):
    """Per-row (AXIS = 1) or per-column (AXIS = 0) powers of two that bring max|v32| into [2^13, 2^14)
    (1 for an all-zero row). The exponent is read from the bits (no transcendental): exact."""
    m = tl.max(tl.abs(v32), axis=AXIS)
    e = ((m.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2 m) for a normal m
    k = tl.where(m > 0, 13 - e, 0)
    k = tl.minimum(tl.maximum(k, -60), 60)
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def dot_exact_a(a, b32, acc, DT: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a · b32 with ``a`` exact in DT and ``b32`` float32 of moderate magnitude (parameters): b split."""
    if DT == tl.float32:
        return tl.dot(a, b32, acc, input_precision=PRECISION)
    else:
        b_hi = b32.to(DT)
        acc = tl.dot(a, b_hi, acc)
        return tl.dot(a, (b32 - b_hi.to(tl.float32)).to(DT), acc)


@triton.jit
def dot_exact_a_scaled_b(a, b32, acc, DT: tl.constexpr, PRECISION: tl.constexpr):
    """:func:`dot_exact_a` for a ``b32`` of any magnitude (gradients): in float16, b's columns and the
    accumulator's columns are scaled by powers of two around the split."""
    if DT == tl.float16:
        s = pow2_scale(b32, 0)[None, :]
        return dot_exact_a(a, b32 * s, acc * s, DT, PRECISION) / s
    else:
        return dot_exact_a(a, b32, acc, DT, PRECISION)


@triton.jit
def dot_split(a32, b32, acc, DT: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a32 · b32 for float32 tiles: a_hi b_hi + a_hi b_lo + a_lo b_hi in DT (in float16 a's rows, b's
    columns and the accumulator alike scaled by powers of two around the split: gradients of any size)."""
    if DT == tl.float32:
        return tl.dot(a32, b32, acc, input_precision=PRECISION)
    else:
        if DT == tl.float16:
            s_a = pow2_scale(a32, 1)[:, None]
            s_b = pow2_scale(b32, 0)[None, :]
            a32 = a32 * s_a
            b32 = b32 * s_b
            acc = acc * (s_a * s_b)
        a_hi = a32.to(DT)
        a_lo = (a32 - a_hi.to(tl.float32)).to(DT)
        acc = dot_exact_a(a_hi, b32, acc, DT, PRECISION)
        acc = tl.dot(a_lo, b32.to(DT), acc)
        if DT == tl.float16:
            acc = acc / (s_a * s_b)
        return acc
