"""Triton mov_ffn (pemoe.kernels.triton.mov_ffn): output and every gradient vs the reference, the
traffic model vs the interpreter's counted traffic, ahead-of-time compiles, and bad input.

Under TRITON_INTERPRET=1 (no GPU) the kernels run in the Triton interpreter on CPU tensors; the
bfloat16 interpreter defects are patched (pemoe.kernels.triton.interpreter), not skipped.
Tolerances: the rule in tests/helpers.py (2× the same-dtype reference's error + ATOL·scale).
"""

from __future__ import annotations

import time

import pytest
import torch
import triton

from pemoe import ops
from pemoe.kernels.triton import interpreter
from pemoe.kernels.triton import mov_ffn as kernels
from pemoe.kernels.triton import mov_ffn_analysis as analysis
from tests.helpers import assert_within_rule
from tests.test_ops import DTYPES, K, MoVFFNCases, _experts, _router

pytestmark = pytest.mark.skipif(not interpreter.INTERPRET, reason="needs TRITON_INTERPRET=1 (no GPU)")

KINDS = [(True, "gelu_new"), (False, "relu"), (True, "gelu"), (False, "gelu_new"), (True, "silu")]
AUTOTUNED = {
    "_ffn_up_kernel": kernels._ffn_up_kernel,
    "_ffn_down_kernel": kernels._ffn_down_kernel,
    "_ffn_down_backward_kernel": kernels._ffn_down_backward_kernel,
    "_ffn_up_backward_kernel": kernels._ffn_up_backward_kernel,
}


def _small_tiles(monkeypatch, m=16, n=16, k=16):
    """Force one small tile config on every autotuned kernel: many tiles, so the split buffers
    (logit, dp, d experts, d router partials) and the K loops really accumulate across tiles; GROUP_M = 2 row
    tiles a group, so the grouped program order of (a) and (b) has several groups and a partial last one."""
    blocks = {
        "_ffn_up_kernel": dict(BLOCK_M=m, BLOCK_F=n, BLOCK_K=k, GROUP_M=2),
        "_ffn_down_kernel": dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=2),
        "_ffn_down_backward_kernel": dict(BLOCK_M=m, BLOCK_F=n, BLOCK_K=k),  # 2-D grid over row chunks
        "_ffn_up_backward_kernel": dict(BLOCK_M=m, BLOCK_F=n, BLOCK_K=k),
    }
    for name, kernel in AUTOTUNED.items():
        monkeypatch.setattr(kernel, "configs", [triton.Config(blocks[name], num_warps=4, num_stages=1)])
        monkeypatch.setattr(kernel, "cache", {})


@pytest.fixture
def small_tiles(monkeypatch):
    _small_tiles(monkeypatch)


class TestMoVFFNTriton(MoVFFNCases):
    implementation = "triton"

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("gated,activation", KINDS)
    @pytest.mark.parametrize("e", [1, 2, 10, 30, 60])
    def test_matches_reference(self, dtype, gated, activation, e):
        self.check(self.inputs(37, e, gated=gated, activation=activation), dtype)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("t", [1, 7, 123])
    @pytest.mark.parametrize("gated,activation", KINDS[:2])
    def test_odd_shapes_many_tiles(self, small_tiles, dtype, t, gated, activation):
        # M = 40, F = 56 with 16-wide tiles: partial tiles in every dimension, 4 F tiles, 3 K steps
        self.check(self.inputs(t, 10, gated=gated, activation=activation), dtype)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("top_k,renormalize", [(1, False), (3, False), (3, True), (10, True)])
    def test_top_k(self, dtype, top_k, renormalize):
        self.check(self.inputs(37, 10, top_k=top_k, renormalize=renormalize), dtype)

    def test_top_k_many_tiles(self, small_tiles):
        self.check(self.inputs(50, 30, top_k=4, renormalize=True), torch.bfloat16)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("top_k", [None, 2])
    def test_sentence_routing(self, dtype, top_k):
        inputs = self.inputs(5, 4, top_k=top_k)
        inputs["x"] = torch.randn(2, 5, K, requires_grad=True)
        inputs["router_input"] = torch.randn(2, 9, requires_grad=True)
        inputs["router"] = _router(9, 4)
        self.check(inputs, dtype)

    @pytest.mark.slow
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("e", [2, 60])
    def test_larger_shape_default_tiles(self, dtype, e):
        m, f, t = 136, 200, 300  # several default-sized tiles in every dimension
        inputs = self.inputs(t, e)
        inputs.update(
            x=torch.randn(t, m, requires_grad=True),
            wi_0=torch.randn(f, m) * m**-0.5,
            wi_1=torch.randn(f, m) * m**-0.5,
            wo=torch.randn(m, f) * f**-0.5,
            router=_router(f, e, std=0.2),
            experts=_experts(1, e, f),
        )
        self.check(inputs, dtype)

    @pytest.mark.parametrize("chunk", [48, 40])
    @pytest.mark.parametrize("e", [1, 10])
    def test_row_chunks_sum_every_row_tile(self, monkeypatch, small_tiles, chunk, e):
        """(c) and (d) loop over the 16-row tiles of their row chunk and write one d experts / d router partial
        per chunk: T = 123 in chunks of 48 rows (3, 3 and 2 row tiles) or 40 (tiles cut at the chunk's end, so a
        row counted twice or skipped shows). A dropped chunk partial or a skipped row tile breaks the gradients."""
        monkeypatch.setattr(kernels, "row_chunk", lambda pb, configs: chunk)
        pb = kernels.plan_problem(123, K, 56, e, "float32", gated=True, has_router=e > 1, has_probs=False,
                                  activation="gelu_new", top_k=None, renormalize=False)  # fmt: skip
        buffers, launch = kernels.down_backward_launch(pb, True, e > 1, True)
        assert buffers["dexperts_part"].shape[0] == triton.cdiv(123, chunk) == launch.grid({"BLOCK_F": 16})[0]
        self.check(self.inputs(123, e), torch.float32)

    @pytest.mark.parametrize("chunk", [16, 32, 48])
    @pytest.mark.parametrize("t", [1, 37])
    def test_f_chunks_sum_every_f_tile(self, monkeypatch, small_tiles, chunk, t):
        """(a) and (c) loop over the 16-column F tiles of their F chunk and write one logit / dp partial slot per
        chunk, which (b) / (r) sum: F = 56 in chunks of 16 (4 slots of one tile), 32 (2 and 2 tiles, the last one
        partial) or 48 (3 tiles, then one partial tile: the chunk's end cuts the F range, not a tile). A skipped
        F tile, a dropped slot or a tile read past its chunk's end breaks the output and the gradients."""
        monkeypatch.setattr(kernels, "f_chunk", lambda F, E, itemsize, configs, programs: chunk)
        pb = kernels.plan_problem(t, K, 56, 10, "float32", gated=True, has_router=True, has_probs=False,
                                  activation="gelu_new", top_k=None, renormalize=False)  # fmt: skip
        buffers, launch = kernels.up_launch(pb)
        slots = triton.cdiv(56, chunk)
        assert buffers["logits_part"].shape[0] == slots == launch.grid({"BLOCK_M": 16})[0] // triton.cdiv(t, 16)
        assert kernels.down_launch(pb, True)[1].scalars["F_SLOTS"] == slots
        buffers, launch = kernels.down_backward_launch(pb, True, True, True)
        assert buffers["dp_part"].shape[0] == slots == launch.grid({"BLOCK_F": 16})[1]
        assert kernels.router_backward_launch(pb)[1].scalars["F_SLOTS"] == slots
        self.check(self.inputs(t, 10), torch.float32)

    def test_gradcheck_float64(self):
        """float64 is not offered by the kernels: a clear TypeError, not a silent fallback."""
        with pytest.raises(TypeError, match="the kernels support"):
            self.gradcheck(self.inputs(5, 3))


# ------------------------------------------------------------------------------------------
# Direct calls of the kernel entry point
# ------------------------------------------------------------------------------------------


def _args(t=19, m=40, f=56, e=10, dtype=torch.bfloat16, gated=True):
    x = torch.randn(t, m).to(dtype)
    wi_0 = (torch.randn(f, m) * m**-0.5).to(dtype)
    wi_1 = (torch.randn(f, m) * m**-0.5).to(dtype) if gated else None
    wo = (torch.randn(m, f) * f**-0.5).to(dtype)
    router = torch.randn(f, e) * 0.2 if e > 1 else None
    experts = 1.0 + 0.3 * torch.randn(1, e, f)
    return dict(x2d=x, wi_0=wi_0, wi_1=wi_1, wo=wo, router=router, experts=experts, probs=None,
                activation="gelu_new", top_k=None, renormalize=False)  # fmt: skip


def _grads(kw, names=("x2d", "router", "experts")):
    kw = {
        k: (v.detach().clone().requires_grad_(k in names) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()
    }
    y = kernels.mov_ffn(**kw)
    leaves = [kw[n] for n in names if kw[n] is not None]
    return (y, *torch.autograd.grad(y, leaves, torch.ones_like(y)))


def test_strided_inputs_are_read_through_their_strides():
    kw = _args()
    strided = dict(kw)
    strided["x2d"] = torch.randn(kw["x2d"].shape[1], kw["x2d"].shape[0]).to(kw["x2d"].dtype).t()
    strided["x2d"].copy_(kw["x2d"])
    for name in ("wi_0", "wi_1", "wo"):  # transposed storage: [F, M] viewed from an [M, F] tensor
        strided[name] = kw[name].t().contiguous().t()
    strided["router"] = kw["router"].t().contiguous().t()
    strided["experts"] = kw["experts"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided["x2d"].is_contiguous() and not strided["wo"].is_contiguous()
    for a, b in zip(_grads(strided), _grads(kw), strict=True):
        assert torch.equal(a, b)


def test_forward_and_backward_are_deterministic(small_tiles):
    kw = _args(t=40)
    first, second = _grads(kw), _grads(kw)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_only_experts_need_grad_skips_the_dx_path():
    kw = _args()
    kw["experts"] = kw["experts"].clone().requires_grad_()
    y = kernels.mov_ffn(**kw)
    (d_experts,) = torch.autograd.grad(y.float().sum(), [kw["experts"]])
    ref = ops.mov_ffn(kw["x2d"], kw["wi_0"], kw["wo"], kw["router"], kw["experts"], wi_1=kw["wi_1"],
                      implementation="reference")  # fmt: skip
    (ref_d,) = torch.autograd.grad(ref.float().sum(), [kw["experts"]])
    truth = ops.mov_ffn(kw["x2d"].double(), kw["wi_0"].double(), kw["wo"].double(), kw["router"].double(),
                        kw["experts"].double(), wi_1=kw["wi_1"].double(), implementation="reference")  # fmt: skip
    (truth_d,) = torch.autograd.grad(truth.sum(), [kw["experts"]])
    assert_within_rule(d_experts, ref_d, truth_d, torch.bfloat16, "d experts")


H100_SMS = 132


@pytest.mark.parametrize(
    "t,f,e,dtype",
    [(8192, 10240, 60, "bfloat16"), (2048, 2816, 10, "bfloat16"), (2048, 11008, 10, "float32"),
     (1024, 10240, 60, "bfloat16"), (37, 56, 10, "float16")],
)  # fmt: skip
def test_row_chunks_bound_the_partials_and_fill_the_gpu(t, f, e, dtype):
    """The d experts / d router partials of (c) and (d): one slot per row chunk, whichever tile autotune picks,
    within 1/8 of a [T, F] activation's bytes unless one chunk fewer would leave an H100 wave of programs
    unfilled; enough chunks for a full wave where T allows it."""
    pb = kernels.plan_problem(t, 4096, f, e, dtype, gated=True, has_router=True, has_probs=False,
                              activation="gelu_new", top_k=None, renormalize=False)  # fmt: skip
    activation = t * f * pb.itemsize
    for (buffers, launch), part in (
        (kernels.down_backward_launch(pb, True, True, True), "dexperts_part"),
        (kernels.up_backward_launch(pb, True, True), "drouter_part"),
    ):
        chunk, configs = launch.scalars["ROW_CHUNK"], launch.kernel.configs
        assert all(chunk % c.kwargs["BLOCK_M"] == 0 for c in configs)  # a row tile never straddles two chunks
        slots = buffers[part].shape[0]
        assert slots == triton.cdiv(t, chunk) and {launch.grid(c.kwargs)[0] for c in configs} == {slots}
        fewest_f_tiles = min(launch.grid(c.kwargs)[1] for c in configs)
        assert slots * e * f * 4 <= activation / 8 or (slots - 1) * fewest_f_tiles < H100_SMS
        assert slots * fewest_f_tiles >= H100_SMS or slots == triton.cdiv(t, max(c.kwargs["BLOCK_M"] for c in configs))


@pytest.mark.parametrize(
    "t,m,f,e,dtype",
    [(8192, 4096, 10240, 60, "bfloat16"), (2048, 1024, 2816, 10, "bfloat16"), (2048, 4096, 11008, 10, "float32"),
     (2048, 4096, 11008, 60, "bfloat16"), (37, 40, 56, 10, "float16"), (1, 1024, 2816, 10, "bfloat16")],
)  # fmt: skip
def test_f_chunks_bound_the_partials_and_fill_the_gpu(t, m, f, e, dtype):
    """The logit partials of (a) and the dp partials of (c): one slot per F chunk, whichever tile autotune picks;
    a chunk never splits an F tile; at least one H100 wave of programs unless every chunk is one widest tile; and
    at the shape of the report (T = 8192, E = 60, F = 10240) within 1/8 of a [T, F] activation's bytes."""
    pb = kernels.plan_problem(t, m, f, e, dtype, gated=True, has_router=True, has_probs=False,
                              activation="gelu_new", top_k=None, renormalize=False)  # fmt: skip
    for (buffers, launch), part, rows in (
        (kernels.up_launch(pb), "logits_part", None),
        (kernels.down_backward_launch(pb, True, True, True), "dp_part", "ROW_CHUNK"),
    ):
        chunk, configs = launch.scalars["F_CHUNK"], launch.kernel.configs
        widest = max(c.kwargs["BLOCK_F"] for c in configs)
        assert all(chunk % c.kwargs["BLOCK_F"] == 0 for c in configs)
        slots = buffers[part].shape[0]
        assert slots == triton.cdiv(f, chunk)
        if rows is None:  # (a): a 1-D grid over (row tiles, F chunks); the plan counts the tallest row tiles
            programs = {launch.grid(c.kwargs)[0] for c in configs}
            assert programs == {triton.cdiv(t, c.kwargs["BLOCK_M"]) * slots for c in configs}
            fewest = triton.cdiv(t, max(c.kwargs["BLOCK_M"] for c in configs)) * slots
        else:  # (c): (row chunks, F chunks), the same for every tile
            assert {launch.grid(c.kwargs) for c in configs} == {(triton.cdiv(t, launch.scalars[rows]), slots)}
            fewest = triton.cdiv(t, launch.scalars[rows]) * slots
        assert fewest >= H100_SMS or chunk == widest
        # within 1/8 of the activation unless the next wider chunk would leave an H100 wave unfilled
        wider = fewest // slots * triton.cdiv(f, chunk + widest)
        assert slots * t * e * 4 <= t * f * pb.itemsize / 8 or wider < H100_SMS
        if (t, f, e) == (8192, 10240, 60):  # the report's shape: a slot per F tile was 630 MB at BLOCK_F = 32
            assert slots * t * e * 4 <= t * f * pb.itemsize / 4


def test_no_tokens_plan_and_run():
    """T = 0: the plan sizes empty partial buffers, and the op returns empty outputs and zero parameter grads."""
    pb = kernels.plan_problem(0, 40, 56, 10, "bfloat16", gated=True, has_router=True, has_probs=False,
                              activation="gelu_new", top_k=None, renormalize=False)  # fmt: skip
    assert kernels.up_launch(pb)[0]["logits_part"].shape[1:] == (0, 10)
    assert kernels.down_backward_launch(pb, True, True, True)[0]["dp_part"].shape[1:] == (0, 10)
    y, dx, d_router, d_experts = _grads(_args(t=0))
    assert y.shape == (0, 40) and dx.shape == (0, 40)
    assert not d_router.any() and not d_experts.any()


# ------------------------------------------------------------------------------------------
# Bad input specific to the kernels
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(dtype=torch.float64), TypeError, "the kernels support"),
        (dict(experts_dtype=torch.bfloat16), TypeError, "experts must be float32"),
        (dict(router_dtype=torch.float16), TypeError, "router must be float32"),
        (dict(wo_dtype=torch.float32), TypeError, "wo must have x's dtype"),
        (dict(activation="swish"), ValueError, "activation must be one of"),
        (dict(meta="wo"), NotImplementedError, "wo is on meta; the kernels run on cpu"),
        (dict(frozen="wi_1"), NotImplementedError, "wi_1 requires grad.*frozen"),
        (dict(top_k=11), ValueError, "top_k must be in"),
        (dict(router_shape=(55, 10)), ValueError, r"router must have shape \[F, E\] = \[56, 10\]"),
        (dict(no_router=True), ValueError, "router .* is required"),
        (dict(x_rank=3), ValueError, r"x must be a 2-D tensor \[T, M\]"),
    ],
)
def test_bad_input(change, error, match):
    kw = _args(t=change.get("t", 5), dtype=change.get("dtype", torch.bfloat16))
    if "experts_dtype" in change:
        kw["experts"] = kw["experts"].to(change["experts_dtype"])
    if "router_dtype" in change:
        kw["router"] = kw["router"].to(change["router_dtype"])
    if "wo_dtype" in change:
        kw["wo"] = kw["wo"].to(change["wo_dtype"])
    if "activation" in change:
        kw["activation"] = change["activation"]
    if "meta" in change:
        kw[change["meta"]] = kw[change["meta"]].to("meta")
    if "frozen" in change:
        kw[change["frozen"]].requires_grad_()
    if "top_k" in change:
        kw["top_k"] = change["top_k"]
    if "router_shape" in change:
        kw["router"] = torch.randn(*change["router_shape"])
    if "no_router" in change:
        kw["router"] = None
    if "x_rank" in change:
        kw["x2d"] = kw["x2d"].unsqueeze(0)
    with pytest.raises(error, match=match):
        kernels.mov_ffn(**kw)


def test_ops_refuses_float64_for_triton_loudly():
    kw = _args(dtype=torch.float64)
    with pytest.raises(TypeError, match="the kernels support"):
        ops.mov_ffn(kw["x2d"], kw["wi_0"], kw["wo"], kw["router"], kw["experts"], implementation="triton")


# ------------------------------------------------------------------------------------------
# HBM-traffic model vs the interpreter's counted traffic
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        dict(dtype=torch.bfloat16, gated=True, routing="self", e=10, needs=(True, True, True, False)),
        dict(dtype=torch.float16, gated=True, routing="self", e=3, needs=(False, True, False, False)),
        dict(dtype=torch.float32, gated=False, routing="none", e=1, needs=(True, False, True, False)),
        dict(dtype=torch.bfloat16, gated=True, routing="given", e=4, needs=(True, False, True, True)),
        dict(dtype=torch.bfloat16, gated=False, routing="self", e=10, needs=(False, False, False, False)),
    ],
    ids=["self-all-grads", "self-router-only", "ia3-fp32", "sentence", "inference"],
)
@pytest.mark.parametrize("tiles", ["small", "default"])
def test_traffic_model_matches_the_interpreter(monkeypatch, case, tiles):
    if tiles == "small":
        _small_tiles(monkeypatch, 16, 32, 16)
    t, m, f, e = 45, 40, 88, case["e"]
    kw = _args(t, m, f, e, case["dtype"], case["gated"])
    need_x, need_router, need_experts, need_probs = case["needs"]
    if case["routing"] == "none":
        kw["router"] = None
    if case["routing"] == "given":
        kw["probs"] = torch.softmax(torch.randn(t, e), -1).requires_grad_(need_probs)
    kw["x2d"].requires_grad_(need_x)
    if kw["router"] is not None:
        kw["router"].requires_grad_(need_router)
    kw["experts"].requires_grad_(need_experts)
    model = analysis.hbm_traffic(
        t, m, f, e, dtype=case["dtype"], gated=case["gated"], routing=case["routing"], needs=case["needs"]
    )
    with interpreter.count_traffic() as fwd:
        y = kernels.mov_ffn(**kw)
    assert (fwd.loaded, fwd.stored) == model.interpreted("forward")
    if any(case["needs"]):
        with interpreter.count_traffic() as bwd:
            y.backward(torch.randn_like(y))
        assert (bwd.loaded, bwd.stored) == model.interpreted("backward")


def test_traffic_at_t5_large_shape():
    """The figures of the report: overhead over a plain FFN at T5-large FFN shape, default tiles."""
    model = analysis.hbm_traffic(2048, 1024, 2816, 10, dtype=torch.bfloat16)
    print("\n" + model.summary())
    fwd, plain = model.total("forward", "unique"), model.plain("unique")
    # beyond a plain FFN: the logit partials (one slot per F chunk, written once, read once), p_soft and the experts
    extra = fwd - plain
    pb = kernels.plan_problem(2048, 1024, 2816, 10, "bfloat16", gated=True, has_router=True, has_probs=False,
                              activation="gelu_new", top_k=None, renormalize=False)  # fmt: skip
    slots = kernels.up_launch(pb)[0]["logits_part"].shape[0]
    assert slots < triton.cdiv(2816, model.configs["_ffn_up_kernel"]["BLOCK_F"])
    assert extra == 2 * slots * 2048 * 10 * 4 + 2816 * 10 * 4 * 2 + 2048 * 10 * 4
    assert model.total("forward") < 1.15 * model.plain()  # spill-free default tiles (BLOCK_F = 64)
    big = {"BLOCK_M": 128, "BLOCK_F": 128, "BLOCK_K": 64}
    big_tiles = analysis.hbm_traffic(
        2048, 1024, 2816, 10, configs={"_ffn_up_kernel": big, "_ffn_down_kernel": {**big, "BLOCK_N": 128}}
    )
    print("with 128x128 tiles:\n" + big_tiles.summary())
    assert big_tiles.total("forward") < 1.1 * big_tiles.plain()
    assert model.unfused_forward > 4 * model.minimum["forward"]


def test_down_merge_flops_shrink_with_block_n():
    """(b) recomputes the merge s = p·experts ([BLOCK_M, BLOCK_E]·[BLOCK_E, BLOCK_K] a K step) in each of its
    M / BLOCK_N column blocks: 2·T·BLOCK_E·F·(M / BLOCK_N) FLOPs next to the 2·T·M·F of the GEMM. The default
    tile keeps it at 1/8 of the GEMM for E ≤ 16."""
    t, m, f = 2048, 1024, 2816  # whole tiles at every BLOCK_N below: no padding
    for e, block_e in ((10, 16), (60, 64)):
        for block_n in (64, 128, 256):
            flops = analysis.down_mma_flops(t, m, f, e, config=dict(BLOCK_M=128, BLOCK_N=block_n, BLOCK_K=64))
            assert flops["gemm"] == 2 * t * m * f
            assert flops["merge_once"] == 2 * t * block_e * f
            assert flops["merge"] == flops["merge_once"] * m // block_n
        assert analysis.down_mma_flops(t, m, f, e, routing="none")["merge"] == 0
    default = analysis.down_mma_flops(t, m, f, 10)
    assert default["merge"] * 8 <= default["gemm"]


# ------------------------------------------------------------------------------------------
# Ahead-of-time compiles for sm_80 / sm_90
# ------------------------------------------------------------------------------------------


def _compile(monkeypatch, selection):
    from pemoe.kernels.triton.aot import compile_module_in_subprocess, format_reports

    monkeypatch.setenv("PEMOE_AOT_SELECTION", selection)
    start = time.perf_counter()
    reports = compile_module_in_subprocess("pemoe.kernels.triton.mov_ffn_analysis")
    print(f"\n{len(reports)} compiles in {time.perf_counter() - start:.0f}s\n" + format_reports(reports))
    assert reports
    errors = [f"{r.name} sm_{r.capability}: {r.error}" for r in reports if r.error]
    assert not errors, "\n".join(errors)
    smem_limit = {80: 163 * 1024, 90: 227 * 1024}  # opt-in shared memory per block (A100, H100)
    for r in reports:
        assert r.shared_bytes <= smem_limit[r.capability], f"{r.kernel} {r.name}: {r.shared_bytes} B of shared memory"
        if r.default and (r.kernel, r.name, r.capability) not in analysis.KNOWN_SPILLS:
            # ptxas spills into the stack frame (cuobjdump STACK), not only LOCAL: both must be 0
            assert r.spill_bytes == 0 and r.stack_bytes == 0, (
                f"{r.kernel} {r.name} sm_{r.capability} spills: local {r.spill_bytes} B, stack {r.stack_bytes} B"
            )
        # wgmma needs 64-row warpgroup tiles: the decode configs (BLOCK_M < 64) use mma.sync
        big = r.constexprs.get("BLOCK_M", 0) >= 64 or r.default
        if r.capability == 90 and r.name.startswith("bf16") and r.kernel != "_router_backward_kernel" and big:
            assert r.uses_wgmma, f"{r.kernel} {r.name}: no wgmma on sm_90"
    return reports


def test_aot_default_configs_compile_without_spills(monkeypatch):
    reports = _compile(monkeypatch, "smoke")
    kernels_seen = {r.kernel for r in reports}
    assert kernels_seen == {*AUTOTUNED, "_router_backward_kernel"}
    assert {r.capability for r in reports} == {80, 90}


@pytest.mark.slow
def test_aot_every_config_compiles(monkeypatch):
    reports = _compile(monkeypatch, "all")
    assert {r.name.split()[0] for r in reports} == {"fp16", "bf16", "fp32"}
    spilled = {(r.kernel, r.name, r.capability) for r in reports if r.default and (r.spill_bytes or r.stack_bytes)}
    assert spilled == analysis.KNOWN_SPILLS  # the known spills still happen (else the list is stale)
