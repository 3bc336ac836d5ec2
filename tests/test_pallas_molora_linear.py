"""Pallas fused MoLoRA linear (kernels/pallas/molora_linear.py) and its custom_vjp (pemoe/jax/pallas.py).

* The kernel in the Pallas interpreter vs the references, float32 and bfloat16, odd and tiled shapes
  (partial row / column blocks, K over several steps, E·r wider than one 128-lane vreg), every routing
  mode (router, top-k, given probabilities, LoRA). Tolerance rule (tests/test_jax_ops.py, SPEC §5):
      max|out - truth| <= 2 * max|ref - truth| + ATOL[dtype] * max(max|truth|, 1)
  truth = the PyTorch reference in float64 on the same float32 draws, ref = the JAX reference in the
  kernel's dtypes. The saved residuals U and p_soft, which the backward consumes, must equal the
  "xla" implementation's (same roundings) up to float32 summation order: U within 1e-5 of its largest
  entry, p_soft within 1e-5 absolute (logits of size ~10 summed in another order move p by ~1e-6).
* The backward (dgrad) kernel in the interpreter vs the "xla" backward on the same residuals (tiled: partial
  dx tiles, N reduced over several steps; top-k, renormalised, given probs, LoRA): equal up to float32
  summation order.
* ``pemoe.jax.molora_linear(implementation="pallas")`` (both kernels + XLA adapter GEMMs): output and every
  gradient (x, weight, bias, lora_a, lora_b, router / router_input) under the same rule, E ∈ {1, 2, 10},
  r ∈ {1, 4, 16}.
* Block sizes: frozen, validated, each illegal choice names the rule; defaults TPU-legal at T5 shapes.
* Bad input: ValueError / TypeError at trace time naming the argument.
* ``jax.export(..., platforms=["tpu"])`` (Mosaic lowering) at T5 base / large / XL shapes with the
  default blocks, forward and a training step (:func:`export_cases`, reusable by other tests).
* The GPU twin (kernels/pallas/molora_linear_gpu.py): the same interpreter checks and a training step's
  gradients, its blocks' rules, a structural check that every access that can leave an array is masked
  (the Triton lowering does not bound-check and the interpreter pads, so only the jaxpr shows it), and
  ``jax.export(..., platforms=["cuda"])`` of its ``export_cases()`` and of a training step.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import export

from pemoe import jax as pj
from pemoe import reference as torch_reference
from pemoe.jax import pallas as jax_pallas
from pemoe.jax import reference as jax_reference
from pemoe.jax import xla
from pemoe.kernels.pallas import molora_linear as kernel
from pemoe.kernels.pallas import molora_linear_gpu as gpu_kernel
from pemoe.kernels.pallas.molora_linear import VMEM_BUDGET, MoLoRALinearBlocks, get_default
from pemoe.kernels.pallas.molora_linear_gpu import MoLoRALinearGPUBlocks
from tests.test_jax_ops import (
    _residuals,
    assert_within_rule,
    cast,
    check,
    jax_run,
    molora_inputs,
    torch_truth,
)

# ------------------------------------------------------------------------------------------
# the kernel in the interpreter vs the references (forward and the saved residuals)
# ------------------------------------------------------------------------------------------


def _inputs(t, k, n, e, r, *, routing="router", bias=True, seed=0) -> dict[str, Any]:
    """float32 numpy draws; routing: "router" (token), "probs" (per-token probabilities), "lora" (E = 1)."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    out = dict(
        x=rng.standard_normal((t, k)).astype(f32),
        weight=(rng.standard_normal((n, k)) * k**-0.5).astype(f32),
        bias=rng.standard_normal(n).astype(f32) if bias else None,
        lora_a=(0.3 * rng.standard_normal((e, k, r))).astype(f32),
        lora_b=(0.3 * rng.standard_normal((e, r, n))).astype(f32),
        router=None,
        router_input=None,
        router_in=None,
    )
    if routing == "router":
        out["router"] = (0.5 * rng.standard_normal((k, e))).astype(f32)
    elif routing == "probs":  # sentence-style routing: the router reads another input, one row per token
        out["router_input"] = rng.standard_normal((t, 9)).astype(f32)
        out["router_in"] = (0.5 * rng.standard_normal((9, e))).astype(f32)
    return out


KERNEL_CASES = {
    # grid (2, 3, 2): partial last row and column blocks, K accumulated over two steps
    "tiled-E10-r4": (dict(t=123, k=256, n=300, e=10, r=4), MoLoRALinearBlocks(64, 128, 128), {}),
    # E·r = 160: U spans two 128-lane vregs; top-2 renormalised
    "tiled-E10-r16-top2": (
        dict(t=123, k=256, n=300, e=10, r=16),
        MoLoRALinearBlocks(64, 128, 128),
        dict(top_k=2, renormalize=True),
    ),
    # E·r = 240, grid (5, 2, 3) with 8-row blocks; top-1 without renormalisation
    "tiled-E15-r16-top1": (dict(t=40, k=384, n=256, e=15, r=16), MoLoRALinearBlocks(8, 128, 128), dict(top_k=1)),
    # full-dimension blocks with odd widths (K = 40, N = 72: not lane multiples)
    "odd-E2-r1": (dict(t=7, k=40, n=72, e=2, r=1), None, {}),
    "one-token-E1-router-no-bias": (dict(t=1, k=128, n=136, e=1, r=16, bias=False), None, {}),
    "odd-lora-r4": (dict(t=33, k=40, n=72, e=1, r=4, routing="lora"), None, {}),
    "probs-E10-r1": (dict(t=33, k=136, n=200, e=10, r=1, routing="probs"), MoLoRALinearBlocks(16, 128, 136), {}),
}


def _truth(a: dict, scale: float, top_k, renormalize) -> np.ndarray:
    def t64(v):
        return None if v is None else torch.tensor(v, dtype=torch.float64)

    router = a["router"] if a["router_in"] is None else a["router_in"]
    return torch_reference.molora_linear(
        t64(a["x"]),
        t64(a["weight"]),
        t64(a["lora_a"]),
        t64(a["lora_b"]),
        t64(router),
        scale=scale,
        bias=t64(a["bias"]),
        top_k=top_k,
        renormalize=renormalize,
        router_input=t64(a["router_input"]),
    ).numpy()


#: (case, dtype) pairs run by default: every case in at least one dtype, the main tiled case and the cheap
#: full-block cases in both; the rest of the product runs under -m slow.
KERNEL_DEFAULT = {
    ("tiled-E10-r4", jnp.float32),
    ("tiled-E10-r4", jnp.bfloat16),
    ("tiled-E10-r16-top2", jnp.bfloat16),
    ("tiled-E15-r16-top1", jnp.float32),
    ("odd-E2-r1", jnp.float32),
    ("odd-E2-r1", jnp.bfloat16),
    ("one-token-E1-router-no-bias", jnp.bfloat16),
    ("odd-lora-r4", jnp.float32),
    ("odd-lora-r4", jnp.bfloat16),
    ("probs-E10-r1", jnp.float32),
}
KERNEL_PARAMS = [
    pytest.param(
        case,
        dtype,
        id=f"{case}-{jnp.dtype(dtype).name}",
        marks=() if (case, dtype) in KERNEL_DEFAULT else pytest.mark.slow,
    )
    for case in KERNEL_CASES
    for dtype in (jnp.float32, jnp.bfloat16)
]


@pytest.mark.parametrize("case,dtype", KERNEL_PARAMS)
def test_kernel_matches_reference(case, dtype):
    check_kernel(kernel, *KERNEL_CASES[case], dtype, case)


def check_kernel(module, shape: dict, blocks, routing_kw: dict, dtype, case: str) -> None:
    """module.molora_linear (TPU or GPU kernel) in the interpreter: y under the rule, U and p_soft vs "xla"."""
    a = _inputs(**shape)
    scale = 16.0 / shape["r"]
    top_k, renormalize = routing_kw.get("top_k"), routing_kw.get("renormalize", False)
    act = {k: None if a[k] is None else jnp.asarray(a[k], dtype) for k in ("x", "weight", "bias")}
    ad = {k: None if a[k] is None else jnp.asarray(a[k]) for k in ("lora_a", "lora_b", "router")}
    probs = None
    if a["router_input"] is not None:
        probs = jax_reference.router_probs(jnp.asarray(a["router_input"]), jnp.asarray(a["router_in"]))

    y, u, p_soft = module.molora_linear(
        act["x"], act["weight"], act["bias"], ad["lora_a"], ad["lora_b"], ad["router"], probs,
        scale=scale, blocks=blocks, interpret=True, save_residuals=True, **routing_kw,
    )  # fmt: skip

    truth = _truth(a, scale, top_k, renormalize)
    ref = jax_reference.molora_linear(
        act["x"], act["weight"], ad["lora_a"], ad["lora_b"],
        ad["router"] if probs is None else jnp.asarray(a["router_in"]),
        scale=scale, bias=act["bias"], top_k=top_k, renormalize=renormalize,
        router_input=None if probs is None else jnp.asarray(a["router_input"]),
    )  # fmt: skip
    assert y.dtype == jnp.dtype(dtype) and y.shape == truth.shape
    assert_within_rule(y, ref, truth, dtype, f"{module.__name__} {case}")
    if dtype == jnp.float32:  # without the residual outputs: the same y
        y_only = module.molora_linear(
            act["x"], act["weight"], act["bias"], ad["lora_a"], ad["lora_b"], ad["router"], probs,
            scale=scale, blocks=blocks, interpret=True, **routing_kw,
        )  # fmt: skip
        np.testing.assert_array_equal(np.asarray(y_only), np.asarray(y))

    # the residuals the backward consumes equal the "xla" forward's
    _, (*_, xla_p_soft, xla_u) = xla._molora_core_fwd(
        act["x"], act["weight"], ad["lora_a"], ad["lora_b"], ad["router"], probs, scale, top_k, renormalize
    )
    assert u.dtype == jnp.float32 and u.shape == (shape["t"], shape["e"] * shape["r"])
    np.testing.assert_allclose(u, xla_u, rtol=0, atol=1e-5 * float(np.abs(xla_u).max()))
    if ad["router"] is None:
        assert p_soft is None and xla_p_soft is None
    else:
        assert p_soft.dtype == jnp.float32 and p_soft.shape == (shape["t"], shape["e"])
        np.testing.assert_allclose(p_soft, xla_p_soft, rtol=0, atol=1e-5)  # logits ~ 10: float32 summation order


def test_kernel_empty_batch():
    a = _inputs(t=1, k=40, n=72, e=3, r=4)
    args = [jnp.zeros((0, 40)), jnp.asarray(a["weight"]), None, jnp.asarray(a["lora_a"]), jnp.asarray(a["lora_b"])]
    y, u, p = kernel.molora_linear(*args, jnp.asarray(a["router"]), scale=4.0, interpret=True, save_residuals=True)
    assert y.shape == (0, 72) and u.shape == (0, 12) and p.shape == (0, 3)


# ------------------------------------------------------------------------------------------
# the backward (dgrad) kernel in the interpreter vs the "xla" backward on the same residuals
# ------------------------------------------------------------------------------------------

#: (shape, blocks, routing): blocks tile dx [T, K] by (block_m, block_n) and reduce over N by block_k.
BWD_CASES = {
    # grid (2, 3, 2): partial row and dx-column tiles, N reduced over two steps (G = dy·B_catᵀ too)
    "tiled-E10-r4": (dict(t=123, k=300, n=256, e=10, r=4), MoLoRALinearBlocks(64, 128, 128), {}),
    "tiled-E10-r16-top2-renorm": (
        dict(t=123, k=300, n=256, e=10, r=16),
        MoLoRALinearBlocks(64, 128, 128),
        dict(top_k=2, renormalize=True),
    ),
    "E15-r16-top3": (dict(t=40, k=256, n=384, e=15, r=16), MoLoRALinearBlocks(8, 128, 128), dict(top_k=3)),
    "lora-r4": (dict(t=5, k=40, n=72, e=1, r=4, routing="lora"), None, {}),
    "probs-E10-r1": (dict(t=33, k=40, n=72, e=10, r=1, routing="probs"), None, {}),
}
BWD_PARAMS = [
    ("tiled-E10-r4", jnp.float32),
    ("tiled-E10-r16-top2-renorm", jnp.bfloat16),
    ("E15-r16-top3", jnp.float32),
    ("lora-r4", jnp.bfloat16),
    ("probs-E10-r1", jnp.float32),
]


@pytest.mark.parametrize("case,dtype", BWD_PARAMS, ids=[f"{c}-{jnp.dtype(d).name}" for c, d in BWD_PARAMS])
def test_backward_kernel_matches_xla_backward(case, dtype):
    """dx, dU (-> d lora_a) and d logits (-> d router) or d probs equal the "xla" backward's up to float32
    summation order (1e-5 of the largest entry; dx in bfloat16: one rounding, 2^-7 of the largest entry)."""
    shape, blocks, routing_kw = BWD_CASES[case]
    a = _inputs(**shape)
    t, k, n, e, r = (shape[key] for key in "tkner")
    scale = 16.0 / r
    top_k, renormalize = routing_kw.get("top_k"), routing_kw.get("renormalize", False)
    x, weight = jnp.asarray(a["x"], dtype), jnp.asarray(a["weight"], dtype)
    lora_a, lora_b = jnp.asarray(a["lora_a"]), jnp.asarray(a["lora_b"])
    router = None if a["router"] is None else jnp.asarray(a["router"])
    probs = None
    if a["router_input"] is not None:
        probs = jax_reference.router_probs(jnp.asarray(a["router_input"]), jnp.asarray(a["router_in"]))
    dy = jnp.asarray(np.random.default_rng(5).standard_normal((t, n)), dtype)
    _, res = xla._molora_core_fwd(x, weight, lora_a, lora_b, router, probs, scale, top_k, renormalize)
    ref_dx, _, ref_da, _, ref_drouter, ref_dprobs = xla._molora_core_bwd(scale, top_k, renormalize, res, dy)
    *_, p_soft, u = res

    dx, du, d_col = kernel.molora_linear_bwd(
        dy, weight, lora_a, lora_b, router, probs, u, p_soft,
        scale=scale, blocks=blocks, interpret=True, **routing_kw,
    )  # fmt: skip

    def close(got, want, what, rel=1e-5):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        assert got.shape == want.shape, what
        np.testing.assert_allclose(got, want, rtol=0, atol=rel * np.abs(want).max(), err_msg=what)

    assert dx.dtype == jnp.dtype(dtype) and du.dtype == jnp.float32
    close(dx, ref_dx, "dx", 1e-5 if dtype == jnp.float32 else 2**-7)
    x32 = np.asarray(x, np.float64)
    close((x32.T @ np.asarray(du, np.float64)).reshape(k, e, r).transpose(1, 0, 2), ref_da, "d lora_a")
    if router is not None:
        assert d_col.shape == (t, e)
        close(x32.T @ np.asarray(d_col, np.float64), ref_drouter, "d router")
    elif probs is not None:
        close(d_col, ref_dprobs, "d probs")
    else:
        assert d_col is None


@pytest.mark.parametrize(
    "blocks,match",
    [
        (MoLoRALinearBlocks(64, 128, 256), "block_k must divide K = 384"),  # the reduction is over N = 384
        (MoLoRALinearBlocks(64, 384, 128), "block_n = 384 is larger than N = 300"),  # dx columns tile K = 300
    ],
)
def test_backward_blocks_are_validated_with_roles_swapped(blocks, match):
    a = _inputs(t=64, k=300, n=384, e=2, r=4)
    w, la, lb, ro = (jnp.asarray(a[key]) for key in ("weight", "lora_a", "lora_b", "router"))
    u, p_soft = jnp.zeros((64, 8)), jnp.full((64, 2), 0.5)
    with pytest.raises(ValueError, match=match):
        kernel.molora_linear_bwd(jnp.ones((64, 384)), w, la, lb, ro, None, u, p_soft, scale=4.0, blocks=blocks)
    b = kernel.get_default_backward(2048, 2816, 1024, 10, 4)  # T5-large wo-like dgrad: dx [2048, 1024]
    b.validate(t=2048, n=1024, k=2816)
    assert 2816 % b.block_k == 0


# ------------------------------------------------------------------------------------------
# pemoe.jax.molora_linear(implementation="pallas"): Pallas forward and backward kernels, every gradient
# ------------------------------------------------------------------------------------------


def _tiled_inputs(t, e, r, *, k=640, n=300, seed=0, **kw):
    """molora_inputs at widths the default blocks tile: K = 640 (five 128-deep steps), N = 300 (partial)."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    return dict(
        x=rng.standard_normal((t, k)).astype(f32),
        weight=(rng.standard_normal((n, k)) * k**-0.5).astype(f32),
        bias=rng.standard_normal(n).astype(f32),
        lora_a=(0.3 * rng.standard_normal((e, k, r))).astype(f32),
        lora_b=(0.3 * rng.standard_normal((e, r, n))).astype(f32),
        router=(0.2 * rng.standard_normal((k, e))).astype(f32),
        scale=16.0 / r,
        **kw,
    )


OP_CASES = {
    # (dtype, inputs): E ∈ {1, 2, 10} and r ∈ {1, 4, 16} over the cases, odd T, K = 40, N = 72
    "f32-T7-E10-r4": (jnp.float32, lambda: molora_inputs(7, 10, 4)),
    "bf16-T123-E2-r16": (jnp.bfloat16, lambda: molora_inputs(123, 2, 16)),
    "f32-T1-lora-r1": (jnp.float32, lambda: molora_inputs(1, 1, 1)),
    "bf16-T33-E10-r1-top2-renorm": (jnp.bfloat16, lambda: molora_inputs(33, 10, 1, top_k=2, renormalize=True)),
    "f32-T33-E10-r4-top1": (jnp.float32, lambda: molora_inputs(33, 10, 4, top_k=1)),
    "f32-sentence-E2-r4-top1": (jnp.float32, lambda: molora_inputs(3, 2, 4, sentence=True, top_k=1)),
    # the default blocks tile these: grid (2, 2, 5) with partial row and column blocks
    "f32-tiled-T300-E10-r4": (jnp.float32, lambda: _tiled_inputs(300, 10, 4)),
    "bf16-tiled-T300-E2-r16-top1": (jnp.bfloat16, lambda: _tiled_inputs(300, 2, 16, top_k=1)),
}


@pytest.mark.parametrize("case", list(OP_CASES))
def test_op_output_and_gradients(monkeypatch, case):
    monkeypatch.setenv("PEMOE_PALLAS_INTERPRET", "1")
    dtype, make = OP_CASES[case]
    check("molora_linear", make(), dtype, implementation="pallas")


def test_op_saves_no_n_wide_tensor(monkeypatch, capsys):
    """Adapters trained: the residuals are the inputs plus U float32 [T, E·r] and p_soft float32 [T, E]."""
    monkeypatch.setenv("PEMOE_PALLAS_INTERPRET", "1")
    t, e, r, n = 123, 10, 4, 72
    arrays, static = cast(molora_inputs(t, e, r), jnp.bfloat16)
    x, weight, bias = arrays.pop("x"), arrays.pop("weight"), arrays.pop("bias")

    def loss(adapters):
        y = pj.molora_linear(x, weight, bias=bias, **adapters, **static, implementation="pallas")
        return y.astype(jnp.float32).sum()

    saved = _residuals(capsys, loss, arrays)
    assert not any(f"[{t},{e},{n}]" in s or f"[{t},{n}]" in s for s in saved), saved
    assert any(f"f32[{t},{e * r}]" in s for s in saved) and any(f"f32[{t},{e}]" in s for s in saved), saved


def test_op_pallas_needs_tpu_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("PEMOE_PALLAS_INTERPRET", raising=False)
    arrays, static = cast(molora_inputs(3, 2), jnp.float32)
    with pytest.raises(NotImplementedError, match="runs on TPU .* PEMOE_PALLAS_INTERPRET=1"):
        pj.molora_linear(**arrays, **static, implementation="pallas")
    assert "pallas" in pj.AVAILABLE["molora_linear"]


# ------------------------------------------------------------------------------------------
# the GPU twin (kernels/pallas/molora_linear_gpu.py, Pallas' Triton lowering) in the interpreter
# ------------------------------------------------------------------------------------------

GPU_CASES = {
    # grid (2, 2) + masked partial row and column blocks, K over two steps
    "tiled-E10-r4": (dict(t=70, k=128, n=200, e=10, r=4), MoLoRALinearGPUBlocks(64, 128, 64), {}),
    # E·r = 160 -> P = 256; top-2 renormalised; odd N, K = 48 (three 16-deep steps)
    "E10-r16-top2": (
        dict(t=33, k=48, n=72, e=10, r=16),
        MoLoRALinearGPUBlocks(32, 32, 16),
        dict(top_k=2, renormalize=True),
    ),
    "lora-r1-no-bias": (dict(t=7, k=48, n=72, e=1, r=1, routing="lora", bias=False), None, {}),
    "probs-E2-r4": (dict(t=5, k=32, n=40, e=2, r=4, routing="probs"), None, {}),
}
GPU_PARAMS = [
    ("tiled-E10-r4", jnp.float32),
    ("E10-r16-top2", jnp.bfloat16),
    ("lora-r1-no-bias", jnp.bfloat16),
    ("probs-E2-r4", jnp.float32),
]


@pytest.mark.parametrize("case,dtype", GPU_PARAMS, ids=[f"{c}-{jnp.dtype(d).name}" for c, d in GPU_PARAMS])
def test_gpu_kernel_matches_reference(case, dtype):
    check_kernel(gpu_kernel, *GPU_CASES[case], dtype, case)


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else [value]:
            inner = getattr(sub, "jaxpr", sub)
            if hasattr(inner, "eqns"):
                yield inner


def _pallas_calls(jaxpr) -> list:
    """Every pallas_call equation in a jaxpr, nested jaxprs (jit, loops, conds) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.append(eqn)
        else:
            for inner in _sub_jaxprs(eqn):
                found += _pallas_calls(inner)
    return found


def _ref_accesses(jaxpr, found=None) -> list[tuple[str, tuple[int, ...]]]:
    """(primitive, ref shape) of every ref read / write in a kernel jaxpr, nested loops and conds included."""
    found = [] if found is None else found
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("get", "swap", "masked_load", "masked_swap"):
            found.append((eqn.primitive.name, tuple(eqn.invars[0].aval.shape)))
        for inner in _sub_jaxprs(eqn):
            _ref_accesses(inner, found)
    return found


@pytest.mark.parametrize("routing", ["router", "probs"])
def test_gpu_kernel_masks_every_access_that_can_leave_the_array(routing):
    """Pallas' Triton lowering does not bound-check blocks (and the interpreter pads them, so the tests above
    cannot see a missing mask): every read of x, W, B_cat, bias, probs and every write must be masked; only
    the full-K adapter blocks (A_cat [K, P], router [K, E_pad]; K = 96 is no other block's leading dim) are
    read unmasked, in bounds by construction."""
    t, k, n, e, r = 70, 96, 200, 10, 4
    fn = functools.partial(
        gpu_kernel.molora_linear, scale=4.0, save_residuals=True, top_k=2 if routing == "router" else None
    )
    args = _specs(t, k, n, e, r, jnp.float32, routing=routing)
    calls = _pallas_calls(jax.make_jaxpr(fn)(*args).jaxpr)
    assert len(calls) == 1
    accesses = _ref_accesses(calls[0].params["jaxpr"])
    unmasked = [(name, shape) for name, shape in accesses if name in ("get", "swap")]
    assert all(name == "get" and shape[0] == k for name, shape in unmasked), unmasked
    assert len(unmasked) == (2 if routing == "router" else 1), unmasked  # A_cat (+ router)
    masked_loads = [a for a in accesses if a[0] == "masked_load"]
    masked_stores = [a for a in accesses if a[0] == "masked_swap"]
    assert len(masked_loads) == (4 if routing == "router" else 5), masked_loads  # x, W, B_cat, bias (+ probs)
    assert len(masked_stores) == (3 if routing == "router" else 2), masked_stores  # y, U (+ p_soft)


def test_gpu_kernel_gradients_through_the_custom_vjp():
    """backend="gpu": the GPU forward's residuals feed the XLA backward; every gradient under the rule."""
    inputs = _tiled_inputs(37, 10, 4, k=64, n=72, top_k=3)  # default GPU tile: (64, 64, 64), partial rows / columns
    numpy_arrays = {k: v for k, v in inputs.items() if isinstance(v, np.ndarray)}
    arrays, static = cast(inputs, jnp.float32)
    truth, truth_grads, grad_out = torch_truth("molora_linear", numpy_arrays, static)
    ref, ref_grads = jax_run("molora_linear", "reference", arrays, static, grad_out)

    def f(a):
        return jax_pallas.molora_linear(**a, **static, interpret=True, backend="gpu")

    out, vjp = jax.vjp(f, arrays)
    (grads,) = vjp(jnp.asarray(grad_out, jnp.float32))
    assert_within_rule(out, ref, truth, jnp.float32, "gpu molora_linear output")
    assert set(grads) == set(truth_grads)
    for name in truth_grads:
        assert_within_rule(grads[name], ref_grads[name], truth_grads[name], jnp.float32, f"gpu d{name}")


def test_gpu_blocks_are_validated():
    with pytest.raises(ValueError, match="block_m must be a power of two >= 16"):
        MoLoRALinearGPUBlocks(48, 64, 64)
    with pytest.raises(ValueError, match="block_k must be a power of two >= 16"):
        MoLoRALinearGPUBlocks(64, 64, 8)
    with pytest.raises(ValueError, match="num_warps must be a positive int"):
        MoLoRALinearGPUBlocks(num_warps=0)
    with pytest.raises(ValueError, match="block_k must divide K = 48"):
        MoLoRALinearGPUBlocks(64, 64, 32).validate(k=48)
    with pytest.raises(ValueError, match="K = 40 must be a multiple of 16"):
        gpu_kernel.get_default(8, 64, 40, 2, 4)
    assert gpu_kernel.get_default(7, 72, 48, 2, 4) == MoLoRALinearGPUBlocks(16, 64, 16)
    for _, t, k, n, e, r in gpu_kernel.EXPORT_SHAPES:
        b = gpu_kernel.get_default(t, n, k, e, r)
        assert k % b.block_k == 0 and all(v >= 16 and v & (v - 1) == 0 for v in (b.block_m, b.block_n, b.block_k))
    assert gpu_kernel.gpu_widths(10, 4) == (64, 16) and gpu_kernel.gpu_widths(15, 16) == (256, 16)


_CUDA_CALL = "__gpu$xla.gpu.triton"
GPU_EXPORT = {label: (fn, args) for label, fn, args in gpu_kernel.export_cases()}


def _export_cuda(fn, args):
    return export.export(
        jax.jit(fn), platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call(_CUDA_CALL)]
    )(*args)


@pytest.mark.parametrize("label", list(GPU_EXPORT))
def test_gpu_kernel_exports_for_cuda(label):
    """Pallas -> Triton lowering at T5 shapes with the default GPU blocks: one Triton call, the op's shapes."""
    fn, args = GPU_EXPORT[label]
    exported = _export_cuda(fn, args)
    (t, _), (n, _) = args[0].shape, args[1].shape
    assert exported.platforms == ("cuda",)
    assert [(a.shape, a.dtype) for a in exported.out_avals] == [((t, n), jnp.bfloat16)]
    calls = [line for line in exported.mlir_module().splitlines() if "stablehlo.custom_call" in line]
    assert len(calls) == 1 and f"@{_CUDA_CALL}(" in calls[0] and f"-> tensor<{t}x{n}xbf16>" in calls[0]


def test_gpu_train_step_exports_for_cuda():
    """Forward (GPU kernel, saving U and p_soft) + XLA backward through the custom_vjp, lowered for CUDA."""
    specs = _specs(2048, 768, 768, 10, 4, jnp.bfloat16)
    exported = _export_cuda(functools.partial(_train_step, scale=4.0, backend="gpu"), specs)
    out = exported.out_avals
    assert [a.shape for a in out[1:]] == [specs[3].shape, specs[4].shape, specs[5].shape]
    calls = [line for line in exported.mlir_module().splitlines() if f"@{_CUDA_CALL}(" in line]
    assert len(calls) == 1 and "tensor<2048x40xf32>" in calls[0] and "tensor<2048x10xf32>" in calls[0]


# ------------------------------------------------------------------------------------------
# block sizes: a validated frozen dataclass with TPU-legal defaults
# ------------------------------------------------------------------------------------------

#: T5 v1.1 widths (d_model, d_ff); attention projections are d_model x d_model (heads · d_kv = d_model).
T5_SHAPES = {"t5-base": (768, 2048), "t5-large": (1024, 2816), "t5-xl": (2048, 5120)}


def t5_sites(model: str) -> dict[str, tuple[int, int]]:
    """(K, N) of the MoLoRA sites: q/k/v/o (d_model -> d_model), wi (d_model -> d_ff), wo (d_ff -> d_model)."""
    d_model, d_ff = T5_SHAPES[model]
    return {"qkvo": (d_model, d_model), "wi": (d_model, d_ff), "wo": (d_ff, d_model)}


@pytest.mark.parametrize("e,r", [(1, 4), (10, 4), (15, 16)])
@pytest.mark.parametrize("model", list(T5_SHAPES))
def test_defaults_are_tpu_legal(model, e, r):
    for k, n in t5_sites(model).values():
        for t in (1, 123, 2048):
            for itemsize in (2, 4):
                b = get_default(t, n, k, e, r, itemsize=itemsize)
                assert b.block_m == t or (b.block_m % 8 == 0 and b.block_m <= t), b
                assert b.block_n == n or (b.block_n % 128 == 0 and b.block_n <= n), b
                assert b.block_k == k or (b.block_k % 128 == 0 and k % b.block_k == 0), b
                assert b.vmem_bytes(num_experts=e, rank=r, itemsize=itemsize) <= VMEM_BUDGET
                b.validate(t=t, n=n, k=k)
                # the backward tiles dx [t, k] and reduces over n: the same rules with N and K swapped
                kernel.get_default_backward(t, n, k, e, r, itemsize=itemsize).validate(t=t, n=k, k=n)
    # K not a multiple of 128 is taken whole
    assert get_default(7, 72, 40, e, r).block_k == 40


def test_default_that_fits_no_budget_is_an_error():
    with pytest.raises(ValueError, match="no default tile fits the VMEM budget"):
        get_default(2048, 4096, 3 * 2**15 + 1, 10, 4, itemsize=4)  # K not a lane multiple: taken whole
    with pytest.raises(ValueError, match="positive sizes"):
        get_default(8, 128, 128, 0, 4)


def test_blocks_are_frozen():
    b = MoLoRALinearBlocks()
    with pytest.raises(AttributeError):
        b.block_m = 8


@pytest.mark.parametrize(
    "blocks,match",
    [
        (MoLoRALinearBlocks(12, 128, 128), "block_m must equal T = 64 or be a multiple of 8"),
        (MoLoRALinearBlocks(128, 128, 128), "block_m = 128 is larger than T = 64"),
        (MoLoRALinearBlocks(64, 96, 128), "block_n must equal N = 300 or be a multiple of 128"),
        (MoLoRALinearBlocks(64, 384, 128), "block_n = 384 is larger than N = 300"),
        (MoLoRALinearBlocks(64, 128, 192), "block_k must equal K = 384 or be a multiple of 128"),
        (MoLoRALinearBlocks(64, 128, 256), "block_k must divide K = 384"),
    ],
)
def test_illegal_blocks_name_the_rule(blocks, match):
    with pytest.raises(ValueError, match=match):
        blocks.validate(t=64, n=300, k=384)


@pytest.mark.parametrize("blocks", [MoLoRALinearBlocks(64, 300, 384), MoLoRALinearBlocks(8, 256, 128)])
def test_legal_blocks_pass(blocks):
    blocks.validate(t=64, n=300, k=384)


@pytest.mark.parametrize("value", [0, -8, 8.0, True, None])
def test_blocks_must_be_positive_ints(value):
    with pytest.raises(ValueError, match="block_k must be a positive int"):
        MoLoRALinearBlocks(8, 128, value)


def test_illegal_blocks_are_rejected_by_the_kernel():
    a = _inputs(t=16, k=256, n=128, e=2, r=4)
    args = [jnp.asarray(a[k]) for k in ("x", "weight", "bias", "lora_a", "lora_b", "router")]
    with pytest.raises(ValueError, match="block_k must divide K = 256"):
        kernel.molora_linear(*args, scale=4.0, blocks=MoLoRALinearBlocks(16, 128, 384))


# ------------------------------------------------------------------------------------------
# bad input: a clear error at trace time, naming the argument and the expected shape
# ------------------------------------------------------------------------------------------


def _bad_call(**change):
    a = _inputs(t=3, k=40, n=72, e=4, r=2)
    kw = {k: None if a[k] is None else jnp.asarray(a[k]) for k in ("x", "weight", "bias", "lora_a", "lora_b")}
    kw.update(router=jnp.asarray(a["router"]), probs=None, scale=8.0, interpret=True)
    kw.update(change)
    return lambda: kernel.molora_linear(**kw)


BAD = {
    "x 1-D": (dict(x=jnp.ones(40)), ValueError, r"x must be \[T, K\], got shape \[40\]"),
    "weight K": (dict(weight=jnp.ones((72, 41))), ValueError, r"weight must be \[N, K\] with K = 40"),
    "x int": (dict(x=jnp.ones((3, 40), jnp.int32)), TypeError, "x must be float32, bfloat16 or float16"),
    "dtype mix": (dict(weight=jnp.ones((72, 40), jnp.bfloat16)), TypeError, "x and weight must share one dtype"),
    "bias": (dict(bias=jnp.ones(71)), ValueError, r"bias must be \[N\] = \[72\], got shape \[71\]"),
    "lora_a K": (dict(lora_a=jnp.ones((4, 39, 2))), ValueError, r"lora_a must be \[E, K, r\] with K = 40"),
    "lora_a r=0": (dict(lora_a=jnp.ones((4, 40, 0))), ValueError, r"lora_a must be \[E, K, r\]"),
    "lora_b": (dict(lora_b=jnp.ones((4, 3, 72))), ValueError, r"lora_b must be \[E, r, N\] = \[4, 2, 72\]"),
    "lora_b int": (dict(lora_b=jnp.ones((4, 2, 72), jnp.int32)), TypeError, "lora_b must be a floating array"),
    "router E": (dict(router=jnp.ones((40, 3))), ValueError, r"router must be \[K, E\] = \[40, 4\], got shape"),
    "no router": (dict(router=None), ValueError, r"router \[K, E\] \(or probs \[T, E\]\) is required when E > 1"),
    "both": (dict(probs=jnp.ones((3, 4))), ValueError, "give router .* or probs .*, not both"),
    "probs": (dict(router=None, probs=jnp.ones((3, 5))), ValueError, r"probs must be \[T, E\] = \[3, 4\]"),
    "top_k 5": (dict(top_k=5), ValueError, r"top_k must be an int in \[1, E = 4\], got 5"),
    "top_k probs": (dict(router=None, probs=jnp.ones((3, 4)), top_k=1), ValueError, "top_k needs the router"),
    "scale": (dict(scale="8"), TypeError, "scale must be a Python float"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_at_trace_time(case):
    change, error, match = BAD[case]
    with pytest.raises(error, match=match):
        _bad_call(**change)()


# ------------------------------------------------------------------------------------------
# lowering for TPU (Mosaic) at T5 shapes, default blocks
# ------------------------------------------------------------------------------------------


class ExportCase(NamedTuple):
    """A jit-able function and the abstract arguments to export it with (``jax.export`` of ``fn(*args)``)."""

    name: str
    fn: Any
    args: tuple[Any, ...]


def _specs(t, k, n, e, r, act, routing="router"):
    f32 = jnp.float32
    return (
        jax.ShapeDtypeStruct((t, k), act),
        jax.ShapeDtypeStruct((n, k), act),
        jax.ShapeDtypeStruct((n,), act),
        jax.ShapeDtypeStruct((e, k, r), f32),
        jax.ShapeDtypeStruct((e, r, n), f32),
        jax.ShapeDtypeStruct((k, e), f32) if routing == "router" else None,
        jax.ShapeDtypeStruct((t, e), f32) if routing == "probs" else None,
    )


def _train_step(x, weight, bias, lora_a, lora_b, router, probs, *, scale, top_k=None, backend="tpu"):
    """Loss and adapter gradients through the custom_vjp (Pallas forward, XLA backward), compiled not interpreted."""

    def loss(adapters):
        y = jax_pallas.molora_linear(
            x, weight, **adapters, scale=scale, bias=bias, probs=probs, top_k=top_k, backend=backend
        )
        return y.astype(jnp.float32).sum()

    return jax.value_and_grad(loss)(dict(lora_a=lora_a, lora_b=lora_b, router=router))


def export_cases(t: int = 2048, act=jnp.bfloat16) -> list[ExportCase]:
    """MoLoRA kernel exports at T5 v1.1 base / large / XL sites (q/k/v/o, wi, wo) with the default blocks.

    E = 10, r = 4 at every site (the forward that saves U and p_soft, as training runs it), plus at
    T5-large: MoLoRA-15 (r = 4), E = 15 r = 16 (E·r = 240), top-2, LoRA (E = 1), sentence routing (probs),
    a float32 forward, and one training step (forward + XLA backward) per model at q/k/v/o.
    """
    cases = []
    fwd = functools.partial(kernel.molora_linear, scale=4.0, save_residuals=True)
    for model in T5_SHAPES:
        for site, (k, n) in t5_sites(model).items():
            cases.append(ExportCase(f"{model}-{site}-E10-r4", fwd, _specs(t, k, n, 10, 4, act)))
        k, n = t5_sites(model)["qkvo"]
        step = functools.partial(_train_step, scale=4.0)
        cases.append(ExportCase(f"{model}-qkvo-E10-r4-train-step", step, _specs(t, k, n, 10, 4, act)))
    k, n = t5_sites("t5-large")["wi"]
    cases += [
        ExportCase("t5-large-wi-E15-r4", fwd, _specs(t, k, n, 15, 4, act)),
        ExportCase("t5-large-wi-E15-r16", fwd, _specs(t, k, n, 15, 16, act)),
        ExportCase(
            "t5-large-wi-E10-r4-top2",
            functools.partial(kernel.molora_linear, scale=4.0, top_k=2, save_residuals=True),
            _specs(t, k, n, 10, 4, act),
        ),
        ExportCase("t5-large-wi-lora-r4", fwd, _specs(t, k, n, 1, 4, act, routing=None)),
        ExportCase("t5-large-wi-E10-r4-probs", fwd, _specs(t, k, n, 10, 4, act, routing="probs")),
        ExportCase("t5-large-wi-E10-r4-float32", fwd, _specs(t, k, n, 10, 4, jnp.float32)),
    ]
    return cases


EXPORT_CASES = {c.name: c for c in export_cases()}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_exports_for_tpu(case):
    c = EXPORT_CASES[case]
    exported = export.export(jax.jit(c.fn), platforms=["tpu"])(*c.args)
    assert exported.platforms == ("tpu",)
    module = exported.mlir_module()
    assert module.count("tpu_custom_call") >= 1, "the kernel did not lower through Mosaic"
    if "train-step" in case:
        assert module.count("@tpu_custom_call") == 2, "forward and backward kernels"
        _, grads = exported.out_avals[0], exported.out_avals[1:]
        assert [g.shape for g in grads] == [c.args[3].shape, c.args[4].shape, c.args[5].shape]  # lora_a, b, router
    else:
        x, weight = c.args[0], c.args[1]
        assert exported.out_avals[0].shape == (x.shape[0], weight.shape[0])
        assert exported.out_avals[0].dtype == x.dtype
        e, _, r = c.args[3].shape
        assert exported.out_avals[1].shape == (x.shape[0], e * r)  # U saved for the backward
