"""Bad input gets a clear ValueError/TypeError naming the argument (every implementation), and
the documented edge cases (empty batch, non-finite values, strided inputs) behave."""

from __future__ import annotations

import pytest
import torch

from pemoe import ops
from pemoe.ops import resolve_implementation

IMPLEMENTATIONS = ["reference", "torch", "auto"]
T, K, G, D, E, R = 6, 16, 2, 8, 3, 2
N = G * D


def mov_linear_args(**over):
    args = dict(x=torch.randn(T, K), weight=torch.randn(N, K), router=torch.randn(D, E), experts=torch.ones(G, E, D))
    args.update(over)
    return args


def molora_args(**over):
    args = dict(
        x=torch.randn(T, K),
        weight=torch.randn(N, K),
        lora_a=torch.randn(E, K, R),
        lora_b=torch.randn(E, R, N),
        router=torch.randn(K, E),
        scale=8.0,
    )
    args.update(over)
    return args


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "over,exc,match",
    [
        ({"experts": torch.ones(G, E, D + 1)}, ValueError, r"experts has shape \[2, 3, 9\].*width must be G\*D = 18"),
        ({"router": torch.randn(D, E + 1)}, ValueError, r"router must have shape \[8, 3\]"),
        ({"experts": torch.ones(G, 0, D), "router": torch.randn(D, 0)}, ValueError, r"E = 0"),
        ({"x": torch.randint(0, 3, (T, K))}, TypeError, r"x must be a floating tensor"),
        ({"x": torch.randn(T, K, dtype=torch.bfloat16)}, TypeError, r"x and weight must share one dtype"),
        ({"weight": torch.randn(N, K + 1)}, ValueError, r"weight must have shape \[N, K\] with K = x.shape\[-1\] = 16"),
        ({"bias": torch.randn(N + 1)}, ValueError, r"bias must have shape \[16\]"),
        ({"top_k": E + 1}, ValueError, r"top_k must be in \[1, num_experts=3\]"),
        ({"top_k": 0}, ValueError, r"top_k must be in"),
        ({"router": None}, ValueError, r"router is required when num_experts > 1"),
        ({"router_input": torch.randn(3, 5), "router": torch.randn(5, E)}, ValueError, r"router_input has shape"),
        ({"experts": torch.ones(G, E, D).to(torch.int32)}, TypeError, r"experts must be a floating tensor"),
        ({"x": [[1.0]]}, TypeError, r"x must be a torch.Tensor"),
    ],
)
def test_mov_linear_rejects(impl, over, exc, match):
    with pytest.raises(exc, match=match):
        ops.mov_linear(**mov_linear_args(**over), implementation=impl)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "over,exc,match",
    [
        ({"lora_a": torch.randn(E, K, 0), "lora_b": torch.randn(E, 0, N)}, ValueError, r"rank must be >= 1"),
        (
            {"lora_a": torch.randn(0, K, R), "lora_b": torch.randn(0, R, N), "router": torch.randn(K, 0)},
            ValueError,
            r"at least one expert",
        ),
        ({"lora_b": torch.randn(E + 1, R, N)}, ValueError, r"lora_b must have shape \[E, r, N\] = \[3, 2, 16\]"),
        ({"lora_b": torch.randn(E, R + 1, N)}, ValueError, r"lora_b must have shape"),
        ({"lora_b": torch.randn(E, R, N + 1)}, ValueError, r"lora_b must have shape"),
        ({"lora_a": torch.randn(E, K + 1, R)}, ValueError, r"lora_a must have shape \[E, K, r\] = \[3, 16, 2\]"),
        ({"router": torch.randn(K, E + 1)}, ValueError, r"router must have shape \[16, 3\]"),
        ({"router": torch.randn(K + 1, E)}, ValueError, r"router must have shape \[16, 3\]"),
        ({"x": torch.randn(T, K, dtype=torch.float16)}, TypeError, r"x and weight must share one dtype"),
        ({"x": torch.randint(0, 3, (T, K)), "weight": torch.randint(0, 3, (N, K))}, TypeError, r"floating"),
        ({"scale": torch.tensor(2.0)}, TypeError, r"scale must be a Python float"),
        ({"top_k": 4}, ValueError, r"top_k must be in \[1, num_experts=3\]"),
    ],
)
def test_molora_linear_rejects(impl, over, exc, match):
    with pytest.raises(exc, match=match):
        ops.molora_linear(**molora_args(**over), implementation=impl)


def test_mov_ffn_rejects():
    x, wi_0, wo = torch.randn(T, K), torch.randn(20, K), torch.randn(K, 20)
    with pytest.raises(ValueError, match=r"wo must have shape \[M, F\] = \[16, 20\]"):
        ops.mov_ffn(x, wi_0, wo.T, torch.randn(20, E), torch.ones(1, E, 20))
    with pytest.raises(ValueError, match=r"activation must be one of"):
        ops.mov_ffn(x, wi_0, wo, torch.randn(20, E), torch.ones(1, E, 20), activation="swish")
    with pytest.raises(ValueError, match=r"wi_1 must have wi_0's shape"):
        ops.mov_ffn(x, wi_0, wo, torch.randn(20, E), torch.ones(1, E, 20), wi_1=torch.randn(21, K))
    with pytest.raises(ValueError, match=r"wi_0 output width must be G\*D = 21"):
        ops.mov_ffn(x, wi_0, wo, torch.randn(21, E), torch.ones(1, E, 21))
    with pytest.raises(TypeError, match=r"x and wo must share one dtype, got x torch.float32 and wo torch.float64"):
        ops.mov_ffn(x, wi_0, wo.double(), torch.randn(20, E), torch.ones(1, E, 20))


def test_mov_rejects_width_mismatch():
    with pytest.raises(ValueError, match=r"h width must be G\*D = 16, got 15"):
        ops.mov(torch.randn(T, 15), torch.randn(D, E), torch.ones(G, E, D))


def test_unknown_and_missing_implementations():
    with pytest.raises(ValueError, match=r"unknown implementation 'cuda'.*'reference', 'torch'"):
        ops.mov_linear(**mov_linear_args(), implementation="cuda")
    with pytest.raises(NotImplementedError, match=r"mov: implementation='triton' does not exist"):
        ops.mov(torch.randn(T, G * D), torch.randn(D, E), torch.ones(G, E, D), implementation="triton")


def test_triton_refuses_devices_it_cannot_run_on(monkeypatch):
    """Asking for the Triton kernels where they cannot run raises; it never falls back."""
    from pemoe.kernels.triton import interpreter

    monkeypatch.setattr(interpreter, "INTERPRET", False)
    with pytest.raises(NotImplementedError, match=r"implementation='triton' cannot run here.*CUDA tensors.*got cpu"):
        ops.molora_linear(**molora_args(), implementation="triton")
    monkeypatch.setattr(interpreter, "INTERPRET", True)
    with pytest.raises(NotImplementedError, match=r"CPU tensors only, got meta"):
        resolve_implementation("mov_linear", "triton", torch.device("meta"))
    # "auto" never picks Triton on the CPU, interpreter or not: it is a correctness tool, not a fast path.
    assert resolve_implementation("mov_linear", "auto", torch.device("cpu")) == "torch"


def test_devices_must_match():
    meta = torch.randn(D, E, device="meta")
    with pytest.raises(ValueError, match=r"one device.*router on meta"):
        ops.mov_linear(**mov_linear_args(router=meta))
    with pytest.raises(ValueError, match=r"one device.*lora_b on meta"):
        ops.molora_linear(**molora_args(lora_b=torch.randn(E, R, N, device="meta")))


def test_auto_choice_is_reported(caplog):
    from pemoe.ops import _dispatch

    _dispatch._announced.clear()
    with caplog.at_level("INFO", logger="pemoe"):
        ops.mov_linear(**mov_linear_args())
    assert "implementation='auto' chose 'torch' on cpu" in caplog.text
    assert ops.resolve_implementation("mov_linear", "auto", torch.device("cpu")) == "torch"


# Every implementation of the three fused ops, Triton's (in the interpreter) included. Their inputs use a head
# width of 16 (the Triton MoV kernels take D in {16, 32, 64, 128}).
FUSED_IMPLEMENTATIONS = ["reference", "torch", "triton"]
TD, TF = 16, 24


def fused_args(op: str, t: int = T, **over) -> dict:
    """Valid inputs for ``op`` (mov_linear, mov_ffn or molora_linear) that every implementation accepts."""
    if op == "mov_linear":
        args = mov_linear_args(
            x=torch.randn(t, K), weight=torch.randn(G * TD, K), router=torch.randn(TD, E), experts=torch.ones(G, E, TD)
        )
    elif op == "mov_ffn":
        args = dict(
            x=torch.randn(t, K), wi_0=torch.randn(TF, K), wo=torch.randn(K, TF), router=torch.randn(TF, E),
            experts=1 + 0.1 * torch.randn(1, E, TF), wi_1=torch.randn(TF, K),
        )  # fmt: skip
    elif op == "molora_adapter":
        args = molora_args(x=torch.randn(t, K), base=torch.randn(t, N))
        del args["weight"]
    else:
        args = molora_args(x=torch.randn(t, K))
    args.update(over)
    return args


FUSED_OPS = ["mov_linear", "mov_ffn", "molora_linear", "molora_adapter"]
ADAPTER_PARAMS = {"mov_linear": ("router", "experts"), "mov_ffn": ("router", "experts"),
                  "molora_linear": ("lora_a", "lora_b", "router"),
                  "molora_adapter": ("lora_a", "lora_b", "router")}  # fmt: skip
#: The frozen base weights of the ops that take them (molora_adapter takes the base layer's output instead).
FROZEN = {"mov_linear": ("weight",), "mov_ffn": ("wi_0", "wi_1", "wo"), "molora_linear": ("weight",)}


@pytest.mark.parametrize("impl", FUSED_IMPLEMENTATIONS)
@pytest.mark.parametrize("op", FUSED_OPS)
def test_empty_batch(impl, op):
    """Zero tokens: every implementation returns the empty output, an empty dx and zero parameter gradients."""
    for lead in ((0,), (2, 0)):
        args = fused_args(op)
        args["x"] = torch.randn(*lead, K, requires_grad=True)
        if "base" in args:
            args["base"] = torch.randn(*lead, N)
        for name in ADAPTER_PARAMS[op]:
            args[name].requires_grad_()
        y = getattr(ops, op)(**args, implementation=impl)
        assert y.shape[:-1] == lead, (op, y.shape)
        y.sum().backward()
        assert args["x"].grad.shape == args["x"].shape
        for name in ADAPTER_PARAMS[op]:
            assert torch.equal(args[name].grad, torch.zeros_like(args[name])), name


@pytest.mark.parametrize("impl", FUSED_IMPLEMENTATIONS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_molora_scale_must_be_finite(impl, bad):
    with pytest.raises(ValueError, match=f"scale must be finite \\(alpha / r\\), got {bad}"):
        ops.molora_linear(**molora_args(scale=bad), implementation=impl)


@pytest.mark.parametrize(
    "op, impl", [(op, i) for op in FUSED_OPS for i in FUSED_IMPLEMENTATIONS] + [("mov", "reference"), ("mov", "torch")]
)
@pytest.mark.parametrize("bad", ["no", 1, None])
def test_renormalize_must_be_a_bool(impl, op, bad):
    if op == "mov":
        args = dict(h=torch.randn(T, G * D), router=torch.randn(D, E), experts=torch.ones(G, E, D))
    else:
        args = fused_args(op)
    with pytest.raises(TypeError, match=f"renormalize must be a bool, got {type(bad).__name__} {bad!r}"):
        getattr(ops, op)(**args, top_k=2, renormalize=bad, implementation=impl)


def test_layers_and_configs_refuse_bad_alpha_and_renormalize():
    from pemoe import MoLoRAConfig, MoVConfig
    from pemoe.layers import MoLoRALinear, MoV, MoVLinear

    base = torch.nn.Linear(K, N)
    with pytest.raises(ValueError, match="alpha must be finite"):
        MoLoRALinear(base, 2, 2, alpha=float("nan"))
    with pytest.raises(ValueError, match="MoLoRAConfig.alpha must be finite"):
        MoLoRAConfig(alpha=float("inf"))
    for make in (
        lambda: MoLoRALinear(base, 2, 2, top_k=1, renormalize="no"),
        lambda: MoVLinear(base, G, 2, top_k=1, renormalize="no"),
        lambda: MoV(G, D, 2, top_k=1, renormalize="no"),
    ):
        with pytest.raises(TypeError, match="renormalize must be a bool, got str 'no'"):
            make()
    for config in (MoVConfig, MoLoRAConfig):
        with pytest.raises(TypeError, match=f"{config.__name__}.renormalize must be a bool, got 'no'"):
            config(num_experts=2, top_k=1, renormalize="no")


@pytest.mark.parametrize("impl", FUSED_IMPLEMENTATIONS)
@pytest.mark.parametrize("op", FUSED_OPS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16_bit_adapter_parameters_are_computed_in_float32(impl, op, dtype):
    """One behaviour for every implementation: 16-bit adapter parameters give exactly what their float32
    values give, and their gradients come back in their own dtype."""
    args = fused_args(op)
    for name in ADAPTER_PARAMS[op]:
        args[name] = args[name].to(dtype).requires_grad_()
    upcast = {k: (v.detach().float().requires_grad_() if k in ADAPTER_PARAMS[op] else v) for k, v in args.items()}
    fn = getattr(ops, op)
    y, y32 = fn(**args, implementation=impl), fn(**upcast, implementation=impl)
    assert torch.equal(y, y32)
    g = torch.randn_like(y)
    y.backward(g)
    y32.backward(g)
    for name in ADAPTER_PARAMS[op]:
        assert args[name].grad.dtype == dtype, name
        assert torch.equal(args[name].grad, upcast[name].grad.to(dtype)), name


@pytest.mark.parametrize("impl", FUSED_IMPLEMENTATIONS)
@pytest.mark.parametrize("op", list(FROZEN))
def test_frozen_weights_that_require_grad_are_refused(impl, op):
    """SPEC §3: no implementation computes a base-weight gradient, so none accepts a weight that asks for one
    while autograd records; under torch.no_grad() the same call runs."""
    for name in FROZEN[op]:
        args = fused_args(op)
        args[name].requires_grad_()
        with pytest.raises(ValueError, match=f"{name} requires grad, but it is a frozen base weight"):
            getattr(ops, op)(**args, implementation=impl)
        with torch.no_grad():
            assert getattr(ops, op)(**args, implementation=impl).shape[0] == T


@pytest.mark.parametrize("impl", FUSED_IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "over,exc,match",
    [
        ({"base": torch.randn(T, N + 1)}, ValueError, r"base must have shape \[\.\.\., N\] = \[6, 16\]"),
        ({"base": torch.randn(T + 1, N)}, ValueError, r"base must have shape \[\.\.\., N\] = \[6, 16\]"),
        ({"base": torch.randn(T, N, dtype=torch.float64)}, TypeError, r"x and base must share one dtype"),
        ({"base": [[0.0]]}, TypeError, r"base must be a torch.Tensor"),
        ({"lora_b": torch.randn(E + 1, R, N)}, ValueError, r"lora_b must have shape \[E, r, N\] = \[3, 2, 16\]"),
        ({"lora_b": torch.randn(E, R, 0)}, ValueError, r"N >= 1 output features"),
        ({"lora_a": torch.randn(E, K + 1, R)}, ValueError, r"lora_a must have shape \[E, K, r\] = \[3, 16, 2\]"),
        ({"router": torch.randn(K, E + 1)}, ValueError, r"router must have shape \[16, 3\]"),
        ({"scale": float("nan")}, ValueError, r"scale must be finite"),
        ({"top_k": 4}, ValueError, r"top_k must be in \[1, num_experts=3\]"),
    ],
)
def test_molora_adapter_rejects(impl, over, exc, match):
    with pytest.raises(exc, match=match):
        ops.molora_adapter(**fused_args("molora_adapter", **over), implementation=impl)


def test_bias_must_share_the_activation_dtype():
    for impl in FUSED_IMPLEMENTATIONS:
        with pytest.raises(TypeError, match="x and bias must share one dtype"):
            ops.molora_linear(**molora_args(bias=torch.randn(N, dtype=torch.float64)), implementation=impl)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_non_finite_router_input_does_not_crash(impl):
    x = torch.randn(T, K)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    y = ops.mov_linear(**mov_linear_args(x=x), implementation=impl)
    assert y.shape == (T, N)
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[3:]).all()  # other tokens untouched
    y2 = ops.molora_linear(**molora_args(x=x), implementation=impl)
    assert y2.shape == (T, N) and torch.isfinite(y2[3:]).all()


def test_strided_inputs():
    x = torch.randn(K, T).t()  # non-contiguous
    args = mov_linear_args(x=x, weight=torch.randn(K, N).t())
    torch.testing.assert_close(
        ops.mov_linear(**args, implementation="torch"), ops.mov_linear(**args, implementation="reference")
    )
    args = molora_args(x=x[::1, :], lora_a=torch.randn(E, R, K).transpose(1, 2))
    torch.testing.assert_close(
        ops.molora_linear(**args, implementation="torch"), ops.molora_linear(**args, implementation="reference")
    )


def test_auto_picks_triton_for_cuda_tensors(monkeypatch):
    """On CUDA "auto" takes the Triton kernels where the op has them (no GPU here: only the choice is tested)."""
    from pemoe.kernels.triton import interpreter

    monkeypatch.setattr(interpreter, "INTERPRET", False)
    cuda = torch.device("cuda")
    for op in ("mov_linear", "mov_ffn", "molora_linear"):
        assert resolve_implementation(op, "auto", cuda) == "triton"
    assert resolve_implementation("mov", "auto", cuda) == "torch"  # no Triton kernel for the bare site


@pytest.mark.parametrize("op", FUSED_OPS)
def test_second_derivatives(op):
    """ "reference" (plain autograd) has exact second derivatives; "torch" and "triton" (hand-written
    backward passes) refuse them loudly instead of returning wrong ones."""
    args = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in fused_args(op, t=4).items()}
    names = ["x", *ADAPTER_PARAMS[op]]
    for name in names:
        args[name].requires_grad_()
    rest = {k: v for k, v in args.items() if k not in names}

    def fn(impl):
        return lambda *tensors: getattr(ops, op)(**dict(zip(names, tensors, strict=True)), **rest, implementation=impl)

    assert torch.autograd.gradgradcheck(fn("reference"), [args[n] for n in names])
    for impl in ("torch", "triton"):
        inputs = (
            dict(args)
            if impl == "torch"
            else {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
        )
        x = inputs["x"].detach().requires_grad_()
        inputs["x"] = x
        y = getattr(ops, op)(**inputs, implementation=impl)
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="once_differentiable"):
            gx.sum().backward()


@pytest.mark.parametrize("impl", FUSED_IMPLEMENTATIONS)
@pytest.mark.parametrize("op", FUSED_OPS)
def test_autocast_casts_activations_and_frozen_weights(impl, op):
    """Under torch.autocast every implementation computes what it computes on inputs cast to the autocast
    dtype (as nn.Linear does), returns that dtype, and leaves the adapter parameters' gradients float32."""
    args = fused_args(op)
    for name in ADAPTER_PARAMS[op]:
        args[name].requires_grad_()
    x = args["x"].requires_grad_()
    frozen = ("x", *FROZEN.get(op, ()), "bias", "base")
    cast = {k: (v.detach().bfloat16() if k in frozen and v is not None else v) for k, v in args.items()}
    want = getattr(ops, op)(**cast, implementation=impl)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = getattr(ops, op)(**args, implementation=impl)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    got.float().sum().backward()
    assert x.grad.dtype == torch.float32
    assert all(args[n].grad.dtype == torch.float32 for n in ADAPTER_PARAMS[op])
