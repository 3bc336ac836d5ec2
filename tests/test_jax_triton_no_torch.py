"""The JAX Triton path (``pemoe.jax.triton`` and the kernel modules it launches) imports and plans every op with
torch unimportable: the launch plans are framework-neutral, and jax-triton consumes them directly.

A child process blocks ``import torch`` with a meta-path finder and traces each op's forward and backward with
``jax.make_jaxpr``: every Triton launch binds jax-triton's kernel-call primitive with the planned arguments
(lowering, which compiles for a GPU, is not needed to build them). The package ``__init__`` modules of ``pemoe``
(the PyTorch API) and ``pemoe.jax`` (its shared argument checks) import torch, so the child loads them as bare
packages: what is shown is that the JAX Triton path itself never imports torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("jax")

CHILD = textwrap.dedent(
    """
    import importlib.abc, importlib.util, json, os, sys, types

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this process")

    sys.meta_path.insert(0, NoTorch())
    for name in ("pemoe", "pemoe.jax"):  # bare packages: their __init__ modules import torch
        spec = importlib.util.find_spec(name)
        module = types.ModuleType(name)
        module.__path__ = list(spec.submodule_search_locations)
        sys.modules[name] = module

    import jax
    import jax.numpy as jnp

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
    out["torch imported"] = "torch" in sys.modules
    print(json.dumps(out))
    """
)


def test_jax_triton_plans_every_op_without_torch(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got.pop("torch imported") is False
    assert got == {
        "mov_linear": ["pemoe_mov_linear_fwd", "pemoe_mov_linear_bwd"],
        "mov_ffn": [
            "pemoe_mov_ffn_up", "pemoe_mov_ffn_down", "pemoe_mov_ffn_down_bwd", "pemoe_mov_ffn_router_bwd",
            "pemoe_mov_ffn_up_bwd",
        ],
        "molora_linear fused": [
            "pemoe_molora_fused", "pemoe_molora_grad_u", "pemoe_molora_dx", "pemoe_molora_wgrad_a",
            "pemoe_molora_wgrad_b",
        ],
        "molora_linear two_kernel": [
            "pemoe_molora_shrink", "pemoe_molora_expand", "pemoe_molora_grad_u", "pemoe_molora_dx",
            "pemoe_molora_wgrad_a", "pemoe_molora_wgrad_b",
        ],
    }  # fmt: skip
