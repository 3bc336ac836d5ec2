"""Pallas fused MoV linear (kernels/pallas/mov_linear.py), forward: the Pallas interpreter vs the
JAX reference under the tests/helpers.py tolerance rule, block-size validation, and the TPU lowering
(``jax.export(..., platforms=["tpu"])``, Mosaic) at T5 base / large / XL shapes with the default blocks."""

from __future__ import annotations

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import export

from pemoe import jax as pj
from pemoe import reference as torch_reference
from pemoe.jax import reference as jax_reference
from pemoe.kernels.pallas import mov_linear as kernel
from pemoe.kernels.pallas.mov_linear import MoVLinearBlocks, get_default
from tests.test_jax_ops import assert_within_rule, cast, check, mov_linear_inputs


def _inputs(t, k, g, d, e, *, bias=True, seed=0):
    rng = np.random.default_rng(seed)
    n = g * d
    return dict(
        x=rng.standard_normal((t, k)).astype(np.float32),
        weight=(rng.standard_normal((n, k)) * k**-0.5).astype(np.float32),
        bias=rng.standard_normal(n).astype(np.float32) if bias else None,
        router=(0.5 * rng.standard_normal((d, e))).astype(np.float32) if e > 1 else None,
        experts=(1.0 + 0.3 * rng.standard_normal((g, e, d))).astype(np.float32),
    )


CASES = {
    # grid (2, 2, 2): a partial last row block, two head-aligned column tiles, K accumulated over two steps
    "tiled-E10": (dict(t=123, k=256, g=4, d=64, e=10), MoVLinearBlocks(64, 128, 128)),
    # full-dimension blocks with odd widths (D = 24, K = 40: not lane multiples), (IA)3
    "odd-ia3": (dict(t=7, k=40, g=3, d=24, e=1), None),
    "one-token-E2": (dict(t=1, k=128, g=2, d=64, e=2, bias=False), None),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", list(CASES))
def test_interpret_matches_reference(case, dtype):
    shape, blocks = CASES[case]
    inputs = _inputs(**shape)
    truth = torch_reference.mov_linear(
        torch.tensor(inputs["x"], dtype=torch.float64),
        torch.tensor(inputs["weight"], dtype=torch.float64),
        None if inputs["router"] is None else torch.tensor(inputs["router"], dtype=torch.float64),
        torch.tensor(inputs["experts"], dtype=torch.float64),
        bias=None if inputs["bias"] is None else torch.tensor(inputs["bias"], dtype=torch.float64),
    ).numpy()
    act = {k: None if inputs[k] is None else jnp.asarray(inputs[k], dtype) for k in ("x", "weight", "bias")}
    adapters = {k: None if inputs[k] is None else jnp.asarray(inputs[k]) for k in ("router", "experts")}
    out = kernel.mov_linear(
        act["x"], act["weight"], act["bias"], adapters["router"], adapters["experts"], blocks=blocks, interpret=True
    )
    ref = jax_reference.mov_linear(act["x"], act["weight"], adapters["router"], adapters["experts"], bias=act["bias"])
    assert out.dtype == jnp.dtype(dtype) and out.shape == truth.shape
    assert_within_rule(out, ref, truth, dtype, f"pallas mov_linear {case}")


# ------------------------------------------------------------------------------------------
# pemoe.jax.mov_linear(implementation="pallas"): kernel forward + explicit XLA backward, every gradient
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,t,e", [(jnp.float32, 7, 10), (jnp.bfloat16, 33, 1)], ids=["float32", "bfloat16"])
def test_op_output_and_gradients(monkeypatch, dtype, t, e):
    monkeypatch.setenv("PEMOE_PALLAS_INTERPRET", "1")
    check("mov_linear", mov_linear_inputs(t, e), dtype, implementation="pallas")


@pytest.mark.parametrize("dtype,t,e", [(jnp.float32, 37, 10), (jnp.bfloat16, 5, 1)], ids=["float32", "bfloat16"])
def test_op_gpu_lowering_output_and_gradients(monkeypatch, dtype, t, e):
    """The op with the GPU (Triton-lowering) kernel, as the gpu JAX backend picks it: one head per tile, so the
    head width is a power of two and K a multiple of 16; T = 37 leaves a partial row block (padded)."""
    from pemoe.jax import pallas as jax_pallas

    monkeypatch.setenv("PEMOE_PALLAS_INTERPRET", "1")
    monkeypatch.setattr(jax_pallas, "_default_backend", lambda: "gpu")
    rng = np.random.default_rng(3)
    k, g, d = 48, 3, 16
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    inputs = dict(
        x=f32(rng.standard_normal((t, k))),
        weight=f32(rng.standard_normal((g * d, k)) * k**-0.5),
        bias=f32(rng.standard_normal(g * d)),
        experts=f32(1.0 + 0.3 * rng.standard_normal((g, e, d))),
        top_k=None,
        renormalize=False,
    )
    inputs["router"] = f32(0.5 * rng.standard_normal((d, e))) if e > 1 else None
    calls = []
    real = jax_pallas._mov_kernel
    monkeypatch.setattr(jax_pallas, "_mov_kernel", lambda backend: calls.append(backend) or real(backend))
    check("mov_linear", inputs, dtype, implementation="pallas")
    assert calls and set(calls) == {"gpu"}


def test_op_unsupported_routing_raises(monkeypatch):
    monkeypatch.setenv("PEMOE_PALLAS_INTERPRET", "1")
    arrays, static = cast(mov_linear_inputs(3, 4, top_k=2), jnp.float32)
    with pytest.raises(NotImplementedError, match="top-k"):
        pj.mov_linear(**arrays, **static, implementation="pallas")
    arrays, static = cast(mov_linear_inputs(3, 4, sentence=True), jnp.float32)
    with pytest.raises(NotImplementedError, match="sentence routing"):
        pj.mov_linear(**arrays, **static, implementation="pallas")


# ------------------------------------------------------------------------------------------
# block sizes: a validated frozen dataclass with TPU-legal defaults
# ------------------------------------------------------------------------------------------

T5_SHAPES = {"t5-base": (768, 12), "t5-large": (1024, 16), "t5-xl": (2048, 32)}  # d_model, heads (d_kv = 64)


@pytest.mark.parametrize("t", [1, 123, 2048])
@pytest.mark.parametrize("model", list(T5_SHAPES))
def test_defaults_are_tpu_legal(model, t):
    k, heads = T5_SHAPES[model]
    n = heads * 64
    b = get_default(t, n, k, 64)
    assert b.block_m == t or b.block_m % 8 == 0
    assert b.block_n == n or (b.block_n % 128 == 0 and b.block_n % 64 == 0)
    assert b.block_k == k or (b.block_k % 128 == 0 and k % b.block_k == 0)
    b.validate(t=t, n=n, k=k, dim=64)


def test_blocks_are_frozen():
    b = MoVLinearBlocks()
    with pytest.raises(AttributeError):
        b.block_m = 8


@pytest.mark.parametrize(
    "blocks,match",
    [
        (MoVLinearBlocks(12, 128, 128), "block_m must equal T = 64 or be a multiple of 8"),
        (MoVLinearBlocks(128, 128, 128), "block_m = 128 is larger than T = 64"),
        (MoVLinearBlocks(64, 96, 128), "block_n must equal N = 384 or be a multiple of 128"),
        (
            MoVLinearBlocks(
                64,
                128,
                128,
            ),
            None,
        ),
        (MoVLinearBlocks(64, 256, 192), "block_k must equal K = 384 or be a multiple of 128"),
        (MoVLinearBlocks(64, 256, 256), "block_k must divide K = 384"),
        (MoVLinearBlocks(64, 512, 128), "block_n = 512 is larger than N = 384"),
    ],
)
def test_illegal_blocks_name_the_rule(blocks, match):
    if match is None:
        blocks.validate(t=64, n=384, k=384, dim=64)
        return
    with pytest.raises(ValueError, match=match):
        blocks.validate(t=64, n=384, k=384, dim=64)


def test_block_n_must_hold_whole_heads():
    with pytest.raises(ValueError, match="multiple of the head width D = 96"):
        MoVLinearBlocks(8, 128, 128).validate(t=8, n=384, k=128, dim=96)
    with pytest.raises(ValueError, match="block_k must be a positive int"):
        MoVLinearBlocks(8, 128, 0)


def test_unsupported_features_raise():
    a = _inputs(t=4, k=128, g=2, d=64, e=4)
    args = [jnp.asarray(a[k]) for k in ("x", "weight", "bias", "router", "experts")]
    with pytest.raises(NotImplementedError, match="top-k"):
        kernel.mov_linear(*args, top_k=2, interpret=True)
    with pytest.raises(NotImplementedError, match="sentence routing"):
        kernel.mov_linear(*args, jnp.ones((4, 4)), interpret=True)


# ------------------------------------------------------------------------------------------
# lowering for TPU (Mosaic) at T5 shapes, default blocks; kernels/ never imports the rest of pemoe
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", list(T5_SHAPES))
def test_exports_for_tpu(model):
    k, heads = T5_SHAPES[model]
    t, d, e = 2048, 64, 10
    n = heads * d
    act, f32 = jnp.bfloat16, jnp.float32
    specs = [
        jax.ShapeDtypeStruct((t, k), act),
        jax.ShapeDtypeStruct((n, k), act),
        jax.ShapeDtypeStruct((n,), act),
        jax.ShapeDtypeStruct((d, e), f32),
        jax.ShapeDtypeStruct((heads, e, d), f32),
    ]
    exported = export.export(jax.jit(kernel.mov_linear), platforms=["tpu"])(*specs)
    assert exported.platforms == ("tpu",)
    assert "tpu_custom_call" in exported.mlir_module()
    assert exported.out_avals[0].shape == (t, n) and exported.out_avals[0].dtype == act
    # (IA)3 (no router) lowers too
    ia3 = export.export(jax.jit(kernel.mov_linear), platforms=["tpu"])(
        specs[0], specs[1], None, None, jax.ShapeDtypeStruct((heads, 1, d), f32)
    )
    assert "tpu_custom_call" in ia3.mlir_module()


def test_kernels_never_import_pemoe():
    root = pathlib.Path(kernel.__file__).resolve().parent
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(name == "pemoe" or name.startswith("pemoe.") for name in names), f"{path.name}: {names}"
