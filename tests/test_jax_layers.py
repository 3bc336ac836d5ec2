"""pemoe.jax.layers (Flax NNX): initialisation, equivalence with the functional ops and with the
PyTorch layers on the same weights, frozen base, float32 adapters, training only the adapters."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from torch import nn

import pemoe.layers as torch_layers
from pemoe import jax as pj
from pemoe.jax.layers import IA3, AdapterParam, LoRALinear, MoLoRALinear, MoV, MoVLinear, num_adapter_parameters

K, N, G = 40, 48, 4


def _base(k=K, n=N, *, use_bias=True, param_dtype=jnp.float32, seed=0) -> nnx.Linear:
    return nnx.Linear(k, n, use_bias=use_bias, param_dtype=param_dtype, rngs=nnx.Rngs(seed))


def _x(*shape, dtype=jnp.float32, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype=dtype)


@nnx.jit
def _call(layer: nnx.Module, *args):
    """layer(*args) under nnx.jit: one XLA compile instead of one per eager primitive."""
    return layer(*args)


def _base_out(base: nnx.Linear, x):
    y = x @ base.kernel[...].astype(x.dtype)
    return y if base.bias is None else y + base.bias[...].astype(x.dtype)


# ------------------------------------------------------------------------------------------
# initialisation and parameters
# ------------------------------------------------------------------------------------------


def test_init_values_and_dtypes():
    layer = MoLoRALinear(_base(512, 256, param_dtype=jnp.bfloat16), num_experts=10, rank=4, rngs=nnx.Rngs(0))
    assert layer.lora_A.shape == (10, 512, 4) and layer.lora_B.shape == (10, 4, 256)
    assert layer.router.shape == (512, 10)
    for p in (layer.lora_A, layer.lora_B, layer.router):
        assert isinstance(p, AdapterParam) and p.dtype == jnp.float32
    assert not np.asarray(layer.lora_B[...]).any()
    for p in (layer.lora_A, layer.router):
        v = np.asarray(p[...])
        assert abs(v.mean()) < 2e-3 and abs(v.std() - 0.02) < 1e-3  # normal(0.02) (thousands of draws)
    mov = MoVLinear(_base(64, 96), num_groups=6, num_experts=30, rngs=nnx.Rngs(0))
    assert mov.mov_scaling.shape == (6, 30, 16) and mov.router.shape == (16, 30)
    np.testing.assert_array_equal(np.asarray(mov.mov_scaling[...]), 1.0)
    assert abs(float(mov.router[...].std()) - 0.02) < 3e-3
    assert num_adapter_parameters(mov) == 6 * 30 * 16 + 16 * 30
    assert num_adapter_parameters(layer) == 10 * 512 * 4 + 10 * 4 * 256 + 512 * 10


def test_one_expert_forms_have_no_router():
    ia3 = IA3(2, 8, rngs=nnx.Rngs(0))
    lora = LoRALinear(_base(), rank=2, rngs=nnx.Rngs(0))
    assert ia3.router is None and ia3.mov_scaling.shape == (2, 1, 8)
    assert lora.router is None and lora.lora_A.shape == (1, K, 2) and lora.scale == 8.0
    assert num_adapter_parameters(lora) == K * 2 + 2 * N


def test_fresh_layers_reproduce_their_base():
    base = _base()
    x = _x(3, 5, K)
    molora = MoLoRALinear(base, num_experts=4, rngs=nnx.Rngs(0))
    # lora_B = 0: the base exactly, up to the summation order of the joined GEMM [x | U'] @ [W | 0]
    np.testing.assert_allclose(np.asarray(_call(molora, x)), np.asarray(_base_out(base, x)), rtol=1e-6, atol=1e-6)
    mov = MoVLinear(base, num_groups=G, num_experts=4, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.asarray(_call(mov, x)), np.asarray(_base_out(base, x)), rtol=1e-6, atol=1e-6)
    site = MoV(1, N, 3, rngs=nnx.Rngs(0))
    h = _x(2, N)
    np.testing.assert_allclose(np.asarray(_call(site, h)), np.asarray(h), rtol=1e-6)


# ------------------------------------------------------------------------------------------
# layers = functional ops = PyTorch layers, on the same weights
# ------------------------------------------------------------------------------------------


def _randomise(layer: nnx.Module, seed: int = 3) -> None:
    """Random adapter values (so a test can see every parameter's effect)."""
    rng = np.random.default_rng(seed)
    for _, v in nnx.iter_graph(layer):
        if isinstance(v, AdapterParam):
            v[...] = jnp.asarray(1.0 + 0.3 * rng.standard_normal(v.shape), dtype=jnp.float32)


def test_molora_layer_is_the_op_and_the_torch_layer():
    base = _base()
    layer = MoLoRALinear(base, num_experts=3, rank=2, alpha=8.0, top_k=2, rngs=nnx.Rngs(0))
    _randomise(layer)
    x = _x(2, 5, K)
    y = layer(x)
    op = pj.molora_linear(
        x,
        base.kernel[...].T,
        layer.lora_A[...],
        layer.lora_B[...],
        layer.router[...],
        scale=4.0,
        bias=base.bias[...],
        top_k=2,
    )
    np.testing.assert_array_equal(np.asarray(y), np.asarray(op))
    t_base = nn.Linear(K, N)
    with torch.no_grad():
        t_base.weight.copy_(torch.tensor(np.asarray(base.kernel[...]).T))
        t_base.bias.copy_(torch.tensor(np.asarray(base.bias[...])))
    t_layer = torch_layers.MoLoRALinear(t_base, num_experts=3, rank=2, alpha=8.0, top_k=2)
    with torch.no_grad():
        t_layer.lora_a.copy_(torch.tensor(np.asarray(layer.lora_A[...])))
        t_layer.lora_b.copy_(torch.tensor(np.asarray(layer.lora_B[...])))
        t_layer.router.copy_(torch.tensor(np.asarray(layer.router[...])))
        y_torch = t_layer(torch.tensor(np.asarray(x))).numpy()
    np.testing.assert_allclose(np.asarray(y), y_torch, rtol=2e-5, atol=2e-5 * np.abs(y_torch).max())


def test_mov_layer_is_the_op_and_the_torch_layer():
    base = _base()
    layer = MoVLinear(base, num_groups=G, num_experts=5, rngs=nnx.Rngs(0))
    _randomise(layer)
    x = _x(7, K)
    y = layer(x)
    op = pj.mov_linear(x, base.kernel[...].T, layer.router[...], layer.mov_scaling[...], bias=base.bias[...])
    np.testing.assert_array_equal(np.asarray(y), np.asarray(op))
    t_base = nn.Linear(K, N)
    with torch.no_grad():
        t_base.weight.copy_(torch.tensor(np.asarray(base.kernel[...]).T))
        t_base.bias.copy_(torch.tensor(np.asarray(base.bias[...])))
    t_layer = torch_layers.MoVLinear(t_base, num_groups=G, num_experts=5)
    with torch.no_grad():
        t_layer.experts.copy_(torch.tensor(np.asarray(layer.mov_scaling[...])))
        t_layer.router.copy_(torch.tensor(np.asarray(layer.router[...])))
        y_torch = t_layer(torch.tensor(np.asarray(x))).numpy()
    np.testing.assert_allclose(np.asarray(y), y_torch, rtol=2e-5, atol=2e-5 * np.abs(y_torch).max())


def test_mov_site_and_ia3():
    site = MoV(3, 8, 4, top_k=2, renormalize=True, rngs=nnx.Rngs(0))
    _randomise(site)
    h = _x(5, 24)
    expected = pj.mov(h, site.router[...], site.mov_scaling[...], top_k=2, renormalize=True)
    np.testing.assert_array_equal(np.asarray(_call(site, h)), np.asarray(expected))
    ia3 = IA3(1, 24, rngs=nnx.Rngs(0))
    _randomise(ia3)
    np.testing.assert_allclose(np.asarray(ia3(h)), np.asarray(h * ia3.mov_scaling[...][0, 0]), rtol=1e-6)


def test_sentence_routing_layer():
    layer = MoLoRALinear(_base(), num_experts=3, router_input_features=9, rngs=nnx.Rngs(0))
    _randomise(layer)
    x, r_in = _x(2, 5, K), _x(2, 9, seed=4)
    assert layer.router.shape == (9, 3)
    y = _call(layer, x, r_in)
    assert y.shape == (2, 5, N)
    with pytest.raises(ValueError, match="routes by sentence"):
        layer(x)


# ------------------------------------------------------------------------------------------
# frozen base, float32 adapters with 16-bit activations, adapter-only training
# ------------------------------------------------------------------------------------------


def test_bfloat16_base_keeps_float32_adapters_and_frozen_base_gets_no_gradient():
    base = _base(param_dtype=jnp.bfloat16)
    layer = MoLoRALinear(base, num_experts=3, rngs=nnx.Rngs(0))
    _randomise(layer)
    x = _x(6, K, dtype=jnp.bfloat16)
    y = _call(layer, x)
    assert y.dtype == jnp.bfloat16

    def loss(model):
        return model(x).astype(jnp.float32).sum()

    grads = nnx.jit(nnx.grad(loss))(layer)  # every nnx.Param, the base's included
    assert grads["lora_A"][...].dtype == jnp.float32 and np.abs(np.asarray(grads["lora_A"][...])).sum() > 0
    assert np.abs(np.asarray(grads["router"][...])).sum() > 0
    assert not np.asarray(grads["base"]["kernel"][...]).any() and not np.asarray(grads["base"]["bias"][...]).any()


def test_training_updates_only_the_adapters():
    model = MoVLinear(_base(), num_groups=G, num_experts=4, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=AdapterParam)
    x, target = _x(8, K), _x(8, N, seed=5)
    kernel_before = np.asarray(model.base.kernel[...]).copy()
    scaling_before = np.asarray(model.mov_scaling[...]).copy()

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(m):
            return ((m(x) - target) ** 2).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, AdapterParam))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(3)]
    assert losses[2] < losses[0]
    np.testing.assert_array_equal(np.asarray(model.base.kernel[...]), kernel_before)
    assert not np.array_equal(np.asarray(model.mov_scaling[...]), scaling_before)


# ------------------------------------------------------------------------------------------
# bad configuration
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build,exc,match",
    [
        (lambda: MoVLinear(_base(), num_groups=5, rngs=nnx.Rngs(0)), ValueError, "must divide base.out_features"),
        (lambda: MoVLinear(_base(), num_groups=G, num_experts=0, rngs=nnx.Rngs(0)), ValueError, "num_experts"),
        (lambda: MoLoRALinear(_base(), num_experts=2, rank=0, rngs=nnx.Rngs(0)), ValueError, "rank"),
        (lambda: MoLoRALinear(_base(), num_experts=2, top_k=3, rngs=nnx.Rngs(0)), ValueError, "top_k"),
        (lambda: MoV(0, 8, rngs=nnx.Rngs(0)), ValueError, "num_groups"),
        (lambda: MoLoRALinear(nn.Linear(4, 4), rngs=nnx.Rngs(0)), TypeError, "flax.nnx.Linear"),
        (lambda: MoLoRALinear(_base(), alpha=float("nan"), rngs=nnx.Rngs(0)), ValueError, "alpha must be finite"),
        (
            lambda: MoLoRALinear(_base(), num_experts=2, top_k=1, renormalize="no", rngs=nnx.Rngs(0)),
            TypeError,
            "renormalize must be a bool, got str 'no'",
        ),
        (
            lambda: MoVLinear(_base(), num_groups=G, num_experts=2, top_k=1, renormalize=1, rngs=nnx.Rngs(0)),
            TypeError,
            "renormalize must be a bool, got int 1",
        ),
    ],
)
def test_bad_configuration(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


def test_bad_input_names_the_argument():
    layer = MoLoRALinear(_base(), num_experts=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"weight must have shape \[N, K\] with K = x.shape\[-1\] = 41"):
        layer(_x(3, K + 1))
