"""The nn.Module layers: init, equivalence with their base, parameters, dtype moves, training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pemoe import ops
from pemoe.layers import IA3, LoRALinear, MoLoRALinear, MoV, MoVLinear, count_parameters

IMPLEMENTATIONS = ["torch", "reference"]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fresh_mov_linear_equals_base(impl, dtype):
    base = nn.Linear(48, 64).to(dtype)
    layer = MoVLinear(base, num_groups=4, num_experts=10, implementation=impl)
    x = torch.randn(3, 11, 48, dtype=dtype)
    # experts start at ones: y = h * sum_e p_e = h up to the rounding of sum_e p_e (a few float32 ulps)
    torch.testing.assert_close(layer(x), base(x), rtol=4e-7 if dtype == torch.float32 else 0, atol=0)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_experts", [1, 15])
def test_fresh_molora_equals_base_exactly(impl, dtype, num_experts):
    base = nn.Linear(48, 40).to(dtype)
    layer = MoLoRALinear(base, num_experts=num_experts, rank=4, implementation=impl)
    x = torch.randn(3, 11, 48, dtype=dtype)
    assert torch.equal(layer(x), base(x))  # lora_b starts at zero: the update is exactly zero


def test_fresh_mov_site_is_identity():
    site = MoV(num_groups=1, dim=56, num_experts=30)
    h = torch.randn(9, 56)
    torch.testing.assert_close(site(h), h, rtol=4e-7, atol=0)
    assert torch.equal(IA3(2, 28)(h), h)


def test_initialisation_and_shapes():
    site = MoV(num_groups=16, dim=64, num_experts=10)
    assert site.experts.shape == (16, 10, 64) and torch.equal(site.experts, torch.ones(16, 10, 64))
    assert site.router.shape == (64, 10) and abs(site.router.std().item() - 0.02) < 0.003
    layer = MoLoRALinear(nn.Linear(1024, 512), num_experts=10, rank=4)
    assert layer.lora_a.shape == (10, 1024, 4) and abs(layer.lora_a.std().item() - 0.02) < 0.002
    assert layer.lora_b.shape == (10, 4, 512) and not layer.lora_b.any()
    assert layer.router.shape == (1024, 10) and layer.scale == 4.0
    assert IA3(16, 64).router is None and LoRALinear(nn.Linear(8, 8)).router is None
    for p in (site.experts, site.router, layer.lora_a, layer.lora_b, layer.router):
        assert p.dtype == torch.float32


def test_parameter_counts():
    layer = MoLoRALinear(nn.Linear(100, 60), num_experts=3, rank=2)
    assert layer.num_adapter_parameters() == 3 * 100 * 2 + 3 * 2 * 60 + 100 * 3
    c = count_parameters(layer)
    assert (c.trainable, c.total) == (layer.num_adapter_parameters(), layer.num_adapter_parameters() + 100 * 60 + 60)
    assert f"{c.percent:.4f}%" in str(c)
    kv = MoVLinear(nn.Linear(32, 32, bias=False), num_groups=4, num_experts=5)
    assert count_parameters(kv).trainable == 4 * 5 * 8 + 8 * 5
    assert count_parameters(IA3(4, 8)).trainable == 32


def test_base_is_frozen_and_only_adapters_get_gradients():
    layer = MoLoRALinear(nn.Linear(24, 16), num_experts=4, rank=2)
    nn.init.normal_(layer.lora_b, std=0.1)
    x = torch.randn(5, 24, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.adapter_parameters())
    assert x.grad is not None


@pytest.mark.parametrize("move", ["half", "bfloat16", "to_bf16", "double"])
def test_dtype_moves_keep_adapters_float32(move):
    layer = MoVLinear(nn.Linear(16, 16), num_groups=2, num_experts=3)
    layer = {
        "half": lambda m: m.half(),
        "bfloat16": lambda m: m.bfloat16(),
        "to_bf16": lambda m: m.to(torch.bfloat16),
        "double": lambda m: m.double(),
    }[move](layer)
    want = torch.float64 if move == "double" else torch.float32
    assert layer.experts.dtype == want and layer.router.dtype == want
    assert layer.base.weight.dtype != torch.float32
    y = layer(torch.randn(3, 16, dtype=layer.base.weight.dtype))
    assert y.dtype == layer.base.weight.dtype
    molora = MoLoRALinear(nn.Linear(16, 8), num_experts=2).half()
    assert {p.dtype for p in molora.adapter_parameters()} == {torch.float32}
    assert molora.base.weight.dtype == torch.float16


def test_training_steps_lower_the_loss():
    torch.manual_seed(1)
    layer = MoLoRALinear(nn.Linear(16, 8), num_experts=4, rank=2, alpha=4)
    site = MoV(num_groups=2, dim=4, num_experts=3)
    x, target = torch.randn(64, 16), torch.randn(64, 8)
    opt = torch.optim.Adam(list(layer.adapter_parameters()) + list(site.adapter_parameters()), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = (site(layer(x)) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_layers_match_functional_ops():
    layer = MoLoRALinear(nn.Linear(12, 10), num_experts=3, rank=2, top_k=2)
    nn.init.normal_(layer.lora_b)
    x = torch.randn(4, 12)
    want = ops.molora_linear(
        x,
        layer.base.weight,
        layer.lora_a,
        layer.lora_b,
        layer.router,
        scale=8.0,
        bias=layer.base.bias,
        top_k=2,
        implementation="reference",
    )
    torch.testing.assert_close(layer(x), want)


def test_extra_repr_and_bad_config():
    assert "num_experts=10, rank=4, alpha=16" in repr(MoLoRALinear(nn.Linear(8, 8), num_experts=10))
    assert "num_groups=2, dim=4, num_experts=3" in repr(MoVLinear(nn.Linear(8, 8), 2, 3))
    with pytest.raises(ValueError, match="num_experts must be a positive int"):
        MoV(2, 4, 0)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        MoLoRALinear(nn.Linear(8, 8), rank=0)
    with pytest.raises(ValueError, match="num_groups=3 must divide"):
        MoVLinear(nn.Linear(8, 8), 3)
    with pytest.raises(ValueError, match="top_k must be in"):
        MoLoRALinear(nn.Linear(8, 8), num_experts=2, top_k=3)
    with pytest.raises(TypeError, match="base must be a torch.nn.Linear"):
        MoLoRALinear(nn.Conv1d(8, 8, 1))


def test_linear_layers_expose_the_base_weight():
    base = nn.Linear(8, 6)
    for layer in (MoVLinear(base, 2, 3), MoLoRALinear(nn.Linear(8, 6), num_experts=2)):
        assert layer.weight is layer.base.weight and layer.bias is layer.base.bias
        assert (layer.in_features, layer.out_features) == (8, 6)


@pytest.mark.parametrize("kind", ["mov", "mov_linear", "molora"])
def test_sentence_routed_layers(kind):
    R, E = 6, 3
    if kind == "mov":
        layer = MoV(2, 4, E, router_input_features=R)
        inp = torch.randn(2, 5, 8)
    elif kind == "mov_linear":
        layer = MoVLinear(nn.Linear(12, 8), 2, E, router_input_features=R)
        inp = torch.randn(2, 5, 12)
    else:
        layer = MoLoRALinear(nn.Linear(12, 8), num_experts=E, router_input_features=R)
        nn.init.normal_(layer.lora_b)
        inp = torch.randn(2, 5, 12)
    with torch.no_grad():
        for p in layer.adapter_parameters():
            p.add_(torch.randn_like(p))
    assert layer.router.shape == (R, E)
    with pytest.raises(ValueError, match=r"routes by sentence \(router_input_features=6\)"):
        layer(inp)
    r = torch.randn(2, R)
    explicit = layer(inp, r)
    if kind == "mov":
        want = ops.mov(inp, layer.router, layer.experts, router_input=r, implementation="reference")
    elif kind == "mov_linear":
        want = ops.mov_linear(
            inp, layer.weight, layer.router, layer.experts, bias=layer.bias, router_input=r, implementation="reference"
        )
    else:
        want = ops.molora_linear(
            inp,
            layer.weight,
            layer.lora_a,
            layer.lora_b,
            layer.router,
            scale=layer.scale,
            bias=layer.bias,
            router_input=r,
            implementation="reference",
        )
    torch.testing.assert_close(explicit, want, rtol=1e-6, atol=1e-6)
    layer.set_router_input(r)
    assert torch.equal(layer(inp), explicit)
    layer.set_router_input(None)
    with pytest.raises(ValueError, match="routes by sentence"):
        layer(inp)
    with pytest.raises(ValueError, match="router_input_features must be a positive int"):
        MoV(2, 4, E, router_input_features=0)
