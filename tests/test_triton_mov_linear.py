"""The fused Triton ``mov_linear`` (kernels/triton/mov_linear.py): output and every gradient vs the
reference in the Triton interpreter, tile edge cases, strided inputs, bad input, the HBM-traffic model
against the interpreter's own load/store counts, and ahead-of-time compiles for sm_80 / sm_90.

Interpreter-sized shapes use D = 16 (the smallest supported head width: tl.dot needs 16) and G = 3
heads, so N = 48 is not a multiple of the default column tile (BLOCK_N = 128, or 64).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from pemoe import ops, reference
from pemoe.kernels.triton import aot, interpreter
from pemoe.kernels.triton import mov_linear as kernel
from pemoe.kernels.triton import mov_linear_analysis as analysis
from tests.helpers import assert_within_rule, cast_inputs, run_with_grads
from tests.test_ops import ACTIVATION_NAMES, DTYPES, MoVLinearCases

pytestmark = pytest.mark.skipif(not interpreter.INTERPRET, reason="needs TRITON_INTERPRET=1 (no GPU)")

K, G, D = 40, 3, 16

#: Small tiles so that every reduction crosses programs: 2 heads per column tile (the last one half
#: empty for G = 5), 16-row tiles, a K loop with a ragged tail (K = 40).
SMALL_TILES = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}
ONE_HEAD_TILES = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 2}
#: Taller tiles for T over several backward row chunks (REDUCE_ROWS tokens each): fewer interpreted programs.
TALL_TILES = {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}


class TestMoVLinearTriton(MoVLinearCases):
    """The shared mov_linear cases (tests/test_ops.py) on the Triton kernels, with a supported D."""

    implementation = "triton"
    groups, dim = G, D  # D = 16: a head width the kernels support

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("t", [1, 7, 123])
    @pytest.mark.parametrize("e", [1, 2, 10, 30, 60])
    def test_matches_reference(self, dtype, t, e):
        self.check(self.inputs(t, e), dtype)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("top_k,renormalize", [(1, False), (2, False), (2, True), (10, True), (10, False)])
    def test_top_k(self, dtype, top_k, renormalize):
        self.check(self.inputs(33, 10, top_k=top_k, renormalize=renormalize), dtype)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
    def test_trainable_bias(self, dtype):
        inputs = self.inputs(19, 4)
        inputs["bias"].requires_grad_()
        self.check(inputs, dtype)

    @pytest.mark.parametrize(
        "dim,dtype", [(32, torch.bfloat16), (64, torch.float16), (128, torch.bfloat16), (128, torch.float32)]
    )
    def test_head_widths(self, dim, dtype):
        self.check(self.inputs(9, 10, groups=2, dim=dim), dtype)

    @pytest.mark.parametrize("trainable", ["all", "x", "router", "experts"])
    def test_d128_backward_reads_h_in_two_passes(self, trainable):
        """D = 128, token routing: the plan reads h, and the kernel runs two passes over each chunk (d experts;
        then dh and d router in column halves). Top-2 renormalised, T over two row chunks with a ragged tail, and
        each gradient alone (a pass is skipped when nothing needs it)."""
        assert kernel.backward_reads_h(kernel.ROUTING_TOKEN, 128, 16)
        inputs = self.inputs(kernel.REDUCE_ROWS + 21, 10, top_k=2, renormalize=True, groups=2, dim=128)
        for name in ("x", "router", "experts"):
            inputs[name].requires_grad_(trainable in (name, "all"))
        self.check(inputs, torch.bfloat16)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
    def test_d128_ia3_backward_reads_h(self, dtype):
        """(IA)3 at D = 128: the plan reads h and the kernel runs its one-pass loop (no router, so no second
        pass); T over two row chunks with a ragged tail, bias trainable."""
        assert kernel.backward_reads_h(kernel.ROUTING_NONE, 128, 16)
        inputs = self.inputs(kernel.REDUCE_ROWS + 21, 1, groups=2, dim=128)
        inputs["bias"].requires_grad_()
        self.check(inputs, dtype)

    def test_ia3_with_trainable_bias(self):
        inputs = self.inputs(21, 1)
        inputs["bias"].requires_grad_()
        self.check(inputs, torch.float16)

    @pytest.mark.parametrize("case", ["soft", "top2", "top2-renorm", "sentence", "ia3"])
    def test_gradcheck_float64(self, case):
        """The kernels have no float64 path (GPU kernels: float16/bfloat16/float32); instead of
        gradcheck, float64 is refused by name. The gradients are checked in float32 above."""
        inputs = self.inputs(5, 1 if case == "ia3" else 4, sentence=case == "sentence")
        args = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        with pytest.raises(NotImplementedError, match="supports float16, bfloat16 and float32"):
            ops.mov_linear(**args, implementation="triton")


class TestMoVLinearTritonFusedRecompute(TestMoVLinearTriton):
    """A subset of the shared cases with the backward recomputing h per tile (the plan's alternative to
    reading h from one GEMM, :data:`.mov_linear.BACKWARD_H_FROM_GEMM`)."""

    @pytest.fixture(autouse=True)
    def _fused_recompute(self, monkeypatch):
        monkeypatch.setattr(kernel, "BACKWARD_H_FROM_GEMM", False)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("t", [1, 123])
    @pytest.mark.parametrize("e", [1, 10])
    def test_matches_reference(self, dtype, t, e):
        self.check(self.inputs(t, e), dtype)

    test_top_k = None
    test_trainable_bias = None
    test_head_widths = None
    test_d128_backward_reads_h_in_two_passes = None
    test_d128_ia3_backward_reads_h = None
    test_ia3_with_trainable_bias = None
    test_gradcheck_float64 = None
    test_no_bias = None


#: The interpreter's name of each activation dtype in :class:`.interpreter.Traffic`'s per-dtype counts.
TRAFFIC_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["token", "top2r", "sentence", "ia3"])
def test_backward_reads_h_from_the_gemm(dtype, case, monkeypatch):
    """The backward that reads h (one torch GEMM in the launcher; forced here for every routing mode, also
    where the plan recomputes h by default): the kernel's activation-dtype loads are h and dy once each, no x
    or W (16-bit activations; float32 ones share the count with the adapters); its gradients match the fused
    recompute's within the tolerance rule (with the fused path as the reference)."""
    cases = TestMoVLinearTriton()
    kw = dict(top_k=2, renormalize=True) if case == "top2r" else dict(sentence=case == "sentence")
    inputs = cases.inputs(45, 1 if case == "ia3" else 6, groups=5, **kw)
    inputs["bias"].requires_grad_()
    args = cast_inputs(inputs, dtype, torch.float32, ACTIVATION_NAMES)
    args64 = cast_inputs(inputs, torch.float64, torch.float64, ACTIVATION_NAMES)
    names = [k for k, v in args.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    probe, _ = run_with_grads(lambda **a: cases.call("reference", **a), args64)
    grad_out = torch.randn(probe.shape, dtype=torch.float64)
    _, truth_grads = run_with_grads(lambda **a: cases.call("reference", **a), args64, grad_out)
    grads = {}
    for from_gemm in (True, False):
        monkeypatch.setattr(kernel, "backward_reads_h", lambda *_, read=from_gemm: read)
        leaves = {k: v.detach().clone().requires_grad_(k in names) if k in names else v for k, v in args.items()}
        y = cases.call("triton", **leaves)
        with interpreter.count_traffic() as traffic:
            gs = torch.autograd.grad(y, [leaves[k] for k in names], grad_out.to(y.dtype))
        grads[from_gemm] = dict(zip(names, gs, strict=True))
        h_and_dy = 2 * y.numel() * dtype.itemsize
        if dtype != torch.float32:
            act_loads = traffic.loads[TRAFFIC_DTYPE[dtype]]
            assert act_loads == h_and_dy if from_gemm else act_loads > h_and_dy + args["weight"].numel() * 2
    for name in names:
        assert_within_rule(grads[True][name], grads[False][name], truth_grads[name], dtype, f"d{name}")


# ------------------------------------------------------------------------------------------
# Explicit tile configurations: multi-tile reductions, ragged edges, several row chunks
# ------------------------------------------------------------------------------------------


def _kernel_call(config, **kw):
    """pemoe.ops.mov_linear's flattening, then the kernel entry point with a forced configuration."""
    x = kw["x"]
    probs = None
    if kw.get("router_input") is not None:
        probs = reference.sentence_router_probs(
            kw["router_input"], kw["router"], tuple(x.shape[:-1]), top_k=kw["top_k"], renormalize=kw["renormalize"]
        )
        probs = probs.reshape(-1, probs.shape[-1])
    y = kernel.mov_linear(
        x.reshape(-1, x.shape[-1]),
        kw["weight"],
        kw.get("bias"),
        kw["router"] if probs is None else None,
        kw["experts"],
        probs,
        kw["top_k"],
        kw["renormalize"],
        config=config,
    )
    return y.reshape(x.shape[:-1] + (kw["weight"].shape[0],))


class TestMoVLinearTritonTiles(TestMoVLinearTriton):
    """Forced small tiles: partial sums over many programs, N and K tails, T over several chunks."""

    config = SMALL_TILES

    def call(self, implementation, **kw):
        if implementation == "reference":
            return super().call(implementation, **kw)
        return _kernel_call(self.config, **kw)

    # The cases below replace the shared ones (which ran above with autotuned tiles).
    test_matches_reference = None
    test_top_k = None
    test_gradcheck_float64 = None
    test_head_widths = None
    test_d128_backward_reads_h_in_two_passes = None
    test_d128_ia3_backward_reads_h = None
    test_ia3_with_trainable_bias = None
    test_no_bias = None

    @pytest.mark.parametrize(
        "dtype,e",
        [(torch.float32, 10), (torch.bfloat16, 60), (torch.float16, 1), (torch.bfloat16, 10)]
        + [pytest.param(dt, e, marks=pytest.mark.slow) for dt in DTYPES for e in (1, 10, 60)],
        ids=str,
    )
    def test_tiles(self, dtype, e):
        inputs = self.inputs(70, e, groups=5)
        inputs["bias"].requires_grad_()
        self.check(inputs, dtype)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float32, marks=pytest.mark.slow)], ids=str)
    def test_several_row_chunks(self, dtype):
        self.config = TALL_TILES
        self.check(self.inputs(2 * kernel.REDUCE_ROWS + 37, 10, top_k=3, renormalize=True, groups=5), dtype)

    def test_one_head_per_tile(self):
        self.config = ONE_HEAD_TILES
        self.check(self.inputs(70, 10, top_k=2, groups=3, dim=32), torch.float16)


def test_backward_is_deterministic():
    """Two-stage reductions, no atomics: two backward passes agree bit for bit."""
    inputs = TestMoVLinearTriton().inputs(77, 10, groups=5)
    grads = [run_with_grads(lambda **kw: _kernel_call(TALL_TILES, **kw), inputs)[1] for _ in range(2)]
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


# ------------------------------------------------------------------------------------------
# Strided inputs, empty batch, bad input
# ------------------------------------------------------------------------------------------


def _args(t=11, e=4, dtype=torch.float32, dim=D):
    n = G * dim
    return dict(
        x=torch.randn(t, K, dtype=dtype),
        weight=(torch.randn(n, K) * K**-0.5).to(dtype),
        router=torch.randn(dim, e) * 0.5,
        experts=1 + 0.3 * torch.randn(G, e, dim),
        bias=torch.randn(n).to(dtype),
    )


def test_strided_inputs_work():
    """x and W strided (the kernels take their strides), an expanded gradient (stride 0), and
    non-contiguous adapters (made contiguous explicitly by the entry point)."""
    a = _args()
    x = torch.randn(K, a["x"].shape[0]).t().requires_grad_()  # column-major [T, K]
    w = a["weight"].t().contiguous().t()  # column-major [N, K]
    router = a["router"].t().contiguous().t().requires_grad_()
    experts = a["experts"].transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    assert not (x.is_contiguous() or w.is_contiguous() or router.is_contiguous() or experts.is_contiguous())
    y = kernel.mov_linear(x, w, a["bias"], router, experts, None, None, False)
    dy = torch.randn(1, y.shape[1]).expand_as(y)  # stride 0 over tokens
    grads = torch.autograd.grad(y, [x, router, experts], dy)
    leaves = [t.detach().contiguous().requires_grad_() for t in (x, router, experts)]
    y_ref = reference.mov_linear(leaves[0], w.contiguous(), leaves[1], leaves[2], bias=a["bias"])
    grads_ref = torch.autograd.grad(y_ref, leaves, dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


def test_empty_batch():
    a = _args(t=0)
    x = a["x"].requires_grad_()
    experts = a["experts"].requires_grad_()
    y = ops.mov_linear(x, a["weight"], a["router"].requires_grad_(), experts, implementation="triton")
    assert y.shape == (0, G * D)
    y.sum().backward()
    assert x.grad.shape == (0, K) and torch.equal(experts.grad, torch.zeros_like(experts))


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(dim=24), NotImplementedError, r"D = N / G = 24 is not supported; supported D: \(16, 32, 64, 128\)"),
        (dict(dim=8), NotImplementedError, "supported D"),
        (dict(e=65), NotImplementedError, "at most 64 experts"),
        (dict(dtype=torch.float64), NotImplementedError, "float16, bfloat16 and float32 activations"),
    ],
)
def test_unsupported_problems_are_refused(change, error, match):
    a = _args(**change)
    with pytest.raises(error, match=match):
        ops.mov_linear(a["x"], a["weight"], a["router"], a["experts"], bias=a["bias"], implementation="triton")


def test_unsupported_arguments_are_refused():
    a = _args()
    with pytest.raises(NotImplementedError, match="base weight is frozen"):
        kernel.mov_linear(a["x"], a["weight"].requires_grad_(), None, a["router"], a["experts"], None, None, False)
    a = _args()
    with pytest.raises(NotImplementedError, match="router must be float32"):
        kernel.mov_linear(a["x"], a["weight"], None, a["router"].double(), a["experts"], None, None, False)
    with pytest.raises(ValueError, match="not legal for D=16"):
        bad = SMALL_TILES | {"BLOCK_N": 24}
        kernel.mov_linear(a["x"], a["weight"], None, a["router"], a["experts"], None, None, False, config=bad)
    with pytest.raises(ValueError, match="probs must have shape"):
        kernel.mov_linear(a["x"], a["weight"], None, None, a["experts"], torch.rand(3, 4), None, False)


def test_unsupported_device_is_refused():
    a = _args()
    with pytest.raises(NotImplementedError, match="runs on CUDA tensors"):
        kernel.mov_linear(a["x"].to("meta"), a["weight"], None, a["router"], a["experts"], None, None, False)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf in the bad rows
def test_non_finite_rows_stay_local():
    a = _args(t=9, e=10)
    a["x"][2, 5] = float("nan")
    a["x"][4, 0] = float("inf")
    y = kernel.mov_linear(a["x"], a["weight"], a["bias"], a["router"], a["experts"], None, None, False)
    rows = [0, 1, 3, 5, 6, 7, 8]
    assert torch.isfinite(y[rows]).all() and not torch.isfinite(y[2]).all()
    y_ref = reference.mov_linear(a["x"][rows], a["weight"], a["router"], a["experts"], bias=a["bias"])
    torch.testing.assert_close(y[rows], y_ref, rtol=1e-5, atol=1e-5)


def test_p_soft_is_written_only_for_backward():
    """SAVE_P_SOFT: the forward stores float32 probabilities only when a gradient will need them."""
    a = _args(t=37, e=10, dtype=torch.bfloat16)
    stores = {}
    for grad in (False, True):
        experts = a["experts"].clone().requires_grad_(grad)
        with interpreter.count_traffic() as traffic:
            kernel.mov_linear(a["x"], a["weight"], None, a["router"], experts, None, None, False)
        stores[grad] = traffic.stores
    assert stores[False] == {"bf16": 37 * G * D * 2}
    assert stores[True] == {"bf16": 37 * G * D * 2, "fp32": 37 * G * 10 * 4}


# ------------------------------------------------------------------------------------------
# HBM-traffic model
# ------------------------------------------------------------------------------------------


#: One D = 128 head a tile (the backward that reads h runs two passes there).
D128_TILES = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}


@pytest.mark.parametrize(
    "routing,e,bias,dtype,dim",
    [
        ("token", 10, True, torch.bfloat16, D), ("none", 1, False, torch.float16, D),
        ("sentence", 6, True, torch.float32, D), ("token", 10, False, torch.float16, 128),
    ],
)  # fmt: skip
@pytest.mark.parametrize("h_from_gemm", [True, False], ids=["h-gemm", "h-fused"])
def test_traffic_model_matches_the_interpreter(routing, e, bias, dtype, dim, h_from_gemm):
    """The model's issued bytes equal the interpreter's count of every load and store, per kernel, for both
    ways the backward gets h (the torch GEMM's own entry is not a Triton kernel: not counted here)."""
    t, groups = 2 * kernel.REDUCE_ROWS + 37, 5 if dim == D else 2
    n, tiles = groups * dim, TALL_TILES if dim == D else D128_TILES
    x = torch.randn(t, K, dtype=dtype)
    w = (torch.randn(n, K) * K**-0.5).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    router = torch.randn(dim, e) if routing == "token" else None
    experts = 1 + 0.3 * torch.randn(groups, e, dim)
    probs = torch.softmax(torch.randn(t, e), -1) if routing == "sentence" else None
    pb = dataclasses.replace(kernel._problem(x, w, b, router, experts, probs, None, False), h_from_gemm=h_from_gemm)
    with interpreter.count_traffic() as fwd:
        _, p_soft = kernel.mov_linear_forward(x, w, b, router, experts, probs, pb, True, tiles)
    dy = torch.randn(t, n, dtype=dtype)
    with interpreter.count_traffic() as bwd:
        kernel.mov_linear_backward(x, w, b, router, experts, probs, p_soft, dy, pb, (True, True, True), tiles)
    model = analysis.hbm_traffic(
        t, K, n, groups, e, dtype, tiles, tiles, routing=routing, bias=bias, h_from_gemm=h_from_gemm
    )
    f, bk = model.forward[0], next(k for k in model.backward if k.name == "mov_linear_bwd_kernel")
    assert [k.name for k in model.backward].count("h = x·Wᵀ + b (torch GEMM)") == int(h_from_gemm)
    print(f"\n{routing}: forward issued model {f.issued_read}/{f.issued_written} interpreter {fwd.loaded}/{fwd.stored}")
    print(
        f"{routing}: backward issued model {bk.issued_read}/{bk.issued_written} interpreter {bwd.loaded}/{bwd.stored}"
    )
    assert (f.issued_read, f.issued_written) == (fwd.loaded, fwd.stored)
    assert (bk.issued_read, bk.issued_written) == (bwd.loaded, bwd.stored)


def test_forward_traffic_is_near_the_minimum_at_t5_large():
    """SPEC §6 target: modelled forward HBM bytes ≤ 1.1× the minimum (T5-large k/v, E = 10, bf16)."""
    for training in (False, True):
        r = analysis.hbm_traffic(2048, 1024, 1024, 16, 10, torch.bfloat16, training=training)
        ratio = r.forward_hbm / r.forward_minimum
        print(
            f"\nT5-large MoV-10 bf16 training={training}: forward HBM {r.forward_hbm / 2**20:.2f} MiB, "
            f"minimum {r.forward_minimum / 2**20:.2f} MiB ({ratio:.3f}x), unfused "
            f"{r.forward_unfused / 2**20:.2f} MiB ({r.forward_unfused / r.forward_minimum:.2f}x), issued to L2 "
            f"{sum(k.issued for k in r.forward) / 2**20:.2f} MiB; backward HBM {r.backward_hbm / 2**20:.2f} MiB, "
            f"minimum {r.backward_minimum / 2**20:.2f} MiB, unfused {r.backward_unfused / 2**20:.2f} MiB"
        )
        assert ratio <= 1.1
        assert r.forward_unfused > 1.5 * r.forward_minimum


def test_program_groups_are_sized_from_the_l2():
    """Llama-7B-like k/v (K = N = 4096, T = 2048, bf16): a group of 8 row tiles reads W from DRAM four times
    (2.4x the forward's minimum in the model); groups sized from the L2 read it once, on A100 and H100."""
    pb = kernel.plan_problem(
        2048, 4096, 4096, (32, 10, 128), router_shape=(128, 10), probs_shape=None, top_k=None,
        renormalize=False, itemsize=2, l2_bytes=40 * 2**20,
    )  # fmt: skip
    assert pb.group_rows == 20 * 2**20 // (4096 * 2)
    eight = analysis.hbm_traffic(2048, 4096, 4096, 32, 10, torch.bfloat16, dict(BLOCK_M=64, BLOCK_N=128, GROUP_M=8))
    assert eight.forward_hbm > 2 * eight.forward_minimum
    for capability in (80, 90):
        r = analysis.hbm_traffic(2048, 4096, 4096, 32, 10, torch.bfloat16, capability=capability)
        assert r.forward_hbm <= 1.02 * r.forward_minimum, capability


def test_runtime_program_groups_cover_every_tile(monkeypatch):
    """Groups from a small L2 (3 row tiles of 8 ragged ones, the last group short) give the forward of one
    group per row tile, bit for bit: every output tile is computed once."""
    t, e = 123, 4
    inputs = TestMoVLinearTriton().inputs(t, e)
    inputs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    args = (inputs["x"], inputs["weight"], inputs["bias"], inputs["router"], inputs["experts"], None)
    tiles = {k: v for k, v in SMALL_TILES.items() if k != "GROUP_M"}
    ungrouped = kernel.mov_linear(*args, None, False, config=tiles | {"GROUP_M": 1})
    monkeypatch.setattr(kernel, "DEFAULT_L2_BYTES", 2 * 3 * 16 * K * 4)
    pb = kernel._problem(*args, None, False)
    assert pb.group_rows == 48 and kernel.forward_group_rows(pb, tiles) == 48
    grouped = kernel.mov_linear(*args, None, False, config=tiles)
    assert torch.equal(grouped, ungrouped)


def test_backward_strategies_model():
    """Where the backward gets h, modelled: saving h holds T·N activation bytes and moves the fewest; the fused
    kernel's 32-row recompute tiles request x and W from L2 so often that one big GEMM beats it at Llama-7B-like
    and T5-large bf16 shapes; at decode-sized T the three are within launch overheads of each other."""
    llama = {s.name: s for s in analysis.backward_strategies(2048, 4096, 4096, 32, 10, torch.bfloat16)}
    assert llama["save h"].saved == llama["save h"].forward_extra == 2048 * 4096 * 2
    assert llama["recompute (fused)"].saved == llama["recompute (GEMM)"].saved == 0
    assert llama["save h"].seconds < llama["recompute (GEMM)"].seconds < llama["recompute (fused)"].seconds / 2
    assert llama["recompute (fused)"].l2_requested > 3 * llama["recompute (GEMM)"].l2_requested
    t5 = {s.name: s for s in analysis.backward_strategies(2048, 1024, 1024, 16, 10, torch.bfloat16)}
    assert t5["recompute (GEMM)"].seconds < t5["recompute (fused)"].seconds
    decode = {s.name: s for s in analysis.backward_strategies(32, 4096, 4096, 32, 10, torch.bfloat16)}
    assert decode["recompute (fused)"].seconds < 1.5 * decode["recompute (GEMM)"].seconds
    ia3 = {s.name: s for s in analysis.backward_strategies(2048, 4096, 4096, 32, 1, torch.bfloat16, routing="none")}
    assert ia3["recompute (GEMM)"].seconds < ia3["recompute (fused)"].seconds / 2
    assert ia3["recompute (GEMM)"].l2_requested < llama["recompute (GEMM)"].l2_requested  # one pass, no p_soft
    with pytest.raises(ValueError, match="routing"):
        analysis.backward_strategies(32, 64, 64, 1, 4, torch.bfloat16, routing="sentence")


# ------------------------------------------------------------------------------------------
# Ahead-of-time compiles (sm_80, sm_90)
# ------------------------------------------------------------------------------------------


# The default run compiles the default configurations: every example shape in bfloat16 (where sm_90
# must use wgmma), and T5-large E = 10 in float16 and float32. Compiling takes ~1-5 s per kernel and
# capability, so it runs in a child process started when this module starts, beside the interpreter
# tests; the slow test compiles everything aot_cases() lists (every configuration autotuning may choose).
_AOT_DEFAULTS = """
import dataclasses, json, torch
from pemoe.kernels.triton import aot, mov_linear_analysis as m
cases = m.aot_cases(dtypes=(torch.bfloat16,), all_configs=False)
cases += m.aot_cases(dtypes=(torch.float16, torch.float32), shapes=m.AOT_SHAPES[:1], all_configs=False)
reports = [aot.compile_case(c, cc) for c in cases for cc in aot.CAPABILITIES]
# bf16 defaults without wgmma on sm_90: their first 64-row candidate (what autotuning on an H100 can pick)
plain = {
    r.name.rsplit(" ", 1)[0] for r in reports
    if r.capability == 90 and "bfloat16" in r.name and not r.uses_wgmma and not r.name.startswith("bwd ")
}
alternatives, seen = [], set()
for c in m.aot_cases(dtypes=(torch.bfloat16,), all_configs=True):
    key = c.name.rsplit(" ", 1)[0]
    if key in plain and key not in seen and c.constexprs["BLOCK_M"] >= 64:
        seen.add(key)
        alternatives.append(aot.compile_case(c, 90))
# the h-reading backward's first tile where the plan recomputes h instead (backward_reads_h says no)
h_read = [c for c in m.aot_cases(dtypes=(torch.bfloat16,), all_configs=False, h_read_everywhere=True) if not c.default]
h_read = [aot.compile_case(c, cc) for c in h_read for cc in aot.CAPABILITIES]
print(json.dumps([[dataclasses.asdict(r) for r in rs] for rs in (reports, alternatives, h_read)]))
"""
#: bf16 defaults that use mma.sync on sm_90 (spill-free 64-row tiles do not fit sm_80's registers with the
#: float32-grade split epilogue); each must have a spill-free wgmma candidate for autotuning on sm_90. The
#: backward that reads h ("bwd ...", the default) has no GEMM: its dots are the epilogue's, wgmma or not.
#: (The fused recompute's (IA)3 D = 128 default is 32 rows: the plan reads h there, the fused kernel runs only when
#: BACKWARD_H_FROM_GEMM is off.)
SM90_PLAIN_DEFAULTS = {
    "fwd t5-large E=60 bfloat16",
    "bwd-fused t5-large E=10 sent bfloat16",
    "bwd-fused d128 ia3 bfloat16",
}
#: Example shapes where the plan recomputes h in the backward (mov_linear.backward_reads_h): the h-reading
#: kernel's first tile spills there (its epilogue, fed by loaded tiles rather than the recompute's accumulator,
#: takes more registers at the same tile, and 16 rows is the shortest tile). Not "d128 E=10": there the h-reading
#: kernel runs in two passes, spill-free, and the plan reads h.
H_RECOMPUTED = {"t5-large E=60", "t5-large E=10 sent"}
#: Largest dynamic shared memory per block (bytes): sm_80 163 KiB, sm_90 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@pytest.fixture(scope="module", autouse=True)
def _aot_defaults_in_background():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    child = subprocess.Popen(
        [sys.executable, "-c", _AOT_DEFAULTS], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    yield child
    if child.poll() is None:  # the AOT test was not selected
        child.kill()
        child.communicate()


def _check_reports(reports: list[aot.CompileReport]) -> None:
    errors = [f"{r.name} sm_{r.capability}: {r.error}" for r in reports if r.error]
    assert not errors, "\n".join(errors)
    spilled = [f"{r.name} sm_{r.capability}" for r in reports if r.default and r.spill_bytes != 0]
    assert not spilled, spilled
    too_big = [f"{r.name} sm_{r.capability}" for r in reports if r.shared_bytes > SMEM_LIMIT[r.capability]]
    assert not too_big, f"shared memory over the per-block limit: {too_big}"
    wgmma_kinds = [r for r in reports if not r.name.startswith("bwd ")]  # the h-reading backward has no GEMM
    bf16_sm90 = [r for r in wgmma_kinds if r.capability == 90 and "bfloat16" in r.name and r.default]
    plain = {r.name.rsplit(" ", 1)[0] for r in bf16_sm90 if not r.uses_wgmma}
    assert bf16_sm90 and plain <= SM90_PLAIN_DEFAULTS, plain


def test_aot_default_configs_compile_without_spills_and_with_wgmma(_aot_defaults_in_background):
    start = time.time()
    out, err = _aot_defaults_in_background.communicate(timeout=900)
    assert _aot_defaults_in_background.returncode == 0, err[-4000:]
    reports, alternatives, h_read = ([aot.CompileReport(**r) for r in rs] for rs in json.loads(out))
    print(
        f"\n{aot.format_reports(reports + alternatives + h_read)}\n"
        f"({len(reports)} compiles; waited {time.time() - start:.0f} s)"
    )
    # bf16: fwd and bwd-fused at every shape, bwd (reads h) where the plan reads it; fp16, fp32: one shape, all 3
    assert len(reports) == 2 * (2 * len(analysis.AOT_SHAPES) + len(analysis.AOT_SHAPES) - len(H_RECOMPUTED) + 6)
    assert all(r.default for r in reports)
    _check_reports(reports)
    # where the plan recomputes h, the h-reading kernel's first tile spills on sm_80 or sm_90 (why it does)
    spills = {r.name.split(" ", 1)[1].rsplit(" ", 2)[0] for r in h_read if r.spill_bytes > 0 and not r.error}
    assert {r.name.split(" ", 1)[1].rsplit(" ", 2)[0] for r in h_read} == spills == H_RECOMPUTED, aot.format_reports(
        h_read
    )
    # where the sm_90 default is mma.sync, autotuning on sm_90 has a spill-free wgmma tile to pick
    plain = {
        r.name.rsplit(" ", 1)[0]
        for r in reports
        if r.capability == 90 and "bfloat16" in r.name and not r.uses_wgmma and not r.name.startswith("bwd ")
    }
    assert {r.name.rsplit(" ", 1)[0] for r in alternatives} == plain
    assert all(r.uses_wgmma and r.spill_bytes == 0 and not r.error for r in alternatives), aot.format_reports(
        alternatives
    )


@pytest.mark.slow
def test_aot_every_config_compiles():
    """Every configuration autotuning may choose, every example shape and dtype (aot_cases())."""
    reports = aot.compile_module_in_subprocess("pemoe.kernels.triton.mov_linear_analysis")
    print(f"\n{aot.format_reports(reports)}")
    assert len(reports) == 2 * len(analysis.aot_cases())
    _check_reports(reports)
