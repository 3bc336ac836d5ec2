"""What the ``"torch"`` autograd Functions keep for the backward (pemoe.ops.mov / pemoe.ops.molora).

Values and gradients of these ops are checked against the reference in tests/test_ops.py; here: the
fused FFN site (activation inside :class:`MoVActFunction`) equals act followed by :class:`MoVFunction`
bit for bit while keeping one [T, F] tensor less; MoV keeps only h (the router softmax is recomputed);
MoLoRA keeps only x, its U|logits GEMM output and the parameters (the softmax is recomputed), and
when that GEMM is the base GEMM's extra columns, copies of U and the logits rather than the output.
"""

from __future__ import annotations

import sys

import pytest
import torch

from pemoe import ops, reference
from pemoe.ops.molora import FUSED_COLUMNS_MIN_TOKENS as MOLORA_FUSED_MIN_TOKENS
from pemoe.ops.molora import MoLoRAFunction
from pemoe.ops.mov import ACTIVATION_GRADS, MoVActFunction, MoVFunction

mov_module = sys.modules["pemoe.ops.mov"]  # the module (pemoe.ops.mov is also the op's name)


def _saved_storages(fn, exclude=()):
    """{storage data_ptr: nbytes} of what autograd saves while running fn(), minus ``exclude``."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return seen, out


def test_every_activation_has_a_gradient():
    assert set(ACTIVATION_GRADS) == set(reference.ACTIVATIONS)


@pytest.mark.parametrize("activation", sorted(reference.ACTIVATIONS))
@pytest.mark.parametrize("top_k", [None, 2])
def test_fused_activation_site_equals_act_then_mov_bitwise(activation, top_k):
    torch.manual_seed(0)
    t, f, e = 37, 56, 5
    z = torch.randn(t, f, requires_grad=True)
    router = (0.3 * torch.randn(f, e)).requires_grad_()
    experts = (1 + 0.3 * torch.randn(1, e, f)).requires_grad_()
    dy = torch.randn(t, f)
    leaves = (z, router, experts)

    def grads(y):
        return torch.autograd.grad(y, leaves, dy)

    fused = MoVActFunction.apply(z, router, experts, None, top_k, False, activation)
    h = reference.ACTIVATIONS[activation](z)
    unfused = MoVFunction.apply(h, None, None, router, experts, None, top_k, False)
    assert torch.equal(fused, unfused)
    for got, want, name in zip(grads(fused), grads(unfused), ("z", "router", "experts"), strict=True):
        assert torch.equal(got, want), name


@pytest.mark.parametrize("gated", [True, False])
def test_mov_ffn_keeps_the_pre_activation_not_the_activation(gated):
    torch.manual_seed(0)
    t, m, f, e = 29, 24, 40, 6
    x = torch.randn(t, m, requires_grad=True)
    wi_0, wi_1, wo = torch.randn(f, m), torch.randn(f, m), torch.randn(m, f)
    router = (0.3 * torch.randn(f, e)).requires_grad_()
    experts = (1 + 0.3 * torch.randn(1, e, f)).requires_grad_()
    params = (x, wi_0, wi_1, wo, router, experts)

    def fused():
        return ops.mov_ffn(x, wi_0, wo, router, experts, wi_1=wi_1 if gated else None, implementation="torch")

    def unfused():  # what mov_ffn's torch path did before: act, then MoVFunction on act(z)
        a = reference.ACTIVATIONS["gelu_new"](torch.nn.functional.linear(x, wi_0))
        a = MoVFunction.apply(a, None, None, router, experts, None, None, False)
        if gated:
            a = a * torch.nn.functional.linear(x, wi_1)
        return torch.nn.functional.linear(a, wo)

    got, y = _saved_storages(fused, params)
    want, y_ref = _saved_storages(unfused, params)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    assert sum(want.values()) - sum(got.values()) == t * f * 4  # act(z) [T, F] float32 is no longer kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [33, 513])
def test_molora_keeps_x_its_shrink_output_and_the_logits_only(dtype, t):
    """513 tokens: float32 x runs the shrink and router as extra columns of the base GEMM (pemoe.ops.molora.
    FUSED_COLUMNS_MIN_TOKENS); U and the logits are then saved as copies of their own, so the [T, N + …]
    output that y shares is not kept."""
    assert 33 < MOLORA_FUSED_MIN_TOKENS <= 513
    torch.manual_seed(0)
    k, n, e, r = 40, 24, 5, 3
    x = torch.randn(t, k, dtype=dtype, requires_grad=True)
    weight = torch.randn(n, k, dtype=dtype)
    lora_a = torch.randn(e, k, r, requires_grad=True)
    lora_b = torch.randn(e, r, n, requires_grad=True)
    router = torch.randn(k, e, requires_grad=True)
    params = (x, weight, lora_a, lora_b, router)
    saved, y = _saved_storages(
        lambda: MoLoRAFunction.apply(x, weight, None, None, lora_a, lora_b, router, None, 4.0, None, False), params
    )
    if dtype == torch.bfloat16:  # U float32 (d router's softmax backward needs it exact); float32 logits [E, T]
        assert sorted(saved.values()) == sorted([t * e * r * 4, t * e * 4])
    elif t < MOLORA_FUSED_MIN_TOKENS:  # one GEMM output x @ [A_cat | router | 0]: U and the logits share it
        assert sorted(saved.values()) == [t * 32 * 4]  # e·r + e = 20 columns, padded to 32
    else:
        assert y.stride() == (48, 1)  # n + e·r + e = 44 columns, padded to 48
        assert sorted(saved.values()) == sorted([t * e * r * 4, t * e * 4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("e", [1, 7])
def test_mov_linear_keeps_only_the_projection(dtype, e):
    torch.manual_seed(0)
    t, k, g, d = 31, 24, 3, 8
    x = torch.randn(t, k, dtype=dtype, requires_grad=True)
    weight = torch.randn(g * d, k, dtype=dtype)
    router = torch.randn(d, e, requires_grad=True) if e > 1 else None
    experts = torch.randn(g, e, d, requires_grad=True)
    params = tuple(p for p in (x, weight, router, experts) if p is not None)
    saved, _ = _saved_storages(lambda: ops.mov_linear(x, weight, router, experts, implementation="torch"), params)
    assert list(saved.values()) == [t * g * d * x.element_size()]  # h = x Wᵀ; no [G, E, T] probabilities


@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize("fused_act", [False, True])
def test_kept_and_recomputed_probabilities_give_the_same_gradients(monkeypatch, top_k, fused_act):
    torch.manual_seed(0)
    t, g, d, e = 23, 2, 12, 7
    h = torch.randn(t, g * d, requires_grad=True)
    router = (0.5 * torch.randn(d, e)).requires_grad_()
    experts = (1 + 0.3 * torch.randn(g, e, d)).requires_grad_()
    dy = torch.randn(t, g * d)

    def run():
        if fused_act:
            return MoVActFunction.apply(h, router, experts, None, top_k, False, "gelu_new")
        return MoVFunction.apply(h, None, None, router, experts, None, top_k, False)

    results = {}
    for keep_min_dim in (1, 10**9):  # always keep p_soft / always recompute it
        monkeypatch.setattr(mov_module, "KEEP_PROBS_MIN_DIM", keep_min_dim)
        saved, y = _saved_storages(run, (h, router, experts))
        results[keep_min_dim] = (sum(saved.values()), y, torch.autograd.grad(y, (h, router, experts), dy))
    (kept_bytes, y_keep, g_keep), (rec_bytes, y_rec, g_rec) = results[1], results[10**9]
    assert kept_bytes - rec_bytes == g * e * t * 4  # p_soft [G, E, T] float32
    assert torch.equal(y_keep, y_rec)
    for a, b in zip(g_keep, g_rec, strict=True):
        assert torch.equal(a, b)
