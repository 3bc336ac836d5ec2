"""What a GPU does that the plain Triton interpreter does not, made visible on the CPU.

* Real autotuning: every candidate configuration runs on the same buffers before the winner
  (``interpreter.autotune_every_config``), so partial-sum buffers that only some tiles write must be reset.
* TF32: the interpreter patch emulates ``tf32`` / ``tf32x3`` dots (``test_triton_interpreter.py``); the op
  tests of every kernel then hold their tolerance rule under it.
* 32-bit offsets: on a GPU ``row · stride`` wraps past 2^31 elements; the interpreter wraps the same way,
  so a strided input whose rows sit past 2^31 elements (a large sparse allocation, rows touched only where
  used) shows whether the kernels address in 64 bits. Run in a child process (a wrapped address may crash).
* Grad mode: under ``torch.no_grad()`` nothing is saved for a backward; a second derivative through the
  kernels (not themselves differentiable) raises instead of returning zeros.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from pemoe import ops
from pemoe.kernels.triton import interpreter
from tests.test_ops import MoLoRALinearCases, MoVFFNCases, MoVLinearCases

pytestmark = pytest.mark.skipif(not interpreter.INTERPRET, reason="needs TRITON_INTERPRET=1 (no GPU)")

if interpreter.INTERPRET:
    from pemoe.kernels.triton import molora_linear as molora_kernels
    from pemoe.kernels.triton import mov_ffn as mov_ffn_kernels
    from pemoe.kernels.triton import mov_linear as mov_linear_kernels

    MODULES = {"mov_linear": mov_linear_kernels, "mov_ffn": mov_ffn_kernels, "molora_linear": molora_kernels}


class _MoVLinear(MoVLinearCases):
    implementation = "triton"
    groups, dim = 2, 64  # D = 64: 64- and 128-wide column tiles (one and two heads) are both legal


class _MoVFFN(MoVFFNCases):
    implementation = "triton"


class _MoLoRA(MoLoRALinearCases):
    implementation = "triton"


CASES = {
    # token routing over two backward row chunks (REDUCE_ROWS = 128): the partial sums of both chunks
    "mov_linear": (_MoVLinear, lambda c: c.inputs(130, 10), "mov_linear"),
    "mov_linear-sentence": (_MoVLinear, lambda c: c.inputs(40, 6, sentence=True), "mov_linear"),
    "mov_ffn": (_MoVFFN, lambda c: c.inputs(70, 10), "mov_ffn"),
    "molora_linear": (_MoLoRA, lambda c: c.inputs(70, 10), "molora_linear"),
}


@pytest.mark.parametrize("winner", ["first", "last"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_candidate_config_runs_before_the_winner(case, winner):
    """As on a GPU: each legal configuration of each autotuned kernel runs on the real buffers, then the
    winner; output and every gradient still within the tolerance rule (tests/helpers.py)."""
    cls, make, module = CASES[case]
    cases = cls()
    kernels = interpreter.autotuners(MODULES[module])
    assert kernels
    with interpreter.autotune_every_config(kernels, winner=winner):
        cases.check(make(cases), torch.bfloat16)


def test_mov_linear_partials_stale_without_reset_to_zero(monkeypatch):
    """The failure the reset prevents: with the 128-wide winner running after 64-wide candidates, the
    second head's d router slots keep the candidates' sums unless they are zeroed between runs."""
    bwd = mov_linear_kernels.mov_linear_bwd_kernel
    monkeypatch.setattr(bwd, "reset_to_zero", [])
    monkeypatch.setattr(bwd, "pre_hook", lambda kwargs, reset_only=False: 0)
    cases = _MoVLinear()
    with pytest.raises(AssertionError, match="drouter"):
        with interpreter.autotune_every_config([bwd], winner="last"):
            cases.check(cases.inputs(130, 10), torch.bfloat16)


OPS = {
    "mov_linear": lambda: _MoVLinear().inputs(20, 4),
    "mov_ffn": lambda: _MoVFFN().inputs(20, 4),
    "molora_linear": lambda: _MoLoRA().inputs(20, 4),
}


@pytest.mark.parametrize("op", list(OPS))
def test_second_derivatives_are_refused(op):
    args = OPS[op]()
    for name in ("router", "experts", "lora_a"):
        if name in args:
            args[name].requires_grad_()
    y = getattr(ops, op)(**args, implementation="triton")
    (gx,) = torch.autograd.grad(y.float().square().sum(), args["x"], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


@pytest.mark.parametrize("op", ["mov_linear", "mov_ffn"])
def test_p_soft_is_not_written_under_no_grad(op):
    """p_soft (float32 [T, G, E] / [T, E]) is written only when autograd records the call: under
    torch.no_grad() with parameters that require grad, the forward writes what inference needs alone."""
    args = OPS[op]()
    args["experts"].requires_grad_()
    stored = {}
    for grad in (False, True):
        with torch.set_grad_enabled(grad), interpreter.count_traffic() as traffic:
            getattr(ops, op)(**args, implementation="triton")
        stored[grad] = traffic.stored
    heads = args["experts"].shape[0]
    assert stored[True] - stored[False] == 20 * heads * 4 * 4, stored  # T = 20 tokens, G heads, E = 4


# ------------------------------------------------------------------------------------------
# 64-bit addressing
# ------------------------------------------------------------------------------------------

_FAR_ROWS = textwrap.dedent(
    """
    import sys, torch
    from pemoe.kernels.triton import molora_linear, mov_ffn, mov_linear
    op, T, K = sys.argv[1], 16, 32
    stride = 2**28  # rows 8.. of x sit at element offsets >= 2**31
    storage = torch.empty((T - 1) * stride + K, dtype=torch.float16)  # 8 GiB of address space, 16 rows touched
    x = storage.as_strided((T, K), (stride, 1))
    torch.manual_seed(0)
    x.copy_(torch.randn(T, K).half())
    # the kernels' own launchers: they read x through its strides (pemoe.ops would make a contiguous copy)
    if op == "mov_linear":
        G, D, E = 2, 16, 4
        w, router, experts = torch.randn(G * D, K).half() / 8, torch.randn(D, E), 1 + torch.randn(G, E, D) / 4
        run = lambda x: mov_linear.mov_linear(x, w, None, router, experts, None, None, False)
    elif op in ("mov_ffn", "mov_ffn_dy"):
        F, E = 32, 4
        wi_0, wi_1, wo = torch.randn(F, K).half() / 8, torch.randn(F, K).half() / 8, torch.randn(K, F).half() / 8
        router, experts = torch.randn(F, E), 1 + torch.randn(1, E, F) / 4
        run = lambda x: mov_ffn.mov_ffn(x, wi_0, wi_1, wo, router, experts, None, "gelu_new", None, False)
    else:
        N, E, R = 48, 4, 4
        w, router = torch.randn(N, K).half() / 8, torch.randn(K, E)
        a, b = torch.randn(E, K, R) / 4, torch.randn(E, R, N) / 4
        run = lambda x: molora_linear.molora_linear(x, w, None, a, b, router, None, 4.0, None, False)
    if op == "mov_ffn_dy":  # the backward's dy [T, K] strided alike (x contiguous): dz = dy·wo reads its rows
        x = x.contiguous()
        router.requires_grad_(), experts.requires_grad_()
        dy = torch.empty((T - 1) * stride + K, dtype=torch.float16).as_strided((T, K), (stride, 1))
        dy.copy_(torch.randn(T, K).half())
        grads = lambda dy: torch.cat([g.flatten() for g in torch.autograd.grad(run(x), (router, experts), dy)])
        got, want = grads(dy), grads(dy.contiguous())
    else:
        got, want = run(x), run(x.contiguous())
    print("max-diff", (got.float() - want.float()).abs().max().item())
    """
)


@pytest.mark.parametrize("op", ["mov_linear", "mov_ffn", "mov_ffn_dy", "molora_linear"])
def test_rows_past_2_31_elements_are_addressed_in_64_bits(op):
    """x (mov_ffn_dy: the backward's dy) strided so that its rows 8..15 start past element 2^31: a kernel
    computing row · stride in 32 bits reads the wrong memory (or crashes). The result (mov_ffn_dy: d router and
    d experts) must equal the same rows read contiguously."""
    done = subprocess.run(
        [sys.executable, "-c", _FAR_ROWS, op], capture_output=True, text=True, timeout=600, env=_child_env()
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])
    assert done.stdout.strip().endswith("max-diff 0.0"), done.stdout


def _child_env() -> dict:
    import os

    return dict(os.environ, TRITON_INTERPRET="1")


def test_kernels_launch_on_their_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: forward and backward run under launch_device(tensor's
    device) (torch.cuda.device for a CUDA tensor; here, on the interpreter's CPU tensors, it is recorded)."""
    from pemoe.kernels.triton import autograd

    assert isinstance(autograd.launch_device(torch.device("cuda", 1)), torch.cuda.device)
    assert autograd.launch_device(torch.device("cuda", 1)).idx == 1
    from pemoe.kernels.triton import molora_linear_torch, mov_ffn_torch, mov_linear_torch

    seen = []
    real = autograd.launch_device
    for module in (mov_linear_torch, mov_ffn_torch, molora_linear_torch):  # the torch launchers
        monkeypatch.setattr(module, "launch_device", lambda d: seen.append(d) or real(d))
    for op, make in OPS.items():
        seen.clear()
        args = make()
        args["experts" if "experts" in args else "lora_a"].requires_grad_()
        getattr(ops, op)(**args, implementation="triton").float().sum().backward()
        assert seen == [torch.device("cpu")] * 2, (op, seen)  # forward, backward
