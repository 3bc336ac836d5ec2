"""pemoe.jax.layers with adapter banks (``num_adapters=A``, ``adapter_ids`` one index per sequence): outputs and
gradients against each adapter's own single layer, building and splitting banks, bad input.

A bank is built from A single layers (random adapters) with :func:`stack_adapters`; the batch names one
adapter per sequence (unsorted, with -1: the frozen base alone, and one adapter named by no sequence). For
each adapter a, the rows of its sequences are compared with the single layer a run on those sequences alone.
Tolerance: the rule of tests/helpers.py on jax arrays (tests.test_jax_ops.assert_within_rule) with ``out`` the
bank (jitted, ids traced) in dtype dt, ``ref`` the single layer in dt, ``truth`` the torch float64 reference
(:mod:`pemoe.reference`) with adapter a's parameters on the same (dt-rounded) inputs. Gradients: the input's
rows and every adapter parameter's slice a (summed over a's sequences), through ``jax.vjp`` with one random
cotangent; the slice of the adapter no sequence names gets exactly zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pemoe.jax.layers import (
    IA3,
    AdapterParam,
    LoRALinear,
    MoLoRALinear,
    MoV,
    MoVLinear,
    adapter_from_bank,
    num_adapter_parameters,
    stack_adapters,
)
from tests.test_jax_ops import assert_within_rule, torch_truth

K, N, G = 40, 48, 4
A = 4
IDS = np.array([1, -1, 0, 2, 1], dtype=np.int32)  # adapter 3 is named by no sequence
S = 3
TORCH_NAME = {"mov_scaling": "experts", "router": "router", "lora_A": "lora_a", "lora_B": "lora_b"}

# kind -> (op of pemoe.reference, build(base, rngs) of one single layer)
KINDS = {
    "mov_linear": ("mov_linear", lambda base, rngs: MoVLinear(base, num_groups=G, num_experts=5, rngs=rngs)),
    "ia3_linear": ("mov_linear", lambda base, rngs: MoVLinear(base, num_groups=G, num_experts=1, rngs=rngs)),
    "mov": ("mov", lambda base, rngs: MoV(G, N // G, 3, top_k=2, renormalize=True, rngs=rngs)),
    "molora": ("molora_linear", lambda base, rngs: MoLoRALinear(base, 3, rank=2, alpha=8.0, top_k=2, rngs=rngs)),
    "lora": ("molora_linear", lambda base, rngs: LoRALinear(base, rank=3, rngs=rngs)),
}


def _base(dtype=jnp.float32) -> nnx.Linear:
    return nnx.Linear(K, N, param_dtype=dtype, rngs=nnx.Rngs(0))


def _randomise(layer: nnx.Module, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _, v in nnx.iter_graph(layer):
        if isinstance(v, AdapterParam):
            v[...] = jnp.asarray(1.0 + 0.3 * rng.standard_normal(v.shape), dtype=jnp.float32)


def _singles(kind: str, dtype) -> tuple[nnx.Linear, list[nnx.Module]]:
    base = _base(dtype)
    layers = []
    for a in range(A):
        layer = KINDS[kind][1](base, nnx.Rngs(a))
        _randomise(layer, seed=10 + a)
        layers.append(layer)
    return base, layers


def _input(kind: str, batch: int, dtype, seed: int = 1) -> jax.Array:
    width = N if kind == "mov" else K
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, S, width)), dtype=dtype)


@nnx.jit
def _call_bank(layer: nnx.Module, x: jax.Array, ids: jax.Array) -> jax.Array:
    """layer(x, adapter_ids=ids) under nnx.jit (one compile; the ids traced)."""
    return layer(x, adapter_ids=ids)


def _flat(state: nnx.State) -> dict[str, jax.Array]:
    return {k: v for k, v in nnx.to_pure_dict(state).items() if v is not None}


def _vjp(layer: nnx.Module, x: jax.Array, ids, cot: np.ndarray):
    """(y, {adapter param: grad}, grad of x) of layer(x, adapter_ids=ids) under jax.jit (ids traced)."""
    graphdef, params, rest = nnx.split(layer, AdapterParam, ...)

    @jax.jit
    def run(params, x, ids, cot):
        def f(params, x):
            return nnx.merge(graphdef, params, rest)(x, adapter_ids=ids)

        y, vjp = jax.vjp(f, params, x)
        gp, gx = vjp(cot.astype(y.dtype))
        return y, gp, gx

    y, gp, gx = run(params, x, None if ids is None else jnp.asarray(ids), jnp.asarray(cot, dtype=jnp.float32))
    return y, _flat(gp), gx


def _truth(kind: str, layer: nnx.Module, x: jax.Array, cot: np.ndarray):
    """torch float64 reference of one single layer (or of the bare base, layer None) on x: (y, grads)."""
    op = KINDS[kind][0]
    x64 = np.asarray(x, dtype=np.float64)
    arrays, static = {}, {}
    if kind != "mov":
        base = layer.base
        arrays["weight"] = np.asarray(base.kernel[...], dtype=np.float64).T
        arrays["bias"] = np.asarray(base.bias[...], dtype=np.float64)
    arrays["h" if kind == "mov" else "x"] = x64
    for name, torch_name in TORCH_NAME.items():
        v = getattr(layer, name, None)
        if v is not None:
            arrays[torch_name] = np.asarray(v[...], dtype=np.float64)
    if "router" not in arrays:
        static["router"] = None
    static.update(top_k=layer.top_k, renormalize=layer.renormalize)
    if op == "molora_linear":
        static["scale"] = layer.scale
    out, grads, _ = torch_truth(op, arrays, static, cot)
    return out, grads


def _base_rows(kind: str, base: nnx.Linear, x: jax.Array, cot: np.ndarray):
    """(ref in dt, its x-gradient, float64 truth, its x-gradient) of the frozen base alone (id -1)."""
    if kind == "mov":  # the identity
        x64, c64 = np.asarray(x, dtype=np.float64), np.asarray(cot, dtype=np.float64)
        return x, jnp.asarray(cot, dtype=x.dtype), x64, c64
    kernel, bias = base.kernel[...], base.bias[...]
    y, vjp = jax.vjp(lambda x: x @ kernel + bias, x)
    (gx,) = vjp(jnp.asarray(cot, dtype=y.dtype))
    w64, b64 = np.asarray(kernel, dtype=np.float64), np.asarray(bias, dtype=np.float64)
    x64, c64 = np.asarray(x, dtype=np.float64), np.asarray(cot, dtype=np.float64)
    return y, gx, x64 @ w64 + b64, c64 @ w64.T


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("kind", list(KINDS))
def test_bank_equals_each_adapters_single_layer(kind, dtype):
    base, singles = _singles(kind, dtype)
    bank = stack_adapters(singles)
    assert bank.num_adapters == A and (kind == "mov" or bank.base is base)
    x = _input(kind, len(IDS), dtype)
    cot = np.random.default_rng(2).standard_normal((len(IDS), S, N))
    y, gp, gx = _vjp(bank, x, IDS, cot)
    assert y.dtype == dtype and y.shape == (len(IDS), S, N)
    for a in range(-1, A):
        rows = np.flatnonzero(IDS == a)
        if a == A - 1:  # named by no sequence: no gradient at all
            assert rows.size == 0
            for name, g in gp.items():
                assert not np.asarray(g[a]).any(), name
            continue
        what = f"{kind} adapter {a}"
        if a < 0:
            ref, ref_gx, truth, truth_gx = _base_rows(kind, base, x[rows], cot[rows])
        else:
            ref, ref_gp, ref_gx = _vjp(singles[a], x[rows], None, cot[rows])
            truth, truth_grads = _truth(kind, singles[a], x[rows], cot[rows])
            truth_gx = truth_grads["h" if kind == "mov" else "x"]
            assert set(gp) == set(ref_gp)
            for name, g in gp.items():
                assert_within_rule(g[a], ref_gp[name], truth_grads[TORCH_NAME[name]], dtype, f"{what} d{name}")
        assert_within_rule(y[rows], ref, truth, dtype, f"{what} output")
        assert_within_rule(gx[rows], ref_gx, truth_gx, dtype, f"{what} dx")
    # the adapters take part: a sequence's output depends on the adapter it names
    assert not np.allclose(np.asarray(y[0], np.float32), np.asarray(_vjp(bank, x, IDS * 0, cot)[0][0], np.float32))


def test_sentence_routed_bank_equals_single_layers():
    """Sentence routing: each sequence's router vector goes through its own adapter's router."""
    base = _base()
    singles = [MoLoRALinear(base, 3, rank=2, router_input_features=9, rngs=nnx.Rngs(a)) for a in range(3)]
    for a, layer in enumerate(singles):
        _randomise(layer, seed=20 + a)
    bank = stack_adapters(singles)
    x, vectors = _input("molora", 4, jnp.float32), jnp.asarray(np.random.default_rng(5).standard_normal((4, 9)))
    ids = np.array([2, 0, -1, 2], dtype=np.int32)
    y = nnx.jit(lambda m, x, r, i: m(x, r, adapter_ids=i))(bank, x, vectors.astype(jnp.float32), jnp.asarray(ids))
    for b, a in enumerate(ids):
        want = base(x[b : b + 1]) if a < 0 else singles[a](x[b : b + 1], vectors[b : b + 1].astype(jnp.float32))
        np.testing.assert_allclose(np.asarray(y[b : b + 1]), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_a_fresh_bank_is_its_base_and_holds_independent_adapters():
    base = _base()
    bank = MoLoRALinear(base, 3, rank=2, num_adapters=A, rngs=nnx.Rngs(0))
    assert bank.lora_A.shape == (A, 3, K, 2) and bank.lora_B.shape == (A, 3, 2, N) and bank.router.shape == (A, K, 3)
    assert not np.asarray(bank.lora_B[...]).any()
    lora_a = np.asarray(bank.lora_A[...])
    assert not np.array_equal(lora_a[0], lora_a[1])  # each adapter its own draw
    assert num_adapter_parameters(bank) == A * num_adapter_parameters(MoLoRALinear(base, 3, rank=2, rngs=nnx.Rngs(0)))
    mov = MoVLinear(base, num_groups=G, num_experts=5, num_adapters=2, rngs=nnx.Rngs(0))
    assert mov.mov_scaling.shape == (2, G, 5, N // G) and mov.router.shape == (2, N // G, 5)
    np.testing.assert_array_equal(np.asarray(mov.mov_scaling[...]), 1.0)
    assert IA3(G, 8, num_adapters=3, rngs=nnx.Rngs(0)).mov_scaling.shape == (3, G, 1, 8)
    x = _input("molora", 3, jnp.float32)
    ids = jnp.asarray([1, -1, 0], dtype=jnp.int32)
    want = np.asarray(base(x))
    for layer in (bank, mov):
        np.testing.assert_allclose(np.asarray(_call_bank(layer, x, ids)), want, rtol=1e-6, atol=1e-6)


def test_adapter_from_bank_is_the_single_layer():
    """Splitting a bank gives back each single layer: its parameters bitwise, so its outputs bitwise."""
    base, singles = _singles("molora", jnp.float32)
    bank = stack_adapters(singles)
    x = _input("molora", 2, jnp.float32)
    for a, single in enumerate(singles):
        layer = adapter_from_bank(bank, a)
        assert layer.num_adapters is None and layer.base is base
        for name in ("lora_A", "lora_B", "router"):
            np.testing.assert_array_equal(np.asarray(getattr(layer, name)[...]), np.asarray(getattr(single, name)[...]))
        np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(single(x)))
    with pytest.raises(ValueError, match=r"index must be an int in \[0, 4\)"):
        adapter_from_bank(bank, A)
    with pytest.raises(ValueError, match=r"index must be an int in \[0, 4\)"):
        adapter_from_bank(bank, -1)
    with pytest.raises(ValueError, match="holds one adapter, not a bank"):
        adapter_from_bank(singles[0], 0)


def test_stacking_refuses_layers_of_another_structure():
    base = _base()
    mov = [MoVLinear(base, num_groups=G, num_experts=5, rngs=nnx.Rngs(a)) for a in range(2)]
    with pytest.raises(ValueError, match="at least one layer"):
        stack_adapters([])
    with pytest.raises(ValueError, match=r"layers\[1\] has num_experts=3, layers\[0\] 5"):
        stack_adapters([mov[0], MoVLinear(base, num_groups=G, num_experts=3, rngs=nnx.Rngs(0))])
    with pytest.raises(ValueError, match=r"layers\[1\] has top_k=2, layers\[0\] None"):
        stack_adapters([mov[0], MoVLinear(base, num_groups=G, num_experts=5, top_k=2, rngs=nnx.Rngs(0))])
    with pytest.raises(TypeError, match=r"layers\[1\] is a MoLoRALinear"):
        stack_adapters([mov[0], MoLoRALinear(base, 5, rngs=nnx.Rngs(0))])
    with pytest.raises(ValueError, match=r"layers\[1\] wraps another base layer"):
        other = nnx.Linear(K, N, rngs=nnx.Rngs(7))
        stack_adapters([mov[0], MoVLinear(other, num_groups=G, num_experts=5, rngs=nnx.Rngs(0))])
    with pytest.raises(ValueError, match=r"layers\[0\] already holds a bank of 2"):
        stack_adapters([stack_adapters(mov)])
    # an equal base (a copy with the same values) is accepted, the first layer's is shared
    twin = MoVLinear(nnx.clone(base), num_groups=G, num_experts=5, rngs=nnx.Rngs(3))
    assert stack_adapters([mov[0], twin]).base is base


@pytest.mark.parametrize("kind", ["mov_linear", "mov", "molora"])
def test_bad_adapter_ids_name_the_argument(kind):
    _, singles = _singles(kind, jnp.float32)
    bank = stack_adapters(singles[:3])
    x = _input(kind, 3, jnp.float32)
    good = jnp.asarray([0, -1, 2], dtype=jnp.int32)
    cases = [
        (None, ValueError, r"holds an adapter bank \(num_adapters=3\): pass adapter_ids \[B\]"),
        ([0, 1, 2], TypeError, "adapter_ids must be an integer jax.Array"),
        (good.astype(jnp.float32), TypeError, "adapter_ids must be an integer array"),
        (good[:2], ValueError, r"adapter_ids must have shape \[B\].*got shape \[2\].*input of shape \[3, 3, "),
        (jnp.zeros((3, S), jnp.int32), ValueError, r"adapter_ids must have shape \[B\].*got shape \[3, 3\]"),
        (jnp.asarray([0, 3, 1], jnp.int32), ValueError, r"index 3, outside \[-1, 3\)"),
        (jnp.asarray([0, -2, 1], jnp.int32), ValueError, r"index -2, outside \[-1, 3\)"),
    ]
    for ids, exc, match in cases:
        with pytest.raises(exc, match=match):
            bank(x, adapter_ids=ids)
    with pytest.raises(ValueError, match=r"adapter_ids must have shape \[B\].*input of shape \["):
        bank(x[0, 0], adapter_ids=good[:1])  # no batch dimension
    with pytest.raises(ValueError, match="holds one adapter: adapter_ids is for a layer holding an adapter bank"):
        singles[0](x, adapter_ids=good)
    # traced ids cannot be refused: an id outside the bank gives NaN rows, never another adapter's output
    y = _call_bank(bank, x, jnp.asarray([0, 5, -1], jnp.int32))
    y = np.asarray(y)
    assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2]]).all()


def test_bank_without_a_kernel_for_banks_says_so():
    bank = MoVLinear(_base(), num_groups=G, num_experts=2, num_adapters=2, implementation="pallas", rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match="no kernel for adapter banks"):
        bank(_input("mov_linear", 2, jnp.float32), adapter_ids=jnp.asarray([0, 1], jnp.int32))
    with pytest.raises(ValueError, match="num_adapters must be a positive int"):
        MoV(G, 8, num_adapters=0, rngs=nnx.Rngs(0))
