"""pemoe.jax ops: every output and every gradient vs the references, per implementation.

Ground truth is the PyTorch reference (:mod:`pemoe.reference`) in float64 on the same weights, so
these tests are also the cross-framework check (JAX float64 would need ``jax_enable_x64``, a global
switch; torch float64 needs none). The tolerance rule is tests/helpers.py's, on jax arrays:

    max|out - truth| <= 2 * max|ref - truth| + ATOL[dtype] * max(max|truth|, 1)

with ``out`` the implementation under test in dtype ``dt`` (activations and frozen weights in dt,
adapters float32), ``ref`` the JAX reference in the same dtypes, ``truth`` the torch float64 reference
from the same float32 draws. Gradients of every array argument (frozen weights and bias included)
are compared, through ``jax.vjp`` with one random cotangent.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.ad_checkpoint import print_saved_residuals

from pemoe import jax as pj
from pemoe import reference as torch_reference
from pemoe.jax import ops as jax_ops
from pemoe.jax import reference as jax_reference

ATOL = {
    jnp.dtype(jnp.float32): 2e-6,
    jnp.dtype(jnp.float16): 2**-10,
    jnp.dtype(jnp.bfloat16): 2**-7,
}
DTYPES = [jnp.float32, jnp.bfloat16]


def _id(v) -> str:
    return jnp.dtype(v).name if isinstance(v, type) else str(v)


# (dtype, T, E): every T in {1, 7, 123} and every E in {1, 2, 10} in each dtype (a covering design:
# each case is one XLA compile, ~1 s); the full product runs under -m slow.
SHAPES = [
    (jnp.float32, 1, 2),
    (jnp.float32, 7, 10),
    (jnp.float32, 123, 1),
    (jnp.float32, 123, 10),
    (jnp.bfloat16, 1, 10),
    (jnp.bfloat16, 7, 1),
    (jnp.bfloat16, 123, 2),
    (jnp.bfloat16, 123, 10),
]
ALL_SHAPES = [
    pytest.param(dt, t, e, marks=pytest.mark.slow)
    for dt in DTYPES
    for t in (1, 7, 123)
    for e in (1, 2, 10)
    if (dt, t, e) not in SHAPES
]
ACTIVATION_NAMES = ("x", "h", "weight", "bias", "wi_0", "wi_1", "wo", "router_input")
# odd widths on purpose: not multiples of 8 or 128
K, G, D = 40, 3, 24


def assert_within_rule(out, ref, truth, dtype, what: str) -> None:
    """The tests/helpers.py rule on numpy/jax/torch arrays (compared in float64)."""
    out64, ref64, truth64 = (np.asarray(a, dtype=np.float64) for a in (out, ref, truth))
    assert out64.shape == truth64.shape, f"{what}: shape {out64.shape} != {truth64.shape}"
    assert np.isfinite(out64).all(), f"{what}: non-finite values"
    if out64.size == 0:
        return
    err = np.abs(out64 - truth64).max()
    ref_err = np.abs(ref64 - truth64).max()
    bound = 2 * ref_err + ATOL[jnp.dtype(dtype)] * max(np.abs(truth64).max(), 1.0)
    assert err <= bound, f"{what}: max error {err:.3e} > bound {bound:.3e} (reference error {ref_err:.3e})"


def torch_truth(op: str, arrays: dict, static: dict, grad_out: np.ndarray | None = None, dtype=torch.float64):
    """The torch reference on the same values: (output, {name: grad}, grad_out), grads of every array."""
    leaves = {k: torch.tensor(v, dtype=dtype, requires_grad=True) for k, v in arrays.items()}
    out = getattr(torch_reference, op)(**leaves, **static)
    if grad_out is None:
        grad_out = np.random.default_rng(1).standard_normal(out.shape)
    grads = torch.autograd.grad(out, list(leaves.values()), torch.tensor(grad_out, dtype=dtype), allow_unused=True)
    grads = {k: (torch.zeros_like(leaves[k]) if g is None else g) for k, g in zip(leaves, grads, strict=True)}
    return out.detach().numpy(), {k: g.numpy() for k, g in grads.items()}, grad_out


def jax_run(op: str, implementation: str, arrays: dict, static: dict, grad_out: np.ndarray):
    """(output, {name: grad}) of pemoe.jax.<op> through jax.vjp, eagerly."""

    def f(arrs):
        return getattr(pj, op)(**arrs, **static, implementation=implementation)

    out, vjp = jax.vjp(f, arrays)
    (grads,) = vjp(jnp.asarray(grad_out, dtype=out.dtype))
    return out, grads


def jax_run_jit(op: str, implementations: tuple[str, ...], arrays: dict, static: dict, grad_out: np.ndarray):
    """[(output, {name: grad}) per implementation], all under one ``jax.jit`` (one compile per case)."""

    def run(arrs, g, implementation):
        out, vjp = jax.vjp(lambda a: getattr(pj, op)(**a, **static, implementation=implementation), arrs)
        return out, vjp(g.astype(out.dtype))[0]

    fn = jax.jit(lambda arrs, g: [run(arrs, g, impl) for impl in implementations])
    return fn(arrays, jnp.asarray(grad_out, dtype=jnp.float32))


def cast(inputs: dict, dtype) -> tuple[dict, dict]:
    """Split into (jax arrays: activations/frozen weights in dtype, adapters float32; static kwargs)."""
    arrays = {
        k: jnp.asarray(v, dtype=dtype if k in ACTIVATION_NAMES else jnp.float32)
        for k, v in inputs.items()
        if isinstance(v, np.ndarray)
    }
    return arrays, {k: v for k, v in inputs.items() if not isinstance(v, np.ndarray)}


def check(op: str, inputs: dict, dtype, implementation: str = "xla", *, jit: bool = True) -> None:
    """Output and every gradient of ``implementation`` vs the JAX reference and the torch float64 truth."""
    numpy_arrays = {k: v for k, v in inputs.items() if isinstance(v, np.ndarray)}
    arrays, static = cast(inputs, dtype)
    truth, truth_grads, grad_out = torch_truth(op, numpy_arrays, static)
    if jit:
        (out, grads), (ref, ref_grads) = jax_run_jit(op, (implementation, "reference"), arrays, static, grad_out)
    else:
        out, grads = jax_run(op, implementation, arrays, static, grad_out)
        ref, ref_grads = jax_run(op, "reference", arrays, static, grad_out)
    source = "h" if "h" in arrays else "x"
    assert out.dtype == arrays[source].dtype
    assert_within_rule(out, ref, truth, dtype, f"{op} output")
    assert set(grads) == set(truth_grads)
    for name in truth_grads:
        assert grads[name].dtype == arrays[name].dtype, f"d{name} dtype"
        assert_within_rule(grads[name], ref_grads[name], truth_grads[name], dtype, f"{op} d{name}")


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


# ------------------------------------------------------------------------------------------
# input factories (numpy float32 draws; routers larger than the 0.02 init so routing matters)
# ------------------------------------------------------------------------------------------


def mov_linear_inputs(t, e, *, top_k=None, renormalize=False, sentence=False, bias=True, seed=0, dim=D):
    rng = _rng(seed)
    n = G * dim
    args = dict(
        x=_f32(rng.standard_normal((t, K))),
        weight=_f32(rng.standard_normal((n, K)) * K**-0.5),
        experts=_f32(1.0 + 0.3 * rng.standard_normal((G, e, dim))),
        top_k=top_k,
        renormalize=renormalize,
    )
    if bias:
        args["bias"] = _f32(rng.standard_normal(n))
    if sentence:
        args["x"] = _f32(rng.standard_normal((2, t, K)))
        args["router_input"] = _f32(rng.standard_normal((2, 9)))
        args["router"] = _f32(0.5 * rng.standard_normal((9, e)))
    elif e > 1:
        args["router"] = _f32(0.5 * rng.standard_normal((dim, e)))
    else:
        args["router"] = None
    return args


def mov_inputs(t, e, *, seed=0, **kw):
    rng = _rng(seed)
    return dict(
        h=_f32(rng.standard_normal((t, G * D))),
        router=_f32(0.5 * rng.standard_normal((D, e))) if e > 1 else None,
        experts=_f32(1.0 + 0.3 * rng.standard_normal((G, e, D))),
        **kw,
    )


def mov_ffn_inputs(t, e, *, gated=True, activation="gelu_new", seed=0, **kw):
    rng = _rng(seed)
    m, f = K, 56
    args = dict(
        x=_f32(rng.standard_normal((t, m))),
        wi_0=_f32(rng.standard_normal((f, m)) * m**-0.5),
        wo=_f32(rng.standard_normal((m, f)) * f**-0.5),
        router=_f32(0.2 * rng.standard_normal((f, e))) if e > 1 else None,
        experts=_f32(1.0 + 0.3 * rng.standard_normal((1, e, f))),
        activation=activation,
        **kw,
    )
    if gated:
        args["wi_1"] = _f32(rng.standard_normal((f, m)) * m**-0.5)
    return args


def molora_inputs(t, e, r=4, *, top_k=None, renormalize=False, sentence=False, bias=True, seed=0):
    rng = _rng(seed)
    n = 72
    args = dict(
        x=_f32(rng.standard_normal((t, K))),
        weight=_f32(rng.standard_normal((n, K)) * K**-0.5),
        lora_a=_f32(0.3 * rng.standard_normal((e, K, r))),
        lora_b=_f32(0.3 * rng.standard_normal((e, r, n))),
        scale=16.0 / r,
        top_k=top_k,
        renormalize=renormalize,
    )
    if bias:
        args["bias"] = _f32(rng.standard_normal(n))
    if sentence:
        args["x"] = _f32(rng.standard_normal((2, t, K)))
        args["router_input"] = _f32(rng.standard_normal((2, 9)))
        args["router"] = _f32(0.5 * rng.standard_normal((9, e)))
    else:
        args["router"] = _f32(0.5 * rng.standard_normal((K, e))) if e > 1 else None
    return args


# ------------------------------------------------------------------------------------------
# the JAX reference is the torch reference (float32, tight: within the rule against float64)
# ------------------------------------------------------------------------------------------

REFERENCE_CASES = {
    "mov": lambda: mov_inputs(7, 4, top_k=2, renormalize=True),
    "mov-ia3": lambda: mov_inputs(7, 1),
    "mov_linear": lambda: mov_linear_inputs(7, 4),
    "mov_linear-sentence": lambda: mov_linear_inputs(3, 4, sentence=True, top_k=2),
    "mov_ffn": lambda: mov_ffn_inputs(7, 3),
    "mov_ffn-relu": lambda: mov_ffn_inputs(7, 3, gated=False, activation="relu"),
    "mov_ffn-gelu": lambda: mov_ffn_inputs(7, 3, activation="gelu", top_k=1),
    "mov_ffn-silu": lambda: mov_ffn_inputs(7, 3, activation="silu"),
    "molora_linear": lambda: molora_inputs(7, 4, top_k=2),
    "molora_linear-lora": lambda: molora_inputs(7, 1),
    "molora_linear-sentence": lambda: molora_inputs(3, 4, sentence=True),
}


@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_reference_matches_torch_reference(case):
    op = case.split("-")[0]
    inputs = REFERENCE_CASES[case]()
    numpy_arrays = {k: v for k, v in inputs.items() if isinstance(v, np.ndarray)}
    arrays, static = cast(inputs, jnp.float32)
    truth, truth_grads, grad_out = torch_truth(op, numpy_arrays, static)
    torch32, torch32_grads, _ = torch_truth(op, numpy_arrays, static, grad_out, dtype=torch.float32)
    ((out, grads),) = jax_run_jit(op, ("reference",), arrays, static, grad_out)
    assert_within_rule(out, torch32, truth, jnp.float32, f"{case} output")
    np.testing.assert_allclose(np.asarray(out), torch32, rtol=1e-5, atol=1e-5)
    for name in truth_grads:
        assert_within_rule(grads[name], torch32_grads[name], truth_grads[name], jnp.float32, f"{case} d{name}")


# ------------------------------------------------------------------------------------------
# "xla" vs the reference: outputs and every gradient, float32 and bfloat16, odd shapes
# ------------------------------------------------------------------------------------------


class TestMoVLinear:
    @pytest.mark.parametrize("dtype,t,e", SHAPES + ALL_SHAPES, ids=_id)
    def test_matches_reference(self, dtype, t, e):
        check("mov_linear", mov_linear_inputs(t, e), dtype)

    @pytest.mark.parametrize(
        "dtype,top_k,renormalize",
        [(jnp.float32, 1, False), (jnp.float32, 2, False), (jnp.float32, 10, True), (jnp.bfloat16, 2, True)],
        ids=_id,
    )
    def test_top_k(self, dtype, top_k, renormalize):
        check("mov_linear", mov_linear_inputs(33, 10, top_k=top_k, renormalize=renormalize), dtype)

    @pytest.mark.parametrize("dtype", DTYPES, ids=_id)
    def test_sentence_routing(self, dtype):
        check("mov_linear", mov_linear_inputs(5, 4, sentence=True, top_k=2), dtype)

    def test_no_bias_eager(self):
        check("mov_linear", mov_linear_inputs(7, 2, bias=False), jnp.float32, jit=False)

    def test_float16(self):
        check("mov_linear", mov_linear_inputs(7, 10), jnp.float16)


class TestMoV:
    @pytest.mark.parametrize(
        "dtype,e", [(jnp.float32, 2), (jnp.float32, 10), (jnp.bfloat16, 1), (jnp.bfloat16, 10)], ids=_id
    )
    def test_matches_reference(self, dtype, e):
        check("mov", mov_inputs(123, e), dtype)

    def test_leading_dims(self):
        inputs = mov_inputs(1, 4, top_k=3)
        inputs["h"] = _f32(_rng(3).standard_normal((2, 3, 5, G * D)))
        check("mov", inputs, jnp.float32)


class TestMoVFFN:
    @pytest.mark.parametrize(
        "dtype,gated,activation,e",
        [
            (jnp.float32, True, "gelu_new", 10),
            (jnp.float32, False, "relu", 1),
            (jnp.bfloat16, True, "gelu_new", 1),
            (jnp.bfloat16, False, "relu", 10),
        ],
        ids=_id,
    )
    def test_matches_reference(self, dtype, gated, activation, e):
        check("mov_ffn", mov_ffn_inputs(37, e, gated=gated, activation=activation), dtype)

    def test_top_k_sentence(self):
        inputs = mov_ffn_inputs(1, 4, top_k=2, renormalize=True)
        inputs["x"] = _f32(_rng(2).standard_normal((2, 3, K)))
        inputs["router_input"] = _f32(_rng(4).standard_normal((2, 9)))
        inputs["router"] = _f32(0.5 * _rng(5).standard_normal((9, 4)))
        check("mov_ffn", inputs, jnp.float32)


class TestMoLoRALinear:
    @pytest.mark.parametrize("dtype,t,e", SHAPES + ALL_SHAPES, ids=_id)
    def test_matches_reference(self, dtype, t, e):
        check("molora_linear", molora_inputs(t, e), dtype)

    @pytest.mark.parametrize("r", [1, 16])
    def test_ranks(self, r):
        check("molora_linear", molora_inputs(19, 3, r), jnp.bfloat16)

    @pytest.mark.parametrize(
        "dtype,top_k,renormalize",
        [(jnp.float32, 1, False), (jnp.float32, 2, True), (jnp.bfloat16, 2, False)],
        ids=_id,
    )
    def test_top_k(self, dtype, top_k, renormalize):
        check("molora_linear", molora_inputs(33, 10, top_k=top_k, renormalize=renormalize), dtype)

    @pytest.mark.parametrize("dtype", DTYPES, ids=_id)
    def test_sentence_routing(self, dtype):
        check("molora_linear", molora_inputs(5, 4, sentence=True), dtype)

    def test_no_bias_float16(self):
        check("molora_linear", molora_inputs(7, 2, bias=False), jnp.float16)


# ------------------------------------------------------------------------------------------
# jit, memory (saved residuals), dispatch
# ------------------------------------------------------------------------------------------


def test_jit_matches_eager():
    arrays, static = cast(molora_inputs(7, 3, top_k=2), jnp.float32)
    eager = pj.molora_linear(**arrays, **static)
    jitted = jax.jit(lambda a: pj.molora_linear(**a, **static))(arrays)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-6, atol=1e-6)
    arrays, static = cast(mov_linear_inputs(7, 3), jnp.float32)
    eager = pj.mov_linear(**arrays, **static)
    jitted = jax.jit(lambda a: pj.mov_linear(**a, **static))(arrays)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-6, atol=1e-6)


def _residuals(capsys, f, *args) -> list[str]:
    print_saved_residuals(f, *args)
    return [line for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_mov_linear_saves_no_float32_activation(capsys):
    """bf16 mov_linear, adapters trained: the only [T, N] residual is h in bf16, plus p float32 [T, G, E]."""
    t, e, n = 123, 10, G * D
    arrays, static = cast(mov_linear_inputs(t, e), jnp.bfloat16)
    x, weight, bias = arrays.pop("x"), arrays.pop("weight"), arrays.pop("bias")

    def loss(adapters, impl):
        return pj.mov_linear(x, weight, bias=bias, **adapters, **static, implementation=impl).astype(jnp.float32).sum()

    saved = _residuals(capsys, lambda a: loss(a, "xla"), arrays)
    assert not any(f"f32[{t},{n}]" in s or f"f32[{t},{G},{D}]" in s for s in saved), saved
    assert sum(f"bf16[{t},{G},{D}]" in s or f"bf16[{t},{n}]" in s for s in saved) == 1, saved
    assert any(f"f32[{t},{G},{e}]" in s for s in saved), saved
    # the plain-autodiff reference keeps float32 copies of the activation: the custom_vjp is worth having
    saved_ref = _residuals(capsys, lambda a: loss(a, "reference"), arrays)
    assert any(f"f32[{t},{G},{D}]" in s or f"f32[{t},{n}]" in s for s in saved_ref), saved_ref


def test_molora_never_builds_t_e_n(capsys):
    t, e, r, n = 123, 10, 4, 72
    arrays, static = cast(molora_inputs(t, e, r), jnp.float32)
    x, weight, bias = arrays.pop("x"), arrays.pop("weight"), arrays.pop("bias")

    def loss(adapters, impl):
        return pj.molora_linear(x, weight, bias=bias, **adapters, **static, implementation=impl).sum()

    saved = _residuals(capsys, lambda a: loss(a, "xla"), arrays)
    assert not any(f"[{t},{e},{n}]" in s or f"[{t},{n}]" in s for s in saved), saved
    assert any(f"f32[{t},{e * r}]" in s for s in saved) and any(f"f32[{t},{e}]" in s for s in saved), saved
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda a: loss(a, "xla")))(arrays))
    assert f"[{t},{e},{n}]" not in jaxpr
    jaxpr_ref = str(jax.make_jaxpr(jax.grad(lambda a: loss(a, "reference")))(arrays))
    assert f"[{t},{e},{n}]" in jaxpr_ref  # the authors' formulation, kept in the reference


XL_SPECS = {  # T5 v1.1 XL widths: d_model 2048, 32 heads of d_kv 64, d_ff 5120; E = 10, r = 4; 2048 tokens
    "mov": dict(h=((2048, 2048), "act"), router=((64, 10), "f32"), experts=((32, 10, 64), "f32")),
    "mov_linear": dict(
        x=((2048, 2048), "act"), weight=((2048, 2048), "act"), router=((64, 10), "f32"), experts=((32, 10, 64), "f32")
    ),
    "mov_ffn": dict(
        x=((2048, 2048), "act"),
        wi_0=((5120, 2048), "act"),
        wi_1=((5120, 2048), "act"),
        wo=((2048, 5120), "act"),
        router=((5120, 10), "f32"),
        experts=((1, 10, 5120), "f32"),
    ),
    "molora_linear": dict(
        x=((2048, 2048), "act"),
        weight=((2048, 2048), "act"),
        lora_a=((10, 2048, 4), "f32"),
        lora_b=((10, 4, 2048), "f32"),
        router=((2048, 10), "f32"),
    ),
}


@pytest.mark.parametrize("op", list(XL_SPECS))
def test_xla_ops_export_for_tpu_at_t5_xl(op):
    """Forward and the adapters' gradient (a training step's op) lower for TPU at T5-XL shapes."""
    specs = {
        k: jax.ShapeDtypeStruct(shape, jnp.bfloat16 if kind == "act" else jnp.float32)
        for k, (shape, kind) in XL_SPECS[op].items()
    }
    static = {"scale": 4.0} if op == "molora_linear" else {}
    adapters = [k for k in specs if k in ("router", "experts", "lora_a", "lora_b")]

    def step(arrays):
        def loss(trainable):
            out = getattr(pj, op)(**{**arrays, **trainable}, **static, implementation="xla")
            return out.astype(jnp.float32).sum()

        return jax.value_and_grad(loss)({k: arrays[k] for k in adapters})

    exported = jax.export.export(jax.jit(step), platforms=["tpu"])(specs)
    assert exported.platforms == ("tpu",)
    assert [a.shape for a in exported.out_avals[1:]] == [specs[k].shape for k in sorted(adapters)]


def test_auto_chooses_xla_and_logs(caplog):
    jax_ops._announced.clear()
    arrays, static = cast(mov_linear_inputs(3, 2), jnp.float32)
    with caplog.at_level(logging.INFO, logger="pemoe"):
        y = pj.mov_linear(**arrays, **static)
    assert "pemoe.jax.mov_linear: implementation='auto' chose 'xla' on cpu" in caplog.text
    assert pj.resolve_implementation("mov_linear", "auto") == "xla"
    np.testing.assert_array_equal(np.asarray(y), np.asarray(pj.mov_linear(**arrays, **static, implementation="xla")))


@pytest.mark.parametrize("impl", ["pallas", "triton"])
def test_planned_implementations_raise(impl):
    arrays, static = cast(mov_inputs(3, 2), jnp.float32)  # mov has neither (molora_linear has "pallas")
    with pytest.raises(NotImplementedError, match=f"implementation='{impl}' does not exist yet"):
        pj.mov(**arrays, **static, implementation=impl)


def test_pallas_needs_tpu_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("PEMOE_PALLAS_INTERPRET", raising=False)
    arrays, static = cast(mov_linear_inputs(3, 2), jnp.float32)
    with pytest.raises(NotImplementedError, match="runs on TPU .* PEMOE_PALLAS_INTERPRET=1"):
        pj.mov_linear(**arrays, **static, implementation="pallas")


def test_unknown_implementation():
    arrays, static = cast(mov_inputs(3, 2), jnp.float32)
    with pytest.raises(ValueError, match="unknown implementation 'cuda'"):
        pj.mov(**arrays, **static, implementation="cuda")


@pytest.mark.parametrize("impl", ["reference", "xla", "pallas", "triton"])
def test_empty_batch(impl, monkeypatch):
    """Zero tokens: every implementation returns the empty output, an empty dx and zero parameter gradients."""
    monkeypatch.setenv("PEMOE_PALLAS_INTERPRET", "1")
    cases = [
        ("mov_linear", mov_linear_inputs(1, 3, dim=16), (0, K), "router"),  # D = 16: every kernel's head width
        ("mov_ffn", mov_ffn_inputs(1, 3), (0, K), "experts"),
        ("molora_linear", molora_inputs(1, 3), (2, 0, K), "lora_a"),
    ]
    for op, inputs, x_shape, param in cases:
        arrays, static = cast(inputs, jnp.float32)
        arrays["x"] = jnp.zeros(x_shape)
        y, vjp = jax.vjp(lambda a, op=op, static=static: getattr(pj, op)(**a, **static, implementation=impl), arrays)
        assert y.shape[:-1] == x_shape[:-1], op
        (grads,) = vjp(jnp.ones_like(y))
        assert grads["x"].shape == x_shape, op
        assert grads[param].shape == arrays[param].shape and not np.asarray(grads[param]).any(), op


# ------------------------------------------------------------------------------------------
# bad input: a clear ValueError / TypeError naming the argument, at trace time
# ------------------------------------------------------------------------------------------


def _mov_linear_call(**change):
    arrays, static = cast(mov_linear_inputs(3, 4), jnp.float32)
    kw = {**arrays, **static, **change}
    return lambda: pj.mov_linear(**kw)


def _molora_call(**change):
    arrays, static = cast(molora_inputs(3, 4), jnp.float32)
    kw = {**arrays, **static, **change}
    return lambda: pj.molora_linear(**kw)


def _mov_call(**change):
    arrays, static = cast(mov_inputs(3, 4), jnp.float32)
    kw = {**arrays, **static, **change}
    return lambda: pj.mov(**kw)


def _ffn_call(**change):
    arrays, static = cast(mov_ffn_inputs(3, 4), jnp.float32)
    kw = {**arrays, **static, **change}
    return lambda: pj.mov_ffn(**kw)


BAD_INPUTS = {
    "x not an array": (lambda: _mov_linear_call(x=[[1.0] * K])(), TypeError, "x must be a jax.Array"),
    "x int": (lambda: _mov_linear_call(x=jnp.ones((3, K), jnp.int32))(), TypeError, "x must be a floating"),
    "weight K": (lambda: _mov_linear_call(weight=jnp.ones((G * D, K + 1)))(), ValueError, r"weight must have shape"),
    "weight dtype": (
        lambda: _mov_linear_call(weight=jnp.ones((G * D, K), jnp.bfloat16))(),
        TypeError,
        "x and weight must share one dtype",
    ),
    "bias N": (lambda: _mov_linear_call(bias=jnp.ones(5))(), ValueError, r"bias must have shape \[72\]"),
    "experts ndim": (lambda: _mov_linear_call(experts=jnp.ones((G, D)))(), ValueError, "experts must have 3"),
    "experts E=0": (lambda: _mov_linear_call(experts=jnp.ones((G, 0, D)))(), ValueError, "E = 0"),
    "experts G*D": (lambda: _mov_linear_call(experts=jnp.ones((2, 4, D)))(), ValueError, "must be G\\*D = 48"),
    "router shape": (
        lambda: _mov_linear_call(router=jnp.ones((D + 1, 4)))(),
        ValueError,
        r"router must have shape \[24, 4\]",
    ),
    "router missing": (lambda: _mov_linear_call(router=None)(), ValueError, "router is required"),
    "top_k too big": (lambda: _mov_linear_call(top_k=5)(), ValueError, r"top_k must be in \[1, num_experts=4\]"),
    "top_k type": (lambda: _mov_linear_call(top_k=2.0)(), TypeError, "top_k must be an int"),
    "router_input shape": (
        lambda: _mov_linear_call(router_input=jnp.ones((5, 9)))(),
        ValueError,
        "router_input has shape",
    ),
    "mov h width": (lambda: _mov_call(h=jnp.ones((3, G * D + 1)))(), ValueError, "h width must be G\\*D"),
    "mov h 0-d": (lambda: _mov_call(h=jnp.float32(1.0))(), ValueError, "h must have at least 1"),
    "lora_a rank 0": (lambda: _molora_call(lora_a=jnp.ones((4, K, 0)))(), ValueError, "rank must be >= 1"),
    "lora_a E=0": (lambda: _molora_call(lora_a=jnp.ones((0, K, 4)))(), ValueError, "at least one expert"),
    "lora_a K": (lambda: _molora_call(lora_a=jnp.ones((4, K + 1, 4)))(), ValueError, "lora_a must have shape"),
    "lora_b shape": (
        lambda: _molora_call(lora_b=jnp.ones((4, 3, 72)))(),
        ValueError,
        r"lora_b must have shape \[E, r, N\] = \[4, 4, 72\]",
    ),
    "scale array": (lambda: _molora_call(scale=jnp.float32(4.0))(), TypeError, "scale must be a Python float"),
    "molora router": (lambda: _molora_call(router=jnp.ones((K, 3)))(), ValueError, r"router must have shape \[40, 4\]"),
    "ffn activation": (lambda: _ffn_call(activation="swish")(), ValueError, "activation must be one of"),
    "ffn wo": (lambda: _ffn_call(wo=jnp.ones((K, 55)))(), ValueError, r"wo must have shape \[M, F\] = \[40, 56\]"),
    "ffn wi_1": (lambda: _ffn_call(wi_1=jnp.ones((55, K)))(), ValueError, "wi_1 must have wi_0's shape"),
    "ffn wo dtype": (
        lambda: _ffn_call(wo=jnp.ones((K, 56), jnp.bfloat16))(),
        TypeError,
        "x and wo must share one dtype, got x float32 and wo bfloat16",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(case):
    call, exc, match = BAD_INPUTS[case]
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize(
    "op, impl",
    [
        (op, impl)
        for op in ("mov_linear", "mov_ffn", "molora_linear")
        for impl in ("reference", "xla", "pallas", "triton")
    ]
    + [("mov", "reference"), ("mov", "xla")],
)
def test_scale_and_renormalize_are_checked_by_every_implementation(op, impl, monkeypatch):
    monkeypatch.setenv("PEMOE_PALLAS_INTERPRET", "1")
    call = {"mov": _mov_call, "mov_linear": _mov_linear_call, "mov_ffn": _ffn_call, "molora_linear": _molora_call}[op]
    with pytest.raises(TypeError, match="renormalize must be a bool, got str 'no'"):
        call(top_k=2, renormalize="no", implementation=impl)()
    if op == "molora_linear":
        for bad in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match=f"scale must be finite \\(alpha / r\\), got {bad}"):
                call(scale=bad, implementation=impl)()


def test_pallas_mov_ffn_names_the_experts_when_their_count_differs_from_the_router():
    from pemoe.jax import pallas

    arrays, static = cast(mov_ffn_inputs(3, 4), jnp.float32)
    experts = jnp.ones((1, 5, arrays["experts"].shape[2]))
    with pytest.raises(
        ValueError, match=r"experts must be \[1, E, F\] with E = 4 \(the router's E\), got shape \[1, 5, 56\]"
    ):
        pallas.mov_ffn(
            arrays["x"], arrays["wi_0"], arrays["wo"], arrays["router"], experts, wi_1=arrays["wi_1"], interpret=True
        )
    with pytest.raises(
        ValueError, match=r"router must have shape \[56, 5\] .*num_experts = 5 from experts \[1, 5, 56\]"
    ):
        _ffn_call(experts=experts, implementation="pallas")()


def test_bad_input_raises_at_trace_time():
    arrays, static = cast(molora_inputs(3, 4), jnp.float32)
    arrays["lora_b"] = jnp.ones((4, 3, 72))
    with pytest.raises(ValueError, match="lora_b must have shape"):
        jax.jit(lambda a: pj.molora_linear(**a, **static)).lower(arrays)


def test_reference_module_has_the_public_ops():
    for op in ("mov", "mov_linear", "mov_ffn", "molora_linear"):
        assert callable(getattr(jax_reference, op)) and op in pj.AVAILABLE


@pytest.mark.parametrize("op", ["mov_linear", "mov_ffn", "molora_linear"])
def test_xla_bf16_products_accumulate_in_float32(op):
    """Every dot of the bf16 ``"xla"`` forward asks for a float32 result (``preferred_element_type``), rounded
    afterwards: the numerics SPEC §5 asks for, and the only form in which XLA CPU runs bf16 dots natively
    (pemoe.jax.xla.linear). Checked on the jaxpr with the frozen weights passed the way the Flax layers pass
    them, as the transpose of an [in, out] kernel."""
    t = 33
    if op == "mov_linear":
        arrays, static = cast(mov_linear_inputs(t, 10), jnp.bfloat16)
        frozen = ("weight",)
    elif op == "mov_ffn":
        arrays, static = cast(mov_ffn_inputs(t, 10), jnp.bfloat16)
        frozen = ("wi_0", "wi_1", "wo")
    else:
        arrays, static = cast(molora_inputs(t, 10, 4), jnp.bfloat16)
        frozen = ("weight",)
    kernels = {k: jnp.asarray(arrays.pop(k).T) for k in frozen}  # Flax layout [in, out]

    def forward(arrays, kernels):
        return getattr(pj, op)(**arrays, **{k: v.T for k, v in kernels.items()}, **static, implementation="xla")

    lines = [line for line in str(jax.make_jaxpr(forward)(arrays, kernels)).splitlines() if "dot_general[" in line]
    assert lines
    assert not [line for line in lines if ":bf16[" in line.split("=")[0]], lines
