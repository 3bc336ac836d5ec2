"""The Triton interpreter as pemoe uses it: the bfloat16 patch, TF32 emulation, the autotune stand-in,
traffic counting.

The interpreter's bfloat16 and TF32 defects (triton 3.9) are shown on the unpatched builder, so that this
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
def _f32_dot_kernel(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    r = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + r[:, None] * BLOCK + r[None, :])
    b = tl.load(b_ptr + r[:, None] * BLOCK + r[None, :])
    tl.store(c_ptr + r[:, None] * BLOCK + r[None, :], tl.dot(a, b, input_precision=PRECISION))


def _f32_dot(a, b, precision):
    c = torch.empty(a.shape[0], b.shape[1])
    _f32_dot_kernel[(1,)](a, b, c, BLOCK=a.shape[0], PRECISION=precision)
    return c


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
    """If this fails, upstream fixed the interpreter: drop the patch (interpreter.patch_interpreter)."""
    with interpreter.unpatched_interpreter():
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


def test_do_bench_stand_in_does_not_time_in_the_interpreter():  # outside autotune_every_config
    calls = []
    assert interpreter.do_bench(lambda: calls.append(1), quantiles=(0.5, 0.2, 0.8)) == [0.0, 0.0, 0.0]
    assert calls == []


def _tf32_truncated(t: torch.Tensor) -> torch.Tensor:
    return (t.view(torch.int32) & -(2**13)).view(torch.float32)  # clear the 13 low mantissa bits


def test_float32_dots_emulate_tf32():
    """tf32: the products of operands truncated to 10 mantissa bits (what mma.tf32 multiplies when fed
    float32 registers); tf32x3: float32-grade; ieee: exact products. Upstream computes all three exactly."""
    a, b = torch.randn(32, 32), torch.randn(32, 32)
    truth = a.double() @ b.double()
    tf32 = _f32_dot(a, b, "tf32")
    torch.testing.assert_close(tf32, _tf32_truncated(a) @ _tf32_truncated(b), rtol=1e-6, atol=1e-5)
    err = {p: (_f32_dot(a, b, p).double() - truth).abs().max().item() for p in ("tf32", "tf32x3", "ieee")}
    assert err["tf32"] > 1e-4 * truth.abs().max().item() and err["tf32"] > 100 * err["ieee"]  # 10-bit operands
    assert err["tf32x3"] < err["tf32"] / 1000 and err["ieee"] < 1e-5, err
    with interpreter.unpatched_interpreter():  # if this fails, upstream emulates TF32: drop the emulation
        assert (_f32_dot(a, b, "tf32").double() - truth).abs().max().item() < 1e-5


def _accumulating_kernel(reset: bool):
    """An autotuned kernel that adds its BLOCK into out[0] and records it in last[0]: every run is visible."""
    configs = [triton.Config({"BLOCK": b}) for b in (16, 32, 64)]

    @triton.autotune(
        configs=configs, key=["n"], reset_to_zero=["out_ptr"] if reset else None, do_bench=interpreter.do_bench
    )
    @triton.jit
    def kernel(out_ptr, last_ptr, n, BLOCK: tl.constexpr):
        r = tl.arange(0, 16)
        tl.store(out_ptr + r, tl.load(out_ptr + r) + BLOCK, mask=r < 1)
        tl.store(last_ptr + r, BLOCK + r * 0, mask=r < 1)

    return kernel


@pytest.mark.parametrize("winner, block", [("first", 16), ("last", 64)])
def test_autotune_every_config_runs_each_candidate_then_the_winner(winner, block):
    kernel = _accumulating_kernel(reset=False)
    out, last = torch.zeros(16, dtype=torch.int32), torch.zeros(16, dtype=torch.int32)
    kernel[(1,)](out, last, 1)
    assert out[0].item() == 16 and last[0].item() == 16  # outside: the default alone, no candidate runs
    out.zero_()
    with interpreter.autotune_every_config([kernel], winner=winner):
        kernel[(1,)](out, last, 1)
    # 16 + 32 + 64 from the candidates, then the winner once more, on the same buffer
    assert last[0].item() == block and out[0].item() == 16 + 32 + 64 + block
    fixed = _accumulating_kernel(reset=True)
    out.zero_()
    with interpreter.autotune_every_config([fixed], winner=winner):
        fixed[(1,)](out, last, 1)
    assert out[0].item() == block  # reset_to_zero: zeroed before each candidate and before the winner
