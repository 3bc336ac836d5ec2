"""JAX on GPU without a GPU: ``implementation="triton"`` (pemoe's Triton kernels through jax-triton) and the
Pallas kernels' GPU (Triton) lowering.

* The jax-triton path runs here in the Triton interpreter (``TRITON_INTERPRET=1``, set by conftest): the same
  kernels and launch plans, outputs and every gradient against the JAX reference and the torch float64
  truth under the tests/test_jax_ops.py rule ``max|out − truth| ≤ 2·max|ref − truth| + atol(dtype)·max(|truth|, 1)``.
* ``jax.export(..., platforms=["cuda"])`` of the training step (forward + backward) succeeds for sm_80 and
  sm_90; the exported module holds exactly the two ``triton_kernel_call`` custom calls with the expected
  operand and result shapes, and their PTX (compiled by Triton at lowering time) assembles with ptxas to
  code with zero register spills (wgmma on sm_90 for 16-bit activations). jax-triton needs real
  ``triton.jit`` kernels, so this runs in a child process without ``TRITON_INTERPRET``
  (``python -m pemoe.jax.triton_export --json``).
* ``molora_linear``: both forward schedules (forced, and "auto" following the torch launcher's model) and the
  shared backward in the interpreter, including small forced tiles and several partial-sum chunks; the
  T5-large training step exports with its six kernels (expected result shapes, zero spills, wgmma on sm_90).
* On the CPU backend outside the interpreter, ``implementation="triton"`` raises ``NotImplementedError``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pemoe import jax as pj
from pemoe.jax import ops as jax_ops
from pemoe.jax import triton as pjt
from pemoe.jax import triton_export
from pemoe.kernels.triton import interpreter
from tests.test_jax_ops import check

# Triton kernel limits: D ∈ {16, 32, 64, 128}. Odd K (not a multiple of the 16/32/64 K blocks), odd T.
K, G, D = 40, 3, 16


def _inputs(t, e, *, top_k=None, renormalize=False, sentence=False, bias=True, seed=0, groups=G, dim=D):
    rng = np.random.default_rng(seed)
    n = groups * dim
    f32 = np.float32
    args = dict(
        x=rng.standard_normal((t, K)).astype(f32),
        weight=(rng.standard_normal((n, K)) * K**-0.5).astype(f32),
        experts=(1.0 + 0.3 * rng.standard_normal((groups, e, dim))).astype(f32),
        top_k=top_k,
        renormalize=renormalize,
    )
    if bias:
        args["bias"] = rng.standard_normal(n).astype(f32)
    if sentence:
        args["x"] = rng.standard_normal((2, t, K)).astype(f32)
        args["router_input"] = rng.standard_normal((2, 9)).astype(f32)
        args["router"] = (0.5 * rng.standard_normal((9, e))).astype(f32)
    else:
        args["router"] = (0.5 * rng.standard_normal((dim, e))).astype(f32) if e > 1 else None
    return args


# ------------------------------------------------------------------------------------------
# implementation="triton" in the Triton interpreter: output and every gradient
# ------------------------------------------------------------------------------------------

INTERPRETER_CASES = {
    "token-E10-T7-f32": (jnp.float32, dict(t=7, e=10)),
    "token-E2-T33-bf16-nobias": (jnp.bfloat16, dict(t=33, e=2, bias=False)),
    "ia3-T1-bf16": (jnp.bfloat16, dict(t=1, e=1)),
    "top2-renorm-T7-f32": (jnp.float32, dict(t=7, e=10, top_k=2, renormalize=True)),
    "sentence-T5-bf16": (jnp.bfloat16, dict(t=5, e=10, sentence=True)),
    # D = 128: the backward reads h (XLA's GEMM) in two passes
    "d128-top2-renorm-T37-bf16": (jnp.bfloat16, dict(t=37, e=10, top_k=2, renormalize=True, groups=2, dim=128)),
    # (IA)3 at D = 128: the backward reads h (XLA's GEMM) in one pass
    "d128-ia3-T21-f16": (jnp.float16, dict(t=21, e=1, groups=2, dim=128)),
}


@pytest.mark.parametrize("case", list(INTERPRETER_CASES))
def test_triton_matches_reference_in_interpreter(case):
    assert interpreter.INTERPRET, "conftest runs the Triton kernels in the interpreter"
    dtype, kw = INTERPRETER_CASES[case]
    check("mov_linear", _inputs(**kw), dtype, implementation="triton")


def _ffn_inputs(t, e, *, gated=True, activation="gelu_new", sentence=False, seed=0, **kw):
    """T5 FFN inputs: M = 40, F = 56 (neither a multiple of the 64-wide tiles)."""
    rng = np.random.default_rng(seed)
    m, f, f32 = K, 56, np.float32
    args = dict(
        x=rng.standard_normal((2, t, m) if sentence else (t, m)).astype(f32),
        wi_0=(rng.standard_normal((f, m)) * m**-0.5).astype(f32),
        wo=(rng.standard_normal((m, f)) * f**-0.5).astype(f32),
        experts=(1.0 + 0.3 * rng.standard_normal((1, e, f))).astype(f32),
        activation=activation,
        **kw,
    )
    if gated:
        args["wi_1"] = (rng.standard_normal((f, m)) * m**-0.5).astype(f32)
    if sentence:
        args["router_input"] = rng.standard_normal((2, 9)).astype(f32)
        args["router"] = (0.5 * rng.standard_normal((9, e))).astype(f32)
    else:
        args["router"] = (0.2 * rng.standard_normal((f, e))).astype(f32) if e > 1 else None
    return args


FFN_INTERPRETER_CASES = {
    "gated-gelu_new-E10-T7-f32": (jnp.float32, dict(t=7, e=10)),
    "relu-ia3-T5-bf16": (jnp.bfloat16, dict(t=5, e=1, gated=False, activation="relu")),
    "gated-gelu-top2-renorm-T6-f32": (jnp.float32, dict(t=6, e=3, activation="gelu", top_k=2, renormalize=True)),
    "sentence-T3-bf16": (jnp.bfloat16, dict(t=3, e=4, sentence=True)),
}


@pytest.mark.parametrize("case", list(FFN_INTERPRETER_CASES))
def test_triton_mov_ffn_matches_reference_in_interpreter(case):
    dtype, kw = FFN_INTERPRETER_CASES[case]
    check("mov_ffn", _ffn_inputs(**kw), dtype, implementation="triton")


# molora_linear: K = 40, N = 72 (tests/test_jax_ops.molora_inputs), neither a multiple of the 16/32/64 tiles
MOLORA_INTERPRETER_CASES = {
    "E10-r4-T7-f32": (jnp.float32, dict(t=7, e=10)),
    "E10-r1-T33-bf16-top2-renorm": (jnp.bfloat16, dict(t=33, e=10, r=1, top_k=2, renormalize=True)),
    "lora-E1-r4-T1-bf16": (jnp.bfloat16, dict(t=1, e=1)),
    "lora-E1-r1-T7-f32-nobias": (jnp.float32, dict(t=7, e=1, r=1, bias=False)),
    "sentence-E4-T5-bf16": (jnp.bfloat16, dict(t=5, e=4, sentence=True)),
    "sentence-top2-E4-T3-f32": (jnp.float32, dict(t=3, e=4, sentence=True, top_k=2)),
}


def _launch_names(monkeypatch) -> list[str]:
    """Records the name of every kernel launch pemoe.jax.triton makes (and still runs it)."""
    names, call = [], pjt._call

    def spy(launch, *inputs):
        names.append(launch.name)
        return call(launch, *inputs)

    monkeypatch.setattr(pjt, "_call", spy)
    return names


@pytest.mark.parametrize("schedule", ["two_kernel", "fused"])
@pytest.mark.parametrize("case", list(MOLORA_INTERPRETER_CASES))
def test_triton_molora_matches_reference_in_interpreter(case, schedule, monkeypatch):
    """Output and the gradients of x, weight, bias, lora_a, lora_b, router (and router_input: sentence routing)
    vs the reference and the float64 truth, with each forward schedule (the backward is shared)."""
    from pemoe.kernels.triton import molora_linear as kernel
    from tests.test_jax_ops import molora_inputs

    dtype, kw = MOLORA_INTERPRETER_CASES[case]
    names = _launch_names(monkeypatch)
    with kernel.use_schedule(schedule):
        check("molora_linear", molora_inputs(**kw), dtype, implementation="triton")
    forward = ["pack", "shrink", "expand"] if schedule == "two_kernel" else ["pack", "fused"]
    expected = [f"pemoe_molora_{role}" for role in forward + ["pack", "grad_u", "dx", "wgrad_a", "wgrad_b"]]
    assert names == expected  # traced once under jit: the forward, then the whole backward, nothing else


@pytest.mark.parametrize("schedule", ["two_kernel", "fused"])
def test_triton_molora_multi_tile_and_chunks(schedule, monkeypatch):
    """Small forced tiles on T = 37 (3 row tiles of 16, 2-5 column tiles, several K / N steps) and 16-token
    chunks (3 partial sums per adapter gradient, added by XLA): every gradient still within the rule."""
    from pemoe.kernels.triton import molora_linear as kernel
    from tests.test_jax_ops import molora_inputs

    monkeypatch.setattr(kernel, "REDUCE_ROWS", 16)
    configs = dict(
        fused=kernel._fused(16, 32, 32, 4, 2, 2),
        shrink=kernel._config(4, 2, BLOCK_M=16, BLOCK_K=16),
        expand=kernel._gemm(16, 32, 32, 4, 2),
        grad_u=kernel._config(4, 2, BLOCK_M=16, BLOCK_K=16),
        dx=kernel._gemm(16, 16, 16, 4, 2),
        wgrad_a=kernel._config(4, 2, BLOCK_C=16, BLOCK_T=16),
        wgrad_b=kernel._config(4, 2, BLOCK_C=16, BLOCK_T=16),
    )
    with kernel.use_configs(**configs), kernel.use_schedule(schedule):
        check("molora_linear", molora_inputs(37, 10, 4, top_k=3, renormalize=True), jnp.bfloat16, "triton")


def test_triton_molora_auto_schedule_follows_the_model(monkeypatch):
    """schedule "auto" runs what the torch launcher's model (``choose_schedule``) picks at each shape: traced
    only (make_jaxpr), at T5-large attention shape with E = 10 and with plain LoRA."""
    import torch

    from pemoe.kernels.triton import molora_linear_analysis as analysis

    names = []

    def trace_only(launch, *inputs):
        names.append(launch.name)
        return [jnp.zeros(o.shape, o.dtype) for o in launch.out_shapes]

    monkeypatch.setattr(pjt, "_call", trace_only)
    s = jax.ShapeDtypeStruct
    picks = set()
    for e in (10, 1):
        t, k, n, r = 2048, 1024, 1024, 4
        names.clear()
        args = (s((t, k), jnp.bfloat16), s((n, k), jnp.bfloat16), s((e, k, r), jnp.float32), s((e, r, n), jnp.float32))
        router = s((k, e), jnp.float32) if e > 1 else None

        def loss(x, w, a, b, router):
            return pj.molora_linear(x, w, a, b, router, scale=4.0, implementation="triton").astype(jnp.float32).sum()

        jax.make_jaxpr(jax.grad(loss, argnums=(0, 2, 3)))(*args, router)
        pick = analysis.choose_schedule(t, k, n, e, r, torch.bfloat16, save_for_backward=True)
        forward = ["pack", "shrink", "expand"] if pick == "two_kernel" else ["pack", "fused"]
        assert names[: len(forward)] == [f"pemoe_molora_{role}" for role in forward], (e, pick, names)
        picks.add(pick)
    assert picks == {"fused", "two_kernel"}  # both schedules are exercised by the model's choice


@pytest.mark.parametrize("shape", [(2048, 1024, 1024, 10, 4), (2048, 1024, 1024, 1, 4), (7, 40, 72, 15, 16)])
def test_triton_molora_tiles_are_the_torch_autotuners(shape):
    """Every launch of both schedules and the backward: the tiles of the shared launch plan (``Launch.configs``,
    what pemoe.jax.triton uses) are those the torch autotuner's pruning keeps, in its order."""
    from pemoe.kernels.triton import molora_linear as kernel
    from pemoe.kernels.triton import molora_linear_analysis as analysis

    launches = analysis._example_launches(*shape, "bfloat16")
    assert {launch.role for launch in launches} == set(kernel.ROLE_CONFIGS)
    for launch in launches:
        pruned = launch.kernel.early_config_prune(launch.kernel.configs, {**launch.scalars, **launch.constexprs})
        assert list(launch.configs) == pruned, launch.role


def test_triton_molora_limits_and_empty_batch():
    from tests.test_jax_ops import cast, molora_inputs

    arrays, static = cast(molora_inputs(1, 3), jnp.float32)
    x0 = jnp.zeros((0, K), jnp.float32)
    fn = lambda a, b: pj.molora_linear(x0, arrays["weight"], a, b, arrays["router"], **static, implementation="triton")  # noqa: E731
    y, grads = jax.value_and_grad(lambda a, b: fn(a, b).sum(), argnums=(0, 1))(arrays["lora_a"], arrays["lora_b"])
    assert float(y) == 0.0 and all(float(jnp.abs(g).max()) == 0.0 for g in grads)
    wide = jnp.zeros((17, K, 16), jnp.float32)  # 32 experts x 16 ranks: 512 padded adapter columns
    with pytest.raises(NotImplementedError, match="padded adapter columns"):
        pj.molora_linear(
            arrays["x"], arrays["weight"], wide, jnp.zeros((17, 16, 72)), jnp.zeros((K, 17)), scale=1.0,
            implementation="triton",
        )  # fmt: skip
    with pytest.raises(ValueError, match="schedule must be"):
        pjt.molora_linear(arrays["x"], arrays["weight"], None, arrays["lora_a"], arrays["lora_b"], arrays["router"],
                          scale=4.0, schedule="one")  # fmt: skip


def test_triton_float16_and_leading_dims():
    inputs = _inputs(t=6, e=3)
    x = jnp.asarray(inputs["x"].reshape(2, 3, K), jnp.float16)
    w = jnp.asarray(inputs["weight"], jnp.float16)
    args = (x, w, jnp.asarray(inputs["router"]), jnp.asarray(inputs["experts"]))
    y = pj.mov_linear(*args, implementation="triton")
    ref = pj.mov_linear(*args, implementation="reference")
    assert y.shape == (2, 3, G * D) and y.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), rtol=4e-3, atol=4e-3)


def test_triton_empty_batch():
    inputs = _inputs(t=1, e=2)
    x = jnp.zeros((0, K), jnp.float32)
    router, experts = jnp.asarray(inputs["router"]), jnp.asarray(inputs["experts"])
    w = jnp.asarray(inputs["weight"])
    y, grads = jax.value_and_grad(
        lambda r, e: pj.mov_linear(x, w, r, e, implementation="triton").sum(), argnums=(0, 1)
    )(router, experts)
    assert float(y) == 0.0 and all(float(jnp.abs(g).max()) == 0.0 for g in grads)


def test_triton_unsupported_head_width_raises():
    rng = np.random.default_rng(0)
    x, w = jnp.asarray(rng.standard_normal((4, 8)), jnp.float32), jnp.asarray(rng.standard_normal((48, 8)), jnp.float32)
    router, experts = jnp.zeros((24, 2), jnp.float32), jnp.ones((2, 2, 24), jnp.float32)  # D = 24
    with pytest.raises(NotImplementedError, match="head width D"):
        pj.mov_linear(x, w, router, experts, implementation="triton")


def test_triton_refused_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(interpreter, "INTERPRET", False)
    monkeypatch.delenv(pjt.CAPABILITY_ENV, raising=False)
    inputs = _inputs(t=3, e=2)
    args = [jnp.asarray(inputs[k]) for k in ("x", "weight", "router", "experts")]
    with pytest.raises(NotImplementedError, match="runs on the 'gpu' backend"):
        pj.mov_linear(*args, implementation="triton")
    with pytest.raises(NotImplementedError, match="runs on the 'gpu' backend"):
        jax_ops.resolve_implementation("mov_linear", "triton", "cpu")
    assert jax_ops.resolve_implementation("mov_linear", "triton", "gpu") == "triton"
    with pytest.raises(NotImplementedError, match="runs on the 'gpu' backend"):
        jax_ops.resolve_implementation("molora_linear", "triton", "cpu")
    assert jax_ops.resolve_implementation("molora_linear", "triton", "gpu") == "triton"
    assert jax_ops.resolve_implementation("mov_linear", "auto", "cpu") == "xla"  # never chosen silently
    with pjt.cuda_target(90):  # ahead-of-time lowering for a GPU
        assert jax_ops.resolve_implementation("mov_linear", "triton", "cpu") == "triton"
    monkeypatch.setenv(pjt.CAPABILITY_ENV, "80")  # a stated target capability: lowering allowed
    assert jax_ops.resolve_implementation("mov_ffn", "triton", "cpu") == "triton"
    with pytest.raises(NotImplementedError, match="does not exist yet"):
        jax_ops.resolve_implementation("mov", "triton", "gpu")


def test_cuda_target_validates_and_nests(monkeypatch):
    monkeypatch.delenv(pjt.CAPABILITY_ENV, raising=False)
    assert pjt.target_capability() is None
    with pjt.cuda_target(80):
        with pjt.cuda_target(90):
            assert pjt.target_capability() == 90
        assert pjt.target_capability() == 80
    monkeypatch.setenv(pjt.CAPABILITY_ENV, "86")
    assert pjt.target_capability() == 86
    for bad in (True, "90", 9.0, 35):
        with pytest.raises(ValueError, match="capability"):
            with pjt.cuda_target(bad):
                pass


# ------------------------------------------------------------------------------------------
# jax.export(..., platforms=["cuda"]) of the jax-triton path, PTX through ptxas (child process)
# ------------------------------------------------------------------------------------------

#: pemoe.jax.triton_export.EXPORT_PROBLEMS keys of the default run, each for sm_80 and sm_90: T5-large k/v and the
#: T5-large FFN, E = 10, bfloat16. Under -m slow: every problem ((IA)3, E = 60, top-k, sentence routing, D = 128,
#: float32, ...).
QUICK = ["mov_linear/t5-large E=10:bfloat16", "mov_ffn/t5-large E=10:bfloat16"]
#: Spill bytes per thread tolerated for float32 activations (none for 16-bit ones).
FP32_SPILL_BYTES = 32
LINEAR_KERNELS = ["mov_linear_fwd_kernel", "mov_linear_bwd_kernel"]
FFN_KERNELS = [
    "_ffn_up_kernel",
    "_ffn_down_kernel",
    "_ffn_down_backward_kernel",
    "_router_backward_kernel",
    "_ffn_up_backward_kernel",
]


def _export_rows(keys, capabilities, extra=()) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "pemoe.jax.triton_export", "--json", "--capability", *map(str, capabilities), *extra]
    for key in keys:
        cmd += ["--problem", key]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _t(*dims, ty="f32") -> str:
    return f"tensor<{'x'.join(map(str, dims))}x{ty}>"


def _linear_types(shape: dict, act: str) -> tuple[list[list[str]], list[list[str]]]:
    """Operand and result types of the forward and backward calls, written out from SPEC §3.1's shapes."""
    T, K, G, D, E, routing = (shape[k] for k in ("T", "K", "G", "D", "E", "routing"))
    N, C = G * D, -(-T // 128)  # backward partial sums per chunk of 128 tokens
    router = _t(D, E) if routing == "token" else _t(1)
    probs = _t(T, E) if routing == "sentence" else _t(1)
    p_soft = _t(T, G, E) if routing == "token" else _t(1)
    inputs = [_t(T, K, ty=act), _t(N, K, ty=act), _t(1, ty=act), router, _t(G, E, D), probs]
    d_router = _t(C, G, D, E) if routing == "token" else _t(1)
    d_probs = _t(G, T, E) if routing == "sentence" else _t(1)
    # backward: + dy, h (XLA's GEMM) where the plan reads h (kernels/triton/mov_linear.py backward_reads_h: E <= 16,
    # token routing or (IA)3, D <= 64 or D = 128), else a placeholder (recomputed h)
    reads_h = E <= 16 and routing != "sentence" and (D <= 64 or D == 128)
    h = _t(T, N, ty=act) if reads_h else _t(1, ty=act)
    operands = [inputs, inputs + [p_soft, _t(T, N, ty=act), h]]
    results = [[_t(T, N, ty=act), p_soft], [_t(T, N, ty=act), _t(C, G, E, D), d_router, d_probs]]
    return operands, results


def _ffn_check(calls, shape: dict, act: str, what: str) -> None:
    """The [T, ·] outputs of the five mov_ffn kernels (SPEC §3.2): u, y, du, dlogits / d probs, dh0 and dg."""
    T, M, F, E = (shape[k] for k in ("T", "M", "F", "E"))
    gated, routing = shape.get("gated", True), shape.get("routing", "token")
    up, down, down_bwd, router_bwd, up_bwd = (c["result_types"] for c in calls)
    assert up[0] == _t(T, F, ty=act), f"{what} u"
    assert down[0] == _t(T, M, ty=act), f"{what} y"
    assert down[1] == (_t(T, E) if routing == "token" else _t(1)), f"{what} p_soft"
    assert down_bwd[0] == _t(T, F, ty=act), f"{what} du"
    assert router_bwd == [_t(T, E)], f"{what} dlogits"
    assert up_bwd[0] == _t(T, F, ty=act) and up_bwd[1] == (_t(T, F, ty=act) if gated else _t(1)), f"{what} dh0, dg"
    assert calls[0]["operand_types"][0] == _t(T, M, ty=act), f"{what} x"


#: molora_linear kernels per forward schedule, then the backward (grad_u, dx GEMM, the two weight gradients).
MOLORA_FORWARD = {
    "two_kernel": ["_molora_pack_kernel", "_molora_shrink_kernel", "_molora_gemm_kernel"],
    "fused": ["_molora_pack_kernel", "_molora_fused_forward_kernel"],
}
MOLORA_BACKWARD = [
    "_molora_pack_kernel", "_molora_grad_u_kernel", "_molora_gemm_kernel", "_molora_wgrad_kernel",
    "_molora_wgrad_kernel",
]  # fmt: skip
MOLORA_REDUCE_ROWS = 256  # tokens per partial sum of the weight-gradient kernels (kernels/triton/molora_linear.py)


def _molora_schedule(shape: dict, dtype: str) -> str:
    import torch

    from pemoe.kernels.triton import molora_linear as kernel
    from pemoe.kernels.triton import molora_linear_analysis as analysis

    if shape.get("schedule", "auto") != "auto":
        return shape["schedule"]
    mode = {"token": kernel.TOKEN_ROUTER, "sentence": kernel.GIVEN_PROBS, "none": kernel.NO_ROUTER}[
        shape.get("routing") or ("none" if shape["E"] == 1 else "token")
    ]
    t, k, n, e, r = (shape[v] for v in ("T", "K", "N", "E", "r"))
    return analysis.choose_schedule(t, k, n, e, r, getattr(torch, dtype), routing_mode=mode, save_for_backward=True)


def _molora_check(calls, shape: dict, act: str, schedule: str, what: str) -> None:
    """Every molora_linear kernel's outputs, written out from SPEC §3.3's shapes: the packed A_cat [K, J] and
    B_cat [J, N] (J: E and r padded to powers of two, E to 16 with a router, J >= 16; the backward's B_cat low
    part with a router in 16-bit), U′ / y / U / p_soft forward, dU, U′, dlogits (d probs), dx, and the
    per-chunk partial sums of d lora_a, d router, d lora_b."""
    T, K, N, E, r = (shape[v] for v in ("T", "K", "N", "E", "r"))
    routing = shape.get("routing") or ("none" if E == 1 else "token")
    C, one = -(-T // MOLORA_REDUCE_ROWS), _t(1)
    p_soft = _t(T, E) if routing == "token" else one
    u, u_act = _t(T, E * r), _t(T, E * r, ty=act)
    rank_pad = 1 << (r - 1).bit_length()
    block_e = max(1 << (E - 1).bit_length(), 16 if routing != "none" else 1, 16 // min(rank_pad, 16))
    j = block_e * rank_pad
    pack = [_t(K, j, ty=act), _t(j, N, ty=act), one]
    pack_backward = pack[:2] + [_t(j, N, ty=act) if routing != "none" and act != "f32" else one]
    forward = [[_t(T, N, ty=act), u, p_soft]] if schedule == "fused" else [[u_act, u, p_soft], [_t(T, N, ty=act)]]
    forward = [pack] + forward
    backward = [
        pack_backward,
        [u_act, u_act, _t(T, E) if routing != "none" else one],  # dU, U′, dlogits / d probs
        [_t(T, K, ty=act)],  # dx
        [_t(C, E, K, r), _t(C, K, E) if routing == "token" else one, one],  # d lora_a, d router partial sums
        [_t(C, E, r, N), one, one],  # d lora_b partial sums (no bias: no d bias)
    ]
    for call, res in zip(calls, forward + backward, strict=True):
        assert call["result_types"] == res, f"{what} {call['kernel']} results"
    assert calls[0]["operand_types"][0] == _t(E, K, r), f"{what} lora_a (packed first)"
    assert calls[1]["operand_types"][0] == _t(T, K, ty=act), f"{what} x"


def _check_rows(rows, keys, capabilities):
    by_key = {p.key: p for p in triton_export.EXPORT_PROBLEMS}
    for key in keys:
        problem = by_key[key]
        shape, act = dict(problem.shape), {"bfloat16": "bf16", "float32": "f32"}[problem.dtype]
        for cc in capabilities:
            ident = (problem.op, problem.label, problem.dtype, cc)
            calls = [r for r in rows if (r["op"], r["problem"], r["dtype"], r["capability"]) == ident]
            what = f"{key} sm_{cc}"
            if problem.op == "mov_linear":
                assert [c["kernel"] for c in calls] == LINEAR_KERNELS, what
                assert [c["call_name"] for c in calls] == ["pemoe_mov_linear_fwd", "pemoe_mov_linear_bwd"], what
                operands, results = _linear_types(shape, act)
                for call, ops_, res in zip(calls, operands, results, strict=True):
                    assert call["operand_types"] == ops_, f"{what} {call['kernel']} operands"
                    assert call["result_types"] == res, f"{what} {call['kernel']} results"
            elif problem.op == "molora_linear":
                schedule = _molora_schedule(shape, problem.dtype)
                assert [c["kernel"] for c in calls] == MOLORA_FORWARD[schedule] + MOLORA_BACKWARD, what
                roles = (["pack", "shrink", "expand"] if schedule == "two_kernel" else ["pack", "fused"]) + [
                    "pack", "grad_u", "dx", "wgrad_a", "wgrad_b"
                ]  # fmt: skip
                assert [c["call_name"] for c in calls] == [f"pemoe_molora_{role}" for role in roles], what
                _molora_check(calls, shape, act, schedule, what)
            else:
                # (IA)3 has no router, so no router backward (r); sentence routing runs (r) for d probs
                kernels = FFN_KERNELS if shape.get("routing", "token") != "none" else FFN_KERNELS[:3] + FFN_KERNELS[4:]
                assert [c["kernel"] for c in calls] == kernels, what
                if len(kernels) == 5:
                    _ffn_check(calls, shape, act, what)
            for call in calls:
                assert call["configs"] == 1, f"{what}: one (default) configuration per call"
                assert call["ptx_target"] == ("sm_90a" if cc == 90 else f"sm_{cc}"), what
                assert call["registers"] > 0, what
                # 16-bit activations (the tensor-core path): no spills. float32 (FMA dots, the ieee correctness
                # path): at most FP32_SPILL_BYTES (mov_ffn's up kernel spills 8-16 bytes on sm_90 without a
                # router, under jax-triton's constant sizes; see the report of python -m pemoe.jax.triton_export)
                limit = 0 if problem.dtype != "float32" else FP32_SPILL_BYTES
                assert 0 <= call["spill_bytes"] <= limit, f"{what} {call['kernel']}: {call['spill_bytes']} spill bytes"
            if cc == 90 and problem.dtype == "bfloat16":
                gemm = calls[0]  # the first GEMM (the base GEMM)
                if problem.op == "molora_linear":  # after the packing launch (no dots)
                    gemm = calls[1]
                    if _molora_schedule(shape, problem.dtype) == "two_kernel":
                        gemm = calls[2]  # the shrink is a row pass (32-row tiles: mma.sync); then the base GEMM
                assert gemm["uses_wgmma"], f"{what}: the first GEMM does not use wgmma"


def test_jax_triton_exports_for_cuda():
    rows = _export_rows(QUICK, (80, 90))
    _check_rows(rows, QUICK, (80, 90))


#: molora_linear problems of the default run (T5-large attention, E = 10, r = 4, bfloat16), each forward schedule.
QUICK_MOLORA = ["molora_linear/t5-large E=10 r=4 two-kernel:bfloat16", "molora_linear/t5-large E=10 r=4 fused:bfloat16"]


def test_jax_triton_molora_exports_for_cuda():
    """The T5-large MoLoRA training step (both forward schedules, the backward) exports for sm_80 and sm_90:
    the expected kernels and output shapes, no spills, wgmma for the base GEMM on sm_90."""
    rows = _export_rows(QUICK_MOLORA, (80, 90))
    _check_rows(rows, QUICK_MOLORA, (80, 90))


@pytest.mark.slow
def test_jax_triton_exports_every_problem():
    keys = [p.key for p in triton_export.EXPORT_PROBLEMS]
    rows = _export_rows(keys, (80, 90))
    _check_rows(rows, keys, (80, 90))


@pytest.mark.slow
def test_jax_triton_autotuned_export_holds_every_legal_configuration():
    """configs="all": each mov_linear call is one autotuned kernel call holding every legal configuration,
    the default (first) among them spill-free."""
    rows = _export_rows(["mov_linear/t5-large E=10:bfloat16"], (90,), ["--configs", "all"])
    for kernel in LINEAR_KERNELS:
        configs = [r for r in rows if r["kernel"] == kernel]
        assert len(configs) == configs[0]["configs"] > 1, kernel
        assert [r["config"] for r in configs] == list(range(len(configs))), kernel
        assert configs[0]["spill_bytes"] == 0, kernel


@pytest.mark.slow
def test_jax_triton_molora_autotuned_export_holds_every_legal_configuration():
    """configs="all" for molora_linear (two-kernel forward + backward): each of the eight calls is one autotuned
    kernel call holding every legal configuration of its launch, the default (first) spill-free."""
    rows = _export_rows(["molora_linear/t5-large E=10 r=4 two-kernel:bfloat16"], (90,), ["--configs", "all"])
    calls = [r for r in rows if r["config"] == 0]
    assert [c["kernel"] for c in calls] == MOLORA_FORWARD["two_kernel"] + MOLORA_BACKWARD
    for call in calls:
        configs = [r for r in rows if r["call_name"] == call["call_name"]]
        assert len(configs) == call["configs"] > 1, call["call_name"]
        assert [r["config"] for r in configs] == list(range(len(configs))), call["call_name"]
        assert call["spill_bytes"] == 0, call["call_name"]


# ------------------------------------------------------------------------------------------
# Pallas on GPU: the Triton-lowered MoV linear (kernels/pallas/mov_linear_gpu.py)
# ------------------------------------------------------------------------------------------

PALLAS_GPU_CASES = {
    # grid (2, 4): a partial last row block, four one-head column tiles, K in two steps; bias
    "tiled-E10-f32": (jnp.float32, dict(t=100, k=64, g=4, d=32, e=10), dict(block_m=64, block_n=32, block_k=32)),
    # one token, (IA)3, D = 16, bfloat16, default blocks
    "ia3-T1-bf16": (jnp.bfloat16, dict(t=1, k=32, g=2, d=16, e=1), None),
    "E3-T7-bf16": (jnp.bfloat16, dict(t=7, k=48, g=3, d=16, e=3), None),
}


@pytest.mark.parametrize("case", list(PALLAS_GPU_CASES))
def test_pallas_gpu_kernel_interpret_matches_reference(case):
    import torch

    from pemoe import reference as torch_reference
    from pemoe.jax import reference as jax_reference
    from pemoe.kernels.pallas import mov_linear_gpu as kernel
    from tests.test_jax_ops import assert_within_rule

    dtype, shape, blocks = PALLAS_GPU_CASES[case]
    rng = np.random.default_rng(0)
    t, k, g, d, e = (shape[n] for n in ("t", "k", "g", "d", "e"))
    x, w = rng.standard_normal((t, k)), rng.standard_normal((g * d, k)) * k**-0.5
    b, experts = rng.standard_normal(g * d), 1.0 + 0.3 * rng.standard_normal((g, e, d))
    router = 0.5 * rng.standard_normal((d, e)) if e > 1 else None
    t64 = lambda a: None if a is None else torch.tensor(a, dtype=torch.float64)  # noqa: E731
    truth = torch_reference.mov_linear(t64(x), t64(w), t64(router), t64(experts), bias=t64(b)).numpy()
    act = [jnp.asarray(a, dtype) for a in (x, w, b)]
    adapters = [None if a is None else jnp.asarray(a, jnp.float32) for a in (router, experts)]
    blocks = None if blocks is None else kernel.MoVLinearGPUBlocks(**blocks)
    out = kernel.mov_linear(act[0], act[1], act[2], *adapters, blocks=blocks, interpret=True)
    ref = jax_reference.mov_linear(act[0], act[1], *adapters, bias=act[2])
    assert out.dtype == jnp.dtype(dtype)
    assert_within_rule(out, ref, truth, dtype, f"pallas gpu mov_linear {case}")


def test_pallas_gpu_kernel_never_sees_a_partial_row_block():
    """Pallas' Triton lowering does not mask block loads/stores (the interpreter pads partial blocks, so the
    interpreter tests above cannot see an overrun): the wrapper must hand the kernel whole row blocks."""
    from pemoe.kernels.pallas import mov_linear_gpu as kernel

    s = jax.ShapeDtypeStruct
    blocks = kernel.MoVLinearGPUBlocks(block_m=64, block_n=32, block_k=32)
    fn = lambda x, w, r, ex: kernel.mov_linear(x, w, None, r, ex, blocks=blocks)  # noqa: E731
    args = (
        s((100, 64), jnp.bfloat16),
        s((128, 64), jnp.bfloat16),
        s((32, 10), jnp.float32),
        s((4, 10, 32), jnp.float32),
    )
    jaxpr = jax.make_jaxpr(fn)(*args)

    def pallas_calls(jaxpr):  # the pallas_call equations, also inside the jit (pjit) sub-jaxprs
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                yield eqn
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    yield from pallas_calls(inner)

    calls = list(pallas_calls(jaxpr.jaxpr))
    assert calls, "no pallas_call found"
    for eqn in calls:
        assert eqn.invars[0].aval.shape[0] % 64 == 0 and eqn.outvars[0].aval.shape[0] % 64 == 0
    assert jax.eval_shape(fn, *args).shape == (100, 128)


def test_pallas_gpu_kernel_refuses_what_it_cannot_tile():
    from pemoe.kernels.pallas import mov_linear_gpu as kernel

    s = jax.ShapeDtypeStruct
    x, router = s((8, 48), jnp.float32), s((24, 4), jnp.float32)
    with pytest.raises(NotImplementedError, match="D must be a power of two"):  # D = 24
        jax.eval_shape(lambda: kernel.mov_linear(x, s((48, 48), jnp.float32), None, router, s((2, 4, 24), jnp.float32)))
    with pytest.raises(ValueError, match="router must be"):  # the shared checks still apply
        jax.eval_shape(lambda: kernel.mov_linear(x, s((64, 48), jnp.float32), None, router, s((4, 4, 16), jnp.float32)))


def test_pallas_gpu_blocks_are_validated():
    from pemoe.kernels.pallas.mov_linear_gpu import MoVLinearGPUBlocks, get_default

    with pytest.raises(ValueError, match="block_m must be a power of two"):
        MoVLinearGPUBlocks(block_m=24)
    with pytest.raises(ValueError, match="block_k must be a power of two"):
        MoVLinearGPUBlocks(block_k=8)
    with pytest.raises(ValueError, match="block_n must equal the head width"):
        MoVLinearGPUBlocks(block_n=128).validate(n=128, k=64, dim=64)
    with pytest.raises(ValueError, match="block_k must divide K"):
        MoVLinearGPUBlocks(block_k=64).validate(n=128, k=96, dim=64)
    assert get_default(2048, 1024, 768, 64) == MoVLinearGPUBlocks(64, 64, 64)
    with pytest.raises(ValueError, match="multiple of 16"):
        get_default(8, 64, 40, 16)


def _pallas_gpu_export_cases() -> list[tuple[str, str, object, tuple, tuple | None]]:
    """Every Pallas op's GPU export cases as (op, name, fn, args, out (shape, dtype) or None): mov_linear's
    Triton-lowered kernel (kernels/pallas/mov_linear_gpu.py), mov_ffn's "gpu" backend
    (``kernels/pallas/mov_ffn.export_cases(backend="gpu")``) and molora_linear's GPU twin
    (``kernels/pallas/molora_linear_gpu.export_cases()``), each module's own list."""
    import importlib

    sources = (
        ("mov_linear", "mov_linear_gpu", {}),
        ("mov_ffn", "mov_ffn", {"backend": "gpu"}),
        ("molora_linear", "molora_linear_gpu", {}),
    )
    cases = []
    for op, module_name, kwargs in sources:
        module = importlib.import_module(f"pemoe.kernels.pallas.{module_name}")
        for case in module.export_cases(dtype=jnp.bfloat16, **kwargs):
            name, fn, args, *out = case
            cases.append((op, name, fn, tuple(args), out[0] if out else None))
    return cases


def test_pallas_gpu_exports_for_cuda():
    """Pallas → Triton lowering for CUDA at T5 base / large / XL shapes with the default blocks, for every
    Pallas op: the module holds ``__gpu$xla.gpu.triton`` calls carrying Triton IR, and the op's output (the
    case's stated (shape, dtype), else [T, ·] in bfloat16)."""
    from jax import export

    target = "__gpu$xla.gpu.triton"
    cases = _pallas_gpu_export_cases()
    assert {op for op, *_ in cases} == {"mov_linear", "mov_ffn", "molora_linear"}
    for op, name, fn, args, out in cases:
        exported = export.export(
            jax.jit(fn), platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call(target)]
        )(*args)
        what = f"{op} {name}"
        assert exported.platforms == ("cuda",), what
        calls = [line for line in exported.mlir_module().splitlines() if "stablehlo.custom_call" in line]
        assert calls and all(f"@{target}(" in c and "ir = " in c for c in calls), what
        (y_aval,) = exported.out_avals
        shape, dtype = out if out is not None else ((args[0].shape[0], y_aval.shape[1]), jnp.bfloat16)
        assert (y_aval.shape, y_aval.dtype) == (tuple(shape), jnp.dtype(dtype)), what
        assert y_aval.shape[0] == args[0].shape[0], what  # one row per token of x
        ty = {"bfloat16": "bf16", "float32": "f32"}[jnp.dtype(dtype).name]
        out_type = f"tensor<{'x'.join(map(str, shape))}x{ty}>"
        assert any(out_type in c for c in calls), what
