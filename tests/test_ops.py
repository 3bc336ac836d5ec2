"""Every op's output and every gradient vs the reference, per implementation.

One shared test class per op; a subclass per implementation sets ``implementation``.
Tolerances follow the rule in tests/helpers.py.
"""

from __future__ import annotations

import pytest
import torch

from pemoe import ops
from pemoe.ops import molora as molora_module
from tests.helpers import assert_within_rule, cast_inputs, run_with_grads

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ACTIVATION_NAMES = ("x", "h", "weight", "bias", "base", "wi_0", "wi_1", "wo", "router_input")
# odd widths on purpose: not multiples of 16
K, G, D = 40, 3, 24


def _adapter(*shape, std, requires_grad=True):
    return (torch.randn(*shape) * std).requires_grad_(requires_grad)


def _experts(g, e, d):
    return (1.0 + 0.3 * torch.randn(g, e, d)).requires_grad_()


def _router(width, e, std=0.5):
    # larger than the 0.02 init so the routing is far from uniform and its gradient matters
    return None if e == 1 else _adapter(width, e, std=std)


class _OpCases:
    """Subclasses set ``implementation`` and ``op_name``, and build inputs in ``inputs()``."""

    implementation: str
    op_name: str
    out_dtype_source = "x"

    def call(self, implementation, **kw):
        return getattr(ops, self.op_name)(**kw, implementation=implementation)

    def check(self, inputs: dict, dtype: torch.dtype) -> None:
        args = cast_inputs(inputs, dtype, torch.float32, ACTIVATION_NAMES)
        args64 = cast_inputs(inputs, torch.float64, torch.float64, ACTIVATION_NAMES)
        probe, _ = run_with_grads(lambda **kw: self.call("reference", **kw), args64)
        grad_out = torch.randn(probe.shape, dtype=torch.float64)
        out, grads = run_with_grads(lambda **kw: self.call(self.implementation, **kw), args, grad_out)
        ref, ref_grads = run_with_grads(lambda **kw: self.call("reference", **kw), args, grad_out)
        truth, truth_grads = run_with_grads(lambda **kw: self.call("reference", **kw), args64, grad_out)
        assert out.dtype == args[self.out_dtype_source].dtype
        assert_within_rule(out, ref, truth, dtype, f"{self.op_name} output")
        assert set(grads) == set(truth_grads)
        for name in truth_grads:
            assert grads[name].dtype == args[name].dtype, f"d{name} dtype"
            assert_within_rule(grads[name], ref_grads[name], truth_grads[name], dtype, f"{self.op_name} d{name}")

    def gradcheck(self, inputs: dict) -> None:
        args = cast_inputs(inputs, torch.float64, torch.float64, ACTIVATION_NAMES)
        names = [k for k, v in args.items() if isinstance(v, torch.Tensor) and v.requires_grad]
        rest = {k: v for k, v in args.items() if k not in names}

        def f(*tensors):
            return self.call(self.implementation, **rest, **dict(zip(names, tensors, strict=True)))

        assert torch.autograd.gradcheck(f, tuple(args[n] for n in names), eps=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------
# mov (a MoV site on an activation) and mov_linear (fused with the frozen linear)
# ------------------------------------------------------------------------------------------


class MoVLinearCases(_OpCases):
    op_name = "mov_linear"
    groups, dim = G, D  # heads and head width of the inputs (a backend may need another D)

    def inputs(self, t, e, *, top_k=None, renormalize=False, sentence=False, bias=True, groups=None, dim=None):
        groups, dim = groups or self.groups, dim or self.dim
        n = groups * dim
        x = torch.randn(t, K, requires_grad=True)
        args = dict(
            x=x,
            weight=torch.randn(n, K) * K**-0.5,
            experts=_experts(groups, e, dim),
            top_k=top_k,
            renormalize=renormalize,
            bias=torch.randn(n) if bias else None,
        )
        if sentence:
            args["x"] = torch.randn(2, t, K, requires_grad=True)
            args["router_input"] = torch.randn(2, 9, requires_grad=True)
            args["router"] = _router(9, e)
        else:
            args["router"] = _router(dim, e)
        return args

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("t", [1, 7, 123])
    @pytest.mark.parametrize("e", [1, 2, 10, 60])
    def test_matches_reference(self, dtype, t, e):
        self.check(self.inputs(t, e), dtype)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("top_k,renormalize", [(1, False), (2, False), (2, True), (10, True)])
    def test_top_k(self, dtype, top_k, renormalize):
        self.check(self.inputs(33, 10, top_k=top_k, renormalize=renormalize), dtype)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("top_k", [None, 2])
    def test_sentence_routing(self, dtype, top_k):
        self.check(self.inputs(5, 4, sentence=True, top_k=top_k), dtype)

    def test_no_bias(self):
        self.check(self.inputs(7, 2, bias=False), torch.float32)

    @pytest.mark.parametrize("case", ["soft", "top2", "top2-renorm", "sentence", "ia3"])
    def test_gradcheck_float64(self, case):
        kw = {
            "soft": {},
            "top2": {"top_k": 2},
            "top2-renorm": {"top_k": 2, "renormalize": True},
            "sentence": {"sentence": True},
            "ia3": {},
        }[case]
        inputs = self.inputs(5, 1 if case == "ia3" else 4, **kw)
        inputs["bias"].requires_grad_()  # a trainable bias must get its gradient too
        self.gradcheck(inputs)


class MoVCases(_OpCases):
    op_name = "mov"
    out_dtype_source = "h"

    def inputs(self, t, e, **kw):
        return dict(h=torch.randn(t, G * D, requires_grad=True), router=_router(D, e), experts=_experts(G, e, D), **kw)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("e", [1, 2, 10, 60])
    def test_matches_reference(self, dtype, e):
        self.check(self.inputs(123, e), dtype)

    def test_leading_dims(self):
        inputs = self.inputs(1, 4)
        inputs["h"] = torch.randn(2, 3, 5, G * D, requires_grad=True)
        self.check(inputs, torch.float32)

    def test_gradcheck_float64(self):
        self.gradcheck(self.inputs(6, 3, top_k=2))


class MoVFFNCases(_OpCases):
    op_name = "mov_ffn"

    def inputs(self, t, e, *, gated=True, activation="gelu_new", **kw):
        m, f = K, 56
        args = dict(
            x=torch.randn(t, m, requires_grad=True),
            wi_0=torch.randn(f, m) * m**-0.5,
            wo=torch.randn(m, f) * f**-0.5,
            router=_router(f, e, std=0.2),
            experts=_experts(1, e, f),
            activation=activation,
            **kw,
        )
        if gated:
            args["wi_1"] = torch.randn(f, m) * m**-0.5
        return args

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("gated,activation", [(True, "gelu_new"), (False, "relu"), (True, "gelu"), (True, "silu")])
    @pytest.mark.parametrize("e", [1, 10])
    def test_matches_reference(self, dtype, gated, activation, e):
        self.check(self.inputs(37, e, gated=gated, activation=activation), dtype)

    def test_top_k(self):
        self.check(self.inputs(37, 10, top_k=3), torch.float32)

    def test_gradcheck_float64(self):
        self.gradcheck(self.inputs(5, 3))


# ------------------------------------------------------------------------------------------
# molora_linear
# ------------------------------------------------------------------------------------------


class MoLoRALinearCases(_OpCases):
    op_name = "molora_linear"

    def inputs(self, t, e, r=4, *, top_k=None, renormalize=False, sentence=False, bias=True):
        n = 72
        args = dict(
            x=torch.randn(t, K, requires_grad=True),
            weight=torch.randn(n, K) * K**-0.5,
            lora_a=_adapter(e, K, r, std=0.3),
            lora_b=_adapter(e, r, n, std=0.3),
            scale=16.0 / r,
            top_k=top_k,
            renormalize=renormalize,
            bias=torch.randn(n) if bias else None,
        )
        if sentence:
            args["x"] = torch.randn(2, t, K, requires_grad=True)
            args["router_input"] = torch.randn(2, 9, requires_grad=True)
            args["router"] = _router(9, e)
        else:
            args["router"] = _router(K, e)
        return args

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("t", [1, 7, 123])
    @pytest.mark.parametrize("e", [1, 2, 10, 60])
    def test_matches_reference(self, dtype, t, e):
        self.check(self.inputs(t, e), dtype)

    @pytest.mark.parametrize("r", [1, 16])
    def test_ranks(self, r):
        self.check(self.inputs(19, 3, r), torch.bfloat16)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("top_k,renormalize", [(1, False), (2, False), (2, True)])
    def test_top_k(self, dtype, top_k, renormalize):
        self.check(self.inputs(33, 10, top_k=top_k, renormalize=renormalize), dtype)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_sentence_routing(self, dtype):
        self.check(self.inputs(5, 4, sentence=True), dtype)

    @pytest.mark.parametrize("case", ["soft", "top2-renorm", "sentence", "lora"])
    def test_gradcheck_float64(self, case):
        kw = {"soft": {}, "top2-renorm": {"top_k": 2, "renormalize": True}, "sentence": {"sentence": True}, "lora": {}}[
            case
        ]
        inputs = self.inputs(5, 1 if case == "lora" else 4, 2, **kw)
        inputs["bias"].requires_grad_()
        self.gradcheck(inputs)


class MoLoRAAdapterCases(_OpCases):
    """molora_adapter: MoLoRA on top of a frozen layer's own output ``base`` (no frozen weight in the op)."""

    op_name = "molora_adapter"

    def inputs(self, t, e, r=4, *, top_k=None, renormalize=False, sentence=False, base=True):
        n = 72
        lead = (2, t) if sentence else (t,)
        args = dict(
            x=torch.randn(*lead, K, requires_grad=True),
            lora_a=_adapter(e, K, r, std=0.3),
            lora_b=_adapter(e, r, n, std=0.3),
            scale=16.0 / r,
            top_k=top_k,
            renormalize=renormalize,
            base=torch.randn(*lead, n, requires_grad=True) if base else None,
        )
        if sentence:
            args["router_input"] = torch.randn(2, 9, requires_grad=True)
            args["router"] = _router(9, e)
        else:
            args["router"] = _router(K, e)
        return args

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("t", [1, 7, 123])
    @pytest.mark.parametrize("e", [1, 2, 10])
    def test_matches_reference(self, dtype, t, e):
        """T = 1 in 16-bit is the hard case for d router: nothing averages the 16-bit roundings on its path
        (dp feeds the softmax backward, whose dp − Σ_e p·dp cancels), so dU′ = dy·B_catᵀ and dp must be
        float32-grade there ("torch": float32 U, dU′, dp; "triton": B_cat split into two 16-bit parts)."""
        self.check(self.inputs(t, e), dtype)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_without_base(self, dtype):
        self.check(self.inputs(19, 4, base=False), dtype)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("top_k,renormalize", [(1, False), (2, True)])
    def test_top_k(self, dtype, top_k, renormalize):
        self.check(self.inputs(33, 10, top_k=top_k, renormalize=renormalize), dtype)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_sentence_routing(self, dtype):
        self.check(self.inputs(5, 4, sentence=True), dtype)

    def test_equals_molora_linear_on_the_linears_output(self):
        """base = x Wᵀ + b gives molora_linear's output and gradients (float64: exact up to rounding)."""
        inputs = cast_inputs(self.inputs(23, 4), torch.float64, torch.float64, ACTIVATION_NAMES)
        weight, bias = torch.randn(72, K, dtype=torch.float64), torch.randn(72, dtype=torch.float64)
        inputs.pop("base")
        params = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad}

        def adapter(**kw):
            return ops.molora_adapter(**kw, base=torch.nn.functional.linear(kw["x"], weight, bias),
                                      implementation=self.implementation)  # fmt: skip

        def linear(**kw):
            return ops.molora_linear(**kw, weight=weight, bias=bias, implementation="reference")

        out, grads = run_with_grads(adapter, inputs)
        want, want_grads = run_with_grads(linear, inputs)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        assert set(grads) == set(want_grads) == set(params)
        for name in params:
            torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-10, atol=1e-10, msg=name)

    @pytest.mark.parametrize("case", ["soft", "sentence", "lora"])
    def test_gradcheck_float64(self, case):
        inputs = self.inputs(5, 1 if case == "lora" else 4, 2, sentence=case == "sentence")
        self.gradcheck(inputs)


class TestMoLoRAAdapterTorch(MoLoRAAdapterCases):
    implementation = "torch"


class TestMoVTorch(MoVCases):
    implementation = "torch"


class TestMoVLinearTorch(MoVLinearCases):
    implementation = "torch"


class TestMoVFFNTorch(MoVFFNCases):
    implementation = "torch"


class TestMoLoRALinearTorch(MoLoRALinearCases):
    implementation = "torch"


@pytest.mark.parametrize("cases", [TestMoLoRALinearTorch, TestMoLoRAAdapterTorch], ids=lambda c: c.op_name)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_molora_router_grad_at_one_token_over_seeds(cases, dtype):
    """d router at T = 1, E = 10 (no averaging over tokens; the softmax backward cancels) within the rule for
    ten seeds: the torch path keeps U, dU′ and dp float32 where the router reads 16-bit x."""
    for seed in range(10):
        torch.manual_seed(seed)
        cases().check(cases().inputs(1, 10), dtype)


class TestMoLoRALinearTorchFusedColumns(MoLoRALinearCases):
    """The ``"torch"`` forward that runs float32 x's shrink and router as extra columns of the base GEMM
    (pemoe.ops.molora.FUSED_COLUMNS_MIN_TOKENS tokens and more), here for every token count."""

    implementation = "torch"

    @pytest.fixture(autouse=True)
    def _fuse_columns_always(self, monkeypatch):
        monkeypatch.setattr(molora_module, "FUSED_COLUMNS_MIN_TOKENS", 1)


class TestMoLoRALinearAuto(MoLoRALinearCases):
    """ "auto" must resolve to a real implementation and pass the same checks."""

    implementation = "auto"


class TestMoVLinearAuto(MoVLinearCases):
    implementation = "auto"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_molora_fused_columns_output_layout_and_in_place_use(dtype):
    """At FUSED_COLUMNS_MIN_TOKENS tokens, float32 y is the first N columns of x·[Wᵀ | A_cat | router]
    (row stride padded to FUSED_COLUMNS_MULTIPLE) as a tensor of its own, not an autograd view: in-place
    ops on it work and give the gradients of the out-of-place ones. 16-bit x keeps separate GEMMs."""
    torch.manual_seed(0)
    t, k, n, e, r = molora_module.FUSED_COLUMNS_MIN_TOKENS, 40, 72, 5, 3
    x = torch.randn(2, t // 2, k).to(dtype).requires_grad_()
    weight, bias = (torch.randn(n, k) * k**-0.5).to(dtype), torch.randn(n).to(dtype)
    lora_a, lora_b, router = _adapter(e, k, r, std=0.3), _adapter(e, r, n, std=0.3), _adapter(k, e, std=0.5)
    leaves = (x, lora_a, lora_b, router)

    def run(in_place):
        y = ops.molora_linear(x, weight, lora_a, lora_b, router, scale=2.0, bias=bias, implementation="torch")
        y = y.mul_(3.0).add_(1.0) if in_place else y * 3.0 + 1.0
        return y, torch.autograd.grad(y.float().square().sum(), leaves)

    y, grads = run(True)
    y_ref, grads_ref = run(False)
    multiple = molora_module.FUSED_COLUMNS_MULTIPLE
    row = -(-(n + e * r + e) // multiple) * multiple if dtype == torch.float32 else n
    assert y.shape == (2, t // 2, n) and y.stride()[1:] == (row, 1)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_molora_fused_columns_compile_without_graph_breaks(tmp_path, monkeypatch):
    """Under torch.compile the fused-columns forward is not used (its storage sharing would break the graph):
    fullgraph compilation succeeds at FUSED_COLUMNS_MIN_TOKENS tokens and matches eager."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    t, k, n, e, r = molora_module.FUSED_COLUMNS_MIN_TOKENS, 24, 40, 3, 2
    x, weight = torch.randn(t, k), torch.randn(n, k)
    lora_a, lora_b, router = _adapter(e, k, r, std=0.3), _adapter(e, r, n, std=0.3), _adapter(k, e, std=0.5)

    def f(x):
        return ops.molora_linear(x, weight, lora_a, lora_b, router, scale=2.0, implementation="torch")

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x), rtol=1e-5, atol=1e-5)
