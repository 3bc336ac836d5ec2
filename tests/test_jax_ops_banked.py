"""pemoe.jax ops over an adapter bank (``adapter_ids``): outputs and gradients per implementation.

Ground truth is the PyTorch banked reference (``pemoe.ops.<op>(..., adapter_ids=..., implementation="reference")``,
a loop over the adapters through :mod:`pemoe.reference`) in float64 on the same numbers, so these tests are
also the cross-framework check of the bank semantics. The tolerance rule is tests/helpers.py's (on jax arrays,
as in tests/test_jax_ops.py): ``out`` the JAX implementation under test in dtype ``dt`` (activations and frozen
weights in dt, adapters float32), ``ref`` the JAX banked ``"reference"`` in the same dtypes, ``truth`` the torch
float64 banked reference. Gradients: every argument the torch ops differentiate (activations, bias,
router_input, the stacked adapter parameters; the frozen weights get none, SPEC §3), through ``jax.vjp`` with
one random cotangent, under ``jax.jit`` with the ids a traced argument.

The ``"xla"`` bank has three forms (pemoe.jax.xla.bank_form picks one from the shapes): per-token gathers,
the adapters concatenated as A·E experts, and the tokens sorted by adapter with ragged dots. Each is valid for
any T, so the tests run every case with each form forced (the ``form`` fixture) and check the rule separately.
Token ids: an unsorted cycle over the adapters with -1 (the base alone).
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
from pemoe import ops as torch_ops
from pemoe.jax import ops as jax_ops
from pemoe.jax import xla
from tests.test_jax_ops import ACTIVATION_NAMES, D, G, K, assert_within_rule

A = 3
PATTERN = (0, 1, -1, 1, 0, 2, 1, -1, 2, 0, 0)  # unsorted; every adapter and the base
FROZEN = ("weight", "wi_0", "wi_1", "wo")
STACKED = ("router", "experts", "lora_a", "lora_b")


def _ids(shape, pattern=PATTERN) -> np.ndarray:
    n = int(np.prod(shape))
    return np.array([pattern[(i * 5 + 1) % len(pattern)] for i in range(n)], dtype=np.int32).reshape(shape)


def _f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


# ------------------------------------------------------------------------------------------
# input factories (numpy float32 draws; stacked adapter parameters, A adapters)
# ------------------------------------------------------------------------------------------


def _routed(rng, args, e, width, sentence, a, lead):
    """router (token or sentence routing) and the ids over ``lead`` tokens."""
    if sentence:
        args["router_input"] = _f32(rng.standard_normal((lead[0], 9)))
        args["router"] = _f32(0.5 * rng.standard_normal((a, 9, e)))
    else:
        args["router"] = _f32(0.5 * rng.standard_normal((a, width, e))) if e > 1 else None
    args["adapter_ids"] = _ids(lead) if a == A else np.where(_ids(lead) < 0, -1, 0).astype(np.int32)
    return args


def mov_inputs(t, e, *, a=A, top_k=None, renormalize=False, sentence=False, seed=0):
    rng = np.random.default_rng(seed)
    lead = (2, t) if sentence else (t,)
    args = dict(
        h=_f32(rng.standard_normal((*lead, G * D))),
        experts=_f32(1.0 + 0.3 * rng.standard_normal((a, G, e, D))),
        top_k=top_k,
        renormalize=renormalize,
    )
    return _routed(rng, args, e, D, sentence, a, lead)


def mov_linear_inputs(t, e, *, a=A, top_k=None, renormalize=False, sentence=False, bias=True, seed=0):
    rng = np.random.default_rng(seed)
    lead = (2, t) if sentence else (t,)
    n = G * D
    args = dict(
        x=_f32(rng.standard_normal((*lead, K))),
        weight=_f32(rng.standard_normal((n, K)) * K**-0.5),
        experts=_f32(1.0 + 0.3 * rng.standard_normal((a, G, e, D))),
        top_k=top_k,
        renormalize=renormalize,
    )
    if bias:
        args["bias"] = _f32(rng.standard_normal(n))
    return _routed(rng, args, e, D, sentence, a, lead)


def mov_ffn_inputs(t, e, *, a=A, gated=True, activation="gelu_new", top_k=None, renormalize=False, sentence=False):
    rng = np.random.default_rng(0)
    lead = (2, t) if sentence else (t,)
    m, f = K, 56
    args = dict(
        x=_f32(rng.standard_normal((*lead, m))),
        wi_0=_f32(rng.standard_normal((f, m)) * m**-0.5),
        wo=_f32(rng.standard_normal((m, f)) * f**-0.5),
        experts=_f32(1.0 + 0.3 * rng.standard_normal((a, 1, e, f))),
        activation=activation,
        top_k=top_k,
        renormalize=renormalize,
    )
    if gated:
        args["wi_1"] = _f32(rng.standard_normal((f, m)) * m**-0.5)
    return _routed(rng, args, e, f, sentence, a, lead)


def molora_inputs(t, e, r=4, *, a=A, top_k=None, renormalize=False, sentence=False, bias=True):
    rng = np.random.default_rng(0)
    lead = (2, t) if sentence else (t,)
    n = 72
    args = dict(
        x=_f32(rng.standard_normal((*lead, K))),
        weight=_f32(rng.standard_normal((n, K)) * K**-0.5),
        lora_a=_f32(0.3 * rng.standard_normal((a, e, K, r))),
        lora_b=_f32(0.3 * rng.standard_normal((a, e, r, n))),
        scale=16.0 / r,
        top_k=top_k,
        renormalize=renormalize,
    )
    if bias:
        args["bias"] = _f32(rng.standard_normal(n))
    return _routed(rng, args, e, K, sentence, a, lead)


# ------------------------------------------------------------------------------------------
# runners
# ------------------------------------------------------------------------------------------


def _split(inputs: dict, dtype):
    """(trainable jax arrays, frozen jax arrays, ids, static kwargs): activations and frozen weights in dtype,
    adapters float32."""
    arrays = {
        k: jnp.asarray(v, dtype=dtype if k in ACTIVATION_NAMES else jnp.float32)
        for k, v in inputs.items()
        if isinstance(v, np.ndarray) and k != "adapter_ids"
    }
    frozen = {k: arrays.pop(k) for k in FROZEN if k in arrays}
    static = {k: v for k, v in inputs.items() if not isinstance(v, np.ndarray)}
    return arrays, frozen, jnp.asarray(inputs["adapter_ids"]), static


def torch_truth(op: str, inputs: dict, grad_out: np.ndarray | None = None):
    """The torch banked reference in float64: (output, {name: grad} of the non-frozen arrays, grad_out)."""
    leaves = {
        k: torch.tensor(v, dtype=torch.float64, requires_grad=k not in FROZEN)
        for k, v in inputs.items()
        if isinstance(v, np.ndarray) and k != "adapter_ids"
    }
    static = {k: v for k, v in inputs.items() if not isinstance(v, np.ndarray)}
    ids = torch.tensor(inputs["adapter_ids"], dtype=torch.long)
    out = getattr(torch_ops, op)(**leaves, **static, adapter_ids=ids, implementation="reference")
    if grad_out is None:
        grad_out = np.random.default_rng(1).standard_normal(out.shape)
    need = [k for k in leaves if k not in FROZEN]
    grads = torch.autograd.grad(out, [leaves[k] for k in need], torch.tensor(grad_out), allow_unused=True)
    grads = {k: (torch.zeros_like(leaves[k]) if g is None else g).numpy() for k, g in zip(need, grads, strict=True)}
    return out.detach().numpy(), grads, grad_out


def jax_run(op, implementations, arrays, frozen, ids, static, grad_out):
    """[(output, {name: grad}) per implementation], under one ``jax.jit`` with the ids a traced argument."""

    def vjp(a, f, i, g, impl):
        out, pullback = jax.vjp(lambda t: getattr(pj, op)(**t, **f, **static, adapter_ids=i, implementation=impl), a)
        return out, pullback(g.astype(out.dtype))[0]

    fn = jax.jit(lambda a, f, i, g: [vjp(a, f, i, g, impl) for impl in implementations])
    return fn(arrays, frozen, ids, jnp.asarray(grad_out, dtype=jnp.float32))


def check(op: str, inputs: dict, dtype, implementation: str = "xla") -> None:
    """Output and every gradient of ``implementation`` vs the JAX banked reference and the torch float64 truth;
    an adapter that names no token gets exactly zero gradients."""
    arrays, frozen, ids, static = _split(inputs, dtype)
    truth, truth_grads, grad_out = torch_truth(op, inputs)
    (out, grads), (ref, ref_grads) = jax_run(op, (implementation, "reference"), arrays, frozen, ids, static, grad_out)
    source = "h" if "h" in arrays else "x"
    assert out.dtype == arrays[source].dtype
    assert_within_rule(out, ref, truth, dtype, f"{op} output")
    assert set(grads) == set(truth_grads)
    unused = sorted(set(range(A)) - set(inputs["adapter_ids"].reshape(-1).tolist()))
    for name in truth_grads:
        assert grads[name].dtype == arrays[name].dtype, f"d{name} dtype"
        assert_within_rule(grads[name], ref_grads[name], truth_grads[name], dtype, f"{op} d{name}")
        if name in STACKED:
            for a in unused:
                if a < grads[name].shape[0]:
                    assert not np.asarray(grads[name][a]).any(), f"d{name}[{a}] of an unused adapter"


def _id(v) -> str:
    return jnp.dtype(v).name if isinstance(v, type) else str(v)


FORMS = ("gather", "concat", "sorted")


@pytest.fixture(params=FORMS)
def form(request, monkeypatch) -> str:
    """The "xla" bank's form forced for every call (xla.bank_form is read at each call, outside any jit cache)."""
    monkeypatch.setattr(xla, "bank_form", lambda tokens, num_adapters, backend=None: request.param)
    return request.param


# ------------------------------------------------------------------------------------------
# "xla" vs the references: both forms, float32 and bfloat16, odd shapes, E = 1 and several
# ------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("form")
class TestMoVLinear:
    @pytest.mark.parametrize(
        "dtype,t,e",
        [(jnp.float32, 7, 4), (jnp.float32, 2, 4), (jnp.bfloat16, 37, 1), (jnp.bfloat16, 3, 10)],
        ids=_id,
    )
    def test_matches_reference(self, dtype, t, e):
        check("mov_linear", mov_linear_inputs(t, e), dtype)

    @pytest.mark.parametrize(
        "dtype,t,top_k,renormalize",
        [(jnp.float32, 23, 1, False), (jnp.bfloat16, 3, 2, True)],
        ids=_id,
    )
    def test_top_k(self, dtype, t, top_k, renormalize):
        check("mov_linear", mov_linear_inputs(t, 4, top_k=top_k, renormalize=renormalize), dtype)

    @pytest.mark.parametrize("dtype,t", [(jnp.bfloat16, 5), (jnp.float32, 1)], ids=_id)
    def test_sentence_routing(self, dtype, t):
        check("mov_linear", mov_linear_inputs(t, 4, sentence=True, top_k=2), dtype)

    def test_one_adapter_bank_no_bias(self):
        """A = 1: ids 0 and -1."""
        check("mov_linear", mov_linear_inputs(9, 4, a=1, bias=False), jnp.float32)

    def test_every_token_the_base(self):
        inputs = mov_linear_inputs(8, 4)
        inputs["adapter_ids"] = np.full_like(inputs["adapter_ids"], -1)
        check("mov_linear", inputs, jnp.float32)


@pytest.mark.usefixtures("form")
class TestMoV:
    @pytest.mark.parametrize("dtype,t,e", [(jnp.float32, 33, 4), (jnp.bfloat16, 2, 1)], ids=_id)
    def test_matches_reference(self, dtype, t, e):
        check("mov", mov_inputs(t, e, top_k=2 if e > 2 else None), dtype)

    def test_leading_dims_and_sentence_routing(self):
        inputs = mov_inputs(5, 4, sentence=True, top_k=3, renormalize=True)
        inputs["adapter_ids"] = _ids(inputs["h"].shape[:-1])  # the activations' leading shape [2, 5]
        check("mov", inputs, jnp.float32)


@pytest.mark.usefixtures("form")
class TestMoVFFN:
    @pytest.mark.parametrize(
        "dtype,t,gated,activation,e",
        [
            (jnp.float32, 9, True, "gelu_new", 4),
            (jnp.bfloat16, 3, False, "relu", 1),
        ],
        ids=_id,
    )
    def test_matches_reference(self, dtype, t, gated, activation, e):
        check("mov_ffn", mov_ffn_inputs(t, e, gated=gated, activation=activation), dtype)

    def test_top_k_sentence(self):
        check("mov_ffn", mov_ffn_inputs(6, 4, top_k=2, renormalize=True, sentence=True), jnp.float32)


@pytest.mark.usefixtures("form")
class TestMoLoRALinear:
    @pytest.mark.parametrize(
        "dtype,t,e,r",
        [
            (jnp.float32, 7, 4, 4),
            (jnp.float32, 2, 4, 4),
            (jnp.bfloat16, 19, 1, 4),
            (jnp.bfloat16, 3, 1, 1),
        ],
        ids=_id,
    )
    def test_matches_reference(self, dtype, t, e, r):
        check("molora_linear", molora_inputs(t, e, r), dtype)

    @pytest.mark.parametrize(
        "dtype,t,top_k,renormalize", [(jnp.float32, 23, 2, True), (jnp.bfloat16, 2, 1, False)], ids=_id
    )
    def test_top_k(self, dtype, t, top_k, renormalize):
        check("molora_linear", molora_inputs(t, 4, top_k=top_k, renormalize=renormalize), dtype)

    @pytest.mark.parametrize("dtype,t", [(jnp.float32, 5), (jnp.bfloat16, 1)], ids=_id)
    def test_sentence_routing(self, dtype, t):
        check("molora_linear", molora_inputs(t, 4, sentence=True), dtype)

    def test_one_adapter_bank_no_bias(self):
        check("molora_linear", molora_inputs(6, 3, a=1, bias=False), jnp.float32)


@pytest.mark.usefixtures("form")
@pytest.mark.parametrize("op", ["mov_linear", "molora_linear"])
def test_eager_call_matches_jit(op):
    """Concrete ids (an eager call, where their range is checked) give what the traced ids give under jit."""
    inputs = mov_linear_inputs(7, 3) if op == "mov_linear" else molora_inputs(7, 3)
    arrays, frozen, ids, static = _split(inputs, jnp.float32)
    eager = getattr(pj, op)(**arrays, **frozen, **static, adapter_ids=ids)
    jitted = jax.jit(lambda a, i: getattr(pj, op)(**a, **frozen, **static, adapter_ids=i))(arrays, ids)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------
# the bank against the single-adapter op, base tokens, traced bad ids, memory
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [2, 9])
@pytest.mark.usefixtures("form")
@pytest.mark.parametrize("op", ["mov_linear", "molora_linear"])
def test_bank_of_one_is_the_single_adapter_op(op, t):
    """A bank of one adapter with every id 0 gives the single-adapter "xla" op's output."""
    inputs = mov_linear_inputs(t, 4, a=1) if op == "mov_linear" else molora_inputs(t, 4, a=1)
    arrays, frozen, _, static = _split(inputs, jnp.float32)
    ids = jnp.zeros((t,), jnp.int32)
    bank = getattr(pj, op)(**arrays, **frozen, **static, adapter_ids=ids, implementation="xla")
    single = getattr(pj, op)(
        **{k: (v[0] if k in STACKED else v) for k, v in arrays.items()}, **frozen, **static, implementation="xla"
    )
    np.testing.assert_allclose(np.asarray(bank), np.asarray(single), rtol=2e-6, atol=2e-6)


@pytest.mark.usefixtures("form")
@pytest.mark.parametrize("t", [3, 8])
def test_base_tokens_get_the_frozen_layer_alone(t):
    """Rows of id -1 are exactly x Wᵀ + b (mov_linear) and the FFN without MoV (mov_ffn), computed here."""
    inputs = mov_linear_inputs(t, 4)
    arrays, frozen, ids, static = _split(inputs, jnp.bfloat16)
    base = np.asarray(inputs["adapter_ids"]) == -1
    y = pj.mov_linear(**arrays, **frozen, **static, adapter_ids=ids, implementation="xla")
    want = xla.linear(arrays["x"], frozen["weight"], arrays["bias"])
    np.testing.assert_array_equal(np.asarray(y)[base], np.asarray(want)[base])

    inputs = mov_ffn_inputs(t, 4)
    arrays, frozen, ids, static = _split(inputs, jnp.float32)
    y = pj.mov_ffn(**arrays, **frozen, **static, adapter_ids=ids, implementation="xla")
    x = arrays["x"]
    h = jax.nn.gelu(x @ frozen["wi_0"].T, approximate=True) * (x @ frozen["wi_1"].T)
    np.testing.assert_allclose(np.asarray(y)[base], np.asarray(h @ frozen["wo"].T)[base], rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("form")
@pytest.mark.parametrize("impl,t", [("xla", 3), ("xla", 9), ("reference", 9)])
def test_traced_out_of_range_ids_give_nan_rows(impl, t):
    """Under jit the ids' values are unknown at trace time: an id outside [-1, A) gives a NaN row (never another
    adapter's or the base's output); the other rows are the usual ones."""
    for op, inputs in (("mov_linear", mov_linear_inputs(t, 4)), ("molora_linear", molora_inputs(t, 4))):
        arrays, frozen, ids, static = _split(inputs, jnp.float32)
        bad = ids.at[0].set(A).at[1].set(-2)
        run = jax.jit(
            lambda a, i, op=op, static=static: getattr(pj, op)(**a, **static, adapter_ids=i, implementation=impl)
        )
        y, want = np.asarray(run({**arrays, **frozen}, bad)), np.asarray(run({**arrays, **frozen}, ids))
        assert np.isnan(y[:2]).all(), op
        np.testing.assert_array_equal(y[2:], want[2:])


def _residuals(capsys, f, *args) -> list[str]:
    print_saved_residuals(f, *args)
    return [line for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_concatenated_form_memory(capsys, monkeypatch):
    """bf16 mov_linear and molora_linear, T > A, adapters trained: nothing of T times an adapter's size is built,
    and the MoV site keeps no float32 copy of the activation (the single-adapter custom_vjp's residuals, with the
    routing weights over A·E)."""
    monkeypatch.setattr(xla, "bank_form", lambda tokens, num_adapters, backend=None: "concat")
    t, e, n = 123, 10, G * D
    arrays, frozen, ids, static = _split(mov_linear_inputs(t, e), jnp.bfloat16)
    x, bias = arrays.pop("x"), arrays.pop("bias")

    def loss(adapters):
        y = pj.mov_linear(x, frozen["weight"], bias=bias, **adapters, **static, adapter_ids=ids, implementation="xla")
        return y.astype(jnp.float32).sum()

    saved = _residuals(capsys, loss, arrays)
    assert not any(f"f32[{t},{n}]" in s or f"f32[{t},{G},{D}]" in s for s in saved), saved
    assert any(f"f32[{t},{G},{A * e}]" in s for s in saved), saved
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(arrays))
    assert f"[{t},{G},{e},{D}]" not in jaxpr and f"[{t},{D},{e}]" not in jaxpr

    r = 4
    arrays, frozen, ids, static = _split(molora_inputs(t, e, r), jnp.bfloat16)
    x, bias = arrays.pop("x"), arrays.pop("bias")

    def loss_molora(adapters):
        y = pj.molora_linear(x, frozen["weight"], bias=bias, **adapters, **static, adapter_ids=ids)
        return y.astype(jnp.float32).sum()

    jaxpr = str(jax.make_jaxpr(jax.grad(loss_molora))(arrays))
    assert f"[{t},{e},{K},{r}]" not in jaxpr and f"[{t},{e},{r},72]" not in jaxpr and f"[{t},{e},72]" not in jaxpr


def test_bank_form_rule():
    """Gathers for T <= A; for T > A the sorted form on TPU, the concatenated form on CPU (the default here) and
    GPU."""
    assert xla.bank_form(3, 3) == "gather" and xla.bank_form(1, 1, "tpu") == "gather"
    assert xla.bank_form(4, 3) == "concat" and xla.bank_form(4, 3, "cpu") == "concat"
    assert xla.bank_form(4, 3, "gpu") == "concat" and xla.bank_form(4, 3, "cuda") == "concat"
    assert xla.bank_form(4, 3, "tpu") == "sorted"


def _adapter_step(op: str, t: int, e: int, dtype):
    """(loss of the adapters, the adapters): op's bank with x, the bias and the frozen weight closed over."""
    inputs = mov_linear_inputs(t, e) if op == "mov_linear" else molora_inputs(t, e)
    arrays, frozen, ids, static = _split(inputs, dtype)
    x, bias = arrays.pop("x"), arrays.pop("bias")

    def loss(adapters):
        y = getattr(pj, op)(x, frozen["weight"], bias=bias, **adapters, **static, adapter_ids=ids)
        return y.astype(jnp.float32).sum()

    return loss, arrays


@pytest.mark.parametrize("op", ["mov_linear", "molora_linear"])
def test_sorted_form_memory(op, monkeypatch, capsys):
    """The sorted form runs ragged dots and keeps no tensor over all adapters' experts ([T, A·E], [T, G, A·E]) or
    of T times anything per adapter ([T, A + 1, ...], [A + 1, T, ...]), and no per-token parameters."""
    monkeypatch.setattr(xla, "bank_form", lambda tokens, num_adapters, backend=None: "sorted")
    t, e = 123, 10
    loss, adapters = _adapter_step(op, t, e, jnp.bfloat16)
    saved = _residuals(capsys, loss, adapters)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(adapters))
    assert "ragged_dot" in jaxpr
    for shape in (f"{t},{A * e}]", f"{t},{G},{A * e}]", f"[{t},{A + 1},", f"[{A + 1},{t},"):  # (G = A here)
        assert not any(shape in line for line in saved), (shape, saved)
        assert shape not in jaxpr, shape
    assert f"[{t},{e},{K}," not in jaxpr and f"[{t},{G},{e},{D}]" not in jaxpr


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("op", ["mov_linear", "molora_linear"])
def test_sorted_form_exports_ragged_dots(op, platform, monkeypatch):
    """``jax.export`` of the sorted form's training step (loss and adapter gradients) for TPU and CUDA keeps the
    per-adapter products as ragged dots (``chlo.ragged_dot``) for the backend to lower, with no dot over a
    zero-padded [A + 1, T, ·] operand."""
    monkeypatch.setattr(xla, "bank_form", lambda tokens, num_adapters, backend=None: "sorted")
    t, e = 37, 4
    loss, adapters = _adapter_step(op, t, e, jnp.bfloat16)
    module = jax.export.export(jax.jit(jax.value_and_grad(loss)), platforms=[platform])(adapters).mlir_module()
    assert module.count("chlo.ragged_dot") >= 2
    assert f"tensor<{A + 1}x{t}x" not in module


def test_gathered_form_gathers_per_token():
    """T <= A: each token's parameters are gathered ([T, G, E, D] experts), not the adapters concatenated."""
    arrays, frozen, ids, static = _split(mov_linear_inputs(2, 4), jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda a: pj.mov_linear(**a, **frozen, **static, adapter_ids=ids))(arrays))
    assert f"[2,{G},4,{D}]" in jaxpr and f"[{G},{A * 4},{D}]" not in jaxpr


@pytest.mark.usefixtures("form")
def test_empty_batch():
    """Zero tokens: the empty output, an empty dx and zero parameter gradients."""
    arrays, frozen, _, static = _split(molora_inputs(1, 3), jnp.float32)
    arrays["x"] = jnp.zeros((0, K))
    ids = jnp.zeros((0,), jnp.int32)
    for y, grads in jax_run("molora_linear", ("xla", "reference"), arrays, frozen, ids, static, np.ones((0, 72))):
        assert y.shape == (0, 72)
        assert grads["x"].shape == (0, K) and not np.asarray(grads["lora_a"]).any()


# ------------------------------------------------------------------------------------------
# dispatch and bad input: the torch side's errors, before any computation
# ------------------------------------------------------------------------------------------


def _call(op: str, impl: str = "xla", change=None):
    factory = {"mov": mov_inputs, "mov_linear": mov_linear_inputs, "mov_ffn": mov_ffn_inputs}.get(op, molora_inputs)
    inputs = factory(7, 4)
    if change is not None:
        change(inputs)
    kw = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in inputs.items()}
    return lambda: getattr(pj, op)(**kw, implementation=impl)


@pytest.mark.parametrize("impl", ["pallas", "triton"])
@pytest.mark.parametrize("op", ["mov", "mov_linear", "mov_ffn", "molora_linear"])
def test_kernels_refuse_adapter_ids(op, impl):
    """No Pallas or Triton bank kernel: an explicit error naming the op and "xla", never another implementation."""
    with pytest.raises(
        NotImplementedError, match=rf"{op}: implementation='{impl}' has no kernel for adapter banks.*'xla'"
    ):
        _call(op, impl)()


def test_auto_chooses_xla_and_logs(caplog):
    jax_ops._announced.clear()
    with caplog.at_level(logging.INFO, logger="pemoe"):
        y = _call("mov", "auto")()
    assert "pemoe.jax.mov with adapter_ids: implementation='auto' chose 'xla' on cpu" in caplog.text
    np.testing.assert_array_equal(np.asarray(y), np.asarray(_call("mov", "xla")()))


def test_unknown_implementation():
    with pytest.raises(ValueError, match="unknown implementation 'cuda'"):
        _call("mov", "cuda")()


def _set(name, value):
    return lambda a: a.update({name: value(a)})


BAD_CASES = {  # the messages of tests/test_ops_banked.py's torch cases
    "float ids": (_set("adapter_ids", lambda a: a["adapter_ids"].astype(np.float32)), TypeError, r"integer .*float32"),
    "bool ids": (_set("adapter_ids", lambda a: a["adapter_ids"] > 0), TypeError, r"integer .*bool"),
    "list ids": (
        _set("adapter_ids", lambda a: a["adapter_ids"].tolist()),
        TypeError,
        r"adapter_ids must be an integer",
    ),
    "short ids": (_set("adapter_ids", lambda a: a["adapter_ids"][:-1]), ValueError, r"shape \[T\] = \[7\].*got \[6\]"),
    "index = A": (lambda a: a["adapter_ids"].__setitem__(3, A), ValueError, r"index 3, outside \[-1, 3\)"),
    "index -2": (lambda a: a["adapter_ids"].__setitem__(0, -2), ValueError, r"index -2, outside \[-1, 3\)"),
    "unstacked": (_set("experts", lambda a: a["experts"][0]), ValueError, r"experts must be stacked.*\[A, G, E, D\]"),
    "A differs": (
        _set("router", lambda a: a["router"][:2]),
        ValueError,
        r"different numbers of adapters: experts A = 3, router A = 2",
    ),
    "A = 0": (_set("experts", lambda a: a["experts"][:0]), ValueError, r"experts must hold at least one adapter"),
    "router shape": (_set("router", lambda a: a["router"][:, 1:]), ValueError, r"router must have shape \[24, 4\]"),
}


@pytest.mark.parametrize("impl", ["reference", "xla", "auto", "pallas", "triton"])
@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_adapter_ids_and_banks(impl, case):
    change, exc, match = BAD_CASES[case]
    with pytest.raises(exc, match=match):
        _call("mov_linear", impl, change)()


@pytest.mark.parametrize(
    "change,match",
    [
        (
            _set("lora_b", lambda a: a["lora_b"][:2]),
            r"different numbers of adapters: lora_a A = 3, lora_b A = 2, router A = 3",
        ),
        (_set("lora_b", lambda a: a["lora_b"][:, :, :2]), r"lora_b must have shape \[E, r, N\] = \[4, 4, 72\]"),
        (_set("lora_a", lambda a: a["lora_a"][0]), r"lora_a must be stacked per adapter as \[A, E, K, r\]"),
    ],
)
def test_bad_molora_banks(change, match):
    with pytest.raises(ValueError, match=match):
        _call("molora_linear", "xla", change)()


def test_bad_ids_raise_at_trace_time():
    """Shape and dtype of the ids are checked while tracing (their range cannot be: see the NaN test above)."""
    inputs = mov_linear_inputs(7, 4)
    arrays, frozen, ids, static = _split(inputs, jnp.float32)
    with pytest.raises(ValueError, match=r"adapter_ids must have shape \[T\] = \[7\]"):
        jax.jit(lambda a, i: pj.mov_linear(**a, **frozen, **static, adapter_ids=i)).lower(arrays, ids[:5])
