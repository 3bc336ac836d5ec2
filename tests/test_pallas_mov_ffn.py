"""Pallas fused MoV FFN (kernels/pallas/mov_ffn.py): the two forward kernels in the Pallas interpreter
and ``pemoe.jax.mov_ffn(implementation="pallas")`` (kernel forward + explicit XLA backward) vs the
references, output and every gradient; block-size validation; bad input; the TPU lowering
(``jax.export(..., platforms=["tpu"])``, Mosaic) at T5 base / large / XL shapes with the default blocks;
the GPU twins of the kernels (``backend="gpu"``) in the interpreter and lowered for CUDA (Pallas' Triton
lowering, ``platforms=["cuda"]``).

Tolerance rule (tests/test_jax_ops.py, after tests/helpers.py): with ``truth`` the torch reference in
float64 from the same float32 draws and ``ref`` the JAX reference in the tested dtype,

    max|out - truth| <= 2 * max|ref - truth| + ATOL[dtype] * max(max|truth|, 1)

ATOL: float32 2e-6, bfloat16 2**-7.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import export
from jax.ad_checkpoint import print_saved_residuals

from pemoe import jax as pj
from pemoe import reference as torch_reference
from pemoe.jax import pallas as jax_pallas
from pemoe.jax import reference as jax_reference
from pemoe.kernels.pallas import mov_ffn as kernel
from pemoe.kernels.pallas.mov_ffn import (
    VMEM_BUDGET,
    MoVFFNBlocks,
    MoVFFNTritonBlocks,
    export_cases,
    get_default,
    get_default_triton,
)
from tests.test_jax_ops import assert_within_rule, cast, check, mov_ffn_inputs, torch_truth

__all__ = ["export_cases"]  # re-exported for the other export tests


def _inputs(t, m, f, e, *, gated=True, activation="gelu_new", seed=0) -> dict:
    """numpy float32 draws (routers larger than the 0.02 init so routing matters)."""
    rng = np.random.default_rng(seed)
    args = dict(
        x=rng.standard_normal((t, m)),
        wi_0=rng.standard_normal((f, m)) * m**-0.5,
        wo=rng.standard_normal((m, f)) * f**-0.5,
        router=0.2 * rng.standard_normal((f, e)) if e > 1 else None,
        experts=1.0 + 0.3 * rng.standard_normal((1, e, f)),
    )
    if gated:
        args["wi_1"] = rng.standard_normal((f, m)) * m**-0.5
    return {k: None if v is None else v.astype(np.float32) for k, v in args.items()} | {"activation": activation}


# (shape, blocks): tiled cases run every grid axis over several steps with a partial last row block
KERNEL_CASES = {
    # (a) grid (2, 3, 2), (b) grid (2, 2, 3)
    "tiled-gated-gelu_new-E10": (dict(t=123, m=256, f=384, e=10), MoVFFNBlocks(64, 128, 128, 128, 128)),
    # (a) grid (3, 2, 2) with a partial last row block of 8; (b) grid (3, 1, 2)
    "tiled-relu-E2": (
        dict(t=40, m=256, f=256, e=2, gated=False, activation="relu"),
        MoVFFNBlocks(16, 128, 128, 256, 128),
    ),
    # full-dimension blocks at odd widths (M = 40, F = 56: no lane multiple), (IA)3, erf gelu
    "odd-gelu-ia3": (dict(t=7, m=40, f=56, e=1, activation="gelu"), None),
    "one-token-E10": (dict(t=1, m=40, f=56, e=10, gated=False), None),
    # Llama's gated SiLU
    "odd-silu-E4": (dict(t=9, m=40, f=56, e=4, activation="silu"), None),
}
KERNEL_PARAMS = [
    ("tiled-gated-gelu_new-E10", jnp.float32),
    ("tiled-gated-gelu_new-E10", jnp.bfloat16),
    ("tiled-relu-E2", jnp.bfloat16),
    ("odd-gelu-ia3", jnp.float32),
    ("one-token-E10", jnp.bfloat16),
    ("odd-silu-E4", jnp.bfloat16),
]


def _torch64(inputs: dict) -> np.ndarray:
    def t64(name):
        return None if inputs.get(name) is None else torch.tensor(inputs[name], dtype=torch.float64)

    return torch_reference.mov_ffn(
        t64("x"), t64("wi_0"), t64("wo"), t64("router"), t64("experts"), wi_1=t64("wi_1"),
        activation=inputs["activation"],
    ).numpy()  # fmt: skip


def _jax_args(inputs: dict, dtype) -> dict:
    act = {"x", "wi_0", "wi_1", "wo"}
    return {
        k: None if v is None else jnp.asarray(v, dtype if k in act else jnp.float32)
        for k, v in inputs.items()
        if k != "activation"
    }


@pytest.mark.parametrize("case,dtype", KERNEL_PARAMS, ids=[f"{c}-{jnp.dtype(d).name}" for c, d in KERNEL_PARAMS])
def test_kernel_matches_reference(case, dtype):
    shape, blocks = KERNEL_CASES[case]
    inputs = _inputs(**shape)
    truth = _torch64(inputs)
    a = _jax_args(inputs, dtype)
    activation = inputs["activation"]
    out = kernel.mov_ffn(
        a["x"], a["wi_0"], a["wo"], a["router"], a["experts"], a.get("wi_1"),
        activation=activation, blocks=blocks, interpret=True,
    )  # fmt: skip
    ref = jax_reference.mov_ffn(
        a["x"], a["wi_0"], a["wo"], a["router"], a["experts"], wi_1=a.get("wi_1"), activation=activation
    )
    assert out.dtype == jnp.dtype(dtype) and out.shape == truth.shape
    assert_within_rule(out, ref, truth, dtype, f"pallas mov_ffn {case}")


def test_up_kernel_probabilities_and_residuals():
    """Kernel (a) alone: p = softmax(a·router) (padded lanes exactly 0), u, h0, g against numpy float64."""
    inputs = _inputs(t=123, m=256, f=384, e=10)
    a = _jax_args(inputs, jnp.float32)
    up = kernel.mov_ffn_up(
        a["x"], a["wi_0"], a["wi_1"], a["router"], save_residuals=True,
        blocks=MoVFFNBlocks(64, 128, 128, 128, 128), interpret=True,
    )  # fmt: skip
    x, w0, w1, r = (inputs[k].astype(np.float64) for k in ("x", "wi_0", "wi_1", "router"))
    h0, g = x @ w0.T, x @ w1.T
    act = 0.5 * h0 * (1.0 + np.tanh(0.7978845608028654 * (h0 + 0.044715 * h0**3)))
    logits = act @ r
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    assert up.p.shape == (123, 128) and up.p.dtype == jnp.float32
    assert not np.asarray(up.p[:, 10:]).any()
    np.testing.assert_allclose(np.asarray(up.p[:, :10]), p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(up.h0), h0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(up.g), g, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(up.u), act * g, rtol=1e-5, atol=1e-5)
    plain = kernel.mov_ffn_up(a["x"], a["wi_0"], None, None, num_experts=10, interpret=True)
    assert plain.p is None and plain.h0 is None and plain.g is None


# ------------------------------------------------------------------------------------------
# pemoe.jax.mov_ffn(implementation="pallas"): kernel forward + explicit XLA backward, every gradient
# ------------------------------------------------------------------------------------------

OP_CASES = [
    (jnp.float32, 37, 10, True, "gelu_new"),
    (jnp.float32, 1, 2, False, "gelu"),
    (jnp.bfloat16, 7, 1, False, "relu"),
    (jnp.bfloat16, 123, 2, True, "gelu_new"),
]


@pytest.mark.parametrize(
    "dtype,t,e,gated,activation",
    OP_CASES,
    ids=[f"{jnp.dtype(c[0]).name}-T{c[1]}-E{c[2]}-{'gated' if c[3] else 'ungated'}-{c[4]}" for c in OP_CASES],
)
def test_op_output_and_gradients(monkeypatch, dtype, t, e, gated, activation):
    monkeypatch.setenv("PEMOE_PALLAS_INTERPRET", "1")
    check("mov_ffn", mov_ffn_inputs(t, e, gated=gated, activation=activation), dtype, implementation="pallas")


def test_op_top_k_and_sentence_routing(monkeypatch):
    monkeypatch.setenv("PEMOE_PALLAS_INTERPRET", "1")
    check("mov_ffn", mov_ffn_inputs(9, 10, top_k=2, renormalize=True), jnp.float32, implementation="pallas")
    inputs = mov_ffn_inputs(1, 4, top_k=2)
    rng = np.random.default_rng(2)
    inputs["x"] = rng.standard_normal((2, 3, 40)).astype(np.float32)
    inputs["router_input"] = rng.standard_normal((2, 9)).astype(np.float32)
    inputs["router"] = (0.5 * rng.standard_normal((9, 4))).astype(np.float32)
    check("mov_ffn", inputs, jnp.bfloat16, implementation="pallas")


TILED_GRAD_CASES = {
    # TPU kernels: every grid axis of both kernels tiled, a partial last row block
    "tpu-bfloat16": (jnp.bfloat16, dict(t=123, m=256, f=384, e=10), MoVFFNBlocks(64, 128, 128, 128, 128), "tpu"),
    "tpu-float32": (jnp.float32, dict(t=123, m=256, f=384, e=10), MoVFFNBlocks(64, 128, 128, 128, 128), "tpu"),
    # GPU kernels: masked edges on every axis (T, M, F not multiples of the blocks)
    "gpu-float32": (jnp.float32, dict(t=45, m=72, f=100, e=10), MoVFFNTritonBlocks(32, 32, 16, 32, 32), "gpu"),
}


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c == "tpu-float32" else c for c in TILED_GRAD_CASES]
)
def test_tiled_gradients(case):
    """Output and every gradient from residuals written by a multi-tile grid, vs the reference."""
    dtype, shape, blocks, backend = TILED_GRAD_CASES[case]
    inputs = _inputs(**shape)
    del inputs["activation"]
    arrays, _ = cast(inputs, dtype)
    truth, truth_grads, grad_out = torch_truth("mov_ffn", inputs, {})

    def pallas_fn(a):
        return jax_pallas.mov_ffn(
            a["x"], a["wi_0"], a["wo"], a["router"], a["experts"], wi_1=a["wi_1"],
            blocks=blocks, backend=backend, interpret=True,
        )  # fmt: skip

    def ref_fn(a):
        return jax_reference.mov_ffn(a["x"], a["wi_0"], a["wo"], a["router"], a["experts"], wi_1=a["wi_1"])

    @jax.jit
    def both(arrays, g):
        results = []
        for fn in (pallas_fn, ref_fn):
            out, vjp = jax.vjp(fn, arrays)
            results.append((out, vjp(g.astype(out.dtype))[0]))
        return results

    (out, grads), (ref, ref_grads) = both(arrays, jnp.asarray(grad_out, jnp.float32))
    assert_within_rule(out, ref, truth, dtype, "tiled mov_ffn output")
    for name in truth_grads:
        assert grads[name].dtype == arrays[name].dtype
        assert_within_rule(grads[name], ref_grads[name], truth_grads[name], dtype, f"tiled mov_ffn d{name}")


def test_saves_no_float32_activation(monkeypatch, capsys):
    """bf16, adapters trained: residuals are h0 and g in bf16 [T, F] and p_soft float32 [T, E]; nothing
    float32 of width F, no third [T, F] tensor."""
    monkeypatch.setenv("PEMOE_PALLAS_INTERPRET", "1")
    t, e, f = 123, 10, 56
    arrays, static = cast(mov_ffn_inputs(t, e), jnp.bfloat16)
    frozen = {k: arrays.pop(k) for k in ("x", "wi_0", "wi_1", "wo")}

    def loss(adapters):
        y = pj.mov_ffn(**frozen, **adapters, **static, implementation="pallas")
        return y.astype(jnp.float32).sum()

    print_saved_residuals(loss, arrays)
    saved = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert not any(f"f32[{t},{f}]" in s for s in saved), saved
    assert sum(f"bf16[{t},{f}]" in s for s in saved) == 2, saved
    assert sum(f"f32[{t},{e}]" in s for s in saved) == 1, saved


def test_op_needs_tpu_gpu_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("PEMOE_PALLAS_INTERPRET", raising=False)
    assert "pallas" in pj.AVAILABLE["mov_ffn"]
    arrays, static = cast(mov_ffn_inputs(3, 2), jnp.float32)
    with pytest.raises(NotImplementedError, match="runs on TPU .* PEMOE_PALLAS_INTERPRET=1"):
        pj.mov_ffn(**arrays, **static, implementation="pallas")
    assert pj.resolve_implementation("mov_ffn", "pallas", "tpu") == "pallas"
    assert pj.resolve_implementation("mov_ffn", "pallas", "gpu") == "pallas"  # the Triton lowering
    assert pj.resolve_implementation("mov_linear", "pallas", "gpu") == "pallas"
    with pytest.raises(NotImplementedError, match="runs on TPU"):
        pj.resolve_implementation("mov_ffn", "pallas", "cpu")


def test_op_empty_batch(monkeypatch):
    monkeypatch.setenv("PEMOE_PALLAS_INTERPRET", "1")
    arrays, static = cast(mov_ffn_inputs(1, 3), jnp.float32)
    arrays["x"] = jnp.zeros((2, 0, 40))
    y, vjp = jax.vjp(lambda a: pj.mov_ffn(**a, **static, implementation="pallas"), arrays)
    assert y.shape == (2, 0, 40)
    (grads,) = vjp(jnp.ones_like(y))
    assert grads["x"].shape == (2, 0, 40) and not np.asarray(grads["router"]).any()


# ------------------------------------------------------------------------------------------
# block sizes: a validated frozen dataclass with TPU-legal defaults
# ------------------------------------------------------------------------------------------

T5_SHAPES = kernel.T5_SHAPES  # d_model, d_ff (T5 v1.1 base / large / XL)


@pytest.mark.parametrize("itemsize", [2, 4])
@pytest.mark.parametrize("t", [1, 123, 2048])
@pytest.mark.parametrize("model", list(T5_SHAPES))
def test_defaults_are_tpu_legal(model, t, itemsize):
    m, f = T5_SHAPES[model]
    b = get_default(t, f, m, 10, itemsize=itemsize)
    assert b.block_t == t or (b.block_t % 8 == 0 and b.block_t <= t)
    for block, size in ((b.up_block_f, f), (b.up_block_k, m), (b.down_block_k, f)):
        assert block == size or (block % 128 == 0 and size % block == 0)
    assert b.down_block_n == m or (b.down_block_n % 128 == 0 and b.down_block_n <= m)
    assert max(b.vmem_bytes(e=10, itemsize=itemsize)) <= VMEM_BUDGET
    b.validate(t=t, f=f, k=m, e=10, itemsize=itemsize)


def test_default_prefers_whole_model_width():
    """x's row block resident over F in (a) and the merge once per A tile in (b) at T5 XL, bfloat16."""
    b = get_default(2048, 5120, 2048, 10)
    assert (b.block_t, b.up_block_k, b.down_block_n) == (256, 2048, 2048)


def test_blocks_are_frozen_and_positive():
    b = MoVFFNBlocks()
    with pytest.raises(AttributeError):
        b.block_t = 8
    with pytest.raises(ValueError, match="down_block_k must be a positive int"):
        MoVFFNBlocks(8, 128, 128, 128, 0)
    with pytest.raises(ValueError, match="block_t must be a positive int"):
        MoVFFNBlocks(True, 128, 128, 128, 128)


@pytest.mark.parametrize(
    "blocks,match",
    [
        (MoVFFNBlocks(64, 128, 128, 128, 128), None),
        (MoVFFNBlocks(12, 128, 128, 128, 128), "block_t must equal T = 64 or be a multiple of 8"),
        (MoVFFNBlocks(128, 128, 128, 128, 128), "block_t = 128 is larger than T = 64"),
        (MoVFFNBlocks(64, 192, 128, 128, 128), "up_block_f must equal F = 768 or be a multiple of 128"),
        (MoVFFNBlocks(64, 512, 128, 128, 128), r"up_block_f must divide F = 768 \(no partial"),
        (MoVFFNBlocks(64, 128, 96, 128, 128), "up_block_k must equal M = 384 or be a multiple of 128"),
        (MoVFFNBlocks(64, 128, 256, 128, 128), "up_block_k must divide M = 384"),
        (MoVFFNBlocks(64, 128, 128, 200, 128), "down_block_n must equal M = 384 or be a multiple of 128"),
        (MoVFFNBlocks(64, 128, 128, 512, 128), "down_block_n = 512 is larger than M = 384"),
        (MoVFFNBlocks(64, 128, 128, 256, 128), None),  # a partial last column block of (b) is fine
        (MoVFFNBlocks(64, 128, 128, 128, 512), "down_block_k must divide F = 768"),
        (MoVFFNBlocks(64, 768, 384, 384, 768), None),  # whole dimensions
    ],
)
def test_illegal_blocks_name_the_rule(blocks, match):
    if match is None:
        blocks.validate(t=64, f=768, k=384, e=10)
        return
    with pytest.raises(ValueError, match=match):
        blocks.validate(t=64, f=768, k=384, e=10)


def test_blocks_over_the_vmem_budget_are_rejected():
    big = MoVFFNBlocks(1024, 1024, 4096, 128, 128)
    with pytest.raises(ValueError, match=r"kernel \(a\) up needs about .* MiB of VMEM .* over the 16 MiB budget"):
        big.validate(t=2048, f=4096, k=4096, e=10)
    with pytest.raises(ValueError, match=r"kernel \(b\) down needs about"):
        MoVFFNBlocks(1024, 128, 128, 4096, 1024).validate(t=2048, f=4096, k=4096, e=10, itemsize=4)


# ------------------------------------------------------------------------------------------
# bad input: a clear ValueError / TypeError naming the argument, at trace time
# ------------------------------------------------------------------------------------------


def _kernel_call(**change):
    a = _jax_args(_inputs(t=3, m=40, f=56, e=4), jnp.float32) | change
    return lambda: jax.jit(
        lambda a: kernel.mov_ffn(
            a["x"], a["wi_0"], a["wo"], a["router"], a["experts"], a["wi_1"], blocks=a.get("blocks"), interpret=True
        )
    ).lower(a)


BAD = {
    "x 3-d": (dict(x=jnp.ones((1, 3, 40))), ValueError, r"x must be \[T, M\]"),
    "x int": (dict(x=jnp.ones((3, 40), jnp.int32)), TypeError, "x must be float32, bfloat16 or float16"),
    "wi_0 M": (dict(wi_0=jnp.ones((56, 41))), ValueError, r"wi_0 must be \[F, M\] with M = 40"),
    "wi_0 dtype": (dict(wi_0=jnp.ones((56, 40), jnp.bfloat16)), TypeError, "wi_0 must have x's dtype float32"),
    "wi_1 shape": (dict(wi_1=jnp.ones((55, 40))), ValueError, r"wi_1 must be \[F, M\] = \[56, 40\]"),
    "wo shape": (dict(wo=jnp.ones((40, 55))), ValueError, r"wo must be \[M, F\] = \[40, 56\]"),
    "wo dtype": (dict(wo=jnp.ones((40, 56), jnp.bfloat16)), TypeError, "wo must have x's dtype"),
    "router F": (dict(router=jnp.ones((55, 4))), ValueError, r"router must be \[F, E\] with F = 56"),
    "experts E": (dict(experts=jnp.ones((1, 3, 56))), ValueError, r"experts must be \[1, E, F\] with E = 4"),
    "experts F": (dict(experts=jnp.ones((1, 4, 55))), ValueError, r"experts must be \[1, E, F\] with F = 56"),
    "experts G": (dict(experts=jnp.ones((2, 4, 56))), ValueError, r"experts must be \[1, E, F\]"),
    "router missing": (dict(router=None), ValueError, "router is required when E > 1"),
    "blocks type": (dict(blocks=(8, 128, 128, 128, 128)), TypeError, "blocks must be a MoVFFNBlocks"),
    "blocks rule": (dict(blocks=MoVFFNBlocks(3, 56, 40, 40, 48)), ValueError, "down_block_k must equal F = 56"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_at_trace_time(case):
    change, exc, match = BAD[case]
    if "blocks" in change:  # static: not an array argument of the jitted lambda
        blocks = change.pop("blocks")
        a = _jax_args(_inputs(t=3, m=40, f=56, e=4), jnp.float32)
        with pytest.raises(exc, match=match):
            kernel.mov_ffn(a["x"], a["wi_0"], a["wo"], a["router"], a["experts"], a["wi_1"], blocks=blocks)
        return
    with pytest.raises(exc, match=match):
        _kernel_call(**change)()


def test_bad_activation_and_probs():
    a = _jax_args(_inputs(t=3, m=40, f=56, e=4), jnp.float32)
    with pytest.raises(ValueError, match="activation must be one of"):
        kernel.mov_ffn(a["x"], a["wi_0"], a["wo"], a["router"], a["experts"], activation="swish")
    u = jnp.ones((3, 56))
    with pytest.raises(ValueError, match=r"probs must be \[T, E\] = \[3, 4\]"):
        kernel.mov_ffn_down(u, jnp.ones((3, 5)), a["experts"], a["wo"], interpret=True)
    with pytest.raises(ValueError, match="probs are required when E > 1"):
        kernel.mov_ffn_down(u, None, a["experts"], a["wo"], interpret=True)


# ------------------------------------------------------------------------------------------
# lowering for TPU (Mosaic) at T5 shapes with the default blocks
# ------------------------------------------------------------------------------------------

EXPORT_CASES = {case.name: case for case in export_cases()}


@pytest.mark.parametrize("name", list(EXPORT_CASES))
def test_forward_exports_for_tpu(name):
    case = EXPORT_CASES[name]
    exported = export.export(jax.jit(case.fn), platforms=["tpu"])(*case.args)
    assert exported.platforms == ("tpu",)
    assert exported.mlir_module().count("tpu_custom_call") == 2  # kernels (a) and (b)
    (out,) = exported.out_avals
    assert (out.shape, out.dtype) == (case.out[0], jnp.dtype(case.out[1]))


@pytest.mark.parametrize("model", list(T5_SHAPES))
def test_training_step_exports_for_tpu(model):
    """value_and_grad of the adapters through the custom_vjp: kernel (a) with residuals, (b), XLA backward."""
    m, f = T5_SHAPES[model]
    t, e = 2048, 10
    bf16, f32 = jnp.bfloat16, jnp.float32
    frozen = dict(
        x=jax.ShapeDtypeStruct((t, m), bf16),
        wi_0=jax.ShapeDtypeStruct((f, m), bf16),
        wi_1=jax.ShapeDtypeStruct((f, m), bf16),
        wo=jax.ShapeDtypeStruct((m, f), bf16),
    )
    adapters = dict(router=jax.ShapeDtypeStruct((f, e), f32), experts=jax.ShapeDtypeStruct((1, e, f), f32))

    def step(frozen, adapters):
        def loss(ad):
            y = jax_pallas.mov_ffn(frozen["x"], frozen["wi_0"], frozen["wo"], ad["router"], ad["experts"],
                                   wi_1=frozen["wi_1"])  # fmt: skip
            return y.astype(f32).sum()

        return jax.value_and_grad(loss)(adapters)

    exported = export.export(jax.jit(step), platforms=["tpu"])(frozen, adapters)
    assert exported.mlir_module().count("tpu_custom_call") == 2
    assert [a.shape for a in exported.out_avals[1:]] == [(1, e, f), (f, e)]


# ------------------------------------------------------------------------------------------
# GPU: the Triton-lowering twins of the kernels (backend="gpu")
# ------------------------------------------------------------------------------------------

GPU_CASES = {
    # masked edges everywhere: T = 45, M = 72, F = 100 against 32/16-wide blocks; E = 10 -> E_pad = 16
    "tiled-gated-gelu-E10-bfloat16": (
        jnp.bfloat16,
        dict(t=45, m=72, f=100, e=10, activation="gelu"),
        MoVFFNTritonBlocks(32, 32, 16, 32, 32),
    ),
    "default-relu-ia3-float32": (jnp.float32, dict(t=7, m=40, f=56, e=1, gated=False, activation="relu"), None),
    # the rational erf of the GPU kernels, held to the float32 rule
    "default-gelu-E2-float32": (jnp.float32, dict(t=19, m=40, f=56, e=2, activation="gelu"), None),
    "default-silu-E4-bfloat16": (jnp.bfloat16, dict(t=19, m=40, f=56, e=4, activation="silu"), None),
}


@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_kernels_match_reference(case):
    dtype, shape, blocks = GPU_CASES[case]
    inputs = _inputs(**shape)
    truth = _torch64(inputs)
    a = _jax_args(inputs, dtype)
    activation = inputs["activation"]
    out = kernel.mov_ffn(
        a["x"], a["wi_0"], a["wo"], a["router"], a["experts"], a.get("wi_1"),
        activation=activation, blocks=blocks, backend="gpu", interpret=True,
    )  # fmt: skip
    ref = jax_reference.mov_ffn(
        a["x"], a["wi_0"], a["wo"], a["router"], a["experts"], wi_1=a.get("wi_1"), activation=activation
    )
    assert out.dtype == jnp.dtype(dtype) and out.shape == truth.shape
    assert_within_rule(out, ref, truth, dtype, f"pallas-gpu mov_ffn {case}")


def test_triton_blocks_rules():
    MoVFFNTritonBlocks().validate()
    for field, bad in (("block_t", 8), ("up_block_f", 48), ("down_block_k", 96)):
        blocks = dataclasses.replace(MoVFFNTritonBlocks(), **{field: bad})
        with pytest.raises(ValueError, match=f"{field} must be a power of two >= 16"):
            blocks.validate()
    with pytest.raises(ValueError, match="num_warps must be one of"):
        MoVFFNTritonBlocks(num_warps=3).validate()
    assert get_default_triton(1, 5120, 2048, 10).block_t == 16
    assert get_default_triton(2048, 5120, 2048, 10, itemsize=4).up_block_k == 32
    a = _jax_args(_inputs(t=3, m=40, f=56, e=4), jnp.float32)
    with pytest.raises(TypeError, match=r"blocks must be a MoVFFNTritonBlocks \(backend 'gpu'\)"):
        kernel.mov_ffn(a["x"], a["wi_0"], a["wo"], a["router"], a["experts"], blocks=MoVFFNBlocks(), backend="gpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        kernel.mov_ffn(a["x"], a["wi_0"], a["wo"], a["router"], a["experts"], backend="cuda")


CUDA_CHECKS = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
GPU_EXPORT_CASES = {case.name: case for case in export_cases(backend="gpu")}


@pytest.mark.parametrize("name", list(GPU_EXPORT_CASES))
def test_forward_exports_for_gpu(name):
    """Pallas' Triton lowering of both kernels at T5 shapes with the default GPU blocks."""
    case = GPU_EXPORT_CASES[name]
    exported = export.export(jax.jit(case.fn), platforms=["cuda"], disabled_checks=CUDA_CHECKS)(*case.args)
    assert exported.platforms == ("cuda",)
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") == 2  # kernels (a) and (b)
    (out,) = exported.out_avals
    assert (out.shape, out.dtype) == (case.out[0], jnp.dtype(case.out[1]))


def test_training_step_exports_for_gpu():
    m, f = T5_SHAPES["t5-xl"]
    t, e = 2048, 10
    bf16, f32 = jnp.bfloat16, jnp.float32
    frozen = [jax.ShapeDtypeStruct(s, bf16) for s in ((t, m), (f, m), (f, m), (m, f))]
    adapters = dict(router=jax.ShapeDtypeStruct((f, e), f32), experts=jax.ShapeDtypeStruct((1, e, f), f32))

    def step(frozen, adapters):
        x, wi_0, wi_1, wo = frozen

        def loss(ad):
            y = jax_pallas.mov_ffn(x, wi_0, wo, ad["router"], ad["experts"], wi_1=wi_1, backend="gpu")
            return y.astype(f32).sum()

        return jax.value_and_grad(loss)(adapters)

    exported = export.export(jax.jit(step), platforms=["cuda"], disabled_checks=CUDA_CHECKS)(frozen, adapters)
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") == 2
    assert [a.shape for a in exported.out_avals[1:]] == [(1, e, f), (f, e)]
