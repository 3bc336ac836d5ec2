"""Every benchmark provider computes the op it claims to: outputs vs pemoe's reference on tiny shapes.

A benchmark that times the wrong computation is worse than none; this holds the floor-free providers
(pemoe implementations, the authors' einsum formulation, PEFT's IA3/LoRA at E = 1) to the reference.
"""

from __future__ import annotations

import pytest
import torch

from pemoe.bench import harness, molora_linear, mov_ffn, mov_linear
from tests.helpers import assert_within_rule

TINY = {
    "mov_linear": {"T": 9, "K": 48, "N": 64, "G": 4},
    "molora_linear": {"T": 9, "K": 48, "N": 40, "r": 4},
    "mov_ffn": {"T": 9, "M": 24, "F": 56},
}
BENCHES = {b.OP: b for b in (mov_linear, molora_linear, mov_ffn)}
CASES = [
    (op, p, e)
    for op, module in BENCHES.items()
    for p in module.PROVIDERS
    for e in (1, 5)
    if p not in (harness.FLOOR, "reference", "pemoe-triton", "matmuls-only")
    and harness.shape_skip_reason(module.PROVIDERS[p], dict(TINY[op], E=e)) is None
]


@pytest.mark.parametrize(("op", "provider", "e"), CASES, ids=[f"{op}-{p}-E{e}" for op, p, e in CASES])
def test_provider_matches_reference(op, provider, e):
    module = BENCHES[op]
    shape = dict(TINY[op], E=e)
    inputs = module.make_inputs(shape, torch.float32, torch.device("cpu"))
    inputs64 = {k: v.double() for k, v in inputs.items()}
    out = module.PROVIDERS[provider].forward(inputs)
    ref = module.PROVIDERS["reference"].forward(inputs)
    truth = module.PROVIDERS["reference"].forward(inputs64)
    assert_within_rule(out.detach(), ref.detach(), truth.detach(), torch.float32, f"{op}/{provider}")


def test_peft_providers_are_covered():
    covered = {(op, p) for op, p, _ in CASES}
    assert {("mov_linear", "peft-ia3"), ("molora_linear", "peft-lora"), ("mov_ffn", "peft-ia3")} <= covered


@pytest.mark.parametrize("e", [1, 5])
def test_molora_matmuls_only_yardstick(e):
    """``matmuls-only`` (not MoLoRA: no routing) is x Wᵀ + b + Σ_e x A_e B_e, outputs and gradients in float64."""
    shape = dict(TINY["molora_linear"], E=e)
    inputs = {k: v.double().requires_grad_() for k, v in molora_linear.make_inputs(shape, torch.float32, "cpu").items()}
    out = molora_linear.matmuls_only(inputs)
    x, a, b = inputs["x"], inputs["lora_a"], inputs["lora_b"]
    expected = x @ inputs["weight"].t() + inputs["bias"] + sum(x @ a[j] @ b[j] for j in range(e))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(out)
    wrt = [x, a, b]
    got = torch.autograd.grad(out, wrt, grad_out)
    want = torch.autograd.grad(expected, wrt, grad_out)
    for name, g1, g2 in zip(("x", "lora_a", "lora_b"), got, want, strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12, msg=f"d{name}")
