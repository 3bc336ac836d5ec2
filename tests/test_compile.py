"""torch.compile(fullgraph=True) over the fused ops, layers and a T5: no graph break, same values as eager.

The Triton implementation enters autograd as torch.library custom ops (``pemoe::triton_mov_linear``,
``pemoe::triton_mov_ffn``, ``pemoe::triton_molora_linear`` and their ``_backward`` ops): Dynamo and AOTAutograd
trace them through their fake kernels (shapes from shapes, no launch, no read of autotune state) and the
registered autograd formula; the kernels run (here, in the Triton interpreter) when the compiled graph runs.
The ``"torch"`` implementation is plain aten ops inside an autograd Function and is traced through.

``aot_eager`` runs the traced forward and backward graphs with the same kernels as eager, so values and
gradients are compared exactly.
"""

from __future__ import annotations

import pytest
import torch

from pemoe import ops
from pemoe.adapters import MoLoRAConfig, MoVConfig, inject
from pemoe.kernels.triton import interpreter
from pemoe.layers import MoLoRALinear, MoVLinear
from tests import t5_tiny
from tests.test_ops import MoLoRALinearCases, MoVFFNCases, MoVLinearCases

pytestmark = pytest.mark.skipif(not interpreter.INTERPRET, reason="needs TRITON_INTERPRET=1 (no GPU)")

CUSTOM_OPS = {
    "mov_linear": "triton_mov_linear",
    "mov_ffn": "triton_mov_ffn",
    "molora_linear": "triton_molora_linear",
}


class _MoVLinear(MoVLinearCases):
    groups, dim = 2, 16  # the Triton kernels take head widths 16, 32, 64, 128


def _inputs(op: str, experts: int = 4, sentence: bool = False) -> dict:
    """Inputs of ``op`` with 9 tokens (2 × 9 with sentence routing, the router reading [2, 9] vectors)."""
    cases = {"mov_linear": _MoVLinear, "mov_ffn": MoVFFNCases, "molora_linear": MoLoRALinearCases}[op]()
    if op != "mov_ffn":
        return cases.inputs(9, experts, sentence=sentence)
    inputs = cases.inputs(9, experts)
    if sentence:
        inputs["x"] = torch.randn(2, 9, inputs["x"].shape[-1], requires_grad=True)
        inputs["router_input"] = torch.randn(2, 9, requires_grad=True)
        inputs["router"] = torch.randn(9, experts, requires_grad=True)
    return inputs


class GraphCapture:
    """A torch.compile backend that keeps the forward and backward graphs AOTAutograd hands to aot_eager."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []
        self.dynamo_graphs = 0

    def __call__(self, gm, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        self.dynamo_graphs += 1

        def keep(graph, _inputs):
            self.graphs.append(graph)
            return make_boxed_func(graph.forward)

        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(gm, example_inputs)

    def targets(self) -> set[str]:
        return {str(n.target) for g in self.graphs for n in g.graph.nodes if n.op == "call_function"}


def _tensors(inputs: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad}


def _grads(out: torch.Tensor, leaves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    grads = torch.autograd.grad(out.float().square().sum(), list(leaves.values()))
    return dict(zip(leaves, grads, strict=True))


@pytest.mark.parametrize("routing", ["token", "sentence", "ia3"])
@pytest.mark.parametrize("op", list(CUSTOM_OPS))
def test_triton_op_compiles_fullgraph_as_custom_ops(op, routing):
    inputs = _inputs(op, experts=1 if routing == "ia3" else 4, sentence=routing == "sentence")

    def f(**kw):
        return getattr(ops, op)(**kw, implementation="triton")

    eager = f(**inputs)
    eager_grads = _grads(eager, _tensors(inputs))
    capture = GraphCapture()
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=capture)(**inputs)
    compiled_grads = _grads(compiled, _tensors(inputs))
    assert capture.dynamo_graphs == 1
    name = CUSTOM_OPS[op]
    assert {f"pemoe.{name}.default", f"pemoe.{name}_backward.default"} <= capture.targets(), capture.targets()
    assert torch.equal(compiled, eager)
    for key, grad in eager_grads.items():
        assert torch.equal(compiled_grads[key], grad), key


@pytest.mark.parametrize("op", list(CUSTOM_OPS))
def test_tracing_never_launches_or_reads_autotune_state(op, monkeypatch):
    """torch.export traces with fake tensors only: with every launcher and every autotuner's best_config made
    to raise, the export still succeeds and its graph calls the custom op."""
    from pemoe.kernels.triton import molora_linear, mov_ffn, mov_linear

    def refuse(*_a, **_k):
        raise AssertionError("a kernel was launched while tracing")

    monkeypatch.setattr(mov_linear, "mov_linear_forward", refuse)
    monkeypatch.setattr(mov_ffn, "_forward", refuse)
    monkeypatch.setattr(molora_linear, "molora_forward", refuse)
    for module in (mov_linear, mov_ffn, molora_linear):
        for tuner in interpreter.autotuners(module):
            monkeypatch.setattr(type(tuner), "best_config", property(refuse), raising=False)
    inputs = _inputs(op)
    tensors = {k: v.detach() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    options = {k: v for k, v in inputs.items() if not isinstance(v, torch.Tensor)}

    class Op(torch.nn.Module):
        def forward(self, **kw):
            return getattr(ops, op)(**kw, **options, implementation="triton")

    with torch.no_grad():
        exported = torch.export.export(Op(), (), tensors)
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert f"pemoe.{CUSTOM_OPS[op]}.default" in targets, targets


def _layer_stack(implementation: str) -> torch.nn.Module:
    torch.manual_seed(0)
    k, n = 32, 32
    stack = torch.nn.Sequential(
        MoVLinear(torch.nn.Linear(k, n), 2, 4, implementation=implementation),
        torch.nn.GELU(),
        MoLoRALinear(torch.nn.Linear(n, n), 4, 4, implementation=implementation),
        torch.nn.GELU(),
        MoVLinear(torch.nn.Linear(n, n, bias=False), 2, 1, implementation=implementation),  # (IA)3
        MoLoRALinear(torch.nn.Linear(n, k), 1, 2, implementation=implementation),  # LoRA
    )
    with torch.no_grad():  # move the adapters off their identity / zero initialisation
        for p in stack.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return stack


@pytest.mark.parametrize("implementation", ["torch", "triton"])
def test_layer_stack_compiles_fullgraph(implementation):
    stack = _layer_stack(implementation)
    x = torch.randn(2, 5, 32, requires_grad=True)
    leaves = {"x": x} | {n: p for n, p in stack.named_parameters() if p.requires_grad}
    eager = stack(x)
    eager_grads = _grads(eager, leaves)
    capture = GraphCapture()
    torch._dynamo.reset()
    compiled = torch.compile(stack, fullgraph=True, backend=capture)(x)
    compiled_grads = _grads(compiled, leaves)
    assert capture.dynamo_graphs == 1
    if implementation == "triton":
        assert {"pemoe.triton_mov_linear.default", "pemoe.triton_molora_linear.default"} <= capture.targets()
    assert torch.equal(compiled, eager)
    for key, grad in eager_grads.items():
        assert torch.equal(compiled_grads[key], grad), key


@pytest.mark.parametrize(
    "config",
    [
        MoVConfig(num_experts=3),
        pytest.param(MoVConfig(num_experts=3, router_input="sentence"), marks=pytest.mark.slow),
        MoLoRAConfig(num_experts=2, rank=2),
    ],
    ids=["mov", "mov-sentence", "molora"],
)
@pytest.mark.parametrize("implementation", ["torch", "triton"])
def test_t5_training_loss_compiles_fullgraph(implementation, config):
    """pemoe's T5 (v1.1: the fused gated FFN) with adapters: the loss and every adapter gradient of a compiled
    training step equal eager's."""
    import dataclasses

    from pemoe.adapters import sentence_routing

    model = t5_tiny.pemoe_t5("v1.1", d_kv=16)  # head width 16: a Triton mov_linear head width
    inject(model, dataclasses.replace(config, implementation=implementation))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    ids, mask, dec, labels = t5_tiny.batch()
    leaves = {n: p for n, p in model.named_parameters() if p.requires_grad}
    sentence = config.router_input == "sentence"
    router_input = torch.randn(ids.shape[0], model.config.d_model) if sentence else None

    def loss(m):
        if router_input is None:
            return m(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=labels).loss
        with sentence_routing(m, router_input):
            return m(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=labels).loss

    eager = loss(model)
    eager_grads = dict(zip(leaves, torch.autograd.grad(eager, list(leaves.values())), strict=True))
    capture = GraphCapture()
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend=capture)(model)
    compiled_grads = dict(zip(leaves, torch.autograd.grad(compiled, list(leaves.values())), strict=True))
    assert capture.dynamo_graphs == 1
    if implementation == "triton":
        custom = {t for t in capture.targets() if t.startswith("pemoe.")}
        mov = isinstance(config, MoVConfig)
        expected = {"triton_mov_linear", "triton_mov_ffn"} if mov else {"triton_molora_linear"}
        assert {f"pemoe.{n}.default" for n in expected} <= custom, custom
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    for key, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[key], grad, rtol=0, atol=0, msg=key)
