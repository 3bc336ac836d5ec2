"""The Triton interpreter as pemoe uses it: the bfloat16 patch, the autotune stand-in, traffic counting.

The interpreter's bfloat16 defects (triton 3.9) are shown on the unpatched builder, so that this
file fails — and the patch can go — the day upstream fixes them.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from pemoe.kernels.triton import interpreter

pytestmark = pytest.mark.skipif(not interpreter.INTERPRET, reason="needs TRITON_INTERPRET=1 (no GPU)")


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + r[:, None] * BLOCK + r[None, :])
    b = tl.load(b_ptr + r[:, None] * BLOCK + r[None, :])
    tl.store(c_ptr + r[:, None] * BLOCK + r[None, :], tl.dot(a, b))


@triton.jit
def _cast_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    tl.store(y_ptr + r, tl.load(x_ptr + r).to(tl.bfloat16))


@triton.jit
def _bf16_arith_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + r)
    tl.store(y_ptr + r, x * x)


def _run_dot():
    a, b = torch.randn(16, 16).bfloat16(), torch.randn(16, 16).bfloat16()
    c = torch.empty(16, 16)
    _dot_kernel[(1,)](a, b, c, BLOCK=16)
    return (c - a.float() @ b.float()).abs().max().item()


def _run_cast():
    # Values whose float32 -> bfloat16 rounding differs from truncation.
    x = torch.tensor([1 + 2**-8 + 2**-12, -(1 + 3 * 2**-9), 3.14159265, 1e-3, 65504.0, 1 - 2**-10, 0.0, -0.0])
    y = torch.empty_like(x, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, y, BLOCK=x.numel())
    return torch.equal(y.view(torch.int16), x.bfloat16().view(torch.int16))


def test_upstream_bfloat16_defects_are_still_there():
    """If this fails, upstream fixed the interpreter: drop the patch (interpreter.patch_bfloat16)."""
    with interpreter.unpatched_bfloat16():
        assert _run_dot() > 1.0, "unpatched bf16 tl.dot multiplies raw uint16 bits"
        assert not _run_cast(), "unpatched fp32 -> bf16 cast truncates instead of rounding to nearest even"


def test_patched_bfloat16_dot_is_exact_products_with_float32_accumulation():
    assert _run_dot() <= 1e-5


def test_patched_bfloat16_cast_rounds_to_nearest_even():
    assert _run_cast()


def test_bfloat16_arithmetic_is_refused_loudly():
    x = torch.randn(16).bfloat16()
    with pytest.raises(Exception, match="bfloat16 arithmetic in an interpreted Triton kernel"):
        _bf16_arith_kernel[(1,)](x, torch.empty_like(x), BLOCK=16)


def test_count_traffic_counts_unmasked_bytes():
    x = torch.randn(16)
    y = torch.empty(16, dtype=torch.bfloat16)
    with interpreter.count_traffic() as traffic:
        _cast_kernel[(1,)](x, y, BLOCK=16)
    assert (traffic.loaded, traffic.stored) == (16 * 4, 16 * 2)
    assert traffic.loads == {"fp32": 64} and traffic.stores == {"bf16": 32}


def test_do_bench_stand_in_does_not_time_in_the_interpreter():
    calls = []
    assert interpreter.do_bench(lambda: calls.append(1), quantiles=(0.5, 0.2, 0.8)) == [0.0, 0.0, 0.0]
    assert calls == []
