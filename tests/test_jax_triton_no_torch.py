"""``import pemoe.jax`` and every JAX implementation (reference, xla, pallas, and the Triton path with its shared
launch plans) work in a process where torch cannot be imported: ``pemoe`` loads its PyTorch API on first use and
the argument checks pemoe.jax shares with it (:mod:`pemoe._shape_checks`) import no framework.

A child process blocks ``import torch`` with a meta-path finder, imports ``pemoe.jax`` plainly, runs the forward
and backward of every op with the reference, xla and pallas (Pallas interpreter) implementations, and traces the
Triton path's forward and backward with ``jax.make_jaxpr``: every Triton launch binds jax-triton's kernel-call
primitive with the planned arguments (lowering, which compiles for a GPU, is not needed to build them). The
Triton interpreter stand-in (``TRITON_INTERPRET=1``) runs the kernels on torch CPU tensors, so without torch
``implementation="triton"`` refuses there, naming torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("jax")

CHILD = textwrap.dedent(
    """
    import importlib.abc, json, math, os, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this process")

    sys.meta_path.insert(0, NoTorch())

    import jax
    import jax.numpy as jnp

    import pemoe
    import pemoe.jax as pj
    from pemoe.jax import triton as pt
    from pemoe.kernels.triton import molora_linear as ml_lora

    def launches(fn, *args):
        jaxpr = jax.make_jaxpr(jax.grad(fn, argnums=tuple(range(len(args)))))(*args)
        return [e.params.get("name") for e in jaxpr.eqns if "triton" in e.primitive.name]

    def loss(y):
        return y.astype(jnp.float32).sum()

    f32, bf16 = jnp.float32, jnp.bfloat16
    out = {}
    x = jnp.ones((37, 64), bf16)
    w = jnp.ones((64, 64), bf16)
    out["mov_linear"] = launches(
        lambda x, r, e: loss(pt.mov_linear(x, w, None, r, e)), x, jnp.ones((16, 3), f32), jnp.ones((4, 3, 16), f32)
    )
    wi, wo = jnp.ones((48, 64), bf16), jnp.ones((64, 48), bf16)
    out["mov_ffn"] = launches(
        lambda x, r, e: loss(pt.mov_ffn(x, wi, wi, wo, r, e)), x, jnp.ones((48, 3), f32), jnp.ones((1, 3, 48), f32)
    )
    a, b, r = jnp.ones((3, 64, 4), f32), jnp.ones((3, 4, 64), f32), jnp.ones((64, 3), f32)
    for schedule in ml_lora.SCHEDULES:
        out[f"molora_linear {schedule}"] = launches(
            lambda x, a, b, r: loss(pt.molora_linear(x, w, None, a, b, r, scale=2.0, schedule=schedule)), x, a, b, r
        )
    # the public API, through pemoe.jax: the Triton path traced for sm_90, the others run (forward and backward)
    with pt.cuda_target(90):
        out["pemoe.jax.mov_linear triton"] = launches(
            lambda x, r, e: loss(pj.mov_linear(x, w, r, e, implementation="triton")),
            x, jnp.ones((16, 3), f32), jnp.ones((4, 3, 16), f32),
        )
    key = jax.random.split(jax.random.key(0), 8)
    xs = jax.random.normal(key[0], (5, 32), f32)
    w32 = jax.random.normal(key[1], (32, 32), f32) / 8
    mov_args = (jax.random.normal(key[2], (16, 3), f32), 1 + jax.random.normal(key[3], (2, 3, 16), f32) / 8)
    ffn_args = (jax.random.normal(key[4], (32, 3), f32), 1 + jax.random.normal(key[5], (1, 3, 32), f32) / 8)
    lora_args = (jax.random.normal(key[6], (3, 32, 4), f32) / 8, jax.random.normal(key[7], (3, 4, 32), f32) / 8)
    ops = {
        "mov": lambda impl, x, *a: pj.mov(x, *a, implementation=impl),
        "mov_linear": lambda impl, x, *a: pj.mov_linear(x, w32, *a, implementation=impl),
        "mov_ffn": lambda impl, x, *a: pj.mov_ffn(x, w32, w32, *a, wi_1=w32, implementation=impl),
        "molora_linear": lambda impl, x, a, b: pj.molora_linear(
            x, w32, a, b, jnp.ones((32, 3), f32), scale=2.0, implementation=impl
        ),
    }
    op_args = {"mov": mov_args, "mov_linear": mov_args, "mov_ffn": ffn_args, "molora_linear": lora_args}
    for op, fn in ops.items():
        for impl in pj.AVAILABLE[op]:
            if impl == "triton":
                continue
            args = (xs,) + op_args[op]
            y, grads = jax.value_and_grad(
                lambda *a: loss(fn(impl, *a) ** 2), argnums=tuple(range(len(args)))
            )(*args)
            out[f"{op} {impl}"] = bool(math.isfinite(float(y))) and all(bool(jnp.isfinite(g).all()) for g in grads)
    out["torch imported"] = "torch" in sys.modules
    print(json.dumps(out))
    """
)


def _run_without_torch(code: str, **env: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_pemoe_jax_runs_and_plans_every_op_without_torch():
    got = _run_without_torch(CHILD, PEMOE_PALLAS_INTERPRET="1")
    assert got.pop("torch imported") is False
    ran = {name: got.pop(name) for name in list(got) if not isinstance(got[name], list)}
    assert ran == {
        "mov reference": True, "mov xla": True,
        "mov_linear reference": True, "mov_linear xla": True, "mov_linear pallas": True,
        "mov_ffn reference": True, "mov_ffn xla": True, "mov_ffn pallas": True,
        "molora_linear reference": True, "molora_linear xla": True, "molora_linear pallas": True,
    }  # fmt: skip
    assert got == {
        "mov_linear": ["pemoe_mov_linear_fwd", "pemoe_mov_linear_bwd"],
        "pemoe.jax.mov_linear triton": ["pemoe_mov_linear_fwd", "pemoe_mov_linear_bwd"],
        "mov_ffn": [
            "pemoe_mov_ffn_up", "pemoe_mov_ffn_down", "pemoe_mov_ffn_down_bwd", "pemoe_mov_ffn_router_bwd",
            "pemoe_mov_ffn_up_bwd",
        ],
        "molora_linear fused": [
            "pemoe_molora_pack", "pemoe_molora_fused", "pemoe_molora_pack", "pemoe_molora_grad_u", "pemoe_molora_dx",
            "pemoe_molora_wgrad_a", "pemoe_molora_wgrad_b",
        ],
        "molora_linear two_kernel": [
            "pemoe_molora_pack", "pemoe_molora_shrink", "pemoe_molora_expand", "pemoe_molora_pack",
            "pemoe_molora_grad_u", "pemoe_molora_dx", "pemoe_molora_wgrad_a", "pemoe_molora_wgrad_b",
        ],
    }  # fmt: skip


INTERPRETED = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this process")

    sys.meta_path.insert(0, NoTorch())

    import jax.numpy as jnp
    import pemoe.jax as pj

    x, w = jnp.ones((5, 32)), jnp.ones((32, 32))
    try:
        pj.mov_linear(x, w, jnp.ones((16, 3)), jnp.ones((2, 3, 16)), implementation="triton")
        print(json.dumps("ran"))
    except NotImplementedError as e:
        print(json.dumps(str(e)))
    """
)


def test_the_triton_interpreter_stand_in_names_torch_when_it_is_missing():
    """The interpreter stand-in runs the kernels on torch CPU tensors: without torch it refuses up front."""
    message = _run_without_torch(INTERPRETED, TRITON_INTERPRET="1")
    assert "Triton interpreter" in message and "torch" in message, message
