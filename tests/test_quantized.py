"""Adapters over quantized frozen bases (bitsandbytes 4-bit / 8-bit, torchao int8 weight-only), on the CPU.

A quantized base runs its own forward and the adapter runs on its output (``ops.molora_adapter`` for MoLoRA,
``ops.mov`` for MoV). Checked against the same adapter on the dequantized weight (weight-only quantization:
the base output is x·W_deqᵀ up to rounding) or on the base's own output (LLM.int8 quantizes activations too),
with the rule of tests/helpers.py; gradients reach the adapters and x only.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pemoe import ops
from pemoe.kernels.triton import interpreter
from pemoe.layers import MoLoRALinear, MoVLinear, runs_own_forward
from tests.helpers import assert_within_rule

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is installed by scripts/setup.sh (the quant extra)")
torchao = pytest.importorskip("torchao", reason="torchao is installed by scripts/setup.sh (the quant extra)")

K, N, E, R = 64, 48, 4, 4


def _linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(K, N)
    lin.requires_grad_(False)
    return lin


def _bnb_4bit(lin: nn.Linear) -> tuple[nn.Module, torch.Tensor]:
    """nf4 Linear4bit with lin's weights; returns it and its dequantized weight [N, K]."""
    q = bnb.nn.Linear4bit(K, N, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    q.load_state_dict(lin.state_dict())
    q = q.to("cpu")  # quantizes the weight
    w = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).float()
    return q, w


def _bnb_8bit(lin: nn.Linear) -> nn.Module:
    q = bnb.nn.Linear8bitLt(K, N, bias=True, has_fp16_weights=False)
    q.load_state_dict(lin.state_dict())
    return q.to("cpu")


def _torchao_int8(lin: nn.Linear) -> tuple[nn.Module, torch.Tensor]:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    holder = nn.Sequential(nn.Linear(K, N))
    holder[0].load_state_dict(lin.state_dict())
    quantize_(holder, Int8WeightOnlyConfig())
    holder.requires_grad_(False)
    return holder[0], holder[0].weight.dequantize().float()


def _randomize(layer: nn.Module) -> None:
    """Adapters off their initialisation (experts around 1, the rest around 0), so every gradient matters."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn_like(p) + (1.0 if name.endswith("experts") else 0.0))


def _adapters(layer) -> dict[str, nn.Parameter]:
    return {n: p for n, p in layer.named_parameters() if p.requires_grad}


def test_quantized_bases_are_detected():
    lin = _linear()
    assert not runs_own_forward(lin)
    assert runs_own_forward(_bnb_4bit(lin)[0])
    assert runs_own_forward(_bnb_8bit(lin))
    assert runs_own_forward(_torchao_int8(lin)[0])


def _check_molora(quantized: nn.Module, dequantized: torch.Tensor | None, implementation: str, sentence=False):
    """MoLoRALinear over ``quantized`` vs the reference MoLoRA on ``dequantized`` (None: on the quantized base's
    own output), output and every adapter gradient and dx, float32."""
    torch.manual_seed(1)
    layer = MoLoRALinear(quantized, E, R, alpha=8.0, implementation=implementation, top_k=2)
    _randomize(layer)
    x = torch.randn(2, 7, K, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    params = _adapters(layer)
    assert set(params) == {"lora_a", "lora_b", "router"}  # the quantized base is frozen
    grads = torch.autograd.grad(y, [x, *params.values()], g)

    def reference(dtype):
        xx = x.detach().to(dtype).requires_grad_()
        ps = [p.detach().to(dtype).requires_grad_() for p in params.values()]
        a, b, router = ps
        if dequantized is None:  # the base's own forward and backward (float32) in both references
            base = quantized(xx.float()).to(dtype)
            out = base + ops.molora_adapter(xx, a, b, router, scale=layer.scale, top_k=2, implementation="reference")
        else:
            w = dequantized.to(dtype)
            out = ops.molora_linear(xx, w, a, b, router, scale=layer.scale, bias=quantized.bias.to(dtype),
                                    top_k=2, implementation="reference")  # fmt: skip
        return out, torch.autograd.grad(out, [xx, *ps], g.to(dtype))

    ref, ref_grads = reference(torch.float32)
    truth, truth_grads = reference(torch.float64)
    assert_within_rule(y, ref, truth, torch.float32, "output")
    for name, got, r, t in zip(["x", *params], grads, ref_grads, truth_grads, strict=True):
        assert_within_rule(got, r, t, torch.float32, f"d{name}")


IMPLEMENTATIONS = ["torch", "reference"] + (["triton"] if interpreter.INTERPRET else [])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_molora_over_bnb_4bit_equals_molora_on_the_dequantized_weight(implementation):
    q, w = _bnb_4bit(_linear())
    _check_molora(q, w, implementation)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_molora_over_torchao_int8_equals_molora_on_the_dequantized_weight(implementation):
    q, w = _torchao_int8(_linear())
    _check_molora(q, w, implementation)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_molora_over_bnb_8bit_adds_the_adapter_to_the_base_output(implementation):
    """LLM.int8 quantizes the activations too: the reference is the base's own output plus the adapter."""
    _check_molora(_bnb_8bit(_linear()), None, implementation)


@pytest.mark.parametrize("make", ["bnb_4bit", "torchao_int8"])
def test_mov_over_a_quantized_base_equals_mov_on_the_dequantized_weight(make):
    q, w = {"bnb_4bit": _bnb_4bit, "torchao_int8": _torchao_int8}[make](_linear())
    torch.manual_seed(2)
    layer = MoVLinear(q, 4, E, implementation="auto")
    _randomize(layer)
    x = torch.randn(9, K, requires_grad=True)
    y = layer(x)
    params = _adapters(layer)
    assert set(params) == {"site.experts", "site.router"}
    grads = torch.autograd.grad(y.square().sum(), [x, *params.values()])

    def reference(dtype):
        xx = x.detach().to(dtype).requires_grad_()
        router, experts = (p.detach().to(dtype).requires_grad_() for p in (layer.router, layer.experts))
        out = ops.mov_linear(xx, w.to(dtype), router, experts, bias=q.bias.to(dtype), implementation="reference")
        return out, torch.autograd.grad(out.square().sum(), [xx, experts, router])

    (ref, ref_g), (truth, truth_g) = reference(torch.float32), reference(torch.float64)
    assert_within_rule(y, ref, truth, torch.float32, "output")
    got = dict(zip(["x", "experts", "router"], [grads[0], layer.experts.grad, layer.router.grad], strict=True))
    got["experts"], got["router"] = grads[1], grads[2]
    for name, r, t in zip(["x", "experts", "router"], ref_g, truth_g, strict=True):
        assert_within_rule(got[name], r, t, torch.float32, f"d{name}")


def test_mov_over_a_quantized_base_refuses_triton():
    q, _ = _bnb_4bit(_linear())
    layer = MoVLinear(q, 4, E, implementation="triton")
    with pytest.raises(NotImplementedError, match="no Triton kernel; use implementation='auto' or 'torch'"):
        layer(torch.randn(3, K))


def test_a_base_quantized_after_wrapping_takes_the_adapter_path():
    """The path is chosen at every call: torchao's quantize_ on an injected model swaps the weight in place."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    lin = _linear()
    layer = MoLoRALinear(lin, E, R, implementation="torch")
    _randomize(layer)
    x = torch.randn(5, K)
    quantize_(layer, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: m is lin)
    assert runs_own_forward(layer.base)
    w = layer.base.weight.dequantize()
    want = ops.molora_linear(x, w, layer.lora_a, layer.lora_b, layer.router, scale=layer.scale, bias=lin.bias,
                             implementation="reference")  # fmt: skip
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def _quantize_decoder(model: nn.Module) -> nn.Module:
    """Every linear of the decoder layers (not the LM head) as an nf4 Linear4bit with the same weights."""
    for name, module in list(model.named_modules()):
        for attr, child in list(module.named_children()):
            if type(child) is nn.Linear and ".layers." in f"{name}.{attr}.":
                q = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=child.bias is not None,
                    compute_dtype=torch.float32, quant_type="nf4",
                )  # fmt: skip
                q.load_state_dict(child.state_dict())
                setattr(module, attr, q.to("cpu"))
    return model


def _dequantized_twin(quantized: nn.Module, plain: nn.Module) -> nn.Module:
    """``plain`` (same architecture) with each Linear4bit of ``quantized`` as an nn.Linear of its dequantized
    weight."""
    modules = dict(quantized.named_modules())
    for name, module in list(plain.named_modules()):
        for attr, child in list(module.named_children()):
            q = modules.get(f"{name}.{attr}" if name else attr)
            if isinstance(q, bnb.nn.Linear4bit):
                with torch.no_grad():
                    child.weight.copy_(bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state))
    return plain


@pytest.mark.parametrize("method", ["mov", "molora"])
def test_inject_into_an_nf4_llama_equals_the_dequantized_model(method):
    """pemoe.inject on a Llama whose decoder linears are bitsandbytes nf4: logits and every adapter gradient
    equal the same adapters on the model with the dequantized weights (float32, within the rule's atol)."""
    import copy

    from pemoe.adapters import MoLoRAConfig, MoVConfig, adapter_state_dict, inject, load_adapter_state_dict
    from tests import decoder_tiny

    plain = decoder_tiny.decoder("llama")
    quantized = _quantize_decoder(copy.deepcopy(plain))
    twin = _dequantized_twin(quantized, copy.deepcopy(plain))
    config = MoVConfig(num_experts=3) if method == "mov" else MoLoRAConfig(num_experts=2, rank=4)
    inject(quantized, config)
    inject(twin, config)
    if method == "mov":  # nf4 linears: the MLP keeps its own forward (the MoV site wraps act_fn); the twin fuses
        from pemoe.placements import FusedGatedMLP, MoVActivation

        assert isinstance(quantized.model.layers[0].mlp.act_fn, MoVActivation)
        assert isinstance(twin.model.layers[0].mlp, FusedGatedMLP)
    with torch.no_grad():
        for p in adapter_state_dict(quantized).values():
            p.add_(0.3 * torch.randn_like(p))
    load_adapter_state_dict(twin, {k: v.detach() for k, v in adapter_state_dict(quantized).items()})
    trainable = {n for n, p in quantized.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1] in ("experts", "router", "lora_a", "lora_b") for n in trainable)
    ids = decoder_tiny.ids(plain)

    def logits_and_grads(model):
        out = model(input_ids=ids).logits
        params = adapter_state_dict(model)
        return out, dict(zip(params, torch.autograd.grad(out.square().mean(), list(params.values())), strict=True))

    got, got_grads = logits_and_grads(quantized)
    want, want_grads = logits_and_grads(twin)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for key, grad in want_grads.items():
        torch.testing.assert_close(got_grads[key], grad, rtol=1e-3, atol=1e-6, msg=key)


class _WrongDtypeLinear(nn.Linear):
    """A linear that runs its own forward and returns float64 for float32 input."""

    def forward(self, x):
        return super().forward(x).double()


@pytest.mark.parametrize("layer", [MoLoRALinear, MoVLinear])
def test_a_base_output_of_an_unexpected_dtype_is_refused(layer):
    base = _WrongDtypeLinear(K, N).requires_grad_(False)
    wrapped = layer(base, 2, 4) if layer is MoLoRALinear else layer(base, 4, 2)
    with pytest.raises(TypeError, match=r"_WrongDtypeLinear returned torch.float64 for torch.float32 input"):
        wrapped(torch.randn(3, K))
